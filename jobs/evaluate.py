"""spark-submit entry point of the evaluate stage: `spark-submit jobs/evaluate.py --config FILE [--run-id ID]` (see --help)."""
import sys

from synth.runner import main

if __name__ == "__main__":
    sys.exit(main(stages=("evaluate",), prog="jobs/evaluate.py"))
