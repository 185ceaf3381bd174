import json

import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F


def _metrics(spark, run_id, n):
    return spark.range(n).select(
        F.concat(F.lit("m"), F.col("id").cast("string")).alias("metric"), F.lit("synthetic").alias("subject"),
        F.col("id").cast("double").alias("value"), F.lit("d").alias("description"), F.lit(run_id).alias("run_id"))


def test_one_commit_per_write_with_app_transaction(spark, lake):
    first = lake.write(_metrics(spark, "a", 100).repartition(4), "metrics", app_id="evaluate:a", replace={"run_id": "a"})
    assert (first.version, first.rows) == (0, 100)
    assert first.files >= 1
    table = DeltaTable(lake._local_path("metrics"))
    assert table.transaction_version("evaluate:a") == 1
    assert lake.committed("metrics", "evaluate:a") == 0
    assert lake.committed("metrics", "evaluate:b") is None
    # Column comments from the contract reach the Delta schema; the table comment its description.
    schema = json.loads(table.schema().to_json())
    assert schema["fields"][0]["metadata"]["comment"].startswith("Metric name")
    assert table.metadata().description.startswith("Evaluation metrics")


def test_replace_touches_only_its_partition_and_reads_pin_versions(spark, lake):
    lake.write(_metrics(spark, "a", 10), "metrics", app_id="evaluate:a", replace={"run_id": "a"})
    lake.write(_metrics(spark, "b", 20), "metrics", app_id="evaluate:b", replace={"run_id": "b"})
    lake.write(_metrics(spark, "b", 5), "metrics", app_id="evaluate:b", replace={"run_id": "b"})
    counts = {r.run_id: r["count"] for r in lake.read("metrics").df.groupBy("run_id").count().collect()}
    assert counts == {"a": 10, "b": 5}
    pinned = lake.read("metrics", version=1)
    assert pinned.version == 1 and pinned.df.count() == 30


def test_rows_outside_the_replaced_partition_are_refused(spark, lake):
    with pytest.raises(ValueError, match="outside the replaced partition"):
        lake.write(_metrics(spark, "x", 3), "metrics", app_id="evaluate:y", replace={"run_id": "y"})
    assert not lake.exists("metrics")


def test_data_must_match_the_contract(spark, lake):
    with pytest.raises(ValueError, match="missing.*description"):
        lake.write(_metrics(spark, "a", 3).drop("description"), "metrics", app_id="x", replace={"run_id": "a"})


def test_empty_write_creates_a_readable_table(spark, lake):
    commit = lake.write(_metrics(spark, "a", 0), "metrics", app_id="evaluate:a", replace={"run_id": "a"})
    assert commit.rows == 0
    assert lake.read("metrics").df.count() == 0


def test_reading_a_missing_table_names_the_stage(lake):
    with pytest.raises(FileNotFoundError, match="run the featurize stage"):
        lake.read("sessions")


def test_files_are_laid_out_as_the_contract_says(lake):
    """user_profiles: no dictionary and no Snappy for the hashed user_id, no dictionary for the unique
    times, none of either changed for the rest; no statistics for the map column, whose leaves no
    reader prunes by."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = lake.arrow_writer("user_profiles")
    n = 1000
    rows = pa.table({
        "user_id": [f"u_{i:032x}" for i in range(n)], "n_sessions": [1] * n, "n_events": [2] * n, "n_views": [2] * n,
        "n_carts": [0] * n, "n_purchases": [0] * n, "n_searches": [0] * n, "monetary": [0.0] * n,
        "first_seen": pa.array(range(n), pa.timestamp("us", "UTC")), "last_seen": pa.array(range(n), pa.timestamp("us", "UTC")),
        "recency_days": [float(i) for i in range(n)], "top_category": ["c1"] * n,
        "category_affinity": pa.array([[("c1", 1.0)]] * n, pa.map_(pa.string(), pa.float64()))})
    adds = writer([rows])
    lake.commit_files(writer, adds, app_id="featurize:layout")
    metadata = pq.ParquetFile(f"{lake._local_path('user_profiles')}/{adds[0]['path']}").metadata
    chunks = {metadata.row_group(0).column(i).path_in_schema: metadata.row_group(0).column(i)
              for i in range(metadata.num_columns)}

    def dictionary(path):
        return any("DICTIONARY" in e for e in chunks[path].encodings)

    assert chunks["user_id"].compression == "UNCOMPRESSED" and not dictionary("user_id")
    assert not dictionary("first_seen") and not dictionary("recency_days")
    assert chunks["top_category"].compression == "SNAPPY" and dictionary("top_category")
    assert dictionary("n_sessions") and chunks["first_seen"].compression == "SNAPPY"
    assert chunks["user_id"].is_stats_set and chunks["first_seen"].is_stats_set
    assert not chunks["category_affinity.key_value.key"].is_stats_set
    assert chunks["category_affinity.key_value.value"].compression == "SNAPPY"
    assert lake.read("user_profiles").df.count() == n


def test_a_contract_names_only_its_own_columns_for_the_parquet_layout(tmp_path, monkeypatch):
    import schemas

    (tmp_path / "bad.yaml").write_text(
        "table: bad\ncolumns:\n  - {name: a, type: string}\nparquet: {plain: [b]}\n")
    monkeypatch.setattr(schemas.resources, "files", lambda _: tmp_path)
    schemas.contract.cache_clear()
    try:
        with pytest.raises(ValueError, match="parquet plain columns"):
            schemas.contract("bad")
    finally:
        schemas.contract.cache_clear()
