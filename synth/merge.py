"""The merge stage: the recommender's training set for a run = real events + this run's synthetic events.

Each run owns one `run_id` partition of `training_set`, replaced as a whole, so running a run id
again can never double its rows.
"""
from __future__ import annotations

from pyspark.sql import functions as F

_COLUMNS = ("session_id", "user_id", "event_time", "event_type", "item_id", "category", "brand", "price")


def run(ctx) -> dict[str, int]:
    real = ctx.read("events").df.select(*_COLUMNS, F.lit(False).alias("is_synthetic"), F.lit(1.0).alias("weight"))
    synthetic = (ctx.read("synthetic_events").df.where(F.col("run_id") == ctx.run_id)
                 .select(*[F.lit(None).cast("string").alias(c) if c == "user_id" else F.col(c) for c in _COLUMNS],
                         F.lit(True).alias("is_synthetic"),
                         F.lit(float(ctx.cfg.merge.synthetic_weight)).alias("weight")))
    if synthetic.isEmpty():
        raise ValueError(f"synthetic_events has no rows for run {ctx.run_id}; run the generate stage first")
    merged = real.unionByName(synthetic).withColumn("run_id", F.lit(ctx.run_id))
    commit = ctx.write(merged, "training_set", replace={"run_id": ctx.run_id})
    counts = (ctx.lake.read("training_set", commit.version).df.where(F.col("run_id") == ctx.run_id)
              .groupBy("is_synthetic").count().collect())
    by_kind = {("synthetic" if r.is_synthetic else "real"): r["count"] for r in counts}
    return {"training_rows": commit.rows, "real_rows": by_kind.get("real", 0),
            "synthetic_rows": by_kind.get("synthetic", 0)}
