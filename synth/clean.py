"""The clean stage: raw clickstream files -> typed, deduplicated, sessionized, pseudonymized `events`.

Every raw row ends in exactly one place: `events`, `quarantine` (with a reason code and the raw
text), or the duplicate count. The stage checks raw = clean + quarantined + duplicates before it
commits `events`, and fails after committing `quarantine` when too large a share was rejected.

Nightly runs are incremental: the `raw_files` table remembers each input file's size, modification
time and event dates, so a run reads only new, changed or removed files plus the unchanged files
that hold events of the same dates, and replaces just those `event_date` partitions. Every rule that
decides an event's fate (duplicates, bots, sessions) looks no further than its own date, so a date
rebuilt alone comes out exactly as a full rebuild would make it.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from synth import _arrow
from synth.lake import ADD_ACTIONS_DDL
from synth.simulate import simulate
from synth.sources import InputFile, list_input_files, read_source

log = logging.getLogger(__name__)

EVENT_TYPES = ("view", "cart", "purchase", "search")
_CANONICAL = ("event_time", "event_type", "user_id", "session_id", "item_id", "category", "category_path",
              "brand", "price")


_CACHE_COMPRESSED = "spark.sql.inMemoryColumnarStorage.compressed"
# Changes whenever the same input and options would give other events (ids, sessions), so that the
# next run rebuilds every date instead of mixing old and new rows.
_EVENTS_VERSION = 2


class QuarantineThresholdExceeded(RuntimeError):
    pass


def pseudonym_key(cfg) -> bytes:
    """The secret of the user pseudonyms: from the environment, else a key file (created for local runs)."""
    value = os.environ.get(cfg.clean.pseudonym_key_env)
    if value:
        return value.encode()
    path = Path(cfg.clean.pseudonym_key_file)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
        log.warning("no %s set: created a random pseudonymization key in %s; keep it to get the same "
                    "pseudonyms tomorrow", cfg.clean.pseudonym_key_env, path)
    return path.read_text().strip().encode()


def _plausible(event_time: Column, cfg) -> Column:
    # The bound is a literal: Spark adds the interval to current_timestamp() on every row (2 us each).
    latest = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
    return (event_time >= F.lit(str(cfg.clean.time_floor)).cast("timestamp")) & (event_time <= F.lit(latest))


def _checked(rows: DataFrame, cfg, price_required: bool = True) -> DataFrame:
    """Name the first rule each raw row breaks (reason null = valid), with a detail for the reader.

    Sources without prices (YOOCHOOSE, DIGINETICA, ...) pass price_required=False: a missing price is
    then expected, while a price that is there must still be sane.
    """
    needs_item = F.col("event_type") != F.lit("search")
    price = F.col("price_raw").try_cast("double")
    reason_detail = [
        (F.col("malformed").isNotNull(), "malformed_line", F.col("malformed")),
        (F.col("event_time_raw").isNull(), "missing_time", F.lit("no event time")),
        (F.col("event_time").isNull(), "bad_timestamp",
         F.concat(F.lit("unparseable time '"), F.col("event_time_raw"), F.lit("'"))),
        (~_plausible(F.col("event_time"), cfg), "impossible_timestamp",
         F.concat(F.lit("time "), F.col("event_time_raw"), F.lit(" is before the floor or in the future"))),
        (F.col("event_type").isNull(), "unknown_event_type",
         F.concat(F.lit("event type '"), F.coalesce(F.col("event_type_raw"), F.lit("")), F.lit("'"))),
        (F.col("user_id").isNull(), "missing_user", F.lit("no user id")),
        (F.col("needs_item") & F.col("item_id").isNull(), "missing_item", F.lit("no item id")),
        (F.col("needs_item") & F.col("price_value").isNull()
         & (F.lit(price_required) | F.col("price_raw").isNotNull()), "bad_price",
         F.concat(F.lit("unparseable price '"), F.coalesce(F.col("price_raw"), F.lit("")), F.lit("'"))),
        (F.col("needs_item") & ((F.col("price_value") <= 0) | (F.col("price_value") > cfg.clean.max_price)),
         "bad_price", F.concat(F.lit("price "), F.col("price_raw"), F.lit(f" is not in (0, {cfg.clean.max_price}]"))),
    ]
    reason = F.lit(None).cast("string")
    detail = F.lit(None).cast("string")
    for condition, code, text in reversed(reason_detail):
        reason = F.when(condition, F.lit(code)).otherwise(reason)
        detail = F.when(condition, text).otherwise(detail)
    return (rows.withColumn("needs_item", F.coalesce(needs_item, F.lit(True)))
            .withColumn("price_value", price)
            .withColumn("reason", reason).withColumn("detail", detail))


def deduplicated_sessions(rows, gap_seconds: int, max_session_events: int, key: bytes):
    """Exact duplicates dropped, session ids assigned, users pseudonymized, event ids added, for `rows`
    (canonical fields, source_file, event_date) holding whole (user, date) groups.

    Exact duplicates share every canonical field, so they sort next to each other within their
    (user, source session, date); the copy from the first source file is kept. Session ids are the
    source's session where present, else inactivity-gap splits; long sessions are capped by
    splitting. Sessions are also cut at UTC midnight, so that a date re-processed alone (incremental
    runs) gets exactly the sessions a full run would give it.
    """
    import numpy as np
    import pyarrow.compute as pc

    order = ["user_id", "session_id", "event_date", "event_time", "event_type", "item_id", "price", "brand",
             "category", "category_path", "source_file"]
    rows = rows.take(pc.sort_indices(rows, sort_keys=[(c, "ascending") for c in order], null_placement="at_start"))

    def same_as_previous(*columns: str) -> np.ndarray:
        """Rows equal to the row before them in all `columns` (null equals null)."""
        return np.logical_and.reduce([_arrow.same_as_previous(rows.column(c)) for c in columns])

    same_group = same_as_previous("user_id", "session_id", "event_date")
    duplicate = same_group & same_as_previous("event_time", "event_type", "item_id", "price", "brand", "category",
                                              "category_path")
    seconds = rows.column("event_time").combine_chunks().cast(pa.int64()).to_numpy(zero_copy_only=False) // 1_000_000
    gap = np.diff(seconds, prepend=seconds[:1])
    gap_start = same_group & rows.column("session_id").is_null().to_numpy(zero_copy_only=False) & (gap > gap_seconds)
    kept = ~duplicate
    rows, group_start, gap_start = rows.filter(pa.array(kept)), ~same_group[kept], gap_start[kept]
    n = rows.num_rows
    # The inactivity segment of each event in its group (0, 1, ...), its position in the segment, and
    # so the part of the segment (max_session_events each) it falls in: one session per part.
    segment_start = group_start | gap_start
    passed = np.cumsum(gap_start)
    segment = passed - passed[np.flatnonzero(group_start)][np.cumsum(group_start) - 1]
    position = np.arange(n) - np.flatnonzero(segment_start)[np.cumsum(segment_start) - 1]
    part = position // max_session_events
    first = np.flatnonzero(position % max_session_events == 0)
    session_of_row = np.cumsum(position % max_session_events == 0) - 1

    users = pc.dictionary_encode(rows.column("user_id").combine_chunks())
    user_ids = _pseudonyms(key, pc.binary_join_element_wise("user", users.dictionary, "|"), "u_")
    starts = pa.array(first)
    session_keys = pc.binary_join_element_wise(
        rows.column("user_id").take(starts), pc.fill_null(rows.column("session_id").take(starts), ""),
        rows.column("event_date").take(starts).cast(pa.string()), pa.array(segment[first]).cast(pa.string()),
        pa.array(part[first]).cast(pa.string()), "|")
    session_ids = _pseudonyms(key, session_keys, "s_")
    user_id = user_ids.take(users.indices)
    session_id = session_ids.take(pa.array(session_of_row))
    rows = rows.set_column(rows.schema.get_field_index("user_id"), "user_id", user_id)
    rows = rows.set_column(rows.schema.get_field_index("session_id"), "session_id", session_id)
    return rows.append_column("event_id", event_ids(rows))


def _pseudonyms(key: bytes, messages, prefix: str):
    """prefix + the first 32 hex digits of HMAC-SHA256(key, message), per message of a string array."""
    digest = hmac.digest  # the one-shot OpenSSL call: a quarter of the time of hmac.new(...).hexdigest()
    return pa.array([prefix + digest(key, m, "sha256")[:16].hex() for m in messages.cast(pa.binary()).to_pylist()],
                    pa.string())


def event_ids(events):
    """128 bits as 32 hex digits: two 64-bit hash chains over the canonical fields.

    The ids hash the pseudonymized user and session ids, never the raw user id, which an unkeyed hash
    would let anyone recover by trying ids.
    """
    return _arrow.hex_digits(*_arrow.combined_hashes([events.column(c) for c in _CANONICAL], events.num_rows))


def _sessionizer(gap_seconds: int, max_session_events: int, key: bytes, writer):
    """The executor side of the events write: a partition's whole (user, date) groups sessionized and
    written as Parquet; yields the files' add actions."""

    def run(batches):
        batches = [b for b in batches if b.num_rows]
        if batches:
            events = deduplicated_sessions(pa.Table.from_batches(batches), gap_seconds, max_session_events, key)
            yield from writer.batches([events])

    return run


