#!/usr/bin/env bash
# Example nightly submission to a cluster (YARN, Kubernetes or standalone: set MASTER).
# The cluster's Python environment needs the pinned stack of pyproject.toml (torch, petastorm,
# pyarrow 14, deltalake, ...); the project code travels as dist/synth.zip (deploy/package.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
MASTER=${MASTER:-yarn}
RUN_ID=${RUN_ID:-$(date -u +%F)}
CONFIG=${CONFIG:-deploy/nightly.example.yaml}

common=(
  --master "$MASTER" --deploy-mode client
  --py-files dist/synth.zip
  --packages io.delta:delta-spark_2.13:4.0.0
  --conf spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension
  --conf spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog
  --conf spark.dynamicAllocation.enabled=false
  # Let the JIT compile Spark's large generated methods (the clean stage's row checks): 2x on parsing.
  --conf spark.driver.extraJavaOptions=-XX:-DontCompileHugeMethods
  --conf spark.executor.extraJavaOptions=-XX:-DontCompileHugeMethods
)
# Training runs as a barrier stage with one process per GPU executor.
gpu=(
  --conf spark.executor.resource.gpu.amount=1
  --conf spark.task.resource.gpu.amount=1
  --conf spark.executor.resource.gpu.discoveryScript=/opt/spark/examples/src/main/scripts/getGpusResources.sh
)

for stage in clean featurize; do
  spark-submit "${common[@]}" "jobs/$stage.py" --config "$CONFIG" --run-id "$RUN_ID"
done
spark-submit "${common[@]}" "${gpu[@]}" jobs/train.py --config "$CONFIG" --run-id "$RUN_ID" \
  --train.local_mode false --train.use_gpu true --train.num_processes "${GPUS:-2}"
# A fractional GPU per task lets several generation shards share one GPU.
spark-submit "${common[@]}" "${gpu[@]/spark.task.resource.gpu.amount=1/spark.task.resource.gpu.amount=0.25}" \
  jobs/generate.py --config "$CONFIG" --run-id "$RUN_ID"
for stage in merge evaluate; do
  spark-submit "${common[@]}" "jobs/$stage.py" --config "$CONFIG" --run-id "$RUN_ID"
done
