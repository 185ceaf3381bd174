"""The featurize stage: `events` -> `item_catalog`, `sessions`, `user_profiles` and `session_tokens`.

`item_catalog` is also the vocabulary: an item or category keeps its integer id from one nightly
run to the next, and newcomers are appended after the largest id, so checkpoints trained on an
older vocabulary still point at the same items. `session_tokens` is the encoding the session model
trains on: fixed-length windows of BOS, event tokens, EOS and padding.

`sessions` is rebuilt only for the event dates clean rebuilt since the last featurize run (sessions
never cross UTC midnight); the catalogue, profiles and token windows aggregate over all dates and are
recomputed each run.
"""
from __future__ import annotations

import hashlib
import json
import logging

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

PAD, BOS, EOS = 0, 1, 2
EVENT_TOKENS = {"view": 3, "cart": 4, "purchase": 5, "search": 6}
TOKEN_EVENTS = {token: name for name, token in EVENT_TOKENS.items()}

log = logging.getLogger(__name__)


def _append_ids(current: DataFrame, known: DataFrame, key: str, id_column: str,
                persisted: list[DataFrame]) -> DataFrame:
    """Give every `key` of `current` an id: its known id, or the next free ones in key order."""
    start = known.agg(F.coalesce(F.max(id_column), F.lit(0))).first()[0]
    new = current.select(key).distinct().join(known, key, "left_anti")
    # No row_number over a global window (one partition sorting every key, a first run's whole
    # catalogue): range-partition and sort, then an id is the count of keys in the partitions before
    # plus the position within its own. Cached so both passes read the same partitions (a recomputed
    # partition sorts the same keys the same way).
    ranked = (new.repartitionByRange(key).sortWithinPartitions(key)
              .select(key, F.spark_partition_id().alias("_part"), F.monotonically_increasing_id().alias("_row"))
              .persist())
    persisted.append(ranked)
    offsets, before = [], start
    for part in ranked.groupBy("_part").agg(F.count("*").alias("n"), F.min("_row").alias("first")).orderBy("_part").collect():
        offsets.append((part["_part"], before - part["first"] + 1))
        before += part["n"]
    offset = ranked.sparkSession.createDataFrame(offsets or [(0, 0)], "_part int, _offset long")
    return known.unionByName(ranked.join(F.broadcast(offset), "_part").select(
        key, (F.col("_row") + F.col("_offset")).cast("int").alias(id_column)))


def build_item_catalog(events: DataFrame, previous: DataFrame | None, persisted: list[DataFrame]) -> DataFrame:
    """The catalogue with stable ids. The frames it persists (item-level, never events) are appended to
    `persisted`, for the caller to unpersist once the catalogue is written."""
    items = (events.where(F.col("item_id").isNotNull()).groupBy("item_id").agg(
        F.mode("category", deterministic=True).alias("category"),
        F.mode("brand", deterministic=True).alias("brand"),
        F.percentile_approx("price", 0.5).alias("price"),
        F.min("price").alias("price_min"), F.max("price").alias("price_max"), F.avg("price").alias("price_mean"),
        F.count("*").alias("popularity")))
    if previous is None:
        previous = events.sparkSession.createDataFrame(
            [], "item_idx int, item_id string, category string, category_idx int, brand string, "
                "price double, price_min double, price_max double, price_mean double, popularity long")
    # Items gone from today's events stay in the vocabulary, with no popularity today.
    retired = previous.join(items.select("item_id"), "item_id", "left_anti").withColumn("popularity", F.lit(0).cast("long"))
    # Persisted: the id assignment reads the items four times (ranges, ranks, offsets, the final join),
    # and each read would aggregate the events again.
    items = items.unionByName(retired.select(*items.columns)).persist()
    persisted.append(items)
    item_ids = _append_ids(items, previous.select("item_id", "item_idx"), "item_id", "item_idx", persisted)
    category_ids = _append_ids(items.where(F.col("category").isNotNull()),
                               previous.where(F.col("category").isNotNull()).select("category", "category_idx").distinct(),
                               "category", "category_idx", persisted)
    return (items.join(item_ids, "item_id").join(category_ids, "category", "left")
            .withColumn("category_idx", F.coalesce("category_idx", F.lit(0)).cast("int")))


