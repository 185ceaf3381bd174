"""The evaluate stage: metric functions on hand-computed examples, the baseline sampler, and a full stage run."""
from __future__ import annotations

import base64
import datetime as dt
import math

import pytest

from synth.evaluate import (DESCRIPTIONS, HOLDOUT, INDEPENDENT, SYNTHETIC, TRAIN_RESAMPLE, Profile,
                            derive_seed, jsd, ks_from_histograms, metric_rows, tvd)


# ------------------------------------------------------------------------------------------------
# Pure functions.
# ------------------------------------------------------------------------------------------------

def test_tvd_hand_computed():
    assert tvd({"view": 3, "cart": 1}, {"view": 6, "cart": 2}) == 0.0  # same shares, different totals
    assert tvd({"view": 1, "cart": 1}, {"view": 1}) == 0.5  # 0.5 * (|0.5 - 1| + |0.5 - 0|)
    assert tvd({"view": 1}, {"search": 7}) == 1.0
    assert tvd({"a": 1, "b": 3}, {"a": 3, "b": 1}) == 0.5


def test_ks_hand_computed():
    # CDFs: a = .25, .5, 1, 1 and b = 0, .5, .5, 1 at 1, 2, 3, 4; largest gap .5 at 3.
    assert ks_from_histograms({1: 1, 2: 1, 3: 2}, {2: 2, 4: 2}) == 0.5
    assert ks_from_histograms({1: 2, 5: 2}, {1: 1, 5: 1}) == 0.0
    assert ks_from_histograms({1: 3}, {2: 1}) == 1.0
    assert ks_from_histograms({1: 1, 2: 3}, {1: 3, 2: 1}) == 0.5


def test_jsd_hand_computed():
    assert jsd({"a": 2, "b": 2}, {"a": 1, "b": 1}) == 0.0
    assert jsd({"a": 5}, {"b": 1}) == 1.0
    # p = (.5, .5), q = (1, 0), m = (.75, .25): KL(p||m) = 1 - .5 log2 3, KL(q||m) = 2 - log2 3.
    assert jsd({"a": 1, "b": 1}, {"a": 1}) == pytest.approx(1.5 - 0.75 * math.log2(3), abs=1e-12)
    assert jsd({"a": 1}, {"a": 1, "b": 1}) == pytest.approx(1.5 - 0.75 * math.log2(3), abs=1e-12)


@pytest.mark.parametrize("fn", [tvd, ks_from_histograms, jsd])
def test_metric_functions_reject_empty_histograms(fn):
    with pytest.raises(ValueError):
        fn({}, {"a": 1})


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(1, "r", "item") == derive_seed(1, "r", "item")
    assert len({derive_seed(1, "r", "item"), derive_seed(1, "r", "gap"), derive_seed(2, "r", "item"),
                derive_seed(1, "s", "item")}) == 4


def test_metric_rows_on_profiles():
    holdout = Profile({"view": 3, "purchase": 1}, {1: 2, 2: 1}, {"i1": 4}, {"c1": 4}, {5: 1},
                      purchases=1, purchases_after_view=1, copies=1)
    synthetic = Profile({"view": 4}, {2: 2}, {"i1": 2, "i2": 2}, {"c1": 4}, {5: 2},
                        purchases=0, purchases_after_view=0, copies=0)
    rows = {(m, s): v for m, s, v, _ in metric_rows({HOLDOUT: holdout, SYNTHETIC: synthetic}, 0.75)}
    assert rows[("event_type_tvd", SYNTHETIC)] == 0.25
    assert rows[("session_length_ks", SYNTHETIC)] == pytest.approx(2 / 3)
    assert rows[("item_popularity_jsd", SYNTHETIC)] == pytest.approx(1.5 - 0.75 * math.log2(3))
    assert rows[("category_popularity_jsd", SYNTHETIC)] == 0.0
    assert rows[("gap_seconds_ks", SYNTHETIC)] == 0.0
    assert rows[("catalog_consistency", SYNTHETIC)] == 0.75
    assert rows[("purchase_after_view_share", HOLDOUT)] == 1.0
    assert ("purchase_after_view_share", SYNTHETIC) not in rows  # no purchases: undefined, not reported
    assert rows[("exact_copy_share", HOLDOUT)] == pytest.approx(1 / 3)
    assert rows[("n_sessions", SYNTHETIC)] == 2 and rows[("n_events", HOLDOUT)] == 4


