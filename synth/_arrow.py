"""The Arrow data plane: stages that move events as Arrow tables through Spark's shuffle.

Spark's row engine spends microseconds per row and operator; a stage that only needs sorts, group-bys
and array building does them in pyarrow and numpy over whole tables instead. Spark still runs the
tasks and the shuffle: a task reads Parquet files with pyarrow, cuts its rows into buckets and hands
each bucket to the shuffle as one compressed Arrow IPC blob, so Spark moves a few large byte strings
per task, never the rows. Executor code imports pyarrow and numpy itself (these functions are
shipped to Spark's Python workers).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import unquote

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3


def hash64(values, distinct: bool = False) -> "np.ndarray":
    """A 64-bit hash of each string (nulls hash as ""), the same in every process and on every machine.

    FNV-1a over the UTF-8 bytes, then the splitmix64 finalizer so the top bits are as mixed as the low
    ones (range_bucket cuts on the top bits). Each distinct value is hashed once; `distinct`: the values
    are known to be distinct and not null, which spares finding the distinct ones.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], pa.string())
    if distinct:
        return mix64(_fnv1a(values))
    encoded = pc.dictionary_encode(pc.fill_null(values.cast(pa.string()), ""))
    return mix64(_fnv1a(encoded.dictionary))[encoded.indices.to_numpy(zero_copy_only=False)]


def _fnv1a(strings) -> "np.ndarray":
    """FNV-1a of each string of a string array without nulls. Strings of one length are hashed as the
    columns of one byte matrix: a vectorized step per byte position, over contiguous rows (about 30%
    faster than stepping all strings by position through index arrays)."""
    import numpy as np
    import pyarrow as pa

    strings = strings.cast(pa.large_string())
    n = len(strings)
    offsets = np.frombuffer(strings.buffers()[1], np.int64, count=n + 1, offset=8 * strings.offset)
    data = strings.buffers()[2]
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(n, _FNV_OFFSET, np.uint64)
    prime = np.uint64(_FNV_PRIME)
    with np.errstate(over="ignore"):
        for length in np.unique(lengths[lengths > 0]).tolist():
            if lengths[0] == length and lengths[-1] == length and (lengths == length).all():
                rows, block = slice(None), data[starts[0]:starts[0] + n * length].reshape(n, length)
            else:
                rows = np.flatnonzero(lengths == length)
                block = data[starts[rows, None] + np.arange(length)]
            part = h[rows]
            for position in range(length):
                part ^= block[:, position]
                part *= prime
            h[rows] = part
    return h


def mix64(values):
    """The splitmix64 finalizer: a bijection of uint64 that spreads every input bit over all output bits."""
    import numpy as np

    h = values.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


_NULL_HASH = 0x6A09E667F3BCC908  # stands for a null value in combined_hashes


def combined_hashes(columns, rows: int) -> tuple:
    """Two 64-bit hashes of each of `rows` rows of `columns` (strings, integers, timestamps, doubles; a
    null differs from every value), as two uint64 arrays: two chains that mix the same column hashes
    with different constants."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    first = np.full(rows, _FNV_OFFSET, np.uint64)
    second = np.full(rows, _FNV_PRIME, np.uint64)
    with np.errstate(over="ignore"):
        for column in columns:
            if isinstance(column, pa.ChunkedArray):
                column = column.combine_chunks()
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                value = hash64(column)
            elif pa.types.is_floating(column.type):
                value = mix64(pc.fill_null(column, 0.0).to_numpy(zero_copy_only=False).astype(np.float64).view(np.uint64))
            else:
                value = mix64(pc.fill_null(column.cast(pa.int64()), 0).to_numpy(zero_copy_only=False).view(np.uint64))
            value = np.where(column.is_null().to_numpy(zero_copy_only=False), np.uint64(_NULL_HASH), value)
            first = mix64(first * np.uint64(0x9E3779B97F4A7C15) + value)
            second = mix64((second ^ value) * np.uint64(0xC2B2AE3D27D4EB4F))
    return first, second


def hex_digits(*hashes, prefix: str = ""):
    """uint64 arrays side by side as one string of 16 lower-case hex digits each, after `prefix`, per row."""
    import numpy as np
    import pyarrow as pa

    big_endian = np.stack(hashes, axis=1).astype(">u8") if hashes and len(hashes[0]) else np.zeros((0, len(hashes)), ">u8")
    rows = len(big_endian)
    digits = np.frombuffer(big_endian.tobytes().hex().encode(), np.uint8).reshape(rows, 16 * len(hashes))  # one C pass
    head = np.frombuffer(prefix.encode(), np.uint8)
    text = np.concatenate([np.broadcast_to(head, (rows, len(head))), digits], axis=1) if len(head) else digits
    width = text.shape[1]
    offsets = np.arange(0, rows * width + 1, width, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), rows, [None, pa.py_buffer(offsets), pa.py_buffer(text.tobytes())])


def same_as_previous(values):
    """Per row of a sorted column: whether it holds the same value as the row before (null equals null;
    row 0 never). Its negation marks the first row of each run of equal values."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    same = np.zeros(len(values), dtype=bool)
    if len(values) > 1:
        here, before = values.slice(1), values.slice(0, len(values) - 1)
        equal = pc.or_(pc.fill_null(pc.equal(here, before), False), pc.and_(pc.is_null(here), pc.is_null(before)))
        same[1:] = equal.to_numpy(zero_copy_only=False)
    return same


