"""spark-submit entry point of the clean stage: `spark-submit jobs/clean.py --config FILE [--run-id ID]` (see --help)."""
import sys

from synth.runner import main

if __name__ == "__main__":
    sys.exit(main(stages=("clean",), prog="jobs/clean.py"))
