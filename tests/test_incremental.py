"""Nightly incremental clean: new files add dates, late files rebuild their dates, removed files drop
theirs, unchanged input does nothing, and the result always equals a full rebuild of the same files."""
import os
import shutil

import pytest
from pyspark.sql import functions as F

from synth.lake import Lake
from synth.runner import run_stage

HEADER = "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"


def _day(date: str, users=(501, 502), hours=(10, 11)) -> list[str]:
    return [f"{date} {h:02d}:{m:02d}:00 UTC,view,{100 + u % 7 + m},5,cat.a,BrandX,10.00,{u},"
            for u in users for h in hours for m in (0, 5)]


def _write(raw, name: str, lines: list[str]) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    (raw / name).write_text("\n".join([HEADER, *lines]) + "\n")


def _sessions(lake: Lake) -> set[tuple]:
    return {(r.session_id, tuple(r.item_ids), r.split, str(r.event_date)) for r in lake.read("sessions").df.collect()}


def _events(lake: Lake) -> set[tuple]:
    return {tuple(r) for r in lake.read("events").df.select(
        "event_id", "session_id", "user_id", F.col("event_date").cast("string")).collect()}


@pytest.fixture
def nightly(spark, make_cfg, tmp_path):
    """run(run_id) runs clean (and featurize) incrementally on tmp_path/raw; full() rebuilds the same
    files in another lake and returns it."""
    raw = tmp_path / "raw"

    def run(run_id: str, featurize=False, **overrides):
        cfg = make_cfg(**{"run.id": run_id, "input.source": "rees46", **overrides})
        lake = Lake(spark, cfg.lake.root)
        counts = run_stage("clean", cfg, spark, lake)
        if featurize:
            counts["featurize"] = run_stage("featurize", cfg, spark, lake)
        return counts, lake

    def full(featurize=False, **overrides) -> Lake:
        shutil.rmtree(tmp_path / "full-lake", ignore_errors=True)
        cfg = make_cfg(**{"run.id": "full", "input.source": "rees46", "lake.root": str(tmp_path / "full-lake"),
                          **overrides})
        lake = Lake(spark, cfg.lake.root)
        run_stage("clean", cfg, spark, lake)
        if featurize:
            run_stage("featurize", cfg, spark, lake)
        return lake

    return raw, run, full


def test_nightly_runs_process_only_what_changed(nightly):
    raw, run, full = nightly
    _write(raw, "2026-11-01.csv", _day("2026-11-01"))
    _write(raw, "2026-11-02.csv", _day("2026-11-02"))
    counts, lake = run("n1", featurize=True)
    assert counts["raw"] == counts["clean"] == 16 and counts["files_read"] == 2

    counts, _ = run("n2")
    assert counts == {"raw": 0, "clean": 0, "quarantined": 0, "duplicates": 0, "files_read": 0}

    # A new day, and a late file for 2026-11-01 holding one exact copy of an event already there.
    _write(raw, "2026-11-03.csv", _day("2026-11-03"))
    _write(raw, "late-2026-11-01.csv", _day("2026-11-01", users=(503,)) + [_day("2026-11-01")[0]])
    before = {e for e in _events(lake) if e[3] == "2026-11-02"}
    counts, _ = run("n3", featurize=True)
    # Read: the two new files and 2026-11-01.csv (same date as the late file); not 2026-11-02.csv.
    assert counts["files_read"] == 3
    assert counts["raw"] == 8 + 5 + 8 and counts["duplicates"] == 1 and counts["clean"] == 8 + 4 + 8
    assert {e for e in _events(lake) if e[3] == "2026-11-02"} == before
    rebuilt = full(featurize=True)
    assert _events(lake) == _events(rebuilt)
    # featurize rebuilt the sessions of the two dates clean rebuilt, and they match a full rebuild.
    assert (counts["featurize"]["sessions_written"], counts["featurize"]["sessions"]) == (6 + 4, 14)
    assert _sessions(lake) == _sessions(rebuilt)
    ledger = {os.path.basename(r.path): r for r in lake.read("raw_files").df.collect()}
    assert sorted(ledger) == ["2026-11-01.csv", "2026-11-02.csv", "2026-11-03.csv", "late-2026-11-01.csv"]
    assert ledger["2026-11-02.csv"].run_id == "n1" and ledger["late-2026-11-01.csv"].run_id == "n3"
    assert [str(d) for d in ledger["2026-11-03.csv"].event_dates] == ["2026-11-03"]

    # Files removed upstream take their dates' events with them.
    (raw / "2026-11-03.csv").unlink()
    counts, _ = run("n4")
    assert counts["raw"] == 0 and counts["files_read"] == 0
    assert {e[3] for e in _events(lake)} == {"2026-11-01", "2026-11-02"}
    assert _events(lake) == _events(full())


