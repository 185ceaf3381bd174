"""The Arrow CSV reader: delimited text files -> raw rows (sources.SOURCE_COLUMNS) as pyarrow Tables.

It does what sources.py's Spark reader does for a CSV feed (the same rules, reason details and skipped
line kinds) without Spark's row engine: a task reads its byte ranges of the files, finds the lines with
numpy, splits the well-shaped ones with pyarrow's CSV parser and maps the columns onto the canonical
fields with pyarrow.compute. Lines are read as Hadoop's text reader cuts them: a line belongs to the
range its first byte is in, and ends at \\n, \\r\\n or \\r.

Spark datetime patterns are translated to strptime formats; a feed whose pattern has no translation
(or that needs a lookup or a time offset) stays on the Spark reader (see `arrow_time_format`).
"""
from __future__ import annotations

import codecs
import csv
import datetime as dt
from dataclasses import dataclass
from typing import Any

from synth import _arrow

_FFFD = "\ufffd".encode()
_BOM = "\ufeff".encode()
_SPARK_TO_STRPTIME = {"yyyy": "%Y", "MM": "%m", "dd": "%d", "HH": "%H", "mm": "%M", "ss": "%S"}
_UNIX = {"unix_s": 6, "unix_ms": 3}  # digits of the fraction kept (Spark casts to decimal(30, 6) / (30, 3))
_UNIX_LIMIT = {"unix_s": 10**11, "unix_ms": 10**14}


def arrow_time_format(time_format: str) -> str | None:
    """unix_s / unix_ms, or the strptime format of a Spark datetime pattern made of yyyy MM dd HH mm ss,
    separators and quoted literals; None when the pattern has no exact translation."""
    if time_format in _UNIX:
        return time_format
    if time_format == "timestamp":
        return None
    out, i = [], 0
    while i < len(time_format):
        if time_format[i] == "'":
            end = time_format.find("'", i + 1)
            if end < 0:
                return None
            out.append(time_format[i + 1:end].replace("%", "%%") or "'")
            i = end + 1
            continue
        token = time_format[i:i + 4] if time_format[i:i + 4] == "yyyy" else time_format[i:i + 2]
        if token in _SPARK_TO_STRPTIME:
            out.append(_SPARK_TO_STRPTIME[token])
            i += len(token)
        elif time_format[i].isalpha():
            return None
        else:
            out.append(time_format[i].replace("%", "%%"))
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of one file (end None: to the end; compressed files are read whole)."""

    uri: str  # for pyarrow.fs (file:///x)
    source_file: str  # as rows name their file (file:/x, like Spark's _metadata.file_path)
    start: int
    end: int | None
    group: int  # index of the feed's header group
    number: int = 0  # its place in the read plan (sources packs and numbers the pieces); rows carry it


@dataclass(frozen=True)
class CsvFeed:
    """Everything a task needs to turn a feed's pieces into raw rows (plain values: shipped to executors)."""

    where: str
    delimiter: str
    encoding: str  # UTF-8, ISO-8859-1 or US-ASCII
    nulls: tuple[str, ...]
    groups: tuple[tuple[tuple[str, ...], str | None], ...]  # (column names, header line) per header group
    wanted: tuple[str, ...]
    fields: dict[str, Any]  # canonical field -> spec, as in sources.yaml
    time_format: str  # unix_s, unix_ms or a strptime format
    event_types: dict[str, str | None]
    max_line_chars: int
    max_field_chars: int
    first: dt.date | None = None
    last: dt.date | None = None


def _bytes_of(piece: Piece) -> tuple[bytes, int]:
    """The piece's bytes, from the byte before its start (which tells whether a line starts at `start`) to
    the end of the line running past its end; and the offset of `start` in them."""
    fs, path = _arrow.filesystem(piece.uri)
    if piece.end is None:
        with fs.open_input_stream(path, compression="detect") as stream:
            return stream.read(), 0
    with fs.open_input_file(path) as f:
        begin = max(piece.start - 1, 0)
        f.seek(begin)
        parts = [f.read(piece.end - begin)]
        while True:
            more = f.read(1 << 16)
            cut = more.find(b"\n")
            parts.append(more if cut < 0 else more[:cut + 1])
            if not more or cut >= 0:
                break
        return b"".join(parts), piece.start - begin


