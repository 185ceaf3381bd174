import pytest

from synth import config


def test_defaults_load_and_every_option_has_help():
    cfg = config.load()
    helps = config.option_help()
    for section, keys in cfg.to_dict().items():
        for key in keys:
            assert helps.get(f"{section}.{key}"), f"{section}.{key} has no comment line in pipeline.yaml"
    assert cfg.lake.engine == "auto"


def test_help_lists_every_option_with_its_default(capsys):
    """--help formats every option's comment from pipeline.yaml, '%' signs in them included."""
    from synth.runner import main

    with pytest.raises(SystemExit) as stop:
        main(["--help"], prog="python -m synth")
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--spark.worker_memory VALUE" in text and "14% of clean + featurize time" in text
    assert "[default: reuse]" in text


def test_file_then_command_line_override(tmp_path):
    path = tmp_path / "nightly.yaml"
    path.write_text("train:\n  max_steps: 7\n  batch_size: 3\n")
    parser = config.build_parser("t", "test", config.STAGES)
    cfg = config.from_args(parser.parse_args(["--config", str(path), "--train.max_steps", "9", "--run-id", "r-1"]))
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.run.id) == (9, 3, "r-1")


def test_bad_options_are_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_stepz: 7\n")
    with pytest.raises(config.ConfigError, match="max_stepz"):
        config.load(path)
    parser = config.build_parser("t", "test")
    with pytest.raises(config.ConfigError, match="train.max_steps"):
        config.from_args(parser.parse_args(["--train.max_steps", "many"]))
    with pytest.raises(config.ConfigError, match="run id"):
        config.load(overrides={"run.id": "a/b"})


def test_worker_memory_reaches_the_python_workers(spark):
    import os

    from synth.spark import REUSE_MEMORY_ENV, worker_env

    seen = spark.sparkContext.parallelize([0], 1).map(
        lambda _: {name: os.environ.get(name) for name in REUSE_MEMORY_ENV}).collect()[0]
    assert seen == REUSE_MEMORY_ENV  # the test session is built with the default, reuse
    assert spark.sparkContext.parallelize([0], 1).map(
        lambda _: __import__("pyarrow").default_memory_pool().backend_name).collect() == ["system"]
    assert worker_env(config.load(overrides={"spark.worker_memory": "default"})) == {}
    with pytest.raises(config.ConfigError, match="spark.worker_memory"):
        worker_env(config.load(overrides={"spark.worker_memory": "recycle"}))


def test_the_driver_jvm_starts_with_the_configured_memory_and_java_options(spark):
    """Both can only be given when the JVM launches, which the first question about Spark's
    configuration used to do without them (a 1 GB heap whatever spark.driver_memory said)."""
    from synth.spark import JIT_HUGE_METHODS

    arguments = list(spark.sparkContext._jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments())
    defaults = config.load().spark
    assert f"-Xmx{defaults.driver_memory}" in arguments
    assert defaults.driver_java_options == JIT_HUGE_METHODS and JIT_HUGE_METHODS in arguments


def test_local_sessions_leave_shuffle_files_uncompressed(spark):
    # The Arrow stages' shuffle payloads are LZ4-compressed already; local shuffle files cross no network.
    assert spark.sparkContext.getConf().get("spark.shuffle.compress") == "false"


def test_local_workers_run_the_daemon_that_keeps_zip_directories(spark):
    import sys

    from synth.spark import WORKER_DAEMON

    assert spark.sparkContext.getConf().get("spark.python.daemon.module") == WORKER_DAEMON
    patched = spark.sparkContext.parallelize([0], 1).map(
        lambda _: __import__("zipimport").zipimporter.invalidate_caches.__qualname__).collect()[0]
    assert patched.startswith("_invalidate_when_changed.") == (sys.version_info < (3, 12))


def test_python_workers_start_in_the_background_once_per_session(spark, monkeypatch):
    from synth.spark import start_python_workers

    sc = spark.sparkContext
    monkeypatch.setattr(sc, "_synth_workers_started", False, raising=False)
    sc.setJobGroup("start-workers-test", "a stage")
    try:
        thread = start_python_workers(spark, ["synth.clean", "xml.dom.minidom"])
        thread.join(120)
        assert not thread.is_alive()
        assert start_python_workers(spark, ["synth.clean"]) is None  # once per SparkContext
        jobs = [sc.statusTracker().getJobInfo(j) for j in sc.statusTracker().getJobIdsForGroup("start-workers-test")]
        assert [job.status for job in jobs] == ["SUCCEEDED"]  # in the stage's job group, the imports worked
        # A module the workers cannot import fails the background job only: the stage goes on.
        monkeypatch.setattr(sc, "_synth_workers_started", False)
        start_python_workers(spark, ["synth.no_such_module"]).join(120)
        assert sc.parallelize([1, 2], 2).sum() == 3
    finally:
        for key in ("spark.jobGroup.id", "spark.job.description"):
            sc.setLocalProperty(key, None)


def test_a_zip_directory_is_read_again_only_when_its_file_changed(tmp_path, monkeypatch):
    import os
    import zipfile
    import zipimport

    from synth import _daemon

    archive = tmp_path / "lib.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("first.py", "X = 1\n")
    reads = []

    def counted(importer):
        reads.append(importer.archive)
        importer._files = {"read": True}

    invalidate = _daemon._invalidate_when_changed(counted)
    importer = zipimport.zipimporter(str(archive))
    invalidate(importer)
    invalidate(importer)
    assert len(reads) == 1
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr("second.py", "Y = 2\n")
    os.utime(archive, ns=(1, 1))  # a new stamp even where the clock is coarse
    invalidate(importer)
    assert len(reads) == 2
    archive.unlink()
    invalidate(importer)
    invalidate(importer)
    assert len(reads) == 4  # a vanished archive is always handed to zipimport, which forgets it
