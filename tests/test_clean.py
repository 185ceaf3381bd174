import hashlib
import re

import pytest

from synth.clean import QuarantineThresholdExceeded
from synth.runner import StageContext, run_stage
from synth import clean

from conftest import shared_data

HEADER = "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
GOOD = [
    "2026-11-01 10:00:00 UTC,view,100,5,cat.a,BrandX,10.00,501,sessA",
    "2026-11-01 10:00:30 UTC,search,,5,cat.a,,,501,sessA",
    "2026-11-01 10:01:00 UTC,cart,100,5,cat.a,BrandX,10.00,501,sessA",
    "2026-11-01 10:02:00 UTC,purchase,100,5,cat.a,BrandX,10.00,501,sessA",
    # No source session: split on the 30-minute inactivity gap into two sessions.
    "2026-11-01 10:00:00 UTC,view,200,6,,BrandY,20.00,502,",
    "2026-11-01 10:10:00 UTC,view,201,6,,BrandY,21.00,502,",
    "2026-11-01 11:00:00 UTC,view,202,6,,BrandY,22.00,502,",
]
BAD = {
    "2026-11-01 10:05:00 UTC,view,100": "malformed_line",
    "2026-11-01 10:05:00 UTC,view,100,5,cat.a,BrandX,10.00,,sessB": "missing_user",
    "2026-11-01 10:05:00 UTC,view,,5,cat.a,BrandX,10.00,503,sessB": "missing_item",
    "yesterday,view,100,5,cat.a,BrandX,10.00,503,sessB": "bad_timestamp",
    ",view,100,5,cat.a,BrandX,10.00,503,sessB": "missing_time",
    "1999-01-01 10:05:00 UTC,view,100,5,cat.a,BrandX,10.00,503,sessB": "impossible_timestamp",
    "2026-11-01 10:05:00 UTC,click,100,5,cat.a,BrandX,10.00,503,sessB": "unknown_event_type",
    "2026-11-01 10:05:00 UTC,view,100,5,cat.a,BrandX,-1.00,503,sessB": "bad_price",
    "2026-11-01 10:05:00 UTC,view,100,5,cat.a,BrandX,abc,503,sessB": "bad_price",
}
BOT = [f"2026-11-01 12:{m:02d}:00 UTC,view,{300 + m},7,,BrandZ,5.00,666,sessBot" for m in range(6)]


def _write_raw(path, lines, truncated=""):
    path.mkdir(parents=True, exist_ok=True)
    (path / "part-0.csv").write_text("\n".join([HEADER, *lines]) + "\n" + truncated)


@pytest.fixture
def cleaned(spark, lake, make_cfg, tmp_path):
    cfg = make_cfg(**{"input.source": "rees46", "clean.max_quarantine_share": 1.0,
                      "clean.bot_max_events_per_hour": 5})
    lines = GOOD + [GOOD[2]] + list(BAD) + BOT
    _write_raw(tmp_path / "raw", lines, truncated="2026-11-01 10:09:00 UTC,view,1")
    counts = run_stage("clean", cfg, spark, lake)
    return cfg, counts


def test_every_raw_row_is_accounted_for(cleaned):
    _, counts = cleaned
    assert counts["raw"] == len(GOOD) + 1 + len(BAD) + len(BOT) + 1
    assert counts["duplicates"] == 1
    assert counts["clean"] == len(GOOD)
    assert counts["raw"] == counts["clean"] + counts["quarantined"] + counts["duplicates"]
    assert counts["skipped_header_lines"] == 1


def test_quarantine_holds_reason_and_raw_text(cleaned, lake):
    rows = lake.read("quarantine").df.collect()
    by_line = {r.raw_line: r.reason for r in rows}
    for line, reason in BAD.items():
        assert by_line[line] == reason
    assert by_line["2026-11-01 10:09:00 UTC,view,1"] == "malformed_line"
    assert all(by_line[line] == "bot_user" for line in BOT)
    assert all(r.run_id == "test" and r.source_file.endswith("part-0.csv") for r in rows)