@dataclass
class _Plan:
    """What one clean run reads and replaces: files=None and dates=None mean everything."""

    inventory: list[InputFile] | None
    fingerprint: str
    files: set[str] | None = None
    dates: list[dt.date] | None = None
    previous: list | None = None  # raw_files rows of the last run
    why: str = ""

    @property
    def full(self) -> bool:
        return self.files is None


def _fingerprint(cfg, key: bytes) -> str:
    """Changes when anything that shapes the events changes: input and clean options, the key, or the
    way events are derived (_EVENTS_VERSION)."""
    options = {"input": cfg.input.to_dict(), "version": _EVENTS_VERSION,
               "clean": {k: v for k, v in cfg.clean.to_dict().items()
                         if k not in ("incremental", "max_quarantine_share", "pseudonym_key_env",
                                      "pseudonym_key_file")},
               "key": hmac.new(key, b"synth input fingerprint", hashlib.sha256).hexdigest()}
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _file_stats(rows: DataFrame) -> list:
    """One small aggregation serving both the row accounting and the file ledger: rows per source file,
    validity and event date."""
    return rows.groupBy("source_file", F.col("reason").isNull().alias("valid"),
                        F.col("event_date").alias("date")).count().collect()


def _file_dates(stats: list) -> dict[str, tuple[list[dt.date], int]]:
    """Per source file: the UTC dates its rows could be events of, and its row count."""
    dates: dict[str, set] = {}
    rows: dict[str, int] = {}
    for r in stats:
        path = _listed(r.source_file)
        dates.setdefault(path, set())
        if r.date is not None:
            dates[path].add(r.date)
        rows[path] = rows.get(path, 0) + r["count"]
    return {path: (sorted(dates[path]), rows[path]) for path in dates}


