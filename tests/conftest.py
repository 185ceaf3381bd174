"""One SparkSession for the whole test session, and a fresh lake per test that asks for one."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def spark():
    os.environ["PYSPARK_PYTHON"] = sys.executable
    from synth import config
    from synth.spark import build_session

    session = build_session(config.load(overrides={"spark.master": "local[2]", "spark.shuffle_partitions": 4}))
    yield session
    session.stop()


@pytest.fixture
def make_cfg(tmp_path):
    """Build a test configuration under tmp_path: make_cfg(**{"train.max_steps": 5})."""
    from synth import config

    def build(**overrides):
        base = {
            "run.id": "test",
            "lake.root": str(tmp_path / "lake"),
            "input.path": str(tmp_path / "raw"),
            "clean.pseudonym_key_file": str(tmp_path / "secrets" / "key"),
            "train.checkpoint_dir": str(tmp_path / "checkpoints"),
            "evaluate.report_dir": str(tmp_path / "reports"),
            "spark.master": "local[2]",
            "spark.shuffle_partitions": 4,
        }
        base.update(overrides)
        return config.load(overrides=base)

    return build


@pytest.fixture
def lake(spark, tmp_path):
    from synth.lake import Lake

    return Lake(spark, str(tmp_path / "lake"))


def shared_data(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared sample {path} is not present")
    return path
