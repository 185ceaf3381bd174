import datetime as dt

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from synth.featurize import (BOS, EOS, PAD, item_pass, item_statistics, session_tokens, sessions_of,
                             user_contexts, user_groups, user_profiles)

T0 = dt.datetime(2026, 11, 1, 10, 0, 0, tzinfo=dt.timezone.utc)


def _events(rows, item_idx=None):
    """Events of user u1 from (seconds after T0, type, session, item, category, price) tuples."""
    times = [T0 + dt.timedelta(seconds=r[0]) for r in rows]
    return pa.table({
        "event_id": [f"e{i}" for i in range(len(rows))],
        "event_time": pa.array(times, pa.timestamp("us", tz="UTC")),
        "event_type": [r[1] for r in rows], "user_id": ["u1"] * len(rows), "session_id": [r[2] for r in rows],
        "item_id": pa.array([r[3] for r in rows], pa.string()), "category": [r[4] for r in rows],
        "brand": ["b"] * len(rows), "price": pa.array([r[5] for r in rows], pa.float64()),
        "event_date": pa.array([t.date() for t in times], pa.date32()),
        "item_idx": pa.array(item_idx or [None] * len(rows), pa.int32())})


def _counts(events):
    keys = ["item_id", "category", "brand", "price"]
    counted = events.filter(pc.is_valid(events.column("item_id"))).group_by(keys).aggregate([("event_time", "count")])
    return pa.table({"n": counted.column("event_time_count"), **{k: counted.column(k) for k in keys}})


def _catalog(spark, tmp_path, name, rows, previous=None, buckets=4):
    """The catalogue rows the item pass gives for `rows` (and a previous catalogue), by item id."""
    path = tmp_path / f"{name}.parquet"
    pq.write_table(_events(rows), path)
    previous_files = []
    if previous:
        from synth.featurize import _catalog_schema

        pq.write_table(pa.Table.from_pylist(list(previous.values()), _catalog_schema()), tmp_path / f"{name}-prev.parquet")
        previous_files = [(tmp_path / f"{name}-prev.parquet").as_uri()]
    items, vocabulary = item_pass(spark.sparkContext, [path.as_uri()], previous_files, buckets)
    try:
        tables = items.map(vocabulary.catalog).collect()
    finally:
        items.unpersist()
    return {r["item_id"]: r for table in tables for r in table.to_pylist()}


def test_vocabulary_ids_are_stable_and_new_items_are_appended(spark, tmp_path):
    first = _catalog(spark, tmp_path, "day1", [(0, "view", "s1", "b", "c1", 2.0), (1, "view", "s1", "a", "c2", 1.0)])
    assert sorted(r["item_idx"] for r in first.values()) == [1, 2]
    assert {k: r["category_idx"] for k, r in first.items()} == {"b": 1, "a": 2}  # categories in key order
    day2 = [(0, "view", "s2", "c", "c3", 3.0), (1, "view", "s2", "b", "c1", 2.0), (2, "view", "s2", "0", "c1", 2.0)]
    second = _catalog(spark, tmp_path, "day2", day2, previous=first)
    assert {k: second[k]["item_idx"] for k in first} == {k: r["item_idx"] for k, r in first.items()}
    assert sorted(second[k]["item_idx"] for k in ("0", "c")) == [3, 4]
    assert second["a"]["popularity"] == 0 and second["b"]["popularity"] == 1
    assert second["b"]["category_idx"] == first["b"]["category_idx"] and second["c"]["category_idx"] == 3
    # New items are numbered in the order of their id's hash, whatever the number of buckets.
    again = _catalog(spark, tmp_path, "day2-one-bucket", day2, previous=first, buckets=1)
    assert {k: r["item_idx"] for k, r in again.items()} == {k: r["item_idx"] for k, r in second.items()}