# ------------------------------------------------------------------------------------------------
# Spark: the independent_columns sampler.
# ------------------------------------------------------------------------------------------------

def test_independent_events_follow_marginals_and_are_deterministic(spark):
    from synth.evaluate import MARGINALS_DDL, independent_events, inverse_cdf

    marginals = spark.createDataFrame([
        ("length", 3, None, None, None, None, 1),
        ("event_type", None, "view", None, None, None, 3), ("event_type", None, "cart", None, None, None, 1),
        ("item", None, None, "i1", "c1", None, 1), ("item", None, None, None, "c9", None, 1),
        ("gap", None, None, None, None, 7, 1),
    ], MARGINALS_DDL)
    lookups = inverse_cdf(marginals).cache()
    # Values in order: cart owns [0, .25), view [.25, 1); they share bucket 256 of 1024 (and view bucket 1024).
    lookup = sorted((r.event_type, r._lo, r._hi, r._bucket)
                    for r in lookups.where("dim = 'event_type'").collect())
    assert [(r[0], r[1], r[2]) for r in lookup if r[3] == 256] == [("cart", 0.0, 0.25), ("view", 0.25, 1.0)]
    assert len(lookup) == 257 + 769

    seeds = {p: derive_seed(5, "r", p) for p in ("length", "event_type", "item", "gap")}
    build = lambda: sorted(tuple(r) for r in independent_events(lookups, 200, seeds, 3).collect())
    first = build()
    assert first == build()
    assert len(first) == 600 and len({r[1] for r in first}) == 200
    assert {r[0] for r in first} == {INDEPENDENT}
    assert {r[3] for r in first} == {"view", "cart"}
    assert {(r[4], r[5]) for r in first} == {("i1", "c1"), (None, "c9")}
    assert {r[6] for r in first if r[2] == 0} == {None} and {r[6] for r in first if r[2] > 0} == {7}
    views = sum(r[3] == "view" for r in first) / len(first)
    assert 0.65 < views < 0.85  # drawn with share 0.75


# ------------------------------------------------------------------------------------------------
# The stage, end to end on small tables.
# ------------------------------------------------------------------------------------------------

CATALOG = {"i1": ("c1", "b1"), "i2": ("c1", "b2"), "i3": ("c2", "b1"), "i4": ("c2", "b3"), "i5": ("c3", "b2")}
PRICE = 10.0
# (event_type, item_id, category, gap seconds) per event.
TRAIN = {
    "t1": [("view", "i1", "c1", 0), ("view", "i2", "c1", 5), ("cart", "i2", "c1", 10), ("purchase", "i2", "c1", 20)],
    "t2": [("search", None, "c1", 0), ("view", "i1", "c1", 3)],
    "t3": [("view", "i3", "c2", 0), ("view", "i4", "c2", 40), ("view", "i5", "c3", 8)],
    "t4": [("view", "i5", "c3", 0)],
    "t5": [("view", "i3", "c2", 0), ("purchase", "i3", "c2", 60)],
}
HOLD = {
    # Same item sequence as train session t1: an exact copy.
    "h1": [("view", "i1", "c1", 0), ("view", "i2", "c1", 6), ("cart", "i2", "c1", 12), ("purchase", "i2", "c1", 30)],
    # A purchase without a view of the same item.
    "h2": [("search", None, "c2", 0), ("view", "i3", "c2", 4), ("purchase", "i4", "c2", 9)],
    # Equals train session t4, but single events do not count as copies.
    "h3": [("view", "i5", "c3", 0)],
    "h4": [("view", "i4", "c2", 0), ("cart", "i4", "c2", 15)],
}
START = dt.datetime(2026, 11, 1, 8, 0, 0)


