"""The Arrow data plane's helpers: hashes that must never change between processes or releases (item
ids, splits and event ids depend on them), buckets, and a write committed from Arrow tables."""
import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synth import _arrow


def test_hash64_is_fixed_and_hashes_each_value_alike():
    hashes = _arrow.hash64(pa.chunked_array([["a", "item-1"], [None, "", "a"]]))
    # Fixed values: these hashes order new item ids and decide holdout splits on every machine.
    assert hashes[:2].tolist() == [198367012849983736, 3271415252902993251]
    assert hashes[0] == hashes[4] and hashes[2] == hashes[3]  # a null hashes as ""
    long = "x" * 5000
    assert _arrow.hash64(pa.array([long, long + "y"])).tolist()[0] != _arrow.hash64(pa.array([long + "y"])).tolist()[0]


def test_range_buckets_keep_hash_order_for_any_count():
    hashes = np.sort(np.random.default_rng(1).integers(0, 2**63, 10_000, dtype=np.uint64) * np.uint64(2))
    for n in (1, 3, 7, 64):
        buckets = _arrow.range_bucket(hashes, n)
        assert buckets.min() >= 0 and buckets.max() < n
        assert np.all(np.diff(buckets) >= 0)  # sorted hashes fall in non-decreasing buckets


def test_combined_hashes_tell_nulls_from_values_and_columns_apart():
    rows = [pa.array(["a", None, "", "a"]), pa.array([1.5, 1.5, 1.5, None])]
    first, second = _arrow.combined_hashes(rows, 4)
    assert len(set(first.tolist())) == 4 and len(set(second.tolist())) == 4
    swapped = _arrow.combined_hashes(rows[::-1], 4)
    assert swapped[0][0] != first[0]
    ids = _arrow.hex_digits(first, second).to_pylist()
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert ids[0][:16] == f"{int(first[0]):016x}"


def test_buckets_travel_as_ipc_blobs_and_come_back_whole():
    table = pa.table({"k": list(range(10)), "v": [str(i) for i in range(10)]})
    records = list(_arrow.by_bucket(table, np.array([i % 3 for i in range(10)]), 3, "rows"))
    assert [bucket for bucket, _ in records] == [0, 1, 2]
    payloads = _arrow.payloads_of(records)
    back = _arrow.from_ipc(payloads["rows"])
    assert sorted(back.column("k").to_pylist()) == list(range(10))
    assert _arrow.from_ipc([]) is None


def test_read_parquet_adds_the_partition_column_from_the_path(tmp_path):
    folder = tmp_path / "event_date=2026-11-02"
    folder.mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), folder / "part-0.parquet")
    table = _arrow.read_parquet([(folder / "part-0.parquet").as_uri()], ["x", "event_date"], "event_date")
    assert table.column("event_date").to_pylist() == [dt.date(2026, 11, 2)] * 2


def test_tables_written_on_executors_are_committed_once(spark, lake):
    writer = lake.arrow_writer("metrics")
    rows = pa.table({"metric": ["a", "b"], "subject": ["s", "s"], "value": [1.0, 2.0], "description": ["d", "d"],
                     "run_id": ["r1", "r2"]})
    adds = spark.sparkContext.parallelize([0, 1], 2).mapPartitionsWithIndex(
        lambda i, _: writer([rows.slice(i, 1)])).collect()
    commit = lake.commit_files(writer, adds, app_id="evaluate:r")
    assert (commit.rows, commit.files, commit.version) == (2, 2, 0)
    assert sorted(r.metric for r in lake.read("metrics").df.collect()) == ["a", "b"]
    assert lake.committed("metrics", "evaluate:r") == 0 and lake.rows("metrics", 0) == 2


def test_filesystems_pyarrow_cannot_open_stay_on_sparks_readers(tmp_path):
    from synth import sources

    fs, path = _arrow.filesystem(tmp_path.as_uri())
    assert type(fs).__name__ == "LocalFileSystem" and path == str(tmp_path)
    assert sources._arrow_opens(str(tmp_path)) and sources._arrow_opens(tmp_path.as_uri())
    assert not sources._arrow_opens("abfss://container@account.dfs.core.windows.net/clicks")