def test_catalog_holds_price_statistics_and_popularity():
    events = _events([(0, "view", "s1", "a", "c1", 1.0), (1, "cart", "s1", "a", "c1", 3.0),
                      (2, "view", "s2", "a", "c1", 8.0), (3, "view", "s2", "b", "c2", 5.0)])
    a = next(r for r in item_statistics(_counts(events)).to_pylist() if r["item_id"] == "a")
    assert (a["price"], a["price_min"], a["price_max"], a["price_mean"], a["popularity"]) == (3.0, 1.0, 8.0, 4.0, 3)


def test_catalog_takes_the_most_frequent_values_and_works_without_prices():
    events = _events([(0, "view", "s1", "a", "c1", None), (1, "view", "s1", "a", "c2", None),
                      (2, "view", "s2", "a", "c2", None), (3, "view", "s2", "b", "c1", None),
                      (4, "view", "s2", "b", "c0", None)])
    items = {r["item_id"]: r for r in item_statistics(_counts(events)).to_pylist()}
    assert items["a"]["category"] == "c2" and items["b"]["category"] == "c0"  # ties go to the lowest value
    assert all(r["price"] is None and r["price_mean"] is None and r["price_min"] is None for r in items.values())
    assert (items["a"]["popularity"], items["b"]["popularity"]) == (3, 2)


def _contexts(value: float, category_idx: int):
    return pa.table({"user_id": ["u1"], "user_context": pa.array([[value] * 7], pa.list_(pa.float32())),
                     "user_category_idx": pa.array([category_idx], pa.int32())})


def test_sessions_are_ordered_with_gaps_and_tokens_are_framed():
    events = _events([(30, "cart", "s1", "a", "c1", 1.0), (0, "view", "s1", "a", "c1", 1.0),
                      (10, "search", "s1", None, "c1", None)], item_idx=[1, 1, None])
    sessions = sessions_of(events, holdout_percent=0)
    assert sessions.num_rows == 1
    s = sessions.to_pylist()[0]
    assert s["event_types"] == ["view", "search", "cart"]
    assert s["gap_seconds"] == [0.0, 10.0, 20.0]
    assert s["item_idx"] == [1, 0, 1] and s["split"] == "train" and s["n_events"] == 3
    tokens = session_tokens(sessions, _contexts(0.5, 1), window=4, edges=[0, 5, 15, 30], category_ids={"c1": 7})
    assert tokens.num_rows == 1
    t = tokens.to_pylist()[0]
    assert t["event_type"] == [BOS, 3, 6, 4, EOS]  # unpadded: the training reader pads
    assert t["item_idx"] == [0, 1, 0, 1, 0]
    assert t["category_idx"] == [0, 7, 7, 7, 0]
    assert t["gap_bucket"] == [0, 0, 2, 3, 0]
    assert t["length"] == 5
    assert t["user_context"] == [0.5] * 7 and t["user_category_idx"] == 1


def test_long_sessions_become_overlapping_windows_covering_every_token():
    events = _events([(i, "view", "s1", f"i{i}", "c", 1.0) for i in range(10)], item_idx=list(range(1, 11)))
    windows = sorted(session_tokens(sessions_of(events, 0), _contexts(0.0, 0), window=4, edges=[0],
                                    category_ids={}).to_pylist(), key=lambda r: r["window_start"])
    assert [w["window_start"] for w in windows] == [0, 2, 4, 6]
    assert all(len(w["event_type"]) == 6 for w in windows)
    assert windows[0]["event_type"][0] == BOS and windows[-1]["event_type"][-1] == EOS
    covered = {w["window_start"] + k for w in windows for k in range(w["length"])}
    assert covered == set(range(12))


