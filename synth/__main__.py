"""`python -m synth [STAGE ...]`: run pipeline stages on the configured master (local[*] by default)."""
import sys

from synth.runner import main

sys.exit(main(prog="python -m synth"))
