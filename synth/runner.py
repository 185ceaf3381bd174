"""Running stages: the shared command line, the per-run context, and the run ledger.

A stage is a module in `synth/` with a `run(ctx: StageContext) -> dict[str, int]` function that reads
tables through `ctx.read`, writes them through `ctx.write`, and returns its row counts. The runner
records what it read and wrote in the `pipeline_runs` ledger as the stage's last commit, so a
ledger row means the stage's outputs all landed, and running the same run id again is a no-op.
"""
from __future__ import annotations

import datetime as dt
import importlib
import logging
import sys
import time
from dataclasses import dataclass, field

from pyspark.sql import DataFrame, SparkSession

import schemas
from synth import config
from synth.config import STAGES, Config
from synth.lake import ArrowWriter, Commit, Lake, Snapshot
from synth.spark import start_python_workers

log = logging.getLogger("synth")


@dataclass
class StageContext:
    cfg: Config
    spark: SparkSession
    lake: Lake
    stage: str
    force: bool = False
    input_versions: dict[str, int] = field(default_factory=dict)
    output_versions: dict[str, int] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.cfg.run.id

    @property
    def app_id(self) -> str:
        return f"{self.stage}:{self.run_id}"

    @property
    def _metadata(self) -> dict[str, str]:
        """What every commit of this stage run records about itself."""
        return {"synth.run_id": self.run_id, "synth.stage": self.stage}

    def read(self, table: str, version: int | None = None) -> Snapshot:
        """Read `table` pinned at one version, recorded in the ledger as this stage's input."""
        snapshot = self.lake.read(table, version)
        self.input_versions[table] = snapshot.version
        return snapshot

    def write(self, df: DataFrame, table: str, replace: dict[str, str] | None = None) -> Commit:
        commit = self.lake.write(df, table, app_id=self.app_id, replace=replace, metadata=self._metadata)
        self.output_versions[table] = commit.version
        return commit

    def write_rows(self, rows: list[dict], table: str, replace: dict[str, str] | None = None) -> Commit:
        """Commit a few rows built on the driver (see Lake.write_rows)."""
        commit = self.lake.write_rows(rows, table, app_id=self.app_id, replace=replace, metadata=self._metadata)
        self.output_versions[table] = commit.version
        return commit

    def commit_files(self, writer: ArrowWriter, adds: list[dict], replace: dict[str, str] | None = None) -> Commit:
        """Commit what an Arrow stage's executors wrote with `writer` (see Lake.arrow_writer)."""
        commit = self.lake.commit_files(writer, adds, app_id=self.app_id, replace=replace, metadata=self._metadata)
        self.output_versions[writer.table] = commit.version
        return commit


def run_stage(stage: str, cfg: Config, spark: SparkSession, lake: Lake, force: bool = False) -> dict[str, int]:
    """Run one stage for cfg.run.id unless that run already committed it; return its counts."""
    ctx = StageContext(cfg, spark, lake, stage, force)
    done = lake.committed("pipeline_runs", ctx.app_id)
    if done is not None and not force:
        row = (lake.read("pipeline_runs", done).df
               .where(f"stage = '{stage}' AND run_id = '{ctx.run_id}'").first())
        log.info("%s: run %s already committed (pipeline_runs version %d); nothing to do "
                 "(--force recomputes it)", stage, ctx.run_id, done)
        return dict(row.counts or {}) if row else {}
    log.info("%s: starting run %s", stage, ctx.run_id)
    started = dt.datetime.now(dt.timezone.utc)
    clock = time.time()
    module = importlib.import_module(f"synth.{stage}")
    spark.sparkContext.setJobGroup(f"synth-{stage}", f"{stage} stage, run {ctx.run_id}")
    start_python_workers(spark, [module.__name__, "pyarrow.compute", "pyarrow.parquet"])
    counts = {k: int(v) for k, v in (module.run(ctx) or {}).items()}
    ledger = {"started_at": started, "finished_at": dt.datetime.now(dt.timezone.utc),
              "input_versions": ctx.input_versions, "output_versions": ctx.output_versions, "counts": counts,
              "artifacts": ctx.artifacts, "config_json": cfg.to_json(), "stage": stage, "run_id": ctx.run_id}
    lake.write_rows([ledger], "pipeline_runs", app_id=ctx.app_id, replace={"stage": stage, "run_id": ctx.run_id},
                    metadata={"synth.run_id": ctx.run_id, "synth.stage": stage})
    log.info("%s: done in %.1f s; read %s; wrote %s; counts %s", stage, time.time() - clock,
             ctx.input_versions or "-", ctx.output_versions or "-", counts)
    return counts


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("py4j", "petastorm", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None, stages: tuple[str, ...] | None = None, prog: str = "synth") -> int:
    """Command line of every job: `stages` fixed for a one-stage job, chosen on the line otherwise."""
    description = ("Run stages of the nightly synthetic-data pipeline: " + " -> ".join(STAGES) + "."
                   if stages is None else f"Run the {stages[0]} stage of the nightly synthetic-data pipeline.")
    parser = config.build_parser(prog, description, STAGES if stages is None else ())
    args = parser.parse_args(argv)
    try:
        cfg = config.from_args(args)
    except config.ConfigError as exc:
        parser.error(str(exc))
    requested = set(getattr(args, "stages", None) or ["all"])
    unknown = requested - set(STAGES) - {"all"}
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)} or all")
    chosen = stages or (STAGES if "all" in requested else tuple(s for s in STAGES if s in requested))
    setup_logging()
    from synth.spark import build_session

    spark = build_session(cfg)
    lake = Lake(spark, cfg.lake.root, cfg.lake.engine)
    clock = time.time()
    for stage in chosen:
        run_stage(stage, cfg, spark, lake, force=args.force)
    log.info("run %s finished in %.1f s; tables under %s", cfg.run.id, time.time() - clock, lake.root)
    width = max(map(len, schemas.all_tables()))
    for table in schemas.all_tables():
        version = lake.version(table)
        if version is not None:
            print(f"  {table:<{width}} version {version:<4} {lake.uri(table)}")
    report = lake.read("pipeline_runs").df.where(
        f"stage = 'evaluate' AND run_id = '{cfg.run.id}'").select("artifacts").first() \
        if lake.exists("pipeline_runs") else None
    if report and report.artifacts and "report" in report.artifacts:
        print(f"  {'report':<{width}} {report.artifacts['report']}")
    return 0
