"""spark-submit entry point of the train stage: `spark-submit jobs/train.py --config FILE [--run-id ID]` (see --help)."""
import sys

from synth.runner import main

if __name__ == "__main__":
    sys.exit(main(stages=("train",), prog="jobs/train.py"))
