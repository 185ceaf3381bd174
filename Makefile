# Two commands do all set-up on a fresh machine (Python 3.11, Java 17):
#   make demo   runs the whole pipeline on the embedded default (local[*], simulated input)
#   make test   runs the test suite
# Both create .venv on first use and install the pinned stack (pyproject.toml) into it.
VENV ?= .venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test benchmark package

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(INSTALLED)

demo: $(INSTALLED)
	$(PY) -m synth all $(ARGS)

test: $(INSTALLED)
	$(PY) -m pytest $(ARGS)

benchmark: $(INSTALLED)
	$(PY) -m pytest -m benchmark -s $(ARGS)

package: $(INSTALLED)
	deploy/package.sh