def _decoded(data: bytes, encoding: str) -> tuple[bytes, set[int] | None]:
    """UTF-8 text, and for UTF-8 input the byte offsets where undecodable sequences were replaced."""
    if encoding != "UTF-8":
        return data.decode({"ISO-8859-1": "latin-1", "US-ASCII": "ascii"}[encoding], "replace").encode(), None
    if data.isascii():
        return data, None
    try:
        codecs.utf_8_decode(data, "strict", True)
        return data, None
    except UnicodeDecodeError:
        pass
    # Undecodable bytes: decode piece by piece to know where they were, replacing them with U+FFFD.
    out, bad, position, length = [], set(), 0, 0
    while position < len(data):
        try:
            out.append(data[position:])
            data[position:].decode()
            break
        except UnicodeDecodeError as exc:
            out[-1] = data[position:position + exc.start]
            length += exc.start
            bad.add(length)
            out.append(_FFFD)
            length += len(_FFFD)
            position += exc.end
    return b"".join(out), bad


def _line_bounds(text: bytes):
    """(starts, ends) of the lines of `text`, ends excluding the terminator (\\n, \\r\\n or \\r)."""
    import numpy as np

    buf = np.frombuffer(text, np.uint8)
    terminators = np.flatnonzero(buf == 10)
    has_returns = text.find(b"\r") >= 0
    if has_returns:
        returns = np.flatnonzero(buf == 13)
        follows = returns + 1
        lone = returns[(follows >= len(buf)) | (buf[np.minimum(follows, len(buf) - 1)] != 10)]
        terminators = np.union1d(terminators, lone)
    starts = np.concatenate([[0], terminators + 1]).astype(np.int64)
    ends = np.concatenate([terminators, [len(buf)]]).astype(np.int64)
    if starts[-1] == len(buf):  # the text ends with a terminator
        starts, ends = starts[:-1], ends[:-1]
    if has_returns and len(ends):
        before = np.maximum(ends - 1, 0)
        crlf = (ends < len(buf)) & (buf[np.minimum(ends, len(buf) - 1)] == 10) & (ends > starts) & (buf[before] == 13)
        ends = np.where(crlf, ends - 1, ends)
    return starts, ends