def test_bot_rows_keep_their_raw_text_from_any_piece_of_any_file(spark, lake, make_cfg, tmp_path, monkeypatch):
    """Valid rows cross the shuffle without their raw line; a bot-like user's rows get theirs read again
    from the piece they came from: here byte ranges of a plain file, and a gzip file read whole."""
    import gzip

    from synth import sources

    monkeypatch.setattr(sources, "_SPLIT_BYTES", 131)  # a prime: ranges end everywhere in a line
    cfg = make_cfg(**{"input.source": "rees46", "clean.max_quarantine_share": 1.0,
                      "clean.bot_max_events_per_hour": 5})
    more_bot = [f"2026-11-01 12:{m:02d}:30 UTC,view,{400 + m},7,,BrandZ,5.00,666,sessBot" for m in range(6)]
    raw = tmp_path / "raw"
    raw.mkdir(parents=True)
    (raw / "part-0.csv").write_text("\n".join([HEADER, *[line for pair in zip(GOOD, BOT) for line in pair]]) + "\n")
    with gzip.open(raw / "part-1.csv.gz", "wt") as f:
        f.write("\n".join([HEADER, *more_bot]) + "\n")
    counts = run_stage("clean", cfg, spark, lake)
    assert counts["quarantined.bot_user"] == 12
    rows = lake.read("quarantine").df.where("reason = 'bot_user'").collect()
    assert sorted(r.raw_line for r in rows) == sorted(BOT + more_bot)
    assert {r.source_file.rsplit("/", 1)[-1] for r in rows} == {"part-0.csv", "part-1.csv.gz"}


def test_bot_rows_keep_their_raw_text_from_spark_read_rows(spark, lake, make_cfg, tmp_path, monkeypatch, caplog):
    """Rows Spark's readers read keep their raw line through the shuffle (they have no piece to read
    again from)."""
    import logging

    from synth import sources

    monkeypatch.setattr(sources, "_on_arrow", lambda feed: False)
    caplog.set_level(logging.INFO, logger="synth.sources")
    cfg = make_cfg(**{"input.source": "rees46", "clean.max_quarantine_share": 1.0,
                      "clean.bot_max_events_per_hour": 5})
    _write_raw(tmp_path / "raw", GOOD + BOT)
    counts = run_stage("clean", cfg, spark, lake)
    assert counts["quarantined.bot_user"] == len(BOT) and counts["clean"] == len(GOOD)
    rows = lake.read("quarantine").df.where("reason = 'bot_user'").collect()
    assert sorted(r.raw_line for r in rows) == sorted(BOT)
    assert "read in Arrow" not in caplog.text and "rees46: 1 file(s)" in caplog.text


def test_events_are_typed_sessionized_and_pseudonymized(cleaned, lake):
    events = lake.read("events").df
    rows = events.orderBy("event_time", "event_type").collect()
    assert {r.event_type for r in rows} == {"view", "search", "cart", "purchase"}
    # Pseudonyms are pure hex digests (the key is random per test run, so a digest may contain "501"
    # by chance): the format itself shows that no part of the raw id was kept.
    assert all(re.fullmatch(r"u_[0-9a-f]{32}", r.user_id) for r in rows)
    assert all(re.fullmatch(r"s_[0-9a-f]{32}", r.session_id) for r in rows)
    sessions = events.groupBy("user_id", "session_id").count().collect()
    assert sorted(r["count"] for r in sessions) == [1, 2, 4]
    search = next(r for r in rows if r.event_type == "search")
    assert search.item_id is None and search.price is None
    assert {r.brand for r in rows if r.brand} == {"brandx", "brandy"}
    assert events.select("event_id").distinct().count() == len(rows)
    assert {str(r.event_date) for r in rows} == {"2026-11-01"}