def _listed(path: str) -> str:
    """A row's source_file (file:/x) in the form file listings use (file:///x)."""
    return "file://" + path[len("file:"):] if path.startswith("file:/") and not path.startswith("file://") else path


def _plan(ctx, key: bytes) -> _Plan:
    cfg, spark, lake = ctx.cfg, ctx.spark, ctx.lake
    plan = _Plan(list_input_files(spark, cfg), _fingerprint(cfg, key))
    if ctx.force or not cfg.clean.incremental:
        plan.why = "full rebuild (--force)" if ctx.force else "full rebuild (clean.incremental is false)"
        return plan
    if plan.inventory is None:
        plan.why = "full rebuild: the input is a table, not files"
        return plan
    if not (lake.exists("raw_files") and lake.exists("events")):
        plan.why = "full rebuild: first run on this lake"
        return plan
    previous = ctx.read("raw_files").df.collect()  # one row per input file
    if any(r.input_fingerprint != plan.fingerprint for r in previous):
        plan.why = "full rebuild: input or clean options or the pseudonymization key changed"
        return plan
    known = {r.path: r for r in previous}
    present = {f.path: f for f in plan.inventory}
    # Spark hands timestamps back as naive local times; .timestamp() reads them as such.
    changed = [f for f in plan.inventory if f.path not in known
               or (known[f.path].size, round(known[f.path].modification_time.timestamp() * 1000))
               != (f.size, round(f.modification_time.timestamp() * 1000))]
    removed = [r for r in previous if r.path not in present]
    if any(f.role == "lookup" for f in changed) or any(r.role == "lookup" for r in removed):
        plan.why = "full rebuild: a lookup file (joined onto every row) changed"
        return plan
    plan.previous = previous
    files = {f.path for f in changed}
    # The dates the changed files feed now, and those they (or the removed files) fed before.
    dates = {d for r in previous if r.path not in present or r.path in files for d in r.event_dates}
    if files:
        new_rows = read_source(spark, cfg, files=files).rows.select(
            "source_file", F.lit(None).cast("string").alias("reason"),
            F.when(_plausible(F.col("event_time"), cfg), F.to_date("event_time")).alias("event_date"))
        dates |= {d for file_dates, _ in _file_dates(_file_stats(new_rows)).values() for d in file_dates}
    # Unchanged files holding events of an affected date are read again, and their other dates then
    # count as affected too, until the set is closed.
    unchanged = [r for r in previous if r.path in present and r.path not in files and r.role == "feed"]
    grew = True
    while grew:
        grew = False
        for r in unchanged:
            if r.path not in files and dates.intersection(r.event_dates):
                files.add(r.path)
                dates |= set(r.event_dates)
                grew = True
    plan.files, plan.dates = files, sorted(dates)
    plan.why = (f"incremental: {sum(f.path not in known for f in changed)} new, "
                f"{sum(f.path in known for f in changed)} changed and {len(removed)} removed file(s); "
                f"reading {len(files)} file(s) for {len(dates)} date(s)")
    return plan


