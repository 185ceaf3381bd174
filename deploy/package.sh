#!/usr/bin/env bash
# Build what a cluster needs: dist/synth.zip (the synth and schemas packages, for --py-files)
# and a wheel (for images or cluster libraries that pip-install it).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf dist && mkdir -p dist
python3 - <<'PY'
import pathlib, zipfile
with zipfile.ZipFile("dist/synth.zip", "w", zipfile.ZIP_DEFLATED) as archive:
    for package in ("synth", "schemas"):
        for path in sorted(pathlib.Path(package).rglob("*")):
            if path.suffix in (".py", ".yaml"):
                archive.write(path)
print("dist/synth.zip")
PY
"${PY:-.venv/bin/python}" -m pip wheel --quiet --no-deps --wheel-dir dist .
ls -1 dist