def test_rerun_of_the_same_run_changes_nothing(cleaned, spark, lake):
    cfg, counts = cleaned
    versions = {t: lake.version(t) for t in ("events", "quarantine", "pipeline_runs")}
    assert run_stage("clean", cfg, spark, lake) == counts
    assert {t: lake.version(t) for t in versions} == versions
    run_stage("clean", cfg, spark, lake, force=True)
    assert lake.read("quarantine").df.count() == counts["quarantined"]
    assert lake.read("events").df.count() == counts["clean"]


def test_user_pseudonyms_are_the_keyed_hash_of_the_raw_ids(cleaned, lake):
    cfg, _ = cleaned
    key = clean.pseudonym_key(cfg)
    expected = {"u_" + hashlib.blake2b(f"user|{raw}".encode(), key=key, digest_size=16).hexdigest() for raw in (501, 502)}
    assert {r.user_id for r in lake.read("events").df.select("user_id").distinct().collect()} == expected


def test_pseudonym_digests_take_keys_of_any_length():
    import pyarrow as pa

    from synth import _arrow

    messages = pa.array(["user|501", "user|502"])
    for key in (b"k", b"k" * 64, b"k" * 200):
        effective = key if len(key) <= 64 else hashlib.blake2b(key).digest()
        assert _arrow.hex_digits(*clean._digests(key, messages).T, prefix="u_").to_pylist() == [
            "u_" + hashlib.blake2b(m.encode(), key=effective, digest_size=16).hexdigest() for m in messages.to_pylist()]
    assert (clean._digests(b"k" * 64, messages) != clean._digests(b"k" * 200, messages)).all()


def test_quarantine_share_above_threshold_fails_after_writing_quarantine(spark, lake, make_cfg, tmp_path):
    cfg = make_cfg(**{"input.source": "rees46"})
    _write_raw(tmp_path / "raw", GOOD + list(BAD))
    with pytest.raises(QuarantineThresholdExceeded, match="clean.max_quarantine_share"):
        clean.run(StageContext(cfg, spark, lake, "clean"))
    assert lake.read("quarantine").df.count() == len(BAD)
    assert not lake.exists("events")


def test_rees46_sample(spark, lake, make_cfg):
    path = shared_data("rees46/2019-Oct-head.csv")
    cfg = make_cfg(**{"input.source": "rees46", "input.path": str(path)})
    counts = run_stage("clean", cfg, spark, lake)
    assert counts["raw"] == 17434 + 1  # the sample's events plus its truncated last line
    assert counts["duplicates"] == 5
    assert counts["quarantined.bad_price"] == 19
    assert counts["quarantined.malformed_line"] == 1
    assert counts["raw"] == counts["clean"] + counts["quarantined"] + counts["duplicates"]


def test_duplicates_are_dropped_and_long_sessions_capped_in_one_pass():
    import datetime as dt

    import pyarrow as pa

    t0 = dt.datetime(2026, 11, 1, 23, 0, tzinfo=dt.timezone.utc)
    minutes = lambda m: t0 + dt.timedelta(minutes=m)  # noqa: E731
    rows = [
        # u1, no source session: 4 events within the gap, one of them duplicated in a later file. The
        # cap of 2 events makes two sessions; the duplicate must count neither as an event nor a position.
        (minutes(0), "view", "u1", None, "a", "f1"), (minutes(1), "view", "u1", None, "b", "f2"),
        (minutes(1), "view", "u1", None, "b", "f1"), (minutes(2), "view", "u1", None, "c", "f1"),
        (minutes(3), "view", "u1", None, "d", "f1"),
        # u1 after a 40-minute gap: a new segment, also cut at midnight (00:05 the next day).
        (minutes(43), "view", "u1", None, "e", "f1"), (minutes(65), "view", "u1", None, "f", "f1"),
    ]
    table = pa.table({
        "event_time": pa.array([r[0] for r in rows], pa.timestamp("us", tz="UTC")),
        "event_type": [r[1] for r in rows], "user_id": [r[2] for r in rows],
        "session_id": pa.array([r[3] for r in rows], pa.string()), "item_id": [r[4] for r in rows],
        "category": ["c"] * len(rows), "category_path": pa.nulls(len(rows), pa.string()), "brand": ["b"] * len(rows),
        "price": [1.0] * len(rows), "source_file": [r[5] for r in rows],
        "event_date": pa.array([r[0].date() for r in rows], pa.date32())})
    user_hi, user_lo = clean._user_digests(b"k", table.column("user_id"))
    table = table.drop(["user_id"]).append_column("user_hi", pa.array(user_hi)).append_column("user_lo", pa.array(user_lo))
    events = clean.deduplicated_sessions(table, gap_seconds=30 * 60, max_session_events=2, key=b"k").to_pylist()
    assert len(events) == 6
    assert next(r for r in events if r["item_id"] == "b")["source_file"] == "f1"
    sessions = {}
    for r in sorted(events, key=lambda r: r["event_time"]):
        sessions.setdefault(r["session_id"], []).append(r["item_id"])
    assert sorted(sessions.values()) == [["a", "b"], ["c", "d"], ["e"], ["f"]]
    assert len({r["event_id"] for r in events}) == 6 and len({r["user_id"] for r in events}) == 1
    # The same rows in another order (as another partitioning would deliver them) give the same events.
    again = clean.deduplicated_sessions(table.take(pa.array([6, 5, 4, 3, 2, 1, 0])), 30 * 60, 2, b"k").to_pylist()
    assert sorted(again, key=lambda r: r["event_id"]) == sorted(events, key=lambda r: r["event_id"])


