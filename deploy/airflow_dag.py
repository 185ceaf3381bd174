"""Example Airflow DAG: the nightly pipeline as one spark-submit task per stage.

Each task is idempotent for its run id (the run ledger makes a repeated stage a no-op), so Airflow
retries and backfills are safe; `--force` is only for recomputing a run on purpose (for clean, from
all input files). Clean is incremental over the input folder, not over the run's date: each run takes
whatever files arrived, changed or vanished since the previous run (late files included) and rebuilds
just the event dates they touch, so catching up after a missed night needs no special run.
"""
import pendulum
from airflow import DAG
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

STAGES = ["clean", "featurize", "train", "generate", "merge", "evaluate"]

with DAG(
    dag_id="synth_clickstream_nightly",
    schedule="0 2 * * *",
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
) as dag:
    previous = None
    for stage in STAGES:
        task = SparkSubmitOperator(
            task_id=stage,
            application=f"/opt/synth/jobs/{stage}.py",
            py_files="/opt/synth/dist/synth.zip",
            packages="io.delta:delta-spark_2.13:4.0.0",
            application_args=["--config", "/opt/synth/nightly.yaml", "--run-id", "{{ ds }}"],
            conf={"spark.dynamicAllocation.enabled": "false"},
            retries=2,
        )
        if previous is not None:
            previous >> task
        previous = task