def _read_piece(feed: CsvFeed, piece: Piece):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    data, offset = _bytes_of(piece)
    text, replaced = _decoded(data, feed.encoding)
    starts, ends = _line_bounds(text)
    all_lines = _all_lines(text, starts)
    index = np.arange(len(starts))  # each kept line's position in all_lines
    if piece.end is not None:  # the lines whose first byte lies in this piece's range
        owned = (starts >= offset) & (starts < offset + piece.end - piece.start)
        starts, ends, index = starts[owned], ends[owned], index[owned]
    names, header = feed.groups[piece.group]
    n = len(names)
    buf = np.frombuffer(text, np.uint8)
    skipped, keep = _skipped_lines(buf, all_lines, index, starts, ends, header)
    if not keep.all():
        starts, ends, index = starts[keep], ends[keep], index[keep]
    count = len(starts)

    # Shape problems, first one wins: undecodable text, NULs, an oversized line, the field count.
    problem: dict[int, str] = {}
    undecodable = set(_lines_at(np.array(sorted(replaced or ()), np.int64), starts, ends))
    for i in _lines_holding(buf, _FFFD, starts, ends):
        if i in undecodable:
            problem[i] = ("undecodable bytes: the line is not valid UTF-8 (set the feed's encoding if the file "
                          "uses another)")
        elif feed.encoding == "UTF-8":
            problem[i] = "contains U+FFFD replacement characters: the text was mis-decoded before it got here"
    for i in _lines_holding(buf, b"\x00", starts, ends):
        problem.setdefault(i, "contains NUL bytes: UTF-16 text or binary data, not a text line")
    for i in np.flatnonzero(ends - starts > feed.max_line_chars).tolist():
        chars = len(text[starts[i]:ends[i]].decode())
        if i not in problem and chars > feed.max_line_chars:
            problem[i] = f"line is {chars} characters, above input.max_line_chars = {feed.max_line_chars}"
    delimiters = np.flatnonzero(buf == ord(feed.delimiter))
    fields = np.searchsorted(delimiters, ends) - np.searchsorted(delimiters, starts) + 1
    # Lines with quotes: fields counted outside quoted spans (as Spark's reader counts them), and those
    # of the right count split by the csv module in one call.
    quoted_lines = np.array([i for i in _lines_holding(buf, b'"', starts, ends) if i not in problem], np.int64)
    quoted_values = {}
    if quoted_lines.size:
        texts = _lines(all_lines, index[quoted_lines])
        unquoted = pc.replace_substring_regex(texts, r'"[^"]*"', "")
        fields[quoted_lines] = pc.count_substring(unquoted, feed.delimiter).to_numpy(zero_copy_only=False) + 1
        right = quoted_lines[fields[quoted_lines] == n]
        if right.size:
            rows = csv.reader(_lines(all_lines, index[right]).to_pylist(), delimiter=feed.delimiter)
            quoted_values = {i: (parsed + [""] * n)[:n] for i, parsed in zip(right.tolist(), rows)}
    for i in np.flatnonzero(fields != n).tolist():
        if i not in problem:
            hint = " (wrong delimiter?)" if fields[i] == 1 and n > 1 else " (truncated line?)" if fields[i] < n else ""
            problem[i] = f"expected {n} fields separated by {describe_delimiter(feed.delimiter)}, found {fields[i]}{hint}"

    # Three kinds of rows, each a table of its own (row order does not matter downstream): lines split
    # by pyarrow's parser, quoted lines split by Python's csv module, and malformed lines (no values).
    special = np.zeros(count, bool)
    special[list(problem) + list(quoted_values)] = True
    plain = np.flatnonzero(~special)
    quoted = sorted(quoted_values)
    malformed_rows = sorted(problem)
    position = {}
    for i, name in enumerate(names):
        position.setdefault(name, i)
    parts = []
    for rows, columns in ((plain, _split(text, starts[plain], ends[plain], n, feed.delimiter)),
                          (quoted, [pa.array([quoted_values[i][k] for i in quoted], pa.string()) for k in range(n)])):
        if not len(rows):
            continue
        values = {name: _clean_value(columns[position[name]], feed.nulls) if name in position
                  else pa.nulls(len(rows), pa.string()) for name in feed.wanted}
        malformed = pa.array(_oversized_fields(values, feed, len(rows)), pa.string())
        parts.append(_canonical(feed, piece.source_file, _lines(all_lines, index[rows]), malformed, values))
    if malformed_rows:
        values = {name: pa.nulls(len(malformed_rows), pa.string()) for name in feed.wanted}
        parts.append(_canonical(feed, piece.source_file, _lines(all_lines, index[malformed_rows]),
                                pa.array([problem[i] for i in malformed_rows], pa.string()), values))
    table = pa.concat_tables(parts) if parts else None
    if table is not None and (feed.first or feed.last):
        day = table.column("event_time").cast(pa.date32())
        outside = np.zeros(table.num_rows, bool)
        if feed.first:
            outside |= _flag(pc.less(day, pa.scalar(feed.first)))
        if feed.last:
            outside |= _flag(pc.greater(day, pa.scalar(feed.last)))
        outside &= table.column("malformed").is_null().to_numpy(zero_copy_only=False)
        if outside.any():
            skipped["out_of_range"] = int(outside.sum())
            table = table.filter(pa.array(~outside))
    if table is not None:  # where each row comes from, so that its raw line can be read again (raw_lines)
        table = table.append_column("piece", pa.array(np.full(table.num_rows, piece.number, np.int32)))
        table = table.append_column("line", pa.array(np.arange(table.num_rows, dtype=np.int32)))
    return table, skipped


