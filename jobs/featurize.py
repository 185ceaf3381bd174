"""spark-submit entry point of the featurize stage: `spark-submit jobs/featurize.py --config FILE [--run-id ID]` (see --help)."""
import sys

from synth.runner import main

if __name__ == "__main__":
    sys.exit(main(stages=("featurize",), prog="jobs/featurize.py"))