def _raw_files(ctx, plan: _Plan, read: dict[str, tuple[list[dt.date], int]]) -> DataFrame:
    """The new raw_files table: this run's files with what it read of them, the others unchanged."""
    rows = []
    kept = {r.path: r for r in plan.previous or []}
    for f in plan.inventory:
        if f.role == "lookup" or plan.full or f.path in plan.files:
            dates, count = read.get(f.path, ([], 0))
            rows.append((f.path, f.size, f.modification_time, f.role, dates, count, plan.fingerprint, ctx.run_id))
        else:
            r = kept[f.path]
            rows.append((r.path, r.size, r.modification_time, r.role, list(r.event_dates), r.rows,
                         r.input_fingerprint, r.run_id))
    return ctx.spark.createDataFrame(
        rows, "path string, size long, modification_time timestamp, role string, event_dates array<date>, "
              "rows long, input_fingerprint string, run_id string")


def run(ctx) -> dict[str, int]:
    cfg, spark = ctx.cfg, ctx.spark
    raw_path = Path(cfg.input.path)
    if cfg.input.source == "simulator" and not any(raw_path.rglob("*.csv*")):
        simulate(spark, cfg, str(raw_path))
    key = pseudonym_key(cfg)
    plan = _plan(ctx, key)
    log.info("clean: %s", plan.why)
    ctx.artifacts["mode"] = plan.why
    if not plan.full:
        ctx.artifacts["event_dates"] = ",".join(d.isoformat() for d in plan.dates)
    if not plan.full and not plan.files and not plan.dates:
        print("clean: no new, changed or removed input files; nothing to do")
        return {"raw": 0, "clean": 0, "quarantined": 0, "duplicates": 0, "files_read": 0}

    raw = read_source(spark, cfg, files=plan.files)
    if raw.extra_columns:
        log.warning("clean: ignoring source columns %s (not mapped to any event field)", raw.extra_columns)
        ctx.artifacts["ignored_source_columns"] = ",".join(raw.extra_columns)
    if raw.missing_optional:
        log.warning("clean: the source has no %s; those event fields are null", raw.missing_optional)
        ctx.artifacts["missing_optional_fields"] = ",".join(raw.missing_optional)
    checked = _checked(raw.rows, cfg, price_required="price" not in raw.missing_optional)
    # Persisted as read by everything below: the row accounting, the bot verdicts, the quarantine and
    # the events. Uncompressed unless the job sets otherwise: building the compressed column cache
    # took longer than the parse itself (2.4 s against 1.8 s per 505k rows, 1.5 s uncompressed).
    chosen = spark.conf.get(_CACHE_COMPRESSED, None)
    if chosen is None:
        spark.conf.set(_CACHE_COMPRESSED, "false")
    try:
        typed = checked.select(
            "source_file", "raw_line", "reason", "detail",
            # Null for impossible times (the only rows with a time whose first broken rule is the time):
            # their odd dates would tie unrelated files together in raw_files.
            F.when(F.coalesce(F.col("reason") != "impossible_timestamp", F.lit(True)),
                   F.to_date("event_time")).alias("event_date"),
            "event_time", "event_type", "user_id", "session_id",
            F.when(F.col("needs_item"), F.col("item_id")).alias("item_id"), "category", "category_path",
            F.lower(F.col("brand")).alias("brand"),
            F.when(F.col("needs_item"), F.col("price_value")).alias("price")).persist()
    finally:
        if chosen is None:
            spark.conf.unset(_CACHE_COMPRESSED)
    stats = _file_stats(typed)
    valid_count = sum(r["count"] for r in stats if r.valid)
    raw_count = sum(r["count"] for r in stats)
    if raw_count == 0 and plan.full:
        raise ValueError(f"no raw rows in {cfg.input.path} (only headers or blank lines?)")

    valid = typed.where(F.col("reason").isNull()).drop("reason", "detail")
    limit = cfg.clean.bot_max_events_per_hour
    # Persisted: the quarantine and the events both need the verdicts, computed once.
    bots = (valid.groupBy("user_id", "event_date", F.date_trunc("hour", "event_time").alias("hour")).count()
            .where(F.col("count") > limit).groupBy("user_id", "event_date").agg(F.max("count").alias("peak"))
            .persist())
    flagged = valid.join(F.broadcast(bots), ["user_id", "event_date"], "left")
    # Every row of a bot-like user on that date, its exact copies included, is quarantined with its raw
    # text. Per date, not for ever: a date re-processed alone must get the same verdict.
    bot_rows = flagged.where(F.col("peak").isNotNull()).select(
        F.lit("bot_user").alias("reason"),
        F.format_string(f"user made %d events in one hour that day (limit {limit})", F.col("peak")).alias("detail"),
        "source_file", "raw_line")
    quarantine = (typed.where(F.col("reason").isNotNull()).select("reason", "detail", "source_file", "raw_line")
                  .unionByName(bot_rows).withColumn("run_id", F.lit(ctx.run_id)))
    commit = ctx.write(quarantine, "quarantine", replace={"run_id": ctx.run_id})
    quarantined = commit.rows
    by_reason = {r.reason: r["count"] for r in ctx.lake.read("quarantine", commit.version).df
                 .where(F.col("run_id") == ctx.run_id).groupBy("reason").count().collect()}
    if raw_count != valid_count + quarantined - by_reason.get("bot_user", 0):
        raise RuntimeError(f"row accounting does not add up: {raw_count} raw rows, {valid_count} valid, "
                           f"{quarantined} quarantined ({by_reason.get('bot_user', 0)} of them valid bot rows)")
    share = quarantined / max(raw_count, 1)
    if share > cfg.clean.max_quarantine_share:
        raise QuarantineThresholdExceeded(
            f"{quarantined} of {raw_count} raw rows ({100 * share:.1f}%) were quarantined, above "
            f"clean.max_quarantine_share = {cfg.clean.max_quarantine_share}; events were not written. "
            f"Inspect: SELECT reason, count(*) FROM delta.`{ctx.lake.uri('quarantine')}` "
            f"WHERE run_id = '{ctx.run_id}' GROUP BY reason")

    # Whole (user, date) groups per task, deduplicated, sessionized and written in Arrow.
    rows = flagged.where(F.col("peak").isNull()).select(*_CANONICAL, "source_file", "event_date")
    tasks = _arrow.task_count(spark.sparkContext, valid_count - by_reason.get("bot_user", 0),
                              cfg.spark.events_per_task)
    writer = ctx.lake.arrow_writer("events")
    sessionize = _sessionizer(cfg.clean.session_gap_minutes * 60, cfg.clean.max_session_events, key, writer)
    adds = rows.repartition(tasks, "user_id", "event_date").mapInArrow(sessionize, ADD_ACTIONS_DDL).collect()
    replace = None if plan.full else {"event_date": [d.isoformat() for d in plan.dates]}
    clean_count = ctx.commit_files(writer, [r.asDict() for r in adds], replace=replace).rows
    if plan.inventory is not None:
        ctx.write(_raw_files(ctx, plan, _file_dates(stats)), "raw_files")
    typed.unpersist()
    bots.unpersist()
    duplicates = valid_count - by_reason.get("bot_user", 0) - clean_count

    skipped = {f"skipped_{r.kind}_lines": r["count"] for r in raw.skipped.groupBy("kind").count().collect()}
    log.info("clean: quarantined %.2f%% of raw rows, by reason %s", 100 * share, by_reason)
    if not plan.full:
        files_read = len(plan.files)
    else:
        files_read = sum(f.role == "feed" for f in plan.inventory or [])
    print(f"clean: {plan.why}")
    print(f"clean: raw {raw_count} = clean {clean_count} + quarantined {quarantined} + duplicates {duplicates}")
    return {"raw": raw_count, "clean": clean_count, "quarantined": quarantined, "duplicates": duplicates,
            "files_read": files_read, **{f"quarantined.{k}": v for k, v in by_reason.items()}, **skipped}
