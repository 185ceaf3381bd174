"""The clean stage: raw clickstream files -> typed, deduplicated, sessionized, pseudonymized `events`.

Every raw row ends in exactly one place: `events`, `quarantine` (with a reason code and the raw
text), or the duplicate count. The stage checks raw = clean + quarantined + duplicates before it
commits `events`, and fails after committing `quarantine` when too large a share was rejected.

Nightly runs are incremental: the `raw_files` table remembers each input file's size, modification
time and event dates, so a run reads only new, changed or removed files plus the unchanged files
that hold events of the same dates, and replaces just those `event_date` partitions. Every rule that
decides an event's fate (duplicates, bots, sessions) looks no further than its own date, so a date
rebuilt alone comes out exactly as a full rebuild would make it.

The stage is one pass in Arrow over the raw rows (synth._arrow), in two halves. Each map task checks
its share of the raw rows (`checked`) and sends every row, with its verdict, to the bucket of its
user: a range of the user pseudonyms, so that each bucket's events files hold a user_id range of
their own, which featurize reads as groups of users. Each bucket then quarantines the rejected rows
and every row of a bot-like user's date (`bot_peaks`), drops exact duplicates, cuts sessions and
pseudonymizes (`deduplicated_sessions`), and writes both tables' Parquet files; the driver commits quarantine, checks the row accounting and the
quarantine threshold, then commits events, or deletes their files when a check fails.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from pyspark.sql import Column
from pyspark.sql import functions as F

from synth import _arrow, _csv
from synth.simulate import simulate
from synth.sources import InputFile, Listing, list_input_files, read_source

log = logging.getLogger(__name__)

EVENT_TYPES = ("view", "cart", "purchase", "search")
_CANONICAL = ("event_time", "event_type", "user_id", "session_id", "item_id", "category", "category_path",
              "brand", "price")
# Fields with a few distinct values, which travel through the shuffle dictionary-encoded. With the raw
# user id left out too, Spark moves a third fewer bytes (54 -> 36 MB per 674k raw rows), and the map
# side compresses less (0.70 -> 0.65 s per 674k rows, all of _judged).
_FEW_VALUES = ("event_type", "category", "category_path", "brand")


# Changes whenever the same input and options would give other events (ids, sessions), so that the
# next run rebuilds every date instead of mixing old and new rows.
_EVENTS_VERSION = 4


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


def _time_bounds(cfg) -> tuple[dt.datetime, dt.datetime]:
    """The plausible event times: from clean.time_floor to a day after now (UTC)."""
    floor = dt.datetime.fromisoformat(str(cfg.clean.time_floor))
    floor = floor if floor.tzinfo else floor.replace(tzinfo=dt.timezone.utc)
    return floor, dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)


def _plausible(event_time: Column, cfg) -> Column:
    # Literal bounds: Spark would add an interval to current_timestamp() on every row (2 us each).
    floor, latest = _time_bounds(cfg)
    return (event_time >= F.lit(floor)) & (event_time <= F.lit(latest))


@dataclass(frozen=True)
class Rules:
    """What the row checks need to know (plain values: they travel to the executors)."""

    floor_us: int
    latest_us: int
    max_price: float | int  # as configured, so that details print it as written
    price_required: bool  # False for sources without prices: a missing price is expected there
    bot_max_events_per_hour: int

    @classmethod
    def of(cls, cfg, price_required: bool) -> "Rules":
        floor, latest = _time_bounds(cfg)
        micros = lambda t: round(t.timestamp() * 1_000_000)  # noqa: E731
        return cls(micros(floor), micros(latest), cfg.clean.max_price, price_required,
                   int(cfg.clean.bot_max_events_per_hour))


def checked(raw, rules: Rules):
    """Raw rows (sources.SOURCE_COLUMNS, a pyarrow Table) typed and judged: `reason` names the first rule
    each row breaks (null = valid) and `detail` says what was found; returns the canonical fields,
    source_file (dictionary-encoded), raw_line, event_date, reason, detail, and the rows' piece and line
    where the Arrow CSV reader read them (else null).

    Events without an item (searches) keep neither item nor price. event_date is null for impossible
    times: their odd dates would tie unrelated files together in raw_files.
    """
    import numpy as np
    import pyarrow.compute as pc

    n = raw.num_rows

    def column(name):
        return raw.column(name) if raw.column(name).num_chunks else pa.chunked_array([pa.nulls(n, raw.schema.field(name).type)])

    def reference(name):
        return raw.column(name) if name in raw.column_names else pa.nulls(n, pa.int32())

    def flag(condition) -> np.ndarray:
        return pc.fill_null(condition, False).to_numpy(zero_copy_only=False)

    def text(*parts):
        """A detail for the rows at `at`: literal strings and columns joined."""
        def build(at):
            if all(isinstance(p, str) for p in parts):
                return pa.array(["".join(parts)] * len(at), pa.string())
            return pc.binary_join_element_wise(*[p if isinstance(p, str) else p.take(at) for p in parts], "")
        return build

    event_time = column("event_time").cast(pa.timestamp("us", "UTC"))
    micros = event_time.cast(pa.int64())
    event_type, price_raw = column("event_type"), column("price_raw")
    needs_item = flag(pc.not_equal(event_type, "search")) | event_type.is_null().to_numpy(zero_copy_only=False)
    price = _prices(price_raw)
    plausible = flag(pc.and_(pc.greater_equal(micros, rules.floor_us), pc.less_equal(micros, rules.latest_us)))
    time_raw, type_raw = column("event_time_raw"), column("event_type_raw")
    price_text = pc.fill_null(price_raw, "")
    rules_in_order = [
        (flag(column("malformed").is_valid()), "malformed_line", lambda at: column("malformed").take(at)),
        (flag(time_raw.is_null()), "missing_time", text("no event time")),
        (flag(event_time.is_null()), "bad_timestamp", text("unparseable time '", time_raw, "'")),
        (~plausible, "impossible_timestamp", text("time ", time_raw, " is before the floor or in the future")),
        (flag(event_type.is_null()), "unknown_event_type", text("event type '", pc.fill_null(type_raw, ""), "'")),
        (flag(column("user_id").is_null()), "missing_user", text("no user id")),
        (needs_item & flag(column("item_id").is_null()), "missing_item", text("no item id")),
        (needs_item & flag(price.is_null()) & (rules.price_required | flag(price_raw.is_valid())), "bad_price",
         text("unparseable price '", price_text, "'")),
        (needs_item & ~flag(pc.and_(pc.greater(price, 0), pc.less_equal(price, rules.max_price)))
         & flag(price.is_valid()), "bad_price", text("price ", price_text, f" is not in (0, {rules.max_price}]")),
    ]
    # The first rule each row breaks (-1: none); details are built for the rejected rows only.
    first = np.full(n, -1, np.int64)
    for k, (broken, _, _) in enumerate(rules_in_order):
        first[(first < 0) & broken] = k
    rejected = np.flatnonzero(first >= 0)
    codes = pa.array([code for _, code, _ in rules_in_order], pa.string())
    reason = pa.DictionaryArray.from_arrays(pa.array(first, mask=first < 0).cast(pa.int32()), codes).cast(pa.string())
    details, slot = [], np.full(n, -1, np.int64)
    for k, (_, _, describe) in enumerate(rules_in_order):
        at = rejected[first[rejected] == k]
        if at.size:
            slot[at] = sum(len(d) for d in details) + np.arange(at.size)
            details.append(describe(pa.array(at)).cast(pa.string()))
    if details:
        found = pa.chunked_array(details, pa.string()).combine_chunks()
        detail = found.take(pa.array(slot, mask=slot < 0))
    else:
        detail = pa.nulls(n, pa.string())
    impossible = flag(pc.equal(reason, "impossible_timestamp"))
    event_date = pc.if_else(pa.array(impossible), pa.scalar(None, pa.date32()), event_time.cast(pa.date32()))
    keep_item = pa.array(needs_item)
    return pa.table({
        "event_time": event_time, "event_type": event_type, "user_id": column("user_id"),
        "session_id": column("session_id"),
        "item_id": pc.if_else(keep_item, column("item_id"), pa.scalar(None, pa.string())),
        "category": column("category"), "category_path": column("category_path"),
        "brand": pc.utf8_lower(column("brand")),
        "price": pc.if_else(keep_item, price, pa.scalar(None, pa.float64())),
        "source_file": _dictionary(column("source_file")), "raw_line": column("raw_line"), "event_date": event_date,
        "reason": reason, "detail": detail, "piece": reference("piece"), "line": reference("line")})


def _dictionary(values):
    """String values dictionary-encoded (values repeated on many rows: a file name, an event type)."""
    import pyarrow.compute as pc

    return values if pa.types.is_dictionary(values.type) else pc.dictionary_encode(values)


def _prices(text):
    """Prices parsed as numbers (null where a string is not a finite decimal number)."""
    import pyarrow.compute as pc

    try:
        price = text.cast(pa.float64())
    except pa.ArrowInvalid:  # some strings are not numbers: only those that look like one are parsed
        number = pc.match_substring_regex(text, r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$")
        price = pc.if_else(pc.fill_null(number, False), text, pa.scalar(None, pa.string())).cast(pa.float64())
    return pc.if_else(pc.fill_null(pc.is_finite(price), False), price, pa.scalar(None, pa.float64()))


def deduplicated_sessions(rows, gap_seconds: int, max_session_events: int, key: bytes):
    """Exact duplicates dropped, session ids assigned, users pseudonymized, event ids added, for `rows`
    (canonical fields but the raw user_id, source_file, event_date, and user_hi and user_lo: the user's
    pseudonym digest from _user_digests) holding whole (user, date) groups.

    Exact duplicates share every canonical field, so they sort next to each other within their
    (user, source session, date); the copy from the first source file is kept. Session ids are the
    source's session where present, else inactivity-gap splits; long sessions are capped by
    splitting. Sessions are also cut at UTC midnight, so that a date re-processed alone (incremental
    runs) gets exactly the sessions a full run would give it.
    """
    import numpy as np
    import pyarrow.compute as pc

    # Date first: each date's rows are then one slice for the writer (events are partitioned by date),
    # in pseudonym order (the digests' order is their hex digits' order).
    order = ["event_date", "user_hi", "user_lo", "session_id", "event_time", "event_type", "item_id", "price",
             "brand", "category", "category_path", "file_order"]
    ranked = rows.append_column("file_order", _file_order(rows.column("source_file")))
    rows = rows.take(pc.sort_indices(ranked, sort_keys=[(c, "ascending") for c in order], null_placement="at_start"))

    def same_as_previous(*columns: str) -> np.ndarray:
        """Rows equal to the row before them in all `columns` (null equals null)."""
        return np.logical_and.reduce([_arrow.same_as_previous(rows.column(c)) for c in columns])

    same_group = same_as_previous("user_hi", "user_lo", "session_id", "event_date")
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

    starts = pa.array(first)
    user_hi, user_lo = (rows.column(c).combine_chunks().to_numpy() for c in ("user_hi", "user_lo"))
    user_id = _arrow.hex_digits(user_hi, user_lo, prefix="u_")
    session_keys = pc.binary_join_element_wise(
        user_id.take(starts), pc.fill_null(rows.column("session_id").take(starts), ""),
        rows.column("event_date").take(starts).cast(pa.string()), pa.array(segment[first]).cast(pa.string()),
        pa.array(part[first]).cast(pa.string()), "|")
    session_digests = _digests(key, session_keys)
    session_id = _arrow.hex_digits(*session_digests.T, prefix="s_").take(pa.array(session_of_row))
    rows = rows.append_column("user_id", user_id)
    rows = rows.set_column(rows.schema.get_field_index("session_id"), "session_id", session_id)
    rows = rows.drop(["user_hi", "user_lo"])
    return rows.append_column("event_id", event_ids(rows, user_hi, session_digests[session_of_row, 0]))


def _file_order(files):
    """Per row, the rank of its file name among the names (file names sort as these ranks do)."""
    import numpy as np
    import pyarrow.compute as pc

    files = files.combine_chunks() if isinstance(files, pa.ChunkedArray) else files
    if not pa.types.is_dictionary(files.type):
        files = pc.dictionary_encode(files)
    rank = np.empty(len(files.dictionary), np.int32)
    rank[pc.sort_indices(files.dictionary).to_numpy()] = np.arange(len(files.dictionary), dtype=np.int32)
    return pa.array(rank[files.indices.to_numpy(zero_copy_only=False)])


def _with_raw_lines(rows, pieces: dict):
    """The raw_line of `rows`, those the shuffle left out read again from their piece (pieces: number ->
    (CsvFeed, Piece) of the read plan)."""
    import numpy as np

    raw_line = rows.column("raw_line").combine_chunks()
    missing = np.flatnonzero(raw_line.is_null().to_numpy(zero_copy_only=False))
    if not missing.size:
        return raw_line
    piece = rows.column("piece").combine_chunks().to_numpy(zero_copy_only=False)[missing]
    line = rows.column("line").combine_chunks().to_numpy(zero_copy_only=False)[missing]
    # The lines read again are appended after the carried ones; each missing row then points at its own.
    found, slot, end = [raw_line], np.arange(len(raw_line)), len(raw_line)
    for number in np.unique(piece).tolist():
        mine = piece == number
        feed, where = pieces[number]
        found.append(_csv.raw_lines(feed, where, line[mine]))
        slot[missing[mine]] = end + np.arange(mine.sum())
        end += int(mine.sum())
    return pa.concat_arrays([a.cast(pa.string()) for a in found]).take(pa.array(slot))


def _digests(key: bytes, messages):
    """Keyed BLAKE2b-128 (RFC 7693's MAC mode) of each message of a string array, as two uint64 columns.

    BLAKE2b's keyed mode is a PRF like HMAC-SHA256, at a third of its cost per call here. Each message
    continues a copy of one keyed state: about 30% faster than keying a new hash object per message."""
    import numpy as np

    if len(key) > 64:  # BLAKE2b takes keys of up to 64 bytes; longer ones are hashed down, as HMAC does
        key = hashlib.blake2b(key).digest()
    keyed = hashlib.blake2b(key=key, digest_size=16)
    digests = []
    for message in messages.cast(pa.binary()).to_pylist():
        state = keyed.copy()
        state.update(message)
        digests.append(state.digest())
    return np.frombuffer(b"".join(digests), ">u8").reshape(-1, 2).astype(np.uint64)


def _user_digests(key: bytes, user_ids):
    """The keyed digest of each row's user id (_digests of "user|<id>", each distinct id hashed once) as
    two uint64 arrays, 0 for a null id: the user's pseudonym is "u_" and their 32 hex digits."""
    import numpy as np
    import pyarrow.compute as pc

    users = pc.dictionary_encode(user_ids.combine_chunks() if isinstance(user_ids, pa.ChunkedArray) else user_ids)
    digests = np.zeros((len(users.dictionary) + 1, 2), np.uint64)  # the last row stands for null ids
    if len(users.dictionary):
        digests[:-1] = _digests(key, pc.binary_join_element_wise("user", users.dictionary, "|"))
    index = users.indices.fill_null(len(users.dictionary)).to_numpy(zero_copy_only=False)
    return digests[index, 0], digests[index, 1]


def event_ids(events, user_hashes, session_hashes):
    """128 bits as 32 hex digits: two 64-bit hash chains over the canonical fields, with the user and
    session taken as the first 64 bits of their pseudonyms' digests (`user_hashes`, `session_hashes`:
    uint64 per row), which spares hashing their hex digits again.

    The ids hash the pseudonymized user and session ids, never the raw user id, which an unkeyed hash
    would let anyone recover by trying ids.
    """
    columns = {c: events.column(c) for c in _CANONICAL}
    columns["user_id"] = pa.array(user_hashes.view("int64"))
    columns["session_id"] = pa.array(session_hashes.view("int64"))
    return _arrow.hex_digits(*_arrow.combined_hashes([columns[c] for c in _CANONICAL], events.num_rows))


def bot_peaks(valid, limit: int):
    """Per valid row: the most events its user (user_hi, user_lo: the pseudonym digest) made in one hour
    of its date, where that is above `limit` (a bot-like user), else null. Rows hold whole (user, date)
    groups."""
    import numpy as np
    import pyarrow.compute as pc

    user_date = ["user_hi", "user_lo", "event_date"]
    hour = pc.divide(valid.column("event_time").cast(pa.int64()), 3_600_000_000)
    hours = valid.select(user_date).append_column("hour", hour).group_by([*user_date, "hour"]).aggregate([([], "count_all")])
    busy = hours.filter(pc.greater(hours.column("count_all"), limit))
    if not busy.num_rows:
        return pa.nulls(valid.num_rows, pa.int64())
    peaks = busy.group_by(user_date).aggregate([("count_all", "max")])
    position = valid.select(user_date).append_column("row", pa.array(np.arange(valid.num_rows, dtype=np.int64)))
    joined = position.join(peaks, user_date, join_type="inner")
    peak = np.zeros(valid.num_rows, np.int64)
    peak[joined.column("row").to_numpy()] = joined.column("count_all_max").to_numpy()
    return pa.array(peak, mask=peak == 0)


def _judged(rows, rules: Rules, buckets: int, key: bytes):
    """Shuffle records of raw rows: checked, then sent with their verdict and their user's pseudonym
    digest (user_hi, user_lo) to their user's bucket, so that each bucket holds whole (user, date)
    groups. Buckets are ranges of the pseudonyms: each events file then holds a range of user_id
    disjoint from other buckets' files, which featurize reads as user groups without a shuffle.

    Rows the Arrow CSV reader read travel without their raw line unless rejected: it is most of a
    row's bytes, and the buckets need it only for the rare bot-like user, whose lines they read again
    by piece and line (_with_raw_lines). The raw user id stays here: the digest stands for it, and the
    _FEW_VALUES fields travel dictionary-encoded."""
    import numpy as np

    rows = checked(rows, rules)
    keep = (rows.column("reason").is_valid().to_numpy(zero_copy_only=False)
            | rows.column("line").is_null().to_numpy(zero_copy_only=False))
    if not keep.all():
        kept = np.flatnonzero(keep)
        slot = np.full(rows.num_rows, -1, np.int64)
        slot[kept] = np.arange(kept.size)
        lines = rows.column("raw_line").take(pa.array(kept)).combine_chunks().take(pa.array(slot, mask=slot < 0))
        rows = rows.set_column(rows.schema.get_field_index("raw_line"), "raw_line", lines)
    user_hi, user_lo = _user_digests(key, rows.column("user_id"))
    rows = rows.drop(["user_id"]).append_column("user_hi", pa.array(user_hi)).append_column("user_lo", pa.array(user_lo))
    for name in _FEW_VALUES:
        rows = rows.set_column(rows.schema.get_field_index(name), name, _dictionary(rows.column(name)))
    yield from _arrow.by_bucket(rows, _arrow.range_bucket(user_hi, buckets), buckets, "rows")


def _judge(rules: Rules, buckets: int, key: bytes, rows_per_chunk: int):
    """_judged over the Arrow batches of Spark's raw rows (mapInArrow), in chunks of rows_per_chunk rows."""

    def run(batches):
        def emit(pending):
            for bucket, (_, payload) in _judged(pa.Table.from_batches(pending), rules, buckets, key):
                yield pa.RecordBatch.from_pydict({"bucket": [bucket], "payload": [payload]}, _SHUFFLED)

        pending, size = [], 0
        for batch in batches:
            if batch.num_rows:
                pending.append(batch)
                size += batch.num_rows
            if size >= rows_per_chunk:
                yield from emit(pending)
                pending, size = [], 0
        if pending:
            yield from emit(pending)

    return run


def _read_and_judge(rules: Rules, buckets: int, key: bytes):
    """_judged over the raw rows the Arrow CSV reader reads for one task, plus its skipped-line counts."""

    def produce(task):
        rows, skipped = _csv.read_task(task)
        if rows is not None:
            yield from _judged(rows, rules, buckets, key)
        yield 0, ("skipped", skipped)

    return produce


_SHUFFLED = pa.schema([("bucket", pa.int32()), ("payload", pa.binary())])
_SHUFFLED_DDL = "bucket int, payload binary"


def _route(rules: Rules, gap_seconds: int, max_session_events: int, key: bytes, run_id: str, events_writer,
           quarantine_writer, pieces: dict):
    """The reduce side of the clean pass: one bucket's rows to quarantine (rejected rows, and every row
    of a bot-like user's date) or, deduplicated and sessionized, to events; both written as Parquet.
    Yields one summary: the files' add actions and the counts the driver checks. `pieces` (number ->
    (CsvFeed, Piece)) is the Arrow CSV reader's plan, where bot rows' raw lines are read again."""
    import pyarrow.compute as pc

    def run(partition):
        payloads = _arrow.payloads_of(partition)
        skipped: dict[str, int] = {}
        for counts in payloads.get("skipped", []):
            for kind, count in counts.items():
                skipped[kind] = skipped.get(kind, 0) + count
        rows = _arrow.from_ipc(payloads.get("rows", []))
        if rows is None:
            yield {"stats": [], "reasons": {}, "events": [], "quarantine": [], "skipped": skipped}
            return
        rows = rows.unify_dictionaries()  # one dictionary of file names, as group_by needs
        for name in _FEW_VALUES:
            rows = rows.set_column(rows.schema.get_field_index(name), name, rows.column(name).cast(pa.string()))
        valid_rows = rows.column("reason").is_null()
        counted = (pa.table({"source_file": rows.column("source_file"), "valid": valid_rows,
                             "date": rows.column("event_date")})
                   .group_by(["source_file", "valid", "date"]).aggregate([([], "count_all")]))
        stats = list(zip(*[counted.column(c).to_pylist() for c in ("source_file", "valid", "date", "count_all")]))
        quarantine = [rows.filter(pc.invert(valid_rows)).select(["reason", "detail", "source_file", "raw_line"])]
        valid = rows.filter(valid_rows)
        peak = bot_peaks(valid, rules.bot_max_events_per_hour)
        bots = valid.filter(peak.is_valid())
        if bots.num_rows:
            detail = pc.binary_join_element_wise(
                "user made ", peak.drop_null().cast(pa.string()),
                f" events in one hour that day (limit {rules.bot_max_events_per_hour})", "")
            quarantine.append(pa.table({"reason": pa.array(["bot_user"] * bots.num_rows), "detail": detail,
                                        "source_file": bots.column("source_file"),
                                        "raw_line": _with_raw_lines(bots, pieces)}))
            valid = valid.filter(peak.is_null())
        quarantine = pa.concat_tables(quarantine)
        reasons = quarantine.group_by("reason").aggregate([([], "count_all")]).to_pylist()
        quarantine = quarantine.append_column("run_id", pa.array([run_id] * quarantine.num_rows, pa.string()))
        events = deduplicated_sessions(valid.select([*(c for c in _CANONICAL if c != "user_id"), "source_file",
                                                     "event_date", "user_hi", "user_lo"]),
                                       gap_seconds, max_session_events, key)
        yield {"stats": stats, "reasons": {r["reason"]: r["count_all"] for r in reasons}, "skipped": skipped,
               "events": events_writer([events]) if events.num_rows else [],
               "quarantine": quarantine_writer([quarantine]) if quarantine.num_rows else []}

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


def _file_dates(stats: list) -> dict[str, tuple[list[dt.date], int]]:
    """Per source file: the UTC dates its rows could be events of, and its row count, from the counts
    (source_file, valid, date, rows)."""
    dates: dict[str, set] = {}
    rows: dict[str, int] = {}
    for source_file, _, date, count in stats:
        path = _listed(source_file)
        dates.setdefault(path, set())
        if date is not None:
            dates[path].add(date)
        rows[path] = rows.get(path, 0) + count
    return {path: (sorted(dates[path]), rows[path]) for path in dates}


def _event_dates(spark, cfg, files: set[str], listing: Listing) -> list:
    """(source_file, True, date, rows) of `files`' raw rows: the dates they would give events of."""
    raw = read_source(spark, cfg, files=files, listing=listing)
    if raw.rows is not None:
        counted = raw.rows.groupBy(
            "source_file", F.when(_plausible(F.col("event_time"), cfg), F.to_date("event_time")).alias("date")).count()
        return [(r.source_file, True, r.date, r["count"]) for r in counted.collect()]
    rules = Rules.of(cfg, price_required=True)

    def dates(tasks):
        import pyarrow.compute as pc

        for task in tasks:
            rows, _ = _csv.read_task(task)
            if rows is None:
                continue
            micros = rows.column("event_time").cast(pa.int64())
            plausible = pc.and_(pc.greater_equal(micros, rules.floor_us), pc.less_equal(micros, rules.latest_us))
            date = pc.if_else(plausible, rows.column("event_time").cast(pa.date32()), pa.scalar(None, pa.date32()))
            counted = (pa.table({"source_file": rows.column("source_file").cast(pa.string()), "date": date})
                       .group_by(["source_file", "date"]).aggregate([([], "count_all")]))
            yield from zip(counted.column("source_file").to_pylist(), [True] * counted.num_rows,
                           counted.column("date").to_pylist(), counted.column("count_all").to_pylist())

    return spark.sparkContext.parallelize(raw.tasks, max(1, len(raw.tasks))).mapPartitions(dates).collect()


def _listed(path: str) -> str:
    """A row's source_file (file:/x) in the form file listings use (file:///x)."""
    return "file://" + path[len("file:"):] if path.startswith("file:/") and not path.startswith("file://") else path


def _plan(ctx, key: bytes, listing: Listing) -> _Plan:
    cfg, spark, lake = ctx.cfg, ctx.spark, ctx.lake
    plan = _Plan(list_input_files(spark, cfg, listing), _fingerprint(cfg, key))
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
        plan.why = "full rebuild: input or clean options, the pseudonymization key or the way events are derived changed"
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
        dates |= {d for file_dates, _ in _file_dates(_event_dates(spark, cfg, files, listing)).values() for d in file_dates}
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


def _raw_files(ctx, plan: _Plan, read: dict[str, tuple[list[dt.date], int]]) -> list[dict]:
    """The new raw_files table: this run's files with what it read of them, the others unchanged."""
    rows = []
    kept = {r.path: r for r in plan.previous or []}
    for f in plan.inventory:
        if f.role == "lookup" or plan.full or f.path in plan.files:
            dates, count = read.get(f.path, ([], 0))
            rows.append((f.path, f.size, f.modification_time, f.role, dates, count, plan.fingerprint, ctx.run_id))
        else:
            r = kept[f.path]
            # Spark hands timestamps back as naive local times; astimezone reads them as such.
            rows.append((r.path, r.size, r.modification_time.astimezone(dt.timezone.utc), r.role,
                         list(r.event_dates), r.rows, r.input_fingerprint, r.run_id))
    names = ("path", "size", "modification_time", "role", "event_dates", "rows", "input_fingerprint", "run_id")
    return [dict(zip(names, row)) for row in rows]


def run(ctx) -> dict[str, int]:
    cfg, spark = ctx.cfg, ctx.spark
    raw_path = Path(cfg.input.path)
    if cfg.input.source == "simulator" and not any(raw_path.rglob("*.csv*")):
        simulate(spark, cfg, str(raw_path))
    key = pseudonym_key(cfg)
    listing = Listing(spark)
    plan = _plan(ctx, key, listing)
    log.info("clean: %s", plan.why)
    ctx.artifacts["mode"] = plan.why
    if not plan.full:
        ctx.artifacts["event_dates"] = ",".join(d.isoformat() for d in plan.dates)
    if not plan.full and not plan.files and not plan.dates:
        print("clean: no new, changed or removed input files; nothing to do")
        return {"raw": 0, "clean": 0, "quarantined": 0, "duplicates": 0, "files_read": 0}

    raw = read_source(spark, cfg, files=plan.files, listing=listing)
    if raw.extra_columns:
        log.warning("clean: ignoring source columns %s (not mapped to any event field)", raw.extra_columns)
        ctx.artifacts["ignored_source_columns"] = ",".join(raw.extra_columns)
    if raw.missing_optional:
        log.warning("clean: the source has no %s; those event fields are null", raw.missing_optional)
        ctx.artifacts["missing_optional_fields"] = ",".join(raw.missing_optional)
    rules = Rules.of(cfg, price_required="price" not in raw.missing_optional)
    # One task per input split on both sides (the RDD default), in whole rounds over the cores.
    sc = spark.sparkContext
    cores = max(1, sc.defaultParallelism)
    splits = len(raw.tasks) if raw.rows is None else raw.rows.rdd.getNumPartitions()
    tasks = cores * max(1, math.ceil(splits / cores))
    if not plan.full:
        # A night's few files would cut users into a few wide ranges, and featurize reads a user range of
        # every date as one group: the ranges stay as fine as the whole table's size asks.
        tasks = max(tasks, _arrow.task_count(sc, ctx.lake.rows("events", ctx.lake.version("events")),
                                             cfg.spark.events_per_task))
    # Buckets are pseudonym ranges. A power-of-two count makes the ranges of runs with other counts
    # nest, so that featurize still finds user groups in events files written by several runs.
    tasks = 1 << (tasks - 1).bit_length()
    events_writer = ctx.lake.arrow_writer("events")
    quarantine_writer = ctx.lake.arrow_writer("quarantine")
    if raw.rows is None:
        judged = _arrow.records(sc, raw.tasks, _read_and_judge(rules, tasks, key))
    else:
        judged = (raw.rows.mapInArrow(_judge(rules, tasks, key, cfg.spark.events_per_task), _SHUFFLED_DDL).rdd
                  .map(lambda r: (r.bucket, ("rows", r.payload))))
    summaries = _arrow.shuffled(judged, tasks).mapPartitions(_route(
        rules, cfg.clean.session_gap_minutes * 60, cfg.clean.max_session_events, key, ctx.run_id,
        events_writer, quarantine_writer,
        {piece.number: (feed, piece) for task in raw.tasks or [] for feed, listed in task for piece in listed})).collect()
    stats = [row for s in summaries for row in s["stats"]]
    by_reason: dict[str, int] = {}
    for s in summaries:
        for reason, count in s["reasons"].items():
            by_reason[reason] = by_reason.get(reason, 0) + count
    raw_count = sum(count for *_, count in stats)
    valid_count = sum(count for _, valid, _, count in stats if valid)
    event_adds = [a for s in summaries for a in s["events"]]
    if raw_count == 0 and plan.full:
        raise ValueError(f"no raw rows in {cfg.input.path} (only headers or blank lines?)")

    try:
        quarantined = ctx.commit_files(quarantine_writer, [a for s in summaries for a in s["quarantine"]],
                                       replace={"run_id": ctx.run_id}).rows
        if raw_count != valid_count + quarantined - by_reason.get("bot_user", 0):
            raise RuntimeError(f"row accounting does not add up: {raw_count} raw rows, {valid_count} valid, "
                               f"{quarantined} quarantined ({by_reason.get('bot_user', 0)} of them valid bot rows)")
        share = quarantined / max(raw_count, 1)
        if share > cfg.clean.max_quarantine_share:
            raise QuarantineThresholdExceeded(
                f"{quarantined} of {raw_count} raw rows ({100 * share:.1f}%) were quarantined, above "
                f"clean.max_quarantine_share = {cfg.clean.max_quarantine_share}; events were not committed. "
                f"Inspect: SELECT reason, count(*) FROM delta.`{ctx.lake.uri('quarantine')}` "
                f"WHERE run_id = '{ctx.run_id}' GROUP BY reason")
    except Exception:
        events_writer.discard(event_adds)
        raise
    replace = None if plan.full else {"event_date": [d.isoformat() for d in plan.dates]}
    clean_count = ctx.commit_files(events_writer, event_adds, replace=replace).rows
    if plan.inventory is not None:
        ctx.write_rows(_raw_files(ctx, plan, _file_dates(stats)), "raw_files")
    duplicates = valid_count - by_reason.get("bot_user", 0) - clean_count

    if raw.skipped is None:
        skipped = {}
        for s in summaries:
            for kind, count in s["skipped"].items():
                skipped[f"skipped_{kind}_lines"] = skipped.get(f"skipped_{kind}_lines", 0) + count
    else:
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
