"""The generate stage: fan sampling out over Spark, one seeded shard per task, one Delta commit per run.

The checkpoint travels to the executors as a broadcast (so a cluster needs no shared filesystem)
and each task loads it once. A shard's seed is derived from (run.seed, run id, shard), so the same
run always samples the same sessions whatever the cluster's size or scheduling.

No synthetic session copies a real one: a sampled session of 2+ events whose item sequence equals a
training session's is sampled again (generate.copy_retries times) and dropped, counted, if it still
does. The training sequences travel to the tasks as a sorted array of 60-bit hashes.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from pyspark.accumulators import AccumulatorParam
from pyspark.sql import functions as F

from synth.featurize import TOKEN_EVENTS
from synth.model import check_vocabulary

log = logging.getLogger(__name__)

GAP_QUANTILES = 200  # real gap values per gap bucket that synthetic gaps are drawn from (gap_quantiles)
_SAMPLE_DDL = ("session_id string, shard int, position int, event_time timestamp, event_type string, "
               "item_idx int")


def sequence_key(items) -> int:
    """An item sequence as a 60-bit integer: the first 15 hex digits of the SHA-256 of the item ids
    joined by commas, as `train_sequence_keys` computes it in Spark."""
    return int(hashlib.sha256(",".join(str(int(i)) for i in items).encode()).hexdigest()[:15], 16)


def train_sequence_keys(sessions) -> np.ndarray:
    """Sorted distinct keys of the training sessions of 2+ events (a single event is too common to
    single anyone out; evaluate's exact_copy_share counts the same sessions)."""
    text = F.concat_ws(",", F.col("item_idx").cast("array<string>"))
    key = F.conv(F.substring(F.sha2(text, 256), 1, 15), 16, 10).cast("long")
    rows = (sessions.where((F.col("split") == "train") & (F.col("n_events") >= 2))
            .select(key.alias("key")).distinct().collect())
    return np.sort(np.array([r.key for r in rows], dtype=np.int64))


def copied_sessions(out: dict, n: int, train_keys: np.ndarray) -> np.ndarray:
    """Indices (of 0..n-1) of the sampled sessions of 2+ events whose item sequence is a training one's."""
    bounds = np.searchsorted(out["session"], np.arange(n + 1))
    long_enough = np.flatnonzero(np.diff(bounds) >= 2)
    if not len(long_enough) or not len(train_keys):
        return np.zeros(0, dtype=np.int64)
    keys = np.array([sequence_key(out["item_idx"][bounds[s]:bounds[s + 1]]) for s in long_enough], dtype=np.int64)
    found = np.minimum(np.searchsorted(train_keys, keys), len(train_keys) - 1)
    return long_enough[train_keys[found] == keys]


def replace_sessions(out: dict, which: np.ndarray, replacement: dict | None) -> dict:
    """`out` without the sessions `which`, plus, when given, `replacement`'s sessions 0..len(which)-1
    under those indices; ordered by session then position."""
    keep = ~np.isin(out["session"], which)
    parts = {k: [v[keep]] for k, v in out.items()}
    if replacement is not None:
        for k, v in replacement.items():
            parts[k].append(which[v] if k == "session" else v)
    merged = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.lexsort((merged["position"], merged["session"]))
    return {k: v[order] for k, v in merged.items()}


def shard_seed(seed: int, run_id: str, shard: int) -> int:
    digest = hashlib.sha256(f"{seed}:{run_id}:{shard}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def gap_seconds(buckets: np.ndarray, edges: list[float], rng: np.random.Generator,
                quantiles: list[list[float]] | None = None) -> np.ndarray:
    """Draw a time gap inside each gap bucket (the inverse of featurize.gap_bucket): one of the bucket's
    real gap `quantiles` (gap_quantiles, index = bucket) at random, or uniformly between the bucket's edges
    for a bucket without quantiles."""
    edges = np.asarray(edges, dtype=float)
    lower = edges[np.clip(buckets - 1, 0, len(edges) - 1)]
    upper = np.concatenate([edges, [edges[-1] * 4]])[np.clip(buckets, 0, len(edges))]
    gaps = np.where(buckets == 0, 0.0, rng.uniform(lower, upper))
    u = rng.random(len(buckets))
    for bucket, values in enumerate(quantiles or []):
        if values:
            chosen = buckets == bucket
            gaps[chosen] = np.asarray(values, dtype=float)[(u[chosen] * len(values)).astype(int)]
    return gaps


def gap_quantiles(train_sessions, edges: list[float], n: int = GAP_QUANTILES) -> list[list[float]]:
    """Per gap bucket (index = bucket), `n` evenly spaced quantiles of the real time gaps between consecutive
    events of `train_sessions` that fall in it ([] for an empty bucket). The model predicts only a bucket;
    drawing the gap among these values gives synthetic gaps the real shape inside a bucket (mostly short
    gaps, whole seconds where the source has whole seconds) instead of a flat one, as the catalogue gives
    sampled items their real attributes."""
    from synth.featurize import gap_bucket

    levels = [(k + 0.5) / n for k in range(n)]
    rows = (train_sessions.select(F.posexplode("gap_seconds").alias("pos", "gap")).where(F.col("pos") > 0)
            .withColumn("bucket", gap_bucket(F.col("gap"), edges))
            .groupBy("bucket").agg(F.percentile_approx("gap", levels, 10000).alias("q")).collect())
    out: list[list[float]] = [[] for _ in range(len(edges) + 1)]
    for row in rows:
        out[int(row.bucket)] = [float(x) for x in row.q]
    return out


def shard_sizes(total: int, shards: int) -> list[int]:
    return [total // shards + (1 if shard < total % shards else 0) for shard in range(shards)]


def _unpacked(checkpoint_files, load):
    """Load a broadcast checkpoint folder ({file name: bytes}) on an executor with `load(folder)`."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        for name, data in checkpoint_files.value.items():
            Path(folder, name).write_bytes(data)
        return load(folder)


def _sampler(checkpoint_files, cfg, base_time: float, gap_quantiles: list[list[float]] | None, train_keys,
             copy_counts):
    run_id, gen = cfg.run.id, cfg.generate
    sizes = shard_sizes(gen.sessions, gen.shards)
    edges = list(cfg.featurize.gap_bucket_edges)
    context_phase = shard_seed(cfg.run.seed, f"{run_id}/contexts", 0) / 2**63

    def sample(batches):
        import pyarrow as pa
        import pyarrow.compute as pc
        import torch

        from synth.model import load_checkpoint

        torch.set_num_threads(1)
        model, _ = _unpacked(checkpoint_files, load_checkpoint)
        model.eval()
        names = np.array([""] * 3 + [TOKEN_EVENTS[t] for t in sorted(TOKEN_EVENTS)], dtype=object)
        for batch in batches:
            for shard in batch.column("id").to_pylist():
                seed = shard_seed(cfg.run.seed, run_id, shard)
                with torch.no_grad():
                    generator = torch.Generator().manual_seed(seed)
                    # User contexts (with their session lengths) from the training sessions stored in the
                    # checkpoint: one stratified sample across all shards.
                    context, context_category, lengths = model.draw_contexts(
                        sizes[shard], phase=context_phase, first=sum(sizes[:shard]), total=sum(sizes))

                    def draw(rows):
                        return model.sample(len(rows), generator, context=context[rows],
                                            context_category=context_category[rows], temperature=gen.temperature,
                                            top_k=gen.top_k, top_p=gen.top_p, max_events=gen.max_events,
                                            lengths=lengths[rows] if gen.session_lengths == "empirical" else None)

                    out = draw(np.arange(sizes[shard]))
                    copies = copied_sessions(out, sizes[shard], train_keys.value)
                    for _ in range(gen.copy_retries):
                        if not len(copies):
                            break
                        copy_counts.add(np.array([len(copies), 0]))
                        out = replace_sessions(out, copies, draw(copies))
                        copies = copied_sessions(out, sizes[shard], train_keys.value)
                    if len(copies):
                        copy_counts.add(np.array([0, len(copies)]))
                        out = replace_sessions(out, copies, None)
                rng = np.random.default_rng(seed)
                session = np.asarray(out["session"])
                starts = np.round((base_time + rng.uniform(0, 86400, size=max(sizes[shard], 1))) * 1e6)
                gaps = gap_seconds(np.asarray(out["gap_bucket"]), edges, rng, gap_quantiles)
                # Event time = the session's start + the running sum of gaps within the session, in whole
                # microseconds: float seconds near 1.6e9 would shift a whole-second gap by a rounding error
                # (5 s becoming 4.999999 s, a different second).
                cumulative = np.cumsum(np.round(gaps * 1e6).astype("int64"))
                first = np.r_[True, session[1:] != session[:-1]] if len(session) else np.array([], bool)
                offsets = cumulative - np.maximum.accumulate(np.where(first, cumulative, 0))
                times = starts.astype("int64")[session] + offsets
                yield pa.RecordBatch.from_arrays([
                    pc.binary_join_element_wise(f"syn-{run_id}-{shard}-",
                                                pa.array(session).cast(pa.string()), ""),
                    pa.array(np.full(len(session), shard, dtype=np.int32)),
                    pa.array(np.asarray(out["position"], dtype=np.int32)),
                    pa.array(times, pa.timestamp("us", tz="UTC")),
                    pa.array(names[np.asarray(out["event_type"])].tolist(), pa.string()),
                    pa.array(np.asarray(out["item_idx"], dtype=np.int32)),
                ], schema=pa.schema([("session_id", pa.string()), ("shard", pa.int32()),
                                     ("position", pa.int32()), ("event_time", pa.timestamp("us", tz="UTC")),
                                     ("event_type", pa.string()), ("item_idx", pa.int32())]))

    return sample


def _profile_sampler(checkpoint_files, cfg, reference: float):
    run_id = cfg.run.id
    sizes = shard_sizes(cfg.generate.profiles, cfg.generate.shards)

    def sample(frames):
        import pandas as pd
        import torch

        from synth.tabular import load_synthesizer

        torch.set_num_threads(1)
        synthesizer, _ = _unpacked(checkpoint_files, load_synthesizer)
        for frame in frames:
            for shard in frame["id"].tolist():
                if not sizes[shard]:
                    continue
                rows = synthesizer.sample(sizes[shard], seed=shard_seed(cfg.run.seed, f"{run_id}/profiles", shard))
                counts = ["n_views", "n_carts", "n_purchases", "n_searches"]
                rows["n_events"] = rows[counts].sum(axis=1)
                rows["last_seen"] = rows["first_seen"] + pd.to_timedelta(rows["active_seconds"], unit="s")
                last_seen = pd.to_datetime(rows["last_seen"], utc=True)
                rows["recency_days"] = (reference - last_seen.astype("int64") / 1e9) / 86400.0
                rows["user_id"] = f"syn-user-{run_id}-{shard}-" + pd.RangeIndex(len(rows)).astype(str)
                yield rows[["user_id", "n_sessions", "n_events", *counts, "monetary", "first_seen", "last_seen",
                            "recency_days", "top_category"]]

    return sample


def generate_profiles(ctx) -> int:
    """Sample synthetic user profiles in generate.shards seeded tasks; one commit for the run."""
    from synth.train import profile_checkpoint

    cfg, spark = ctx.cfg, ctx.spark
    folder = profile_checkpoint(cfg, ctx.run_id)
    if not (folder / "metadata.json").exists():
        raise FileNotFoundError(f"no profile model for run {ctx.run_id} in {folder}; run the train stage first")
    metadata = json.loads((folder / "metadata.json").read_text())
    reference = dt.datetime.fromisoformat(metadata["recency_reference"]).replace(tzinfo=dt.timezone.utc).timestamp()
    files = spark.sparkContext.broadcast({p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})
    shards = cfg.generate.shards
    schema = ("user_id string, n_sessions long, n_events long, n_views long, n_carts long, n_purchases long, "
              "n_searches long, monetary double, first_seen timestamp, last_seen timestamp, "
              "recency_days double, top_category string")
    profiles = (spark.range(shards, numPartitions=shards)
                .mapInPandas(_profile_sampler(files, cfg, reference), schema)
                .withColumn("run_id", F.lit(ctx.run_id)))
    return ctx.write(profiles, "synthetic_user_profiles", replace={"run_id": ctx.run_id}).rows


def run(ctx) -> dict[str, int]:
    cfg, spark = ctx.cfg, ctx.spark
    if cfg.generate.session_lengths not in ("empirical", "model"):
        raise ValueError(f"generate.session_lengths must be empirical or model, not {cfg.generate.session_lengths!r}")
    checkpoint = Path(cfg.train.checkpoint_dir) / ctx.run_id
    if not (checkpoint / "metadata.json").exists():
        raise FileNotFoundError(f"no checkpoint for run {ctx.run_id} in {checkpoint}; run the train stage first")
    metadata = json.loads((checkpoint / "metadata.json").read_text())
    catalog = ctx.read("item_catalog").df
    sizes = catalog.agg(F.max("item_idx").alias("items"), F.max("category_idx").alias("categories")).first()
    check_vocabulary(metadata, sizes["items"] + 1, sizes["categories"] + 1)
    sessions = ctx.read("sessions").df
    last_real = sessions.agg(F.max("start_time")).first()[0]
    gaps = gap_quantiles(sessions.where(F.col("split") == "train"), list(cfg.featurize.gap_bucket_edges))
    base = dt.datetime.combine(last_real.date() + dt.timedelta(days=1), dt.time(), dt.timezone.utc).timestamp()

    files = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}
    shards = cfg.generate.shards
    keys = spark.sparkContext.broadcast(train_sequence_keys(sessions) if cfg.generate.copy_retries >= 0
                                        else np.zeros(0, dtype=np.int64))
    # [re-draws of copied sessions, sessions dropped]; a retried task would add its shard twice.
    copy_counts = spark.sparkContext.accumulator(np.zeros(2, dtype=np.int64), _ArrayAccumulator())
    sampled = (spark.range(shards, numPartitions=shards)
               .mapInArrow(_sampler(spark.sparkContext.broadcast(files), cfg, base, gaps, keys, copy_counts),
                           _SAMPLE_DDL))
    events = (sampled.join(F.broadcast(catalog.select("item_idx", "item_id", "category", "brand", "price")),
                           "item_idx", "left")
              .withColumn("run_id", F.lit(ctx.run_id)).drop("item_idx"))
    commit = ctx.write(events, "synthetic_events", replace={"run_id": ctx.run_id})
    sessions = ctx.lake.read("synthetic_events", commit.version).df.where(
        F.col("run_id") == ctx.run_id).select("session_id").distinct().count()
    resampled, dropped = (int(x) for x in copy_counts.value)
    if resampled or dropped:
        log.info("generate: %d re-draw(s) of sessions that copied a training session's items; %d session(s) "
                 "still did after %d retries and were dropped", resampled, dropped, cfg.generate.copy_retries)
    return {"synthetic_sessions": sessions, "synthetic_events": commit.rows,
            "copies_resampled": resampled, "copies_dropped": dropped,
            "synthetic_profiles": generate_profiles(ctx)}


class _ArrayAccumulator(AccumulatorParam):
    def zero(self, value):
        return np.zeros_like(value)

    def addInPlace(self, a, b):
        return a + b
