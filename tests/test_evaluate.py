"""The evaluate stage: metric functions on hand-computed examples, the baseline sampler, and a full stage run."""
from __future__ import annotations

import base64
import datetime as dt
import math

import pytest

from synth.evaluate import (DESCRIPTIONS, HIT_RATE, HOLDOUT, INDEPENDENT, REAL_TRAIN, SYNTHETIC, TRAIN_RESAMPLE,
                            Profile, derive_seed, jsd, ks_from_histograms, metric_rows, tvd)


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
                      purchases=1, purchases_after_view=1, copies=1, transitions={("c1", "c1"): 1})
    synthetic = Profile({"view": 4}, {2: 2}, {"i1": 2, "i2": 2}, {"c1": 4}, {5: 2},
                        purchases=0, purchases_after_view=0, copies=0,
                        transitions={("c1", "c1"): 1, ("c1", "c2"): 1})
    extra = {("c2st_auc", SYNTHETIC): 0.5, (HIT_RATE, REAL_TRAIN): 0.25, (HIT_RATE, SYNTHETIC): None}
    rows = {(m, s): v for m, s, v, _ in metric_rows({HOLDOUT: holdout, SYNTHETIC: synthetic}, 0.75, extra)}
    assert rows[("category_transition_jsd", SYNTHETIC)] == pytest.approx(1.5 - 0.75 * math.log2(3))
    assert rows[("c2st_auc", SYNTHETIC)] == 0.5 and rows[(HIT_RATE, REAL_TRAIN)] == 0.25
    assert (HIT_RATE, SYNTHETIC) not in rows  # undefined: left out
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


def test_synthetic_gaps_are_drawn_from_the_real_gaps_of_their_bucket(spark):
    """What gap_seconds_ks compares: generate draws each gap among the real train gaps of its bucket."""
    import numpy as np

    from synth.generate import gap_quantiles, gap_seconds

    edges = [0, 5, 15, 30]
    sessions = spark.createDataFrame([([0.0, 1.0, 1.0, 2.0, 7.0],), ([9.0, 3.0, 100.0],)], "gap_seconds array<double>")
    quantiles = gap_quantiles(sessions, edges, n=4)  # a session's first gap (position 0) is not a gap
    assert quantiles == [[], [1.0, 1.0, 2.0, 3.0], [7.0] * 4, [], [100.0] * 4]
    buckets = np.array([0, 1, 2, 3, 4] * 200)
    gaps = gap_seconds(buckets, edges, np.random.default_rng(0), quantiles)
    assert set(gaps[buckets == 0]) == {0.0} and set(gaps[buckets == 1]) == {1.0, 2.0, 3.0}
    assert set(gaps[buckets == 2]) == {7.0} and set(gaps[buckets == 4]) == {100.0}
    assert np.all((gaps[buckets == 3] >= 15) & (gaps[buckets == 3] <= 30))  # no real gap there: uniform
    assert 0.4 < np.mean(gaps[buckets == 1] == 1.0) < 0.6


# ------------------------------------------------------------------------------------------------
# Spark: the C2ST features and classifier, attribute realism, the recommender.
# ------------------------------------------------------------------------------------------------

COMMON_DDL = ("subject string, session_id string, position int, event_type string, item_id string, "
              "category string, gap_bin long, price double")


def _common_events(spark, subject, sessions, prefix=""):
    """Common-shape rows from {session: [(event_type, item, category, gap seconds, price)]}."""
    rows = [(subject, prefix + sid, pos, e[0], e[1], e[2], e[3] if pos else None, e[4])
            for sid, events in sessions.items() for pos, e in enumerate(events)]
    return spark.createDataFrame(rows, COMMON_DDL)