def _sessions_rows():
    rows = []
    for split, sessions in (("train", TRAIN), ("holdout", HOLD)):
        for sid, events in sessions.items():
            rows.append((sid, f"u-{sid}", START, len(events), [e[0] for e in events], [e[1] for e in events],
                         [int(e[1][1]) if e[1] else 0 for e in events], [e[2] for e in events],
                         [PRICE] * len(events), [float(e[3]) for e in events], split))
    return rows


def _synthetic_rows(run_id, sessions, wrong_brand_at=None):
    rows = []
    for n, events in enumerate(sessions.values()):
        clock = START + dt.timedelta(hours=n)
        for position, (etype, item, category, gap) in enumerate(events):
            clock += dt.timedelta(seconds=gap)
            brand = CATALOG.get(item, (None, "x"))[1] if item else None
            if (n, position) == wrong_brand_at:
                brand = "not-the-brand"
            rows.append((f"syn-{run_id}-0-{n}", 0, position, clock, etype, item, category, brand,
                         PRICE if item else None, run_id))
    return rows


@pytest.fixture
def stage_lake(spark, lake):
    from schemas import contract

    def frame(table, rows):
        return spark.createDataFrame(rows, contract(table).spark_schema())

    lake.write(frame("item_catalog", [(i + 1, item, cat, int(cat[1:]), brand, PRICE, 5)
                                      for i, (item, (cat, brand)) in enumerate(CATALOG.items())]),
               "item_catalog", app_id="featurize:test")
    lake.write(frame("sessions", _sessions_rows()), "sessions", app_id="featurize:test")
    # Run "test": the holdout itself, with one event's brand off the catalogue. Run "other": something else.
    other = {"o1": [("purchase", "i9", "c9", 0)] * 3, "o2": [("cart", "i8", "c8", 0)]}
    lake.write(frame("synthetic_events", _synthetic_rows("test", HOLD, wrong_brand_at=(0, 1))
                     + _synthetic_rows("other", other)),
               "synthetic_events", app_id="generate:test")
    # An older run's metrics, which evaluating run "test" must leave alone.
    lake.write(frame("metrics", [("n_sessions", "synthetic", 1.0, "older run", "older")]),
               "metrics", app_id="evaluate:older", replace={"run_id": "older"})
    return lake


