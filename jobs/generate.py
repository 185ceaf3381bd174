"""spark-submit entry point of the generate stage: `spark-submit jobs/generate.py --config FILE [--run-id ID]` (see --help)."""
import sys

from synth.runner import main

if __name__ == "__main__":
    sys.exit(main(stages=("generate",), prog="jobs/generate.py"))