def test_windows_of_sessions_of_every_length_hold_exactly_their_tokens():
    lengths = [1, 2, 3, 4, 5, 9]
    events = _events([(i, "view", f"s{n}", f"i{i}", "c", 1.0) for n in lengths for i in range(n)],
                     item_idx=[i + 1 for n in lengths for i in range(n)])
    windows = session_tokens(sessions_of(events, 0), _contexts(0.0, 0), window=4, edges=[0],
                             category_ids={}).to_pylist()
    by_session: dict[str, list] = {}
    for w in windows:
        assert all(len(w[c]) == w["length"] <= 6 for c in ("event_type", "item_idx", "category_idx", "gap_bucket"))
        assert PAD not in w["event_type"]
        by_session.setdefault(w["session_id"], []).append(w)
    for n in lengths:
        stream = [BOS] + [3] * n + [EOS]
        items = [0] + list(range(1, n + 1)) + [0]
        for w in by_session[f"s{n}"]:
            assert w["event_type"] == stream[w["window_start"]:w["window_start"] + w["length"]]
            assert w["item_idx"] == items[w["window_start"]:w["window_start"] + w["length"]]
        assert max(w["window_start"] + w["length"] for w in by_session[f"s{n}"]) == n + 2


@pytest.mark.parametrize("percent,expected", [(0, {"train"}), (100, {"holdout"})])
def test_holdout_split_follows_the_configured_share(percent, expected):
    events = _events([(i, "view", f"s{i}", "a", "c", 1.0) for i in range(20)])
    assert set(sessions_of(events, percent).column("split").to_pylist()) == expected


def test_holdout_split_is_a_stable_share_of_sessions():
    events = _events([(i, "view", f"s{i}", "a", "c", 1.0) for i in range(4000)])

    def split(table):
        sessions = sessions_of(table, 10)
        return dict(zip(sessions.column("session_id").to_pylist(), sessions.column("split").to_pylist()))

    everything = split(events)
    assert 300 < list(everything.values()).count("holdout") < 500
    # A session's split depends on its id only, not on the other sessions around it.
    assert split(events.slice(1000, 500)) == {f"s{i}": everything[f"s{i}"] for i in range(1000, 1500)}


def test_user_profiles_count_activity_and_category_affinity():
    events = _events([(0, "view", "s1", "a", "c1", 2.0), (60, "cart", "s1", "a", "c1", 2.0),
                      (120, "purchase", "s1", "a", "c1", 2.0), (86400, "view", "s2", "b", "c2", 5.0)])
    profile = user_profiles(events, T0 + dt.timedelta(days=1)).to_pylist()[0]
    assert (profile["n_sessions"], profile["n_events"], profile["n_views"], profile["n_carts"],
            profile["n_purchases"]) == (2, 4, 2, 1, 1)
    assert profile["monetary"] == 2.0 and profile["recency_days"] == 0.0
    assert profile["top_category"] == "c1"
    assert dict(profile["category_affinity"]) == {"c1": 0.75, "c2": 0.25}
    context = user_contexts(user_profiles(events, T0 + dt.timedelta(days=1)), {"c1": 4}).to_pylist()[0]
    assert context["user_category_idx"] == 4 and context["user_context"][3] == pytest.approx(0.25)


def test_a_lake_without_events_gives_empty_feature_tables(spark, lake, make_cfg):
    from schemas import contract
    from synth.runner import run_stage

    lake.write(spark.createDataFrame([], contract("events").spark_schema()), "events", app_id="clean:empty")
    counts = run_stage("featurize", make_cfg(), spark, lake)
    assert counts == {"items": 0, "sessions": 0, "sessions_written": 0, "users": 0, "token_windows": 0}
    assert all(lake.read(t).df.count() == 0 for t in ("item_catalog", "sessions", "user_profiles", "session_tokens"))