def test_session_features_hand_computed(spark):
    from synth.evaluate import SESSION_FEATURES, session_features

    events = _common_events(spark, HOLDOUT, {
        "s": [("view", "i1", "c1", 0, math.e - 1), ("search", None, None, 3, None),
              ("purchase", "i1", "c1", 7, math.e ** 3 - 1)],
        "t": [("purchase", "i2", "c2", 0, None)]})
    rows = {r.session_id: r for r in session_features(events, 1.0).collect()}
    s, t = rows["s"], rows["t"]
    assert list(s.asDict()) == ["subject", "session_id"] + SESSION_FEATURES
    assert s.log_length == pytest.approx(math.log(4))
    assert (s.view_share, s.cart_share, s.search_share) == (pytest.approx(1 / 3), 0.0, pytest.approx(1 / 3))
    assert s.distinct_item_share == pytest.approx(1 / 3) and s.distinct_category_share == pytest.approx(1 / 3)
    assert s.mean_log_gap == pytest.approx((math.log(4) + math.log(8)) / 2)
    assert s.median_log_gap == pytest.approx(math.log(4)) and s.max_log_gap == pytest.approx(math.log(8))
    assert s.purchase_after_view == 1.0 and t.purchase_after_view == 0.0  # t: a purchase with no view
    assert s.mean_log_price == pytest.approx(2.0) and s.std_log_price == pytest.approx(1.0)
    assert t.mean_log_gap == 0.0 and t.mean_log_price == 0.0 and t.purchase_share == 1.0  # nulls -> 0


def _random_sessions(n, seed, kind):
    import random

    rng = random.Random(seed)
    out = {}
    for i in range(n):
        if kind == "real":
            length = rng.choice([1, 1, 2, 3, 5])
            out[f"s{i}"] = [(rng.choice(["view"] * 8 + ["cart", "purchase"]), f"i{rng.randrange(30)}",
                             f"c{rng.randrange(4)}", rng.randrange(1, 120), 10.0 + rng.randrange(50))
                            for _ in range(length)]
        else:  # obviously different: long purchase-only sessions, one gap, one price
            out[f"s{i}"] = [("purchase", "i1", "c1", 1, 999.0)] * 12
    return out


def test_c2st_auc_is_half_for_the_same_sessions_and_near_one_for_different_ones(spark):
    from synth.evaluate import c2st_auc, session_features

    real = _random_sessions(60, 1, "real")
    holdout = _common_events(spark, HOLDOUT, real)
    # The holdout itself as the subject (same sessions, same ids): identical vectors tie, AUC exactly 0.5.
    same = session_features(holdout.unionByName(_common_events(spark, SYNTHETIC, real)), 1.0)
    assert c2st_auc(same, SYNTHETIC, seed=7, folds=2, classifier="logistic") == 0.5
    different = session_features(holdout.unionByName(
        _common_events(spark, INDEPENDENT, _random_sessions(80, 2, "other"), prefix="x")), 1.0).cache()
    auc = c2st_auc(different, INDEPENDENT, seed=7, folds=2, classifier="logistic")
    assert auc > 0.95
    assert c2st_auc(different, INDEPENDENT, seed=7, folds=2, classifier="logistic") == auc  # deterministic
    assert c2st_auc(different, TRAIN_RESAMPLE, seed=7) is None  # no such subject: nothing to test
    with pytest.raises(ValueError, match="two_sample_folds"):
        c2st_auc(different, INDEPENDENT, seed=7, folds=1)


def test_attribute_realism_hand_computed(spark):
    from schemas import contract
    from synth.evaluate import attribute_realism

    catalog = spark.createDataFrame(
        [(1, "i1", "c1", 1, "b1", 10.0, 10.0, 10.0, 10.0, 1), (2, "i2", "c2", 2, None, 100.0, 100.0, 100.0, 100.0, 1),
         (3, "i3", "c3", 3, "b3", None, None, None, None, 1)],
        contract("item_catalog").spark_schema())
    synthetic = spark.createDataFrame([
        ("view", "i1", "c1", "b1", 10.0),     # realistic
        ("view", "i1", "c1", "b1", 20.0),     # 2x: at the band's edge, realistic
        ("cart", "i1", "c1", "b1", 20.5),     # above 2x
        ("view", "i1", "c1", "b2", 10.0),     # wrong brand
        ("view", "i2", "c2", None, 50.0),     # null brand matches a null brand; 0.5x, realistic
        ("view", "i2", "c9", None, 100.0),    # wrong category
        ("view", "i3", "c3", "b3", None),     # no catalogue price, no price: realistic
        ("view", "i9", "c1", "b1", 10.0),     # not in the catalogue
        ("search", None, "c1", None, None),   # searches are not counted
    ], "event_type string, item_id string, category string, brand string, price double")
    assert attribute_realism(synthetic, catalog, (0.5, 2.0)) == 4 / 8
    assert attribute_realism(synthetic.where("item_id IS NULL"), catalog, (0.5, 2.0)) is None


