import datetime as dt

import pytest

from synth.featurize import BOS, EOS, PAD, build_item_catalog, build_session_tokens, build_sessions

T0 = dt.datetime(2026, 11, 1, 10, 0, 0)


def _events(spark, rows):
    return spark.createDataFrame(
        [(f"e{i}", T0 + dt.timedelta(seconds=s), t, "u1", sess, item, cat, None, "b", price, "f", T0.date())
         for i, (s, t, sess, item, cat, price) in enumerate(rows)],
        "event_id string, event_time timestamp, event_type string, user_id string, session_id string, "
        "item_id string, category string, category_path string, brand string, price double, "
        "source_file string, event_date date")


def test_vocabulary_ids_are_stable_and_new_items_are_appended(spark):
    day1 = _events(spark, [(0, "view", "s1", "b", "c1", 2.0), (1, "view", "s1", "a", "c2", 1.0)])
    first = build_item_catalog(day1, None, [])
    ids1 = {r.item_id: r.item_idx for r in first.collect()}
    assert ids1 == {"a": 1, "b": 2}
    day2 = _events(spark, [(0, "view", "s2", "c", "c3", 3.0), (1, "view", "s2", "b", "c1", 2.0),
                           (2, "view", "s2", "0", "c1", 2.0)])
    second = {r.item_id: r for r in build_item_catalog(day2, first, []).collect()}
    assert {k: v.item_idx for k, v in second.items()} == {"a": 1, "b": 2, "0": 3, "c": 4}
    assert second["a"].popularity == 0 and second["b"].popularity == 1
    assert second["b"].category_idx == next(r.category_idx for r in first.collect() if r.item_id == "b")
    assert second["c"].category_idx == 3


def test_catalog_holds_price_statistics_and_popularity(spark):
    events = _events(spark, [(0, "view", "s1", "a", "c1", 1.0), (1, "cart", "s1", "a", "c1", 3.0),
                             (2, "view", "s2", "a", "c1", 8.0), (3, "view", "s2", "b", "c2", 5.0)])
    a = next(r for r in build_item_catalog(events, None, []).collect() if r.item_id == "a")
    assert (a.price, a.price_min, a.price_max, a.price_mean, a.popularity) == (3.0, 1.0, 8.0, 4.0, 3)


def test_sessions_are_ordered_with_gaps_and_tokens_are_framed(spark):
    events = _events(spark, [(30, "cart", "s1", "a", "c1", 1.0), (0, "view", "s1", "a", "c1", 1.0),
                             (10, "search", "s1", None, "c1", None)])
    catalog = build_item_catalog(events, None, [])
    sessions = build_sessions(events, catalog, holdout_percent=0).collect()
    assert len(sessions) == 1
    s = sessions[0]
    assert s.event_types == ["view", "search", "cart"]
    assert s.gap_seconds == [0.0, 10.0, 20.0]
    assert s.item_idx == [1, 0, 1] and s.split == "train"
    contexts = spark.createDataFrame([("u1", [0.5] * 7, 1)], "user_id string, user_context array<float>, user_category_idx int")
    tokens = build_session_tokens(spark.createDataFrame([s]), catalog, contexts, window=4, edges=[0, 5, 15, 30]).collect()
    assert len(tokens) == 1
    t = tokens[0]
    assert t.event_type == [BOS, 3, 6, 4, EOS, PAD]
    assert t.item_idx == [0, 1, 0, 1, 0, 0]
    assert t.gap_bucket == [0, 0, 2, 3, 0, 0]
    assert t.length == 5
    assert t.user_context == [0.5] * 7 and t.user_category_idx == 1


def test_long_sessions_become_overlapping_windows_covering_every_token(spark):
    rows = [(i, "view", "s1", f"i{i}", "c", 1.0) for i in range(10)]
    events = _events(spark, rows)
    catalog = build_item_catalog(events, None, [])
    sessions = build_sessions(events, catalog, holdout_percent=0)
    contexts = spark.createDataFrame([("u1", [0.0] * 7, 0)], "user_id string, user_context array<float>, user_category_idx int")
    windows = sorted(build_session_tokens(sessions, catalog, contexts, window=4, edges=[0]).collect(),
                     key=lambda r: r.window_start)
    assert [w.window_start for w in windows] == [0, 2, 4, 6]
    assert all(len(w.event_type) == 6 for w in windows)
    assert windows[0].event_type[0] == BOS and windows[-1].event_type[-1] == EOS
    covered = {w.window_start + k for w in windows for k in range(w.length)}
    assert covered == set(range(12))


@pytest.mark.parametrize("percent,expected", [(0, {"train"}), (100, {"holdout"})])
def test_holdout_split_follows_the_configured_share(spark, percent, expected):
    events = _events(spark, [(i, "view", f"s{i}", "a", "c", 1.0) for i in range(20)])
    catalog = build_item_catalog(events, None, [])
    assert {r.split for r in build_sessions(events, catalog, percent).collect()} == expected


def test_user_profiles_count_activity_and_category_affinity(spark):
    from synth.featurize import build_user_profiles

    events = _events(spark, [(0, "view", "s1", "a", "c1", 2.0), (60, "cart", "s1", "a", "c1", 2.0),
                             (120, "purchase", "s1", "a", "c1", 2.0), (86400, "view", "s2", "b", "c2", 5.0)])
    profile = build_user_profiles(events).first()
    assert (profile.n_sessions, profile.n_events, profile.n_views, profile.n_carts, profile.n_purchases) == (2, 4, 2, 1, 1)
    assert profile.monetary == 2.0 and profile.recency_days == 0.0
    assert profile.top_category == "c1"
    assert profile.category_affinity == {"c1": 0.75, "c2": 0.25}


def test_catalog_takes_the_most_frequent_values_and_works_without_prices(spark):
    events = _events(spark, [(0, "view", "s1", "a", "c1", None), (1, "view", "s1", "a", "c2", None),
                             (2, "view", "s2", "a", "c2", None), (3, "view", "s2", "b", "c1", None),
                             (4, "view", "s2", "b", "c0", None)])
    items = {r.item_id: r for r in build_item_catalog(events, None, []).collect()}
    assert items["a"].category == "c2" and items["b"].category == "c0"  # ties go to the lowest value
    assert all(r.price is None and r.price_mean is None and r.price_min is None for r in items.values())
    assert (items["a"].popularity, items["b"].popularity) == (3, 2)