def range_bucket(hashes, n: int):
    """Bucket 0..n-1 of each hash, in hash order: bucket k holds the k-th n-th of the hash range, so
    sorting within buckets and concatenating them in bucket order sorts by hash whatever n is."""
    import numpy as np

    return (((hashes >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32)).astype(np.int64)


def filesystem(uri: str):
    """(pyarrow FileSystem, path) of a URI. Hadoop's S3 schemes (s3a://, s3n://) name the same objects as
    s3://, which pyarrow reads with its own S3 client (credentials from the environment, not from
    Spark's fs.s3a.* settings)."""
    import pyarrow.fs as pafs

    scheme, sep, rest = uri.partition("://")
    if sep and scheme in ("s3a", "s3n"):
        uri = f"s3://{rest}"
    return pafs.FileSystem.from_uri(uri)


def to_ipc(table) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(payloads: Iterable[bytes]):
    """One table from IPC blobs of the same schema; None when there are none."""
    import pyarrow as pa

    tables = [pa.ipc.open_stream(p).read_all() for p in payloads]
    return pa.concat_tables(tables) if tables else None


def by_bucket(table, buckets, n: int, kind: str) -> Iterator[tuple[int, tuple[str, bytes]]]:
    """Shuffle records (bucket, (kind, IPC blob)): the rows of `table` cut by their bucket (0..n-1)."""
    import numpy as np
    import pyarrow as pa

    order = np.argsort(buckets, kind="stable")
    counts = np.bincount(buckets, minlength=n)
    ordered = table.take(pa.array(order))
    start = 0
    for bucket, count in enumerate(counts.tolist()):
        if count:
            yield bucket, (kind, to_ipc(ordered.slice(start, count)))
            start += count


def read_parquet(uris: list[str], columns: list[str], partition_column: str | None = None):
    """The `columns` of Parquet files (Delta table files), with a hive partition column taken from each
    file's path. Nothing but the files' own rows: every task reads just its share of a snapshot."""
    import datetime as dt

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for uri in uris:
        fs, path = filesystem(uri)
        table = pq.read_table(path, columns=[c for c in columns if c != partition_column], filesystem=fs)
        if partition_column is not None:
            match = re.search(rf"(?:^|/){re.escape(partition_column)}=([^/]*)/", unquote(uri))
            if match is None:
                raise ValueError(f"{uri}: no {partition_column}= folder in the path")
            text = unquote(match.group(1))
            if text == "__HIVE_DEFAULT_PARTITION__":
                value = pa.nulls(table.num_rows, pa.date32())
            else:
                value = pa.array(np.full(table.num_rows, np.datetime64(dt.date.fromisoformat(text), "D"))).cast(pa.date32())
            table = table.append_column(partition_column, value)
        tables.append(table.select(columns))
    return pa.concat_tables(tables)


def task_count(sc, events: int, events_per_task: int) -> int:
    """Tasks for `events` events: whole rounds over the cores, each task of about events_per_task
    events. Every Python task costs about 0.05-0.1 s however small, so tasks are made large."""
    cores = max(1, sc.defaultParallelism)
    return cores * max(1, math.ceil(events / (events_per_task * cores)))


def file_groups(uris: list[str], groups: int) -> list[list[str]]:
    """`uris` dealt round-robin into at most `groups` non-empty lists (one map task each)."""
    groups = max(1, min(groups, len(uris)))
    return [uris[i::groups] for i in range(groups)] if uris else []


def records(sc, inputs: list, produce: Callable):
    """An RDD of shuffle records (bucket, (kind, payload)): `produce(input)` yields them, one task per input."""

    def run(items):
        for item in items:
            yield from produce(item)

    return sc.parallelize(inputs, max(1, len(inputs))).mapPartitions(run)


def shuffled(rdd, buckets: int):
    """The records of `rdd` moved so that partition b holds exactly the records of bucket b."""
    return rdd.partitionBy(buckets, lambda bucket: bucket)


def payloads_of(partition) -> dict[str, list]:
    """A partition's shuffle records, the payloads grouped by kind."""
    grouped: dict[str, list] = {}
    for _, (kind, payload) in partition:
        grouped.setdefault(kind, []).append(payload)
    return grouped