def test_recommender_hit_rates_hand_computed(spark):
    from synth.evaluate import recommender_hit_rates

    ddl = "subject string, session_id string, position int, item_id string"
    train = spark.createDataFrame([
        # subject a: i1 -> i2 twice, i1 -> i3 once, i2 -> i3 once (the search between is skipped).
        ("a", "a1", 0, "i1"), ("a", "a1", 1, "i2"), ("a", "a2", 0, "i1"), ("a", "a2", 1, "i2"),
        ("a", "a3", 0, "i1"), ("a", "a3", 1, "i3"), ("a", "a4", 0, "i2"), ("a", "a4", 1, None), ("a", "a4", 2, "i3"),
        # subject b: only i5 -> i1.
        ("b", "b1", 0, "i5"), ("b", "b1", 1, "i1"),
    ], ddl)
    holdout = spark.createDataFrame([
        ("h1", 0, "i9"), ("h1", 1, "i1"), ("h1", 2, "i2"),     # last i2 after i1: a hits (k >= 1)
        ("h2", 0, "i1"), ("h2", 1, "i3"), ("h2", 2, None),     # last item i3 after i1: a hits only with k >= 2
        ("h3", 0, "i2"), ("h3", 1, "i3"),                       # i3 after i2: a hits
        ("h4", 0, "i5"), ("h4", 1, "i7"),                       # nobody recommends i7
        ("h5", 0, "i4"),                                        # one item: not a test case
    ], "session_id string, position int, item_id string")
    assert recommender_hit_rates(train, holdout, k=10) == {"a": 3 / 4, "b": 0.0}
    assert recommender_hit_rates(train, holdout, k=1) == {"a": 2 / 4, "b": 0.0}
    assert recommender_hit_rates(train, holdout.where("session_id = 'h5'")) == {"a": None, "b": None}


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
                         [PRICE] * len(events), [float(e[3]) for e in events], split,
                         START.date()))
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

    lake.write(frame("item_catalog", [(i + 1, item, cat, int(cat[1:]), brand, PRICE, PRICE, PRICE, PRICE, 5)
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

    cfg = make_cfg(**{"evaluate.baseline_sessions": 40, "evaluate.two_sample_classifier": "logistic"})
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
                "gap_seconds_ks", "purchase_after_view_share", "n_sessions", "n_events", "category_transition_jsd",
                "c2st_auc", HIT_RATE, "recommender_hit_rate_ratio"]
    expected = ({(m, s) for m in compared for s in (SYNTHETIC, TRAIN_RESAMPLE, INDEPENDENT)}
                | {("catalog_consistency", SYNTHETIC), ("exact_copy_share", SYNTHETIC), (HIT_RATE, REAL_TRAIN),
                   ("attribute_realism", SYNTHETIC),
                   ("exact_copy_share", INDEPENDENT), ("exact_copy_share", HOLDOUT),
                   ("purchase_after_view_share", HOLDOUT), ("n_sessions", HOLDOUT), ("n_events", HOLDOUT)})
    assert set(got) == expected
    assert all(r.description == DESCRIPTIONS[r.metric] for r in rows)

    # The synthetic set is the holdout itself.
    for metric in ("event_type_tvd", "session_length_ks", "item_popularity_jsd", "category_popularity_jsd",
                   "gap_seconds_ks", "category_transition_jsd"):
        assert got[(metric, SYNTHETIC)] == pytest.approx(0.0, abs=1e-12), metric
    assert got[("event_type_tvd", SYNTHETIC)] == 0.0 and got[("session_length_ks", SYNTHETIC)] == 0.0
    assert got[("purchase_after_view_share", HOLDOUT)] == 0.5 == got[("purchase_after_view_share", SYNTHETIC)]
    assert got[("exact_copy_share", HOLDOUT)] == 0.25 == got[("exact_copy_share", SYNTHETIC)]
    assert got[("catalog_consistency", SYNTHETIC)] == 0.9  # one event of ten has the wrong brand
    assert got[("attribute_realism", SYNTHETIC)] == 8 / 9  # the same event of the nine with an item
    assert 0.0 <= got[("c2st_auc", SYNTHETIC)] <= 1.0 and 0.0 <= got[("c2st_auc", INDEPENDENT)] <= 1.0
    # Recommender test cases: h1 (i2 after i2), h2 (i4 after i3), h4 (i4 after i4). Real train sessions
    # follow i2 by i2 (t1) and i3 by i4 (t3) but i4 only by i5; the synthetic set (the holdout itself) knows all three.
    assert got[(HIT_RATE, REAL_TRAIN)] == pytest.approx(2 / 3) and got[(HIT_RATE, SYNTHETIC)] == 1.0
    assert got[("recommender_hit_rate_ratio", SYNTHETIC)] == pytest.approx(1.5)
    assert got[(HIT_RATE, TRAIN_RESAMPLE)] == pytest.approx(2 / 3)  # all five train sessions
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
    assert {(r.metric, r.subject): r.value for r in rerun} == pytest.approx(got)
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
    assert cfg.evaluate.two_sample_classifier == "gbt" and cfg.evaluate.two_sample_folds == 2
    assert list(cfg.evaluate.price_band) == [0.5, 2.0]
    for key in ("gap_bin_seconds", "baseline_sessions", "two_sample_classifier", "two_sample_folds", "price_band"):
        assert helps[f"evaluate.{key}"], key


# ------------------------------------------------------------------------------------------------
# benchmarks/quality.py: the opt-in quality benchmark (its full run is not part of the test suite).
# ------------------------------------------------------------------------------------------------

def test_quality_benchmark_help_and_skip(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    script = ROOT / "benchmarks" / "quality.py"
    shown = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "--max-steps" in shown.stdout
    skipped = subprocess.run([sys.executable, str(script), "--data-dir", str(tmp_path / "absent")],
                             capture_output=True, text=True, timeout=120)
    assert skipped.returncode == 0 and "SKIPPED" in skipped.stdout


def test_quality_benchmark_verdicts_and_table():
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    metrics = {"event_type_tvd": {"synthetic": 0.01, "independent_columns": 0.3},
               "session_length_ks": {"synthetic": 0.2}, "c2st_auc": {"synthetic": 0.65}}
    verdicts = quality.verdicts(metrics)
    assert verdicts["event_type_tvd"]["verdict"] == "PASS" and verdicts["session_length_ks"]["verdict"] == "FAIL"
    assert verdicts["c2st_auc"]["verdict"] == "PASS" and verdicts["profile_column_pair"]["verdict"] == "n/a"
    text = quality.table({"metrics": metrics, "targets": verdicts, "stage_seconds": {"clean": 1.0}})
    assert "independent_columns" in text and "FAIL" in text and "clean 1.0s" in text
    counts = {"train": {"steps": 300, "events_per_s": 3719, "session_model_ms": 19012, "profile_model_ms": 15600}}
    text = quality.table({"metrics": metrics, "targets": verdicts, "stage_seconds": {"train": 41.1}, "counts": counts})
    assert "session model 19.0 s for 300 steps (3,719 events/s), profile model 15.6 s" in text
    # The sweep summary: per budget, seeds meeting every target and the training seconds' spread.
    passing = {m: {"verdict": "PASS"} for m in quality.TARGETS}
    runs = [{"dataset": "rees46", "steps": 100, "targets": passing if seed else verdicts,
             "counts": {"train": {"session_model_ms": 10_000 + 2_000 * seed, "profile_model_ms": 5_000}}}
            for seed in range(3)]
    summary = quality.time_to_targets(runs).splitlines()
    assert summary[1].split()[:4] == ["rees46", "100", "3", "2/3"]
    assert "17.0 +- 2.0 (15.0-19.0)" in summary[1]


def test_profile_scores_with_synth_tabular_when_present():
    pd = pytest.importorskip("pandas")
    try:
        from synth import tabular
        tabular.column_shape_score, tabular.column_pair_score
    except (ImportError, AttributeError):
        pytest.skip("synth.tabular (column_shape_score, column_pair_score) is not there yet")
    from synth.evaluate import profile_scores

    real = pd.DataFrame({"n_events": [1, 2, 3, 4] * 5, "top_category": ["a", "b", "a", "c"] * 5})
    same = profile_scores(real, real.copy(), tabular)
    assert same == {("profile_column_shape", SYNTHETIC): pytest.approx(1.0),
                    ("profile_column_pair", SYNTHETIC): pytest.approx(1.0)}
    other = profile_scores(real, pd.DataFrame({"n_events": [9] * 20, "top_category": ["z"] * 20}), tabular)
    assert other[("profile_column_shape", SYNTHETIC)] < 0.5
    assert profile_scores(real, real.iloc[:0], tabular) == {}
