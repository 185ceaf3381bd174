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