def build_sessions(events: DataFrame, catalog: DataFrame, holdout_percent: int) -> DataFrame:
    steps = events.join(catalog.select("item_id", "item_idx"), "item_id", "left")
    ordered = steps.groupBy("session_id", "user_id", "event_date").agg(F.sort_array(F.collect_list(F.struct(
        F.col("event_time").cast("double").alias("t"), "event_time", "event_id", "event_type", "item_id",
        F.coalesce("item_idx", F.lit(0)).alias("item_idx"), "category", "price"))).alias("e"))
    # Gaps from the sorted array, not a window: that would sort every event once more.
    gaps = F.transform("e", lambda x, i: F.when(i == 0, F.lit(0.0)).otherwise(x["t"] - F.col("e")[i - 1]["t"]))
    holdout = F.pmod(F.xxhash64("session_id"), F.lit(100)) < holdout_percent
    return ordered.withColumn("gap", gaps).select(
        "session_id", "user_id", F.col("e")[0]["event_time"].alias("start_time"),
        F.size("e").alias("n_events"), F.col("e.event_type").alias("event_types"),
        F.col("e.item_id").alias("item_ids"), F.col("e.item_idx").alias("item_idx"),
        F.col("e.category").alias("categories"), F.col("e.price").alias("prices"),
        F.col("gap").alias("gap_seconds"),
        F.when(holdout, "holdout").otherwise("train").alias("split"), "event_date")


def build_user_profiles(events: DataFrame) -> DataFrame:
    def count_of(event_type: str) -> Column:
        return F.count(F.when(F.col("event_type") == event_type, 1))

    last_event = events.agg(F.max("event_time")).first()[0]
    ranked = (events.where(F.col("category").isNotNull()).groupBy("user_id", "category").count()
              .withColumn("rank", F.row_number().over(
                  Window.partitionBy("user_id").orderBy(F.desc("count"), "category")))
              .withColumn("share", F.col("count") / F.sum("count").over(Window.partitionBy("user_id"))))
    categories = ranked.where("rank <= 5").groupBy("user_id").agg(
        F.min_by("category", "rank").alias("top_category"),
        F.map_from_entries(F.collect_list(F.struct("category", "share"))).alias("category_affinity"))
    return (events.groupBy("user_id").agg(
        F.countDistinct("session_id").alias("n_sessions"), F.count("*").alias("n_events"),
        count_of("view").alias("n_views"), count_of("cart").alias("n_carts"),
        count_of("purchase").alias("n_purchases"), count_of("search").alias("n_searches"),
        F.coalesce(F.sum(F.when(F.col("event_type") == "purchase", F.col("price"))), F.lit(0.0)).alias("monetary"),
        F.min("event_time").alias("first_seen"), F.max("event_time").alias("last_seen"))
        .withColumn("recency_days",
                    (F.lit(last_event).cast("double") - F.col("last_seen").cast("double")) / 86400.0)
        .join(categories, "user_id", "left"))


def gap_bucket(gap: Column, edges: list[float]) -> Column:
    """Index of the bucket of a time gap: 0 for gaps <= edges[0], len(edges) beyond the last edge."""
    return F.size(F.filter(F.array(*[F.lit(float(e)) for e in edges]), lambda edge: edge < gap))


USER_CONTEXT = ("log1p(n_sessions)", "log1p(n_events)", "n_carts / n_events", "n_purchases / n_events",
                "n_searches / n_events", "log1p(monetary)", "log1p(recency_days)")


def user_context(profiles: DataFrame, catalog: DataFrame) -> DataFrame:
    """Each user's profile as the session model's context vector (USER_CONTEXT) and top category id."""
    categories = catalog.select(F.col("category").alias("top_category"),
                                F.col("category_idx").alias("user_category_idx")).distinct()
    return (profiles.join(F.broadcast(categories), "top_category", "left").select(
        "user_id", F.array(*[F.expr(e).cast("float") for e in USER_CONTEXT]).alias("user_context"),
        F.coalesce("user_category_idx", F.lit(0)).cast("int").alias("user_category_idx")))