def raw_lines(feed: CsvFeed, piece: Piece, lines):
    """The raw_line of rows `lines` (their `line` values) of a piece, read again: the clean stage's
    buckets need the raw text of a few valid rows (a bot-like user's) that the shuffle did not carry."""
    import pyarrow as pa

    table, _ = _read_piece(feed, piece)
    if table is None or (len(lines) and max(lines) >= table.num_rows):
        raise RuntimeError(f"{piece.source_file} changed while the clean stage read it (bytes {piece.start}-"
                           f"{piece.end if piece.end is not None else 'end'} no longer hold the rows read before); "
                           f"run clean again")
    return table.column("raw_line").combine_chunks().take(pa.array(lines, pa.int32()))


def _skipped_lines(buf, all_lines, index, starts, ends, header: str | None):
    """({kind: count} of blank and header lines, mask of the other lines). Spark trims spaces only; only
    lines that can be blank or the header (by their first byte) are compared."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    first = buf[np.minimum(starts, max(len(buf) - 1, 0))] if len(buf) else np.zeros(len(starts), np.uint8)
    candidates = (ends == starts) | (first == ord(" ")) | (first == _BOM[0])
    clean_header = header.lstrip("\ufeff").strip() if header is not None else None
    if clean_header:
        candidates |= first == clean_header.encode()[0]
    blank = np.zeros(len(starts), bool)
    is_header = np.zeros(len(starts), bool)
    at = np.flatnonzero(candidates)
    if at.size:
        stripped = pc.utf8_trim(_lines(all_lines, index[at]), " ")
        blank[at] = _flag(pc.is_in(stripped, pa.array(["", "\ufeff"])))
        if clean_header:
            is_header[at] = _flag(pc.is_in(stripped, pa.array([clean_header, "\ufeff" + clean_header]))) & ~blank[at]
    skipped = {kind: int(mask.sum()) for kind, mask in (("blank", blank), ("header", is_header)) if mask.any()}
    return skipped, ~(blank | is_header)


def _all_lines(text: bytes, starts):
    """Every line of `text` (starts from _line_bounds) as a string array: each line's bytes up to the next
    line's start, less its terminator (a line's text never ends with \\r or \\n: those end lines)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    offsets = np.append(starts, len(text)).astype(np.int64)
    with_terminators = pa.Array.from_buffers(pa.large_string(), len(starts),
                                             [None, pa.py_buffer(offsets), pa.py_buffer(text)])
    return pc.utf8_rtrim(with_terminators, "\r\n")


def _lines(all_lines, index):
    """The lines at `index` (positions in all_lines) as a string array."""
    import numpy as np
    import pyarrow as pa

    if len(index) and index[-1] - index[0] + 1 == len(index) and np.all(np.diff(index) == 1):
        return all_lines.slice(int(index[0]), len(index)).cast(pa.string())
    return all_lines.take(pa.array(index, pa.int64())).cast(pa.string())


def _flag(condition):
    import pyarrow.compute as pc

    return pc.fill_null(condition, False).to_numpy(zero_copy_only=False)


def _lines_holding(buf, needle: bytes, starts, ends) -> list[int]:
    """Lines (indexes into starts/ends) holding the bytes `needle`."""
    import numpy as np

    hits = np.flatnonzero(buf == needle[0])
    for k, byte in enumerate(needle[1:], 1):
        hits = hits[hits + k < len(buf)]
        hits = hits[buf[hits + k] == byte]
    return _lines_at(hits, starts, ends)


def _lines_at(positions, starts, ends) -> list[int]:
    """Lines (indexes into starts/ends) holding any of the byte `positions`."""
    import numpy as np

    if not len(positions) or not len(starts):
        return []
    line = np.searchsorted(starts, positions, side="right") - 1
    inside = (line >= 0) & (positions < ends[np.maximum(line, 0)])
    return np.unique(line[inside]).tolist()


