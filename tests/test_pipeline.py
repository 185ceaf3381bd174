"""End to end: every stage on a small simulated input, checked through the tables it leaves."""
import numpy as np
import pytest
from pyspark.sql import functions as F

import schemas
from synth import config
from synth.config import STAGES
from synth.generate import (copied_sessions, gap_seconds, replace_sessions, sequence_key, shard_seed, shard_sizes,
                            train_sequence_keys)
from synth.lake import Lake
from synth.runner import main, run_stage

TABLES = ("events", "quarantine", "sessions", "user_profiles", "item_catalog", "session_tokens",
          "synthetic_events", "synthetic_user_profiles", "training_set", "metrics", "pipeline_runs")


SMALL = """
lake: {root: %(root)s/lake}
input: {path: %(root)s/raw}
simulator: {users: 150, items: 300, days: 2, shards: 2, bot_events: 80}
clean: {pseudonym_key_file: %(root)s/key, bot_max_events_per_hour: 50}
train: {max_steps: 30, d_model: 32, batch_size: 32, log_every: 10, checkpoint_dir: %(root)s/ckpt}
generate: {sessions: 120, shards: 3, profiles: 90}
profiles: {epochs: 5}
evaluate: {report_dir: %(root)s/reports, two_sample_classifier: logistic}
spark: {shuffle_partitions: 4}
"""


def small_config(root, run_id="night-1"):
    path = root / "nightly.yaml"
    path.write_text(SMALL % {"root": root})
    return path, config.load(path, {"run.id": run_id})


