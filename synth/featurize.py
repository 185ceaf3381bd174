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


_ITEM_STATISTICS = ("item_id string, category string, brand string, price double, price_min double, "
                    "price_max double, price_mean double, popularity long")


def _item_statistics(events: DataFrame) -> DataFrame:
    """Per item: the most frequent category and brand (ties: the lowest), the median price (the lowest
    price with at least half of the item's priced events at or below it), price min, max and mean, and
    popularity (events).

    Spark counts the events per item, category, brand and price; Arrow finishes each item from those
    few rows. Spark's own mode and percentile aggregates keep objects per item and value, and with few
    events per item they cost several times the scan of the events.
    """
    counted = (events.where(F.col("item_id").isNotNull()).groupBy("item_id", "category", "brand", "price")
               .agg(F.count("*").alias("n")).repartition("item_id"))
    return counted.mapInArrow(_finish_items, _ITEM_STATISTICS)


def _finish_items(batches):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    batches = [b for b in batches if b.num_rows]
    if not batches:
        return
    table = pa.Table.from_batches(batches)
    totals = table.group_by("item_id").aggregate([("n", "sum"), ("price", "min"), ("price", "max")])
    priced = table.filter(pc.is_valid(table.column("price")))
    priced = priced.append_column("amount", pc.multiply(priced.column("price"), pc.cast(priced.column("n"), pa.float64())))
    means = priced.group_by("item_id").aggregate([("amount", "sum"), ("n", "sum")])
    means = pa.table({"item_id": means.column("item_id"),
                      "price_mean": pc.divide(means.column("amount_sum"), pc.cast(means.column("n_sum"), pa.float64()))})

    def sorted_by_item(rows: pa.Table, order: list[tuple[str, str]]) -> tuple[pa.Table, np.ndarray]:
        """The rows sorted by item, then `order`, and a mask of each item's first row."""
        rows = rows.take(pc.sort_indices(rows, sort_keys=[("item_id", "ascending"), *order]))
        items = rows.column("item_id").combine_chunks()
        first = np.ones(len(items), dtype=bool)
        if len(items) > 1:
            first[1:] = pc.not_equal(items.slice(1), items.slice(0, len(items) - 1)).to_numpy(zero_copy_only=False)
        return rows, first

    def first_per_item(rows: pa.Table, order: list[tuple[str, str]], column: str) -> pa.Table:
        rows, first = sorted_by_item(rows, order)
        return rows.filter(pa.array(first)).select(["item_id", column])

    def most_frequent(column: str) -> pa.Table:
        known = table.filter(pc.is_valid(table.column(column)))
        counts = known.group_by(["item_id", column]).aggregate([("n", "sum")])
        return first_per_item(counts, [("n_sum", "descending"), (column, "ascending")], column)

    # The median: the lowest price whose running count reaches half of the item's priced events.
    prices, starts = sorted_by_item(priced.group_by(["item_id", "price"]).aggregate([("n", "sum")]),
                                    [("price", "ascending")])
    n = prices.column("n_sum").to_numpy()
    group = np.cumsum(starts) - 1
    running = np.cumsum(n)
    before = (running - n)[starts][group]
    at_or_below = running - before
    total = np.add.reduceat(n, np.flatnonzero(starts))[group] if len(n) else n
    reached = 2 * at_or_below >= total
    median = prices.filter(pa.array(reached))
    median = first_per_item(median, [("price", "ascending")], "price")

    result = (totals.join(most_frequent("category"), "item_id", join_type="left outer")
              .join(most_frequent("brand"), "item_id", join_type="left outer")
              .join(median, "item_id", join_type="left outer")
              .join(means, "item_id", join_type="left outer"))
    result = pa.table({
        "item_id": result.column("item_id"), "category": result.column("category"),
        "brand": result.column("brand"), "price": result.column("price"),
        "price_min": result.column("price_min"), "price_max": result.column("price_max"),
        "price_mean": result.column("price_mean"), "popularity": result.column("n_sum"),
    })
    yield from result.to_batches()