def test_item_statistics_do_not_depend_on_the_order_counts_arrive_in():
    """Counts reach an item bucket in whatever order the map tasks and their group-bys produced them; the
    statistics, float means included, must come out bit for bit the same."""
    import numpy as np
    import pyarrow as pa

    from synth import featurize

    rng = np.random.default_rng(5)
    rows = 3000
    prices = rng.choice([0.1, 0.7, 3.3, 19.99, 1e6 + 0.3], rows)
    counts = pa.table({"n": pa.array(rng.integers(1, 1000, rows)),
                       "item_id": pa.array([f"item-{i}" for i in rng.integers(0, 20, rows)]),
                       "category": pa.array(rng.choice(["a", "b"], rows).tolist()),
                       "brand": pa.array(rng.choice(["x", "y"], rows).tolist()),
                       "price": pa.array(prices)})
    expected = featurize.item_statistics(counts)
    for _ in range(5):
        shuffled = counts.take(pa.array(rng.permutation(rows)))
        assert featurize.item_statistics(shuffled).equals(expected)
    # The same events counted by other tasks: each count split in two parts.
    part = rng.integers(0, counts.column("n").to_numpy())
    split = pa.concat_tables([counts.set_column(0, "n", pa.array(part)),
                              counts.set_column(0, "n", pa.array(counts.column("n").to_numpy() - part))])
    split = split.filter(pa.compute.greater(split.column("n"), 0))
    assert featurize.item_statistics(split).equals(expected)


def test_item_statistics_pick_the_value_with_most_events_and_the_lowest_of_ties():
    """Against a plain Python count on random counts with nulls and many ties."""
    import collections

    import numpy as np
    import pyarrow as pa

    from synth import featurize

    rng = np.random.default_rng(11)
    rows = 4000
    counts = pa.table({"n": pa.array(rng.integers(1, 4, rows)),
                       "item_id": pa.array([f"i{i}" for i in rng.integers(0, 300, rows)]),
                       "category": pa.array([None if c == "-" else c for c in rng.choice(["-", "b", "a", "ba", "B"], rows)]),
                       "brand": pa.array([None if c == "-" else c for c in rng.choice(["-", "-", "y", "x"], rows)]),
                       "price": pa.array(rng.choice([1.0, 2.0], rows))})
    totals = {c: collections.defaultdict(collections.Counter) for c in ("category", "brand")}
    for row in counts.to_pylist():
        for column in totals:
            if row[column] is not None:
                totals[column][row["item_id"]][row[column]] += row["n"]
    for row in featurize.item_statistics(counts).to_pylist():
        for column, by_item in totals.items():
            events = by_item.get(row["item_id"])
            expected = min(events, key=lambda value: (-events[value], value)) if events else None
            assert row[column] == expected, (row["item_id"], column, dict(events or {}))


@pytest.mark.parametrize("catalog_ids, numeric", [
    (["17", "3", "-5", "900000000000000001", "42"], True),
    (["17", "3", "007", "42"], False),  # "007" is not how 7 is spelled: the lookup keeps the strings
    (["17", "a-3", "42"], False),
])
def test_item_lookup_by_number_or_by_string_finds_what_a_string_lookup_finds(catalog_ids, numeric):
    import pyarrow as pa
    import pyarrow.compute as pc

    from synth import _arrow, featurize

    catalog = pa.table({"item_id": pa.array(catalog_ids), "item_idx": pa.array(range(1, len(catalog_ids) + 1), pa.int32())})
    # Two catalogue buckets, as the item pass writes them.
    lookup = featurize.item_lookup([_arrow.to_ipc(featurize._catalog_ids(catalog.slice(0, 2))),
                                    _arrow.to_ipc(featurize._catalog_ids(catalog.slice(2)))])
    assert ("item_number" in _arrow.from_ipc([lookup]).column_names) == numeric
    wanted = [*catalog_ids, None, "7", "017", "+17", " 17", "x", "99999999999999999999", "42", "-5", "3"]
    events = pa.table({"item_id": pa.array(wanted, pa.string())})
    found = featurize._with_item_idx(events, type("Broadcast", (), {"value": lookup})).column("item_idx")
    expected = catalog.column("item_idx").take(pc.index_in(events.column("item_id"), value_set=catalog.column("item_id")))
    assert found.to_pylist() == expected.to_pylist()
    assert found.to_pylist()[:len(catalog_ids)] == list(range(1, len(catalog_ids) + 1))