def test_raw_files_dates_leave_out_impossible_times(cleaned, lake):
    # part-0.csv holds a row dated 1999-01-01 (quarantined as impossible_timestamp): its date must not
    # tie this file to 1999 in the ledger that decides what nightly runs re-read.
    files = {r.path.rsplit("/", 1)[-1]: r for r in lake.read("raw_files").df.collect()}
    assert [str(d) for d in files["part-0.csv"].event_dates] == ["2026-11-01"]


def test_events_files_hold_disjoint_user_id_ranges_and_record_them(spark, lake, make_cfg, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    # 40 users on one date: each of the two buckets (local[2]) writes one file, and with this key both
    # buckets get users.
    monkeypatch.setenv("SYNTH_PSEUDONYM_KEY", "a fixed test key")
    _write_raw(tmp_path / "raw", [f"2026-11-01 10:{m:02d}:00 UTC,view,{100 + m},5,,b,1.00,{900 + m},s{m}"
                                  for m in range(40)])
    run_stage("clean", make_cfg(**{"input.source": "rees46"}), spark, lake)
    ranges = lake.file_ranges("events", lake.version("events"), "user_id")
    assert len(ranges) == 2
    for uri, rows, low, high in ranges:
        users = pq.read_table(uri[len("file://"):], columns=["user_id"]).column("user_id").to_pylist()
        assert (rows, low, high) == (len(users), min(users), max(users))
    ordered = sorted(ranges, key=lambda r: r[2])
    assert ordered[0][3] < ordered[1][2] and sum(r[1] for r in ranges) == 40


def test_input_and_lake_folders_with_spaces(spark, make_cfg, tmp_path):
    from synth.lake import Lake

    raw, root = tmp_path / "raw files", tmp_path / "a lake"
    _write_raw(raw, GOOD)
    options = {"input.source": "rees46", "input.path": str(raw), "lake.root": str(root)}
    lake = Lake(spark, str(root))
    assert run_stage("clean", make_cfg(**options), spark, lake)["clean"] == len(GOOD)
    assert run_stage("featurize", make_cfg(**options), spark, lake)["users"] == 2
    (raw / "part-1.csv").write_text(HEADER + "\n" + GOOD[0].replace("2026-11-01", "2026-11-02") + "\n")
    nightly = run_stage("clean", make_cfg(**options, **{"run.id": "night-2"}), spark, lake)
    assert (nightly["files_read"], nightly["clean"]) == (1, 1)
    assert sorted(r.path.rsplit("/", 1)[-1] for r in lake.read("raw_files").df.collect()) == ["part-0.csv", "part-1.csv"]
