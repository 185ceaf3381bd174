"""Building the SparkSession every stage runs on."""
from __future__ import annotations

import logging
import os
import sys
import threading

from pyspark import InheritableThread, SparkConf, SparkContext
from pyspark.sql import SparkSession

from synth.config import Config, ConfigError

log = logging.getLogger(__name__)


JIT_HUGE_METHODS = "-XX:-DontCompileHugeMethods"

# spark.worker_memory = reuse. A worker builds and drops tables of hundreds of MB per task; by default
# jemalloc hands freed pages back to the OS within a second and glibc maps each block above 32 MB
# apart, so every new table faulted its pages in again (1.9M minor faults and 5.5 s of system time
# per 1.1M events cleaned and featurized in one process, against 0.5M and 1.3 s with these).
REUSE_MEMORY_ENV = {
    "ARROW_DEFAULT_MEMORY_POOL": "system",
    "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295",
}


WORKER_DAEMON = "synth._daemon"


def worker_env(cfg: Config) -> dict[str, str]:
    """The environment spark.worker_memory asks for in the Python workers, less the variables the
    Spark configuration already sets for the executors (spark-submit --conf spark.executorEnv.X)."""
    if cfg.spark.worker_memory == "default":
        return {}
    if cfg.spark.worker_memory != "reuse":
        raise ConfigError(f"spark.worker_memory must be reuse or default, got {cfg.spark.worker_memory!r}")
    return {name: value for name, value in REUSE_MEMORY_ENV.items() if not _configured(f"spark.executorEnv.{name}")}


def _configured(key: str) -> bool:
    """Whether the Spark configuration the JVM was started with (spark-submit, PYSPARK_SUBMIT_ARGS,
    spark-defaults.conf) sets `key`."""
    SparkContext._ensure_initialized()  # so that SparkConf() sees what the JVM was given
    return SparkConf().contains(key)


def _start_driver_jvm(cfg: Config) -> None:
    """Start the driver's JVM with the options only its launch can take: driver memory and Java
    options. It must start before anything asks Spark's configuration (_configured does), or it starts
    without them, with a 1 GB heap. spark-submit arguments in PYSPARK_SUBMIT_ARGS come later on the
    launch command and win."""
    if SparkContext._gateway is not None or "PYSPARK_GATEWAY_PORT" in os.environ:
        return
    launch = SparkConf(loadDefaults=False).set("spark.driver.memory", cfg.spark.driver_memory)
    launch.set("spark.driver.extraJavaOptions", cfg.spark.driver_java_options)
    SparkContext._ensure_initialized(conf=launch)


def build_session(cfg: Config) -> SparkSession:
    """Return the active SparkSession (spark-submit) or start one for `cfg.spark.master`.

    Under spark-submit the session, master and resources come from the submit command; the
    pipeline only adds the settings its stages rely on (UTC time, shuffle width, Arrow).
    """
    # Python workers would otherwise start `python3` from PATH, which lacks the virtualenv's packages.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    _start_driver_jvm(cfg)
    builder = (
        SparkSession.builder.appName(cfg.spark.app_name)
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", str(cfg.spark.shuffle_partitions))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        # Progress bars help at a terminal and only litter scheduler logs.
        .config("spark.ui.showConsoleProgress", str(sys.stderr.isatty()).lower())
    )
    for name, value in worker_env(cfg).items():
        builder = builder.config(f"spark.executorEnv.{name}", value)
    # spark-submit starts Python with a gateway to its JVM; its --master, resources and Java options
    # then win (deploy/submit-cluster.sh passes the JIT option below itself).
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        builder = builder.master(cfg.spark.master)
        # The clean stage's row checks generate Java methods above the JVM's 8,000-byte JIT limit, which
        # then run interpreted: parsing the raw lines took twice as long (5.1 s against 2.4 s for 505k
        # rows on one core). The driver's JVM got its options at its launch (spark.driver_java_options).
        builder = builder.config("spark.executor.extraJavaOptions", JIT_HUGE_METHODS)
        if cfg.spark.master.startswith("local") and not _configured("spark.shuffle.compress"):
            # Local shuffle files never cross a network, and the Arrow stages' shuffle payloads are
            # LZ4-compressed IPC already: compressing them again cost 5-8% of clean + featurize at 5M
            # events on one core (67.3 and 67.5 s without, 72.0 and 75.7 s with, runs interleaved).
            builder = builder.config("spark.shuffle.compress", "false")
        if cfg.spark.master.startswith("local") and not _configured("spark.python.daemon.module"):
            # pyspark.daemon without its 0.1 s of CPU per task on Python 3.10-3.11 (see synth._daemon).
            # Local workers import synth as the driver does; cluster workers may get it only with a
            # task's files (--py-files on standalone and Kubernetes), after their daemon started.
            builder = builder.config("spark.python.daemon.module", WORKER_DAEMON)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    for key, value in (("spark.sql.session.timeZone", "UTC"),
                       ("spark.sql.shuffle.partitions", str(cfg.spark.shuffle_partitions))):
        spark.conf.set(key, value)
    log.info("Spark %s, master %s, default parallelism %d",
             spark.version, spark.sparkContext.master, spark.sparkContext.defaultParallelism)
    return spark


def start_python_workers(spark: SparkSession, modules: list[str]) -> threading.Thread | None:
    """Start the executors' Python workers with `modules` imported, in a background job, once per
    SparkContext; returns the job's thread (None when the workers were started before).

    A session's first Python task pays for starting the workers' daemon, forking a worker and its
    imports: its first job took 1.7-1.9 s on local[1] and local[2], the next ones 0.1-0.2 s. Started
    as a stage begins, that runs on the executors while the driver lists and plans the input, and the
    stage's tasks then reuse the started workers (spark.python.worker.reuse)."""
    sc = spark.sparkContext
    if getattr(sc, "_synth_workers_started", False):
        return None
    sc._synth_workers_started = True
    slots = max(1, sc.defaultParallelism)

    def imported(_):
        import importlib

        for module in modules:
            importlib.import_module(module)
        return []

    def run():
        try:
            sc.setJobDescription("start the Python workers")
            sc.parallelize(range(slots), slots).mapPartitions(imported).collect()
        except Exception as exc:  # noqa: BLE001 - the stage's own tasks then fail with the real cause
            log.debug("starting the Python workers failed: %s", exc)

    thread = InheritableThread(target=run, name="start-python-workers", daemon=True)
    thread.start()
    return thread


def has_delta_jars(spark: SparkSession) -> bool:
    """True when the Delta Lake JVM classes are on the driver's classpath."""
    try:
        spark.sparkContext._jvm.java.lang.Class.forName("io.delta.tables.DeltaTable")
        return True
    except Exception:
        return False