def test_evaluate_stage(spark, stage_lake, make_cfg, tmp_path):
    from synth import evaluate
    from synth.runner import StageContext

    cfg = make_cfg(**{"evaluate.baseline_sessions": 40})
    ctx = StageContext(cfg, spark, stage_lake, "evaluate")
    counts = evaluate.run(ctx)

    assert counts["synthetic_sessions"] == 4 and counts["synthetic_events"] == 10
    assert counts["holdout_sessions"] == 4 and counts["holdout_events"] == 10
    assert set(ctx.input_versions) == {"sessions", "synthetic_events", "item_catalog"}
    assert "metrics" in ctx.output_versions

    table = stage_lake.read("metrics").df
    rows = [r for r in table.collect() if r.run_id == "test"]
    assert counts["metrics"] == len(rows)
    got = {(r.metric, r.subject): r.value for r in rows}
    compared = ["event_type_tvd", "session_length_ks", "item_popularity_jsd", "category_popularity_jsd",
                "gap_seconds_ks", "purchase_after_view_share", "n_sessions", "n_events"]
    expected = ({(m, s) for m in compared for s in (SYNTHETIC, TRAIN_RESAMPLE, INDEPENDENT)}
                | {("catalog_consistency", SYNTHETIC), ("exact_copy_share", SYNTHETIC),
                   ("exact_copy_share", INDEPENDENT), ("exact_copy_share", HOLDOUT),
                   ("purchase_after_view_share", HOLDOUT), ("n_sessions", HOLDOUT), ("n_events", HOLDOUT)})
    assert set(got) == expected
    assert all(r.description == DESCRIPTIONS[r.metric] for r in rows)

    # The synthetic set is the holdout itself.
    for metric in ("event_type_tvd", "session_length_ks", "item_popularity_jsd", "category_popularity_jsd",
                   "gap_seconds_ks"):
        assert got[(metric, SYNTHETIC)] == pytest.approx(0.0, abs=1e-12), metric
    assert got[("event_type_tvd", SYNTHETIC)] == 0.0 and got[("session_length_ks", SYNTHETIC)] == 0.0
    assert got[("purchase_after_view_share", HOLDOUT)] == 0.5 == got[("purchase_after_view_share", SYNTHETIC)]
    assert got[("exact_copy_share", HOLDOUT)] == 0.25 == got[("exact_copy_share", SYNTHETIC)]
    assert got[("catalog_consistency", SYNTHETIC)] == 0.9  # one event of ten has the wrong brand
    assert got[("n_sessions", SYNTHETIC)] == 4 and got[("n_events", SYNTHETIC)] == 10
    # Baselines: all five train sessions (fewer than the 40 asked for) and 40 independent sessions.
    assert got[("n_sessions", TRAIN_RESAMPLE)] == 5 and got[("n_events", TRAIN_RESAMPLE)] == 12
    assert got[("n_sessions", INDEPENDENT)] == 40
    assert got[("event_type_tvd", INDEPENDENT)] > 0 and got[("session_length_ks", TRAIN_RESAMPLE)] > 0

    # The report: a metrics table and embedded PNG plots.
    report = tmp_path / "reports" / "test" / "report.html"
    assert ctx.artifacts["report"] == str(report.resolve())
    text = report.read_text()
    assert "catalog_consistency" in text and "independent_columns" in text
    for title in ("Event type mix", "Session length distribution", "Item popularity rank curve"):
        assert f"<h2>{title}</h2>" in text
    images = text.split('src="data:image/png;base64,')[1:]
    assert len(images) >= 3
    assert all(base64.b64decode(chunk.split('"', 1)[0])[:8] == b"\x89PNG\r\n\x1a\n" for chunk in images)
    assert [p.name for p in report.parent.iterdir()] == ["report.html"]  # no temporary file left behind

    # Re-running replaces the run's partition: same rows, same values (deterministic baselines), no duplicates.
    version = stage_lake.version("metrics")
    evaluate.run(StageContext(cfg, spark, stage_lake, "evaluate"))
    assert stage_lake.version("metrics") == version + 1
    again = stage_lake.read("metrics").df.collect()
    rerun = [r for r in again if r.run_id == "test"]
    assert len(rerun) == len(rows)
    assert len({(r.metric, r.subject) for r in rerun}) == len(rerun)
    assert {(r.metric, r.subject): r.value for r in rerun} == got
    assert [(r.metric, r.description) for r in again if r.run_id == "older"] == [("n_sessions", "older run")]

    # A run that generated nothing fails with a clear message and writes nothing.
    empty = StageContext(make_cfg(**{"run.id": "never-generated"}), spark, stage_lake, "evaluate")
    with pytest.raises(RuntimeError, match="no rows for run never-generated"):
        evaluate.run(empty)
    assert stage_lake.version("metrics") == version + 1


def test_evaluate_options_are_documented():
    from synth import config

    helps = config.option_help()
    cfg = config.load()
    assert cfg.evaluate.gap_bin_seconds == 1.0 and cfg.evaluate.baseline_sessions == 0
    assert helps["evaluate.gap_bin_seconds"] and helps["evaluate.baseline_sessions"]