def test_user_profiles_do_not_depend_on_the_order_events_arrive_in():
    """A user bucket's events come in fetch order, which a cluster does not fix; float sums (monetary)
    must come out bit for bit the same."""
    import datetime as dt

    import numpy as np
    import pyarrow as pa

    from synth import featurize

    rng = np.random.default_rng(9)
    rows = 4000
    t0 = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    events = pa.table({
        "user_id": pa.array([f"u{i}" for i in rng.integers(0, 30, rows)]),
        "session_id": pa.array([f"s{i}" for i in rng.integers(0, 300, rows)]),
        "event_time": pa.array([t0 + dt.timedelta(seconds=int(s)) for s in rng.integers(0, 86400, rows)],
                               pa.timestamp("us", "UTC")),
        "event_type": pa.array(rng.choice(["view", "cart", "purchase"], rows, p=[0.4, 0.2, 0.4]).tolist()),
        "price": pa.array(rng.choice([0.1, 0.7, 3.3, 19.99, 1e6 + 0.3], rows)),
        "category": pa.array(rng.choice(["a", "b", "c"], rows).tolist()),
    })
    latest = t0 + dt.timedelta(days=1)
    expected = featurize.user_profiles(events, latest)
    assert expected.column("monetary").to_pylist()[0] > 0
    for _ in range(5):
        shuffled = events.take(pa.array(rng.permutation(rows)))
        assert featurize.user_profiles(shuffled, latest).equals(expected)


def test_user_groups_keep_each_user_in_one_group():
    # (uri, rows, min user_id, max user_id): a and b overlap through c; d and e are ranges of their own.
    files = [("d", 3, "u5", "u6"), ("a", 2, "u1", "u2"), ("c", 2, "u2", "u4"), ("b", 1, "u3", "u3"),
             ("e", 4, "u7", "u9"), ("empty", 0, None, None)]
    assert user_groups(files, events_per_group=5, max_group_events=10) == [["a", "c", "b"], ["d"], ["e"]]
    assert user_groups(files, events_per_group=8, max_group_events=10) == [["a", "c", "b", "d"], ["e"]]
    assert user_groups(files, events_per_group=12, max_group_events=10) == [["a", "c", "b", "d", "e"]]
    assert user_groups(files, events_per_group=5, max_group_events=4) is None  # a, b and c hold 5 events
    assert user_groups([*files, ("old", 1, None, None)], 5, 10) is None  # a file without its range


def test_user_pass_over_user_groups_gives_what_the_shuffle_gives(spark, lake, make_cfg, tmp_path, monkeypatch, caplog):
    import logging

    from synth import featurize
    from synth.runner import run_stage

    header = "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
    lines = [f"2026-11-0{1 + d} {10 + e}:00:00 UTC,{('view', 'cart', 'purchase')[e % 3]},{100 + (u * e) % 7},"
             f"{u % 3},,b,{1 + e}.5,{700 + u},s{u}-{d}" for u in range(12) for d in range(2) for e in range(u % 4 + 1)]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "part-0.csv").write_text("\n".join([header, *lines]) + "\n")
    options = {"input.source": "rees46", "spark.events_per_task": 20}
    run_stage("clean", make_cfg(**options), spark, lake)

    def tables():
        return {t: sorted(map(str, lake.read(t).df.collect())) for t in ("sessions", "user_profiles", "session_tokens")}

    with caplog.at_level(logging.INFO, logger="synth.featurize"):
        run_stage("featurize", make_cfg(**options, **{"run.id": "grouped"}), spark, lake)
    assert "user groups of events files" in caplog.text
    grouped = tables()
    monkeypatch.setattr(featurize, "user_groups", lambda *args: None)
    run_stage("featurize", make_cfg(**options, **{"run.id": "shuffled"}), spark, lake)
    assert tables() == grouped and len(grouped["user_profiles"]) == 12
