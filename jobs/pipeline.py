"""spark-submit entry point of the whole nightly pipeline, or of chosen stages in order (see --help)."""
import sys

from synth.runner import main

if __name__ == "__main__":
    sys.exit(main(prog="jobs/pipeline.py"))