def build_item_catalog(events: DataFrame, previous: DataFrame | None, persisted: list[DataFrame]) -> DataFrame:
    """The catalogue with stable ids. The frames it persists (item-level, never events) are appended to
    `persisted`, for the caller to unpersist once the catalogue is written."""
    items = _item_statistics(events)
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
    # Per session first, then per user: cheaper than a distinct count of sessions next to the other
    # aggregates (Spark expands every event into one row per distinct and non-distinct aggregate).
    sessions = events.groupBy("user_id", "session_id").agg(
        F.count("*").alias("n_events"), count_of("view").alias("n_views"), count_of("cart").alias("n_carts"),
        count_of("purchase").alias("n_purchases"), count_of("search").alias("n_searches"),
        F.sum(F.when(F.col("event_type") == "purchase", F.col("price"))).alias("monetary"),
        F.min("event_time").alias("first_seen"), F.max("event_time").alias("last_seen"))
    return (sessions.groupBy("user_id").agg(
        F.count("*").alias("n_sessions"),
        *[F.sum(c).alias(c) for c in ("n_events", "n_views", "n_carts", "n_purchases", "n_searches")],
        F.coalesce(F.sum("monetary"), F.lit(0.0)).alias("monetary"),
        F.min("first_seen").alias("first_seen"), F.max("last_seen").alias("last_seen"))
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


_TOKEN_SCHEMA = ("session_id string, window_start int, length int, event_type array<int>, item_idx array<int>, "
                 "category_idx array<int>, gap_bucket array<int>, user_context array<float>, "
                 "user_category_idx int, split string")


def build_session_tokens(sessions: DataFrame, catalog: DataFrame, contexts: DataFrame, window: int,
                         edges: list[float], files: int = 1) -> DataFrame:
    """Windows of window + 2 tokens: [BOS] + events + [EOS], cut with half-window overlap, padded.

    In `files` partitions, each ordered by session and window start: training reads them in file
    order, and several files let Petastorm shard them across training processes.
    """
    # The category vocabulary is small (categories, not items): it travels to the tasks with the function.
    vocabulary = {r.category: r.category_idx for r in catalog.where(F.col("category").isNotNull())
                  .select("category", "category_idx").distinct().collect()}
    # Sessions are shuffled and sorted, not their windows: a window is padded to window + 2 tokens in
    # four columns, many times the size of a session. The windows come out in their session's order.
    rows = (sessions.join(contexts, "user_id").select(
        "session_id", "split", "user_context", "user_category_idx", "event_types", "item_idx", "gap_seconds",
        "categories").repartition(files, "session_id").sortWithinPartitions("session_id"))
    return rows.mapInArrow(_token_windows(window + 2, max(1, window // 2), edges, vocabulary), _TOKEN_SCHEMA)


def _token_windows(length: int, step: int, edges: list[float], vocabulary: dict[str, int]):
    """The executor side of build_session_tokens: numpy over whole Arrow batches, no per-event Python."""

    def windows(batches):
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        event_names = pa.array(list(EVENT_TOKENS))
        event_ids = np.array(list(EVENT_TOKENS.values()), dtype=np.int32)
        categories = pa.array(list(vocabulary), pa.string())
        category_ids = np.array(list(vocabulary.values()), dtype=np.int32)
        bounds = np.asarray(edges, dtype=np.float64)
        for batch in batches:
            if batch.num_rows == 0:
                continue
            events = pc.list_value_length(batch.column("event_types")).to_numpy(zero_copy_only=False)
            total = events.astype(np.int64) + 2
            stream_start = np.concatenate([[0], np.cumsum(total)[:-1]])
            inner = np.ones(total.sum(), dtype=bool)  # positions holding an event, not BOS/EOS
            inner[stream_start] = False
            inner[stream_start + total - 1] = False

            def stream(values: np.ndarray, bos: int, eos: int) -> np.ndarray:
                out = np.full(total.sum(), eos, dtype=np.int32)
                out[stream_start] = bos
                out[inner] = values
                return out

            def flat(column: str) -> pa.Array:
                return pc.list_flatten(batch.column(column))

            types = pc.index_in(flat("event_types"), value_set=event_names)
            type_tokens = np.where(types.is_null().to_numpy(zero_copy_only=False), PAD,
                                   event_ids[types.fill_null(0).to_numpy(zero_copy_only=False)])
            gaps = flat("gap_seconds")
            # Bucket = how many edges lie strictly below the gap (a missing gap is bucket 0).
            buckets = np.where(gaps.is_null().to_numpy(zero_copy_only=False), 0,
                               np.searchsorted(bounds, gaps.fill_null(0.0).to_numpy(zero_copy_only=False), "left"))
            found = pc.index_in(flat("categories"), value_set=categories)
            category_tokens = np.where(found.is_null().to_numpy(zero_copy_only=False), 0,
                                       category_ids[found.fill_null(0).to_numpy(zero_copy_only=False)]
                                       if len(category_ids) else 0)
            streams = {
                "event_type": stream(type_tokens, BOS, EOS),
                "item_idx": stream(flat("item_idx").fill_null(0).to_numpy(zero_copy_only=False), PAD, PAD),
                "category_idx": stream(category_tokens, PAD, PAD),
                "gap_bucket": stream(buckets, PAD, PAD),
            }
            # Window starts per session: 0, step, 2 step, ... up to the last start, and the last start
            # itself, so that the session's end is always covered.
            last = np.maximum(total - length, 0)
            regular = last // step + 1
            count = regular + (last % step != 0)
            session = np.repeat(np.arange(len(total)), count)
            rank = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
            start = np.minimum(rank * step, last[session])
            positions = start[:, None] + np.arange(length)[None, :]
            inside = positions < total[session][:, None]
            gather = np.where(inside, stream_start[session][:, None] + positions, 0)
            offsets = pa.array(np.arange(len(session) + 1, dtype=np.int32) * length)

            def windowed(values: np.ndarray) -> pa.Array:
                cut = np.where(inside, values[gather], PAD).astype(np.int32).ravel()
                return pa.ListArray.from_arrays(offsets, pa.array(cut))

            take = pa.array(session)
            contexts = batch.column("user_context").take(take).cast(pa.list_(pa.float32()))
            yield pa.RecordBatch.from_arrays(
                [batch.column("session_id").take(take), pa.array(start.astype(np.int32)),
                 pa.array(np.minimum(total[session] - start, length).astype(np.int32)),
                 *[windowed(streams[c]) for c in ("event_type", "item_idx", "category_idx", "gap_bucket")],
                 contexts, batch.column("user_category_idx").take(take).cast(pa.int32()),
                 batch.column("split").take(take)],
                names=["session_id", "window_start", "length", "event_type", "item_idx", "category_idx",
                       "gap_bucket", "user_context", "user_category_idx", "split"])

    return windows


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
    tokens = build_session_tokens(sessions, catalog, user_context(profiles, catalog), cfg.window,
                                  cfg.gap_bucket_edges, files=max(4, ctx.cfg.train.num_processes))
    tokens_commit = ctx.write(tokens, "session_tokens")
    return {"items": catalog_commit.rows, "sessions": sessions.count(), "sessions_written": sessions_written,
            "users": profiles_commit.rows, "token_windows": tokens_commit.rows}