def build_session_tokens(sessions: DataFrame, catalog: DataFrame, contexts: DataFrame, window: int,
                         edges: list[float]) -> DataFrame:
    """Windows of window + 2 tokens: [BOS] + events + [EOS], cut with half-window overlap, padded."""
    length = window + 2
    category_idx = catalog.where(F.col("category").isNotNull()).select("category", "category_idx").distinct()
    token_map = F.create_map(*[F.lit(x) for pair in EVENT_TOKENS.items() for x in pair])
    events = sessions.join(contexts, "user_id").select(
        "session_id", "split", "user_context", "user_category_idx",
        F.transform("event_types", lambda t: token_map[t]).alias("event_type"),
        "item_idx",
        F.transform("gap_seconds", lambda g: gap_bucket(g, edges)).alias("gap_bucket"),
        "categories")
    # Category ids come from the catalogue vocabulary: explode-free lookup through a broadcast map.
    vocab = category_idx.agg(F.map_from_entries(F.collect_list(F.struct("category", "category_idx"))).alias("v"))
    events = events.crossJoin(F.broadcast(vocab)).withColumn(
        "category_idx", F.transform("categories", lambda c: F.coalesce(F.col("v")[c], F.lit(0)))).drop("v", "categories")

    def framed(column: str, bos: int, eos: int) -> Column:
        return F.concat(F.array(F.lit(bos)), F.col(column).cast("array<int>"), F.array(F.lit(eos)))

    tokens = events.select(
        "session_id", "split", "user_context", "user_category_idx", framed("event_type", BOS, EOS).alias("event_type"),
        framed("item_idx", PAD, PAD).alias("item_idx"), framed("category_idx", PAD, PAD).alias("category_idx"),
        framed("gap_bucket", PAD, PAD).alias("gap_bucket"))
    total = F.size("event_type")
    last_start = F.greatest(total - length, F.lit(0))
    starts = F.array_union(F.sequence(F.lit(0), last_start, F.lit(max(1, window // 2))), F.array(last_start))
    windows = tokens.withColumn("window_start", F.explode(starts))

    def cut(column: str) -> Column:
        piece = F.slice(F.col(column), F.col("window_start") + 1, length)
        return F.concat(piece, F.array_repeat(F.lit(PAD), length - F.size(piece))).alias(column)

    return windows.select(
        "session_id", F.col("window_start").cast("int"),
        F.least(total - F.col("window_start"), F.lit(length)).cast("int").alias("length"),
        cut("event_type"), cut("item_idx"), cut("category_idx"), cut("gap_bucket"), "user_context",
        "user_category_idx", "split")


def _options(cfg) -> str:
    return hashlib.sha256(json.dumps(cfg.featurize.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _dates_to_rebuild(ctx) -> list[str] | None:
    """Event dates clean rebuilt since the last featurize run, or None when every date must be rebuilt."""
    if ctx.force or not ctx.lake.exists("sessions"):
        return None
    ledger = (ctx.lake.read("pipeline_runs").df.where(F.col("stage").isin("clean", "featurize"))
              .select("stage", "finished_at", "input_versions", "output_versions", "artifacts").collect())
    featurized = [r for r in ledger if r.stage == "featurize"]
    if not featurized:
        return None
    last = max(featurized, key=lambda r: r.finished_at)
    if (last.artifacts or {}).get("options") != _options(ctx.cfg) or "events" not in (last.input_versions or {}):
        return None
    since = last.input_versions["events"]
    dates: set[str] = set()
    for run in ledger:
        if run.stage == "clean" and (run.output_versions or {}).get("events", -1) > since:
            rebuilt = (run.artifacts or {}).get("event_dates")
            if rebuilt is None:  # a full clean rebuild
                return None
            dates |= set(filter(None, rebuilt.split(",")))
    return sorted(dates)


def run(ctx) -> dict[str, int]:
    cfg = ctx.cfg.featurize
    ctx.artifacts["options"] = _options(ctx.cfg)
    dates = _dates_to_rebuild(ctx)
    events = ctx.read("events").df
    previous = ctx.read("item_catalog").df if ctx.lake.exists("item_catalog") else None
    persisted: list[DataFrame] = []
    catalog_commit = ctx.write(build_item_catalog(events, previous, persisted), "item_catalog")
    for frame in persisted:
        frame.unpersist()
    catalog = ctx.lake.read("item_catalog", catalog_commit.version).df

    if dates is None:
        log.info("featurize: building the sessions of every date")
        sessions_written = ctx.write(build_sessions(events, catalog, cfg.holdout_percent), "sessions").rows
    elif dates:
        log.info("featurize: rebuilding the sessions of %d date(s) clean rebuilt: %s", len(dates), ", ".join(dates))
        changed = events.where(F.col("event_date").isin(dates))
        sessions_written = ctx.write(build_sessions(changed, catalog, cfg.holdout_percent), "sessions",
                                     replace={"event_date": dates}).rows
    else:
        log.info("featurize: no event dates changed since the last run; sessions stay as they are")
        sessions_written = 0
    ctx.artifacts["session_dates"] = "all" if dates is None else ",".join(dates)
    sessions = ctx.lake.read("sessions").df
    profiles_commit = ctx.write(build_user_profiles(events), "user_profiles")
    profiles = ctx.lake.read("user_profiles", profiles_commit.version).df
    # Several files per split so Petastorm can shard them across training processes, each sorted: rows
    # arrive from a shuffle in no fixed order, and training reads them in file order.
    tokens = build_session_tokens(sessions, catalog, user_context(profiles, catalog), cfg.window,
                                  cfg.gap_bucket_edges)
    tokens_commit = ctx.write(tokens.repartition(max(4, ctx.cfg.train.num_processes), "session_id")
                              .sortWithinPartitions("session_id", "window_start"), "session_tokens")
    return {"items": catalog_commit.rows, "sessions": sessions.count(), "sessions_written": sessions_written,
            "users": profiles_commit.rows, "token_windows": tokens_commit.rows}