def test_changed_options_or_force_rebuild_everything(nightly):
    raw, run, _ = nightly
    _write(raw, "2026-11-01.csv", _day("2026-11-01"))
    _write(raw, "2026-11-02.csv", _day("2026-11-02"))
    run("n1")
    counts, lake = run("n2", **{"clean.session_gap_minutes": 10})
    assert counts["files_read"] == 2 and counts["raw"] == 16
    assert "options" in lake.read("pipeline_runs").df.where("run_id = 'n2'").first().artifacts["mode"]
    counts, _ = run("n3", **{"clean.session_gap_minutes": 10, "clean.incremental": False})
    assert counts["files_read"] == 2 and counts["raw"] == 16


def test_a_file_rewritten_upstream_replaces_its_dates(nightly):
    raw, run, full = nightly
    _write(raw, "2026-11-01.csv", _day("2026-11-01"))
    _write(raw, "2026-11-02.csv", _day("2026-11-02"))
    run("n1")
    _write(raw, "2026-11-02.csv", _day("2026-11-02", users=(502,)) + ["2026-11-02 10:00:00 UTC,view,100"])
    # The alert threshold is not an option that shapes events: changing it rebuilds nothing.
    counts, lake = run("n2", **{"clean.max_quarantine_share": 0.5})
    assert (counts["files_read"], counts["raw"], counts["clean"], counts["quarantined"]) == (1, 5, 4, 1)
    assert sum(e[3] == "2026-11-02" for e in _events(lake)) == 4
    assert _events(lake) == _events(full(**{"clean.max_quarantine_share": 0.5}))


def test_nightly_runs_keep_user_ranges_fine_enough_for_featurize_groups(nightly, spark, monkeypatch, caplog):
    import logging

    raw, run, _ = nightly
    monkeypatch.setenv("SYNTH_PSEUDONYM_KEY", "a fixed test key")
    users = list(range(1000, 1040))
    for part in range(8):  # the first night: 160 events in 8 files read as 8 tasks, so 8 buckets
        _write(raw, f"2026-11-01-{part}.csv", _day("2026-11-01", users=users[part::8]))
    # At 20 events per task featurize's user groups may hold up to 4 x 20 events.
    options = {"spark.events_per_task": 20}
    spark.conf.set("spark.sql.files.maxPartitionBytes", "2048")
    try:
        run("n1", featurize=True, **options)
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")
    _write(raw, "2026-11-02.csv", _day("2026-11-02", users=users))
    with caplog.at_level(logging.INFO, logger="synth.featurize"):
        counts, lake = run("n2", featurize=True, **options)
    # The night's one file alone would make 2 buckets (local[2]): two ranges of 20 users, each over 4
    # of the first night's ranges, groups of 160 events, and featurize would shuffle. The table's
    # 160 events ask for 8 ranges, as fine as the first night's.
    assert counts["files_read"] == 1
    assert "user groups of events files" in caplog.text
    ranges = lake.file_ranges("events", lake.version("events"), "user_id")
    assert len([r for r in ranges if "event_date=2026-11-02" in r[0]]) == 8
