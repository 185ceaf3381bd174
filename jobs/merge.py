"""spark-submit entry point of the merge stage: `spark-submit jobs/merge.py --config FILE [--run-id ID]` (see --help)."""
import sys

from synth.runner import main

if __name__ == "__main__":
    sys.exit(main(stages=("merge",), prog="jobs/merge.py"))