def _split(text: bytes, starts, ends, n: int, delimiter: str):
    """The n string columns of well-shaped unquoted lines, parsed by pyarrow's CSV reader from one buffer
    of just those lines."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pcsv

    if not len(starts):
        return [pa.array([], pa.string()) for _ in range(n)]
    # Runs of consecutive lines are copied as one slice each (terminators included).
    breaks = np.flatnonzero(starts[1:] != _next_start(text, ends[:-1])) + 1
    run_starts = np.concatenate([[0], breaks])
    run_ends = np.concatenate([breaks, [len(starts)]])
    pieces = [text[starts[a]:ends[b - 1]] for a, b in zip(run_starts.tolist(), run_ends.tolist())]
    names = [f"c{i}" for i in range(n)]
    table = pcsv.read_csv(
        pa.BufferReader(b"\n".join(pieces) + b"\n"),
        read_options=pcsv.ReadOptions(column_names=names, use_threads=False, block_size=1 << 26),
        parse_options=pcsv.ParseOptions(delimiter=delimiter, quote_char=False, newlines_in_values=False,
                                        ignore_empty_lines=False),
        convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in names}, strings_can_be_null=False,
                                            quoted_strings_can_be_null=False, check_utf8=False))
    if table.num_rows != len(starts):
        raise ValueError(f"CSV parse gave {table.num_rows} rows for {len(starts)} lines")
    return [table.column(c).combine_chunks() for c in names]


def _next_start(text: bytes, ends):
    """Where the line after each line end starts (past \\r\\n, \\n or \\r)."""
    import numpy as np

    buf = np.frombuffer(text, np.uint8)
    after = np.minimum(ends, len(buf) - 1)
    crlf = (buf[after] == 13) & (buf[np.minimum(ends + 1, len(buf) - 1)] == 10) & (ends + 1 < len(buf))
    return ends + 1 + crlf


def _clean_value(values, nulls: tuple[str, ...]):
    import pyarrow as pa
    import pyarrow.compute as pc

    trimmed = pc.utf8_trim(values, " ")
    return pc.if_else(pc.fill_null(pc.is_in(trimmed, pa.array(["", *nulls], pa.string())), False),
                      pa.scalar(None, pa.string()), trimmed)


def _oversized_fields(values: dict, feed: CsvFeed, count: int) -> list[str | None]:
    """Per row: what names its first wanted column longer than input.max_field_chars, or None."""
    import numpy as np
    import pyarrow.compute as pc

    found: list[str | None] = [None] * count
    for name in feed.wanted:
        column = values[name]
        long = np.flatnonzero(_flag(pc.greater(pc.binary_length(column), feed.max_field_chars)))
        if not long.size:
            continue
        chars = pc.utf8_length(column.take(long)).to_numpy(zero_copy_only=False)
        for i, c in zip(long.tolist(), chars.tolist()):
            if found[i] is None and c > feed.max_field_chars:
                found[i] = (f"column {name!r} is {c} characters, above input.max_field_chars = "
                            f"{feed.max_field_chars}")
    return found


def describe_delimiter(delimiter: str) -> str:
    """A delimiter as error messages name it."""
    return {"\t": "tab", " ": "space"}.get(delimiter, repr(delimiter))


def _canonical(feed: CsvFeed, source_file: str, raw_line, malformed, values: dict):
    """The raw rows: canonical fields from the feed's field specs, the time parsed, the event type mapped."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    count = len(raw_line)
    source_file = pa.DictionaryArray.from_arrays(np.zeros(count, np.int32), [source_file])
    resolved: dict[str, Any] = {}

    def evaluate(spec):
        if isinstance(spec, str):
            return values[spec]
        if "value" in spec:
            column = (pa.nulls(count, pa.string()) if spec["value"] is None else
                      pa.DictionaryArray.from_arrays(np.zeros(count, np.int32), [str(spec["value"])]).cast(pa.string()))
        elif "column" in spec:
            column = values[str(spec["column"])]
        else:
            column = resolved[spec["field"]]
        if spec.get("prefix"):
            column = pc.binary_join_element_wise(str(spec["prefix"]), column, "")
        if "fallback" in spec:
            column = pc.coalesce(column, evaluate(spec["fallback"]))
        return column

    for name in resolution_order(feed.fields):
        resolved[name] = evaluate(feed.fields[name])
    canonical = {name: resolved.get(name, pa.nulls(count, pa.string())) for name in
                 ("event_time", "event_type", "item_id", "category", "category_path", "brand", "price", "user_id",
                  "session_id")}
    time_raw = canonical["event_time"]
    type_raw = canonical["event_type"]
    keys = list(feed.event_types)
    mapped = pa.array([feed.event_types[k] for k in keys], pa.string())
    where = pc.index_in(pc.utf8_lower(pc.utf8_trim(type_raw, " ")), pa.array(keys, pa.string()))
    return pa.table({
        "source_file": source_file, "raw_line": raw_line, "malformed": malformed,
        "event_time_raw": time_raw, "event_time": _parse_time(time_raw, feed.time_format),
        "event_type_raw": type_raw, "event_type": mapped.take(where),
        "item_id": canonical["item_id"], "category": canonical["category"],
        "category_path": canonical["category_path"], "brand": canonical["brand"], "price_raw": canonical["price"],
        "user_id": canonical["user_id"], "session_id": canonical["session_id"]})