@pytest.fixture(scope="module")
def pipeline(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    _, cfg = small_config(root)
    lake = Lake(spark, cfg.lake.root)
    counts = {stage: run_stage(stage, cfg, spark, lake) for stage in STAGES}
    return cfg, lake, counts, root


def _synthetic_rows(lake, run_id):
    return sorted(tuple(r) for r in lake.read("synthetic_events").df.where(F.col("run_id") == run_id)
                  .drop("event_time").collect())


def test_every_table_exists_with_its_contract_columns(pipeline):
    _, lake, _, _ = pipeline
    for table in TABLES:
        assert lake.read(table).df.columns == schemas.contract(table).names, table


def test_row_accounting_and_ledger(pipeline):
    cfg, lake, counts, _ = pipeline
    c = counts["clean"]
    assert c["raw"] == c["clean"] + c["quarantined"] + c["duplicates"] > 0
    assert c["quarantined.bot_user"] > 0 and c["quarantined.malformed_line"] >= 1
    ledger = lake.read("pipeline_runs").df.where(F.col("run_id") == cfg.run.id).collect()
    assert {r.stage for r in ledger} == set(STAGES)
    by_stage = {r.stage: r for r in ledger}
    assert by_stage["featurize"].input_versions == {"events": by_stage["clean"].output_versions["events"]}
    assert "checkpoint" in by_stage["train"].artifacts
    assert by_stage["evaluate"].artifacts["report"].endswith("report.html")


def test_synthetic_events_use_real_items_with_their_attributes(pipeline):
    cfg, lake, counts, _ = pipeline
    synthetic = lake.read("synthetic_events").df.where(F.col("run_id") == cfg.run.id)
    dropped = counts["generate"]["copies_dropped"]
    assert synthetic.select("session_id").distinct().count() == cfg.generate.sessions - dropped
    assert {r.shard for r in synthetic.select("shard").distinct().collect()} == {0, 1, 2}
    catalog = lake.read("item_catalog").df
    items = synthetic.where(F.col("item_id").isNotNull())
    mismatched = items.join(catalog, "item_id", "left_anti").count()
    assert items.count() > 0 and mismatched == 0
    assert synthetic.where((F.col("event_type") != "search") & F.col("item_id").isNull()).count() == 0


def test_no_synthetic_session_copies_a_training_session(pipeline):
    cfg, lake, counts, _ = pipeline
    synthetic = (lake.read("synthetic_events").df.where(F.col("run_id") == cfg.run.id)
                 .groupBy("session_id").agg(F.sort_array(F.collect_list(F.struct(
                     "position", F.coalesce("item_id", F.lit("")).alias("item")))).alias("e"))
                 .select(F.col("e.item").alias("items")))
    train = (lake.read("sessions").df.where("split = 'train' AND n_events >= 2")
             .select(F.transform("item_ids", lambda i: F.coalesce(i, F.lit(""))).alias("items")))
    assert synthetic.where(F.size("items") >= 2).join(train, "items").count() == 0
    assert counts["generate"]["copies_resampled"] >= counts["generate"]["copies_dropped"] >= 0


def test_synthetic_profiles_are_sampled_per_shard(pipeline):
    cfg, lake, counts, _ = pipeline
    profiles = lake.read("synthetic_user_profiles").df.where(F.col("run_id") == cfg.run.id)
    rows = profiles.collect()
    assert len(rows) == counts["generate"]["synthetic_profiles"] == 90
    assert len({r.user_id for r in rows}) == 90
    assert all(r.n_events == r.n_views + r.n_carts + r.n_purchases + r.n_searches for r in rows)


def test_training_set_flags_real_and_synthetic_rows(pipeline):
    cfg, lake, counts, _ = pipeline
    merged = lake.read("training_set").df.where(F.col("run_id") == cfg.run.id)
    kinds = {r.is_synthetic: (r["count"], r.w) for r in
             merged.groupBy("is_synthetic").agg(F.count("*").alias("count"), F.max("weight").alias("w")).collect()}
    assert kinds[False] == (counts["clean"]["clean"], 1.0)
    assert kinds[True] == (counts["generate"]["synthetic_events"], cfg.merge.synthetic_weight)


def test_metrics_are_recorded_for_the_run(pipeline):
    cfg, lake, _, _ = pipeline
    metrics = {(r.metric, r.subject): r.value for r in
               lake.read("metrics").df.where(F.col("run_id") == cfg.run.id).collect()}
    for name in ("event_type_tvd", "session_length_ks", "item_popularity_jsd"):
        assert 0.0 <= metrics[(name, "synthetic")] <= 1.0
        assert (name, "train_resample") in metrics


def test_rerunning_a_run_changes_nothing(pipeline, spark):
    cfg, lake, counts, _ = pipeline
    versions = {t: lake.version(t) for t in TABLES}
    again = {stage: run_stage(stage, cfg, spark, lake) for stage in STAGES}
    assert again == counts
    assert {t: lake.version(t) for t in TABLES} == versions


def test_generation_is_deterministic_and_a_forced_rerun_replaces_the_run(pipeline, spark):
    cfg, lake, counts, _ = pipeline
    before = _synthetic_rows(lake, cfg.run.id)
    run_stage("generate", cfg, spark, lake, force=True)
    assert _synthetic_rows(lake, cfg.run.id) == before
    run_stage("merge", cfg, spark, lake, force=True)
    merged = lake.read("training_set").df.where(F.col("run_id") == cfg.run.id)
    assert merged.count() == counts["merge"]["training_rows"]


def test_command_line_runs_the_pipeline_for_a_new_run(pipeline, capsys):
    cfg, lake, counts, root = pipeline
    assert main(["all", "--config", str(root / "nightly.yaml"), "--run-id", "night-2",
                 "--generate.sessions", "30"]) == 0
    out = capsys.readouterr().out
    assert "training_set" in out and "report.html" in out
    # The input did not change since night-1: the incremental clean read and rewrote nothing.
    night2 = lake.read("pipeline_runs").df.where("stage = 'clean' AND run_id = 'night-2'").first()
    assert night2.counts["raw"] == night2.counts["files_read"] == 0 and "events" not in night2.output_versions
    runs = {r.run_id: r["count"] for r in lake.read("training_set").df.groupBy("run_id").count().collect()}
    assert runs["night-1"] == counts["merge"]["training_rows"]
    assert runs["night-2"] == counts["clean"]["clean"] + lake.read("synthetic_events").df.where(
        F.col("run_id") == "night-2").count()


def test_copied_sessions_are_found_and_replaced():
    out = {"session": np.array([0, 0, 1, 2, 2, 2]), "position": np.array([0, 1, 0, 0, 1, 2]),
           "item_idx": np.array([5, 6, 5, 7, 7, 8])}
    train = np.sort(np.array([sequence_key([5, 6]), sequence_key([5]), sequence_key([1, 2])], dtype=np.int64))
    copies = copied_sessions(out, 3, train)
    assert copies.tolist() == [0]  # session 1 is a single event: too common to count as a copy
    again = {"session": np.array([0, 0, 0]), "position": np.array([0, 1, 2]), "item_idx": np.array([9, 9, 9])}
    merged = replace_sessions(out, copies, again)
    assert merged["session"].tolist() == [0, 0, 0, 1, 2, 2, 2]
    assert merged["item_idx"].tolist() == [9, 9, 9, 5, 7, 7, 8]
    assert replace_sessions(out, np.array([2]), None)["session"].tolist() == [0, 0, 1]
    assert copied_sessions(out, 3, np.zeros(0, dtype=np.int64)).tolist() == []


def test_sequence_keys_match_between_spark_and_python(spark):
    sessions = spark.createDataFrame([("train", 2, [5, 6]), ("train", 1, [5]), ("holdout", 2, [1, 2])],
                                     "split string, n_events int, item_idx array<int>")
    assert train_sequence_keys(sessions).tolist() == [sequence_key([5, 6])]


def test_shard_seeds_and_sizes():
    assert shard_seed(1, "a", 0) == shard_seed(1, "a", 0) != shard_seed(1, "a", 1)
    assert shard_seed(1, "a", 0) != shard_seed(1, "b", 0)
    assert shard_sizes(10, 3) == [4, 3, 3]
    assert sum(shard_sizes(7, 7)) == 7


def test_gap_seconds_fall_inside_their_bucket():
    edges = [0, 5, 15, 30]
    buckets = np.array([0, 1, 2, 3, 4] * 200)
    gaps = gap_seconds(buckets, edges, np.random.default_rng(0))
    assert np.all(gaps[buckets == 0] == 0)
    for b, (lo, hi) in enumerate([(0, 5), (5, 15), (15, 30)], start=1):
        assert np.all((gaps[buckets == b] >= lo) & (gaps[buckets == b] <= hi))
    assert np.all(gaps[buckets == 4] >= 30)