def resolution_order(fields: dict[str, Any]) -> list[str]:
    """The canonical fields of a feed in an order where each comes after the fields it refers to;
    ValueError naming them when references cannot be resolved."""
    order: list[str] = []
    pending = dict(fields)
    while pending:
        ready = [name for name, spec in pending.items() if field_references(spec) <= set(order)]
        if not ready:
            raise ValueError(f"field references {sorted(pending)} cannot be resolved "
                             f"(a cycle, or a reference to an unmapped field)")
        for name in ready:
            order.append(name)
            del pending[name]
    return order


def field_references(spec) -> set[str]:
    """The canonical fields a field spec refers to (through `field` and its fallbacks)."""
    if isinstance(spec, str):
        return set()
    refs = {spec["field"]} if "field" in spec else set()
    return refs | (field_references(spec["fallback"]) if "fallback" in spec else set())


def _parse_time(raw, time_format: str):
    import pyarrow as pa
    import pyarrow.compute as pc

    if time_format not in _UNIX:
        return pc.strptime(raw, format=time_format, unit="us", error_is_null=True).cast(pa.timestamp("us", "UTC"))
    digits = _UNIX[time_format]
    parts = pc.extract_regex(raw, r"^(?P<sign>[+-]?)(?P<whole>[0-9]{1,18})(?:\.(?P<fraction>[0-9]*))?$")
    whole = pc.struct_field(parts, [1]).cast(pa.int64())
    fraction = pc.utf8_slice_codeunits(pc.utf8_rpad(pc.fill_null(pc.struct_field(parts, [2]), ""), digits, "0"), 0,
                                       digits)
    fraction = fraction.cast(pa.int64())
    sign = pc.if_else(pc.equal(pc.struct_field(parts, [0]), "-"), -1, 1)
    limit = _UNIX_LIMIT[time_format]
    in_range = pc.less(whole, limit)
    units = pc.multiply(pc.add(pc.multiply(whole, 10**digits), fraction), sign)
    micros = pc.multiply(units, 10**(6 - digits))
    return pc.if_else(in_range, micros, pa.scalar(None, pa.int64())).cast(pa.timestamp("us", "UTC"))


def read_task(task: list[tuple[CsvFeed, list[Piece]]]):
    """(raw rows in SOURCE_COLUMNS, {kind: count} of skipped lines) of one task's pieces; rows None
    when there are none."""
    import pyarrow as pa

    tables, skipped = [], {}
    for feed, pieces in task:
        for piece in pieces:
            table, counts = _read_piece(feed, piece)
            if table is not None and table.num_rows:
                tables.append(table)
            for kind, count in counts.items():
                skipped[kind] = skipped.get(kind, 0) + count
    return (pa.concat_tables(tables) if tables else None), skipped
