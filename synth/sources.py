"""Raw input adapters: each turns a source's files into the raw rows the clean stage checks.

Every adapter is a spec (synth/sources.yaml for the built-in ones, `input.mapping` for the generic
one) read by the one code path below: feeds of CSV / JSON lines / Parquet files or a Delta or
catalog table, mapped column by column onto the canonical fields, plus lookup joins (an item's
category, a category's ancestor path). Every row keeps its raw text and its file, so a rejected
row reaches quarantine unchanged. `read_source` returns rows with these columns (strings null where
absent or empty):
- source_file, raw_line, malformed (what is wrong with the row's shape; null when it has the expected shape)
- event_time_raw and event_time (the parsed timestamp; null when unparseable)
- event_type_raw and event_type (the canonical view/cart/purchase/search; null when unmapped)
- item_id, category, category_path, brand, price_raw, user_id, session_id
and, as `skipped`, the lines that are not rows: headers, blank lines, rows outside input.from_date /
input.to_date. Nothing is collected to the driver but file headers, column names and lookup-tree sizes.

CSV feeds of sources without lookups are read by the Arrow CSV reader (synth/_csv.py): `read_source`
then returns tasks (byte ranges of the files) that executors turn into the same rows as Arrow tables,
with the skipped-line counts, instead of DataFrames. Everything else is read by Spark's readers.
"""
from __future__ import annotations

import copy
import csv
import datetime as dt
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from synth import _arrow
from synth._csv import CsvFeed, Piece, arrow_time_format, describe_delimiter, resolution_order

log = logging.getLogger(__name__)

SPECS_FILE = Path(__file__).with_name("sources.yaml")
RAW_COLUMNS = ("event_time", "event_type", "item_id", "category", "category_path", "brand", "price",
               "user_id", "session_id")
SOURCE_COLUMNS = ("source_file", "raw_line", "malformed", "event_time_raw", "event_time", "event_type_raw",
                  "event_type", "item_id", "category", "category_path", "brand", "price_raw", "user_id",
                  "session_id")
EVENT_TYPES = ("view", "cart", "purchase", "search")
DEFAULT_REQUIRED = ("event_time", "event_type", "item_id", "user_id")
TIME_KEYWORDS = ("unix_s", "unix_ms", "timestamp")
FORMATS = ("csv", "json", "parquet", "delta", "table")
ENCODINGS = {"utf-8": "UTF-8", "utf8": "UTF-8", "iso-8859-1": "ISO-8859-1", "latin-1": "ISO-8859-1",
             "latin1": "ISO-8859-1", "us-ascii": "US-ASCII", "ascii": "US-ASCII"}
MAX_TREE_DEPTH = 32
_SKIPPED_SCHEMA = "source_file string, kind string"
_SPLIT_BYTES = 16 << 20  # uncompressed files are cut into ranges of at most this many bytes (fine enough to balance tasks)

_FILE_KEYS = {"files", "format", "delimiter", "header", "columns", "encoding", "nulls", "table", "optional"}
_FEED_KEYS = _FILE_KEYS | {"fields", "time_format", "time_offset_ms", "event_types", "required", "description"}
_LOOKUP_KEYS = _FILE_KEYS | {"name", "key", "join_on", "fields", "match", "latest_by", "tree"}
_FIELD_SPEC_KEYS = {"column", "field", "value", "fallback", "prefix"}


class SourceError(ValueError):
    """Input that cannot be read as configured; the message names the source, feed, file and columns."""


@dataclass
class RawInput:
    """The raw rows: read by Spark (`rows`, `skipped`), or, for CSV feeds the Arrow reader takes, as
    `tasks` for _csv.read_task (each task's rows and skipped-line counts, in Arrow on an executor)."""

    rows: DataFrame | None  # SOURCE_COLUMNS
    skipped: DataFrame | None  # source_file, kind: lines that are not rows (header, blank, out_of_range)
    extra_columns: list[str] = field(default_factory=list)  # source columns present but unused
    missing_optional: list[str] = field(default_factory=list)  # optional canonical fields the source lacks
    tasks: list | None = None


@dataclass(frozen=True)
class Layout:
    """A delimited text layout (the simulator writes the REES46 one)."""

    name: str
    header: tuple[str, ...]
    delimiter: str


# --------------------------------------------------------------------------------------------------
# Specs


def builtin_specs() -> dict[str, dict]:
    """The built-in adapter specs of synth/sources.yaml, by source name."""
    return yaml.safe_load(SPECS_FILE.read_text())


def _layout(name: str) -> Layout:
    spec = builtin_specs()[name]
    return Layout(name, tuple(spec["columns"]), spec["delimiter"])


REES46 = _layout("rees46")


def _plain(value: Any) -> Any:
    """Configuration values as plain dicts and lists (the config loader turns mappings into namespaces)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _merge(base: dict, override: dict) -> dict:
    """Override a spec: nested mappings merge, but each entry of `fields` is replaced as a whole."""
    merged = copy.deepcopy(base)
    if "feeds" in merged and "feeds" not in override and set(override) & (_FEED_KEYS - {"description"}):
        # Feed keys at the top level of an override apply to every feed of a multi-feed source.
        feed_keys = {k: v for k, v in override.items() if k in _FEED_KEYS}
        override = {k: v for k, v in override.items() if k not in _FEED_KEYS}
        override["feeds"] = {name: feed_keys for name in merged["feeds"]}
    for key, value in override.items():
        if key == "fields" and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@dataclass
class _Files:
    """How to read one feed's or lookup's files."""

    where: str
    files: str = "*"
    format: str = "csv"
    delimiter: str = ","
    header: bool = True
    columns: list[str] | None = None
    encoding: str = "UTF-8"
    nulls: list[str] = field(default_factory=list)
    table: str | None = None
    optional: bool = False


@dataclass
class _Feed(_Files):
    fields: dict[str, Any] = field(default_factory=dict)
    time_format: str = "timestamp"
    time_offset_ms: str | None = None
    event_types: dict[str, str | None] = field(default_factory=dict)
    required: tuple[str, ...] = DEFAULT_REQUIRED


@dataclass
class _Lookup(_Files):
    name: str = ""
    key: str = ""
    join_on: str = ""
    fields: dict[str, str] = field(default_factory=dict)
    match: dict[str, Any] = field(default_factory=dict)
    latest_by: str | None = None
    tree: dict[str, Any] | None = None


def _file_options(raw: dict, where: str) -> dict:
    fmt = str(raw.get("format", "csv")).lower()
    if fmt not in FORMATS:
        raise SourceError(f"{where}: format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    encoding = ENCODINGS.get(str(raw.get("encoding", "UTF-8")).lower())
    if encoding is None:
        raise SourceError(f"{where}: encoding must be one of UTF-8, ISO-8859-1, US-ASCII, not {raw['encoding']!r}")
    header = raw.get("header", True)
    columns = raw.get("columns")
    if fmt == "csv" and not header and not columns:
        raise SourceError(f"{where}: header is false, so `columns` must list the column names in order")
    delimiter = str(raw.get("delimiter", ","))
    if fmt == "csv" and len(delimiter) != 1:
        raise SourceError(f"{where}: delimiter must be one character, not {delimiter!r}")
    return {"files": str(raw.get("files", "*")), "format": fmt, "delimiter": delimiter, "header": bool(header),
            "columns": [str(c) for c in columns] if columns else None, "encoding": encoding,
            "nulls": [str(n) for n in raw.get("nulls") or []], "table": raw.get("table"),
            "optional": bool(raw.get("optional", False))}


def _check_keys(raw: Any, allowed: set[str], where: str) -> None:
    if not isinstance(raw, dict):
        raise SourceError(f"{where}: expected a mapping, got {raw!r}")
    unknown = sorted(str(k) for k in set(raw) - allowed)
    if unknown:
        raise SourceError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(allowed))})")


def _event_type_map(raw: dict | None, where: str) -> dict[str, str | None]:
    mapping = {t: t for t in EVENT_TYPES}
    for key, value in (raw or {}).items():
        if value is not None and value not in EVENT_TYPES:
            raise SourceError(f"{where}: event type {key!r} maps to {value!r}; use one of "
                              f"{', '.join(EVENT_TYPES)} or null (quarantined as unknown_event_type)")
        mapping[str(key).strip().lower()] = value
    return mapping


def _check_field_spec(spec: Any, where: str) -> None:
    if isinstance(spec, str):
        return
    _check_keys(spec, _FIELD_SPEC_KEYS, where)
    kinds = [k for k in ("column", "field", "value") if k in spec]
    if len(kinds) != 1:
        raise SourceError(f"{where}: give exactly one of column, field or value, not {spec!r}")
    if "field" in spec and spec["field"] not in RAW_COLUMNS:
        raise SourceError(f"{where}: field {spec['field']!r} is not a canonical field ({', '.join(RAW_COLUMNS)})")
    if "fallback" in spec:
        _check_field_spec(spec["fallback"], f"{where}.fallback")


def _feed(raw: dict, where: str, event_type_overrides: dict | None) -> _Feed:
    _check_keys(raw, _FEED_KEYS, where)
    fields = raw.get("fields") or {}
    _check_keys(fields, set(RAW_COLUMNS), f"{where}.fields")
    for name, spec in fields.items():
        _check_field_spec(spec, f"{where}.fields.{name}")
    required = tuple(raw.get("required", DEFAULT_REQUIRED))
    unknown = sorted(set(required) - set(RAW_COLUMNS))
    if unknown:
        raise SourceError(f"{where}.required: {', '.join(unknown)} are not canonical fields")
    unmapped = [f for f in required if f not in fields]
    if unmapped:
        raise SourceError(f"{where}: required field(s) {', '.join(unmapped)} are not mapped in `fields` "
                          f"(map them, or drop them from `required`)")
    time_format = str(raw.get("time_format", "timestamp"))
    return _Feed(where=where, **_file_options(raw, where), fields=dict(fields), time_format=time_format,
                 time_offset_ms=raw.get("time_offset_ms"),
                 event_types=_event_type_map({**(raw.get("event_types") or {}), **(event_type_overrides or {})},
                                             where),
                 required=required)


def _lookup(raw: dict, where: str) -> _Lookup:
    _check_keys(raw, _LOOKUP_KEYS, where)
    for key in ("key", "join_on"):
        if not raw.get(key):
            raise SourceError(f"{where}: `{key}` is required")
    if raw["join_on"] not in RAW_COLUMNS:
        raise SourceError(f"{where}: join_on {raw['join_on']!r} is not a canonical field ({', '.join(RAW_COLUMNS)})")
    tree = raw.get("tree")
    if tree is not None:
        _check_keys(tree, {"parent", "into", "separator"}, f"{where}.tree")
        if not tree.get("parent") or tree.get("into") not in RAW_COLUMNS:
            raise SourceError(f"{where}.tree needs `parent` (a column) and `into` (a canonical field)")
    fields = raw.get("fields") or {}
    _check_keys(fields, set(RAW_COLUMNS), f"{where}.fields")
    if not fields and tree is None:
        raise SourceError(f"{where}: give `fields` (canonical field <- lookup column) or `tree`")
    name = str(raw.get("name") or raw["key"])
    return _Lookup(where=where, **_file_options(raw, where), name=name, key=str(raw["key"]), join_on=raw["join_on"],
                   fields={k: str(v) for k, v in fields.items()}, match=dict(raw.get("match") or {}),
                   latest_by=raw.get("latest_by"), tree=tree)


def resolve_spec(cfg) -> tuple[str, list[_Feed], list[_Lookup]]:
    """The feeds and lookups of `cfg.input.source`, with input.mapping and input.event_types applied."""
    source = str(cfg.input.source)
    mapping = _plain(getattr(cfg.input, "mapping", None))
    overrides = _plain(getattr(cfg.input, "event_types", None))
    builtins = builtin_specs()
    if mapping is not None and not isinstance(mapping, dict):
        raise SourceError(f"input.mapping must be a mapping (the structure of a synth/sources.yaml entry), "
                          f"not {mapping!r}")
    if source == "generic":
        if not mapping:
            raise SourceError("input.source is generic but input.mapping is empty: give the column mapping "
                              "(the structure of a synth/sources.yaml entry)")
        spec = mapping
    elif source in builtins:
        spec = _merge(builtins[source], mapping) if mapping else copy.deepcopy(builtins[source])
    else:
        raise SourceError(f"input.source must be one of {', '.join(sorted([*builtins, 'generic']))}, "
                          f"not {source!r}")
    if not isinstance(spec, dict):
        raise SourceError(f"input.mapping must be a mapping, not {spec!r}")
    if overrides is not None and not isinstance(overrides, dict):
        raise SourceError(f"input.event_types must be a mapping of source value -> event type, not {overrides!r}")
    if "feeds" in spec:
        _check_keys(spec, {"description", "feeds", "lookups"}, source)
        if not spec["feeds"]:
            raise SourceError(f"{source}: `feeds` is empty")
        feeds = [_feed(raw, f"{source} feed {name}", overrides) for name, raw in spec["feeds"].items()]
    else:
        feeds = [_feed({k: v for k, v in spec.items() if k != "lookups"}, source, overrides)]
    lookups = [_lookup(raw, f"{source} lookup {raw.get('name', i) if isinstance(raw, dict) else i}")
               for i, raw in enumerate(spec.get("lookups") or [])]
    return source, feeds, lookups


# --------------------------------------------------------------------------------------------------
# Reading files into records: source_file, raw_line, malformed and one string column per wanted column


@dataclass
class _Records:
    df: DataFrame | None  # source_file, raw_line, malformed, _v0.._vN; None when there are no files
    skipped: DataFrame | None
    missing: set[str] = field(default_factory=set)  # wanted columns absent from at least one file
    extra: set[str] = field(default_factory=set)  # columns present but not wanted
    files: int = 0


@dataclass
class _Limits:
    path: str
    max_line_chars: int
    max_field_chars: int
    only: frozenset[str] | None = None  # read just these feed files (incremental runs); lookups read all


@dataclass(frozen=True)
class InputFile:
    path: str
    size: int
    modification_time: dt.datetime
    role: str  # "feed" (event rows) or "lookup" (joined onto every row)


def _list_files(spark: SparkSession, path: str, glob: str) -> list[str]:
    try:
        reader = spark.read.option("recursiveFileLookup", "true").option("pathGlobFilter", glob)
        return sorted(reader.text(path).inputFiles())
    except AnalysisException as exc:
        if "PATH_NOT_FOUND" in str(exc) or "Path does not exist" in str(exc):
            raise FileNotFoundError(f"input.path {path} does not exist") from None
        raise


class Listing:
    """One run's view of the input: each glob's files (as Spark lists them) and each file's Hadoop
    status and codec, asked of the JVM once however often the run needs them. Listing through Spark
    takes about 0.9 s even for a few files, and planning a clean run needed the listing twice."""

    def __init__(self, spark: SparkSession):
        self._spark = spark
        self._files: dict[tuple[str, str], list[str]] = {}
        self._statuses: dict[str, Any] = {}
        self._codecs = None

    def files(self, path: str, glob: str) -> list[str]:
        if (path, glob) not in self._files:
            self._files[path, glob] = _list_files(self._spark, path, glob)
        return self._files[path, glob]

    def status(self, path: str):
        """Hadoop's FileStatus of a file (size, modification time)."""
        if path not in self._statuses:
            hadoop_path = _hadoop_path(self._spark.sparkContext._jvm, path)
            filesystem = hadoop_path.getFileSystem(self._spark.sparkContext._jsc.hadoopConfiguration())
            self._statuses[path] = filesystem.getFileStatus(hadoop_path)
        return self._statuses[path]

    def compressed(self, path: str) -> bool:
        """Whether Hadoop reads the file through a compression codec (by its name)."""
        if self._codecs is None:
            self._codecs = self._spark.sparkContext._jvm.org.apache.hadoop.io.compress.CompressionCodecFactory(
                self._spark.sparkContext._jsc.hadoopConfiguration())
        return self._codecs.getCodec(_hadoop_path(self._spark.sparkContext._jvm, path)) is not None


def _only(files: list[str], limits: _Limits) -> list[str]:
    return files if limits.only is None else [f for f in files if f in limits.only]


def _first_line(spark: SparkSession, file: str, encoding: str) -> str | None:
    """The first non-blank line of a file (its header), read on the driver through Hadoop's FileSystem."""
    jvm = spark.sparkContext._jvm
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    path = _hadoop_path(jvm, file)
    fs = path.getFileSystem(conf)
    if fs.getFileStatus(path).getLen() == 0:
        return None
    stream = fs.open(path)
    try:
        codec = jvm.org.apache.hadoop.io.compress.CompressionCodecFactory(conf).getCodec(path)
        if codec is not None:
            stream = codec.createInputStream(stream)
        reader = jvm.java.io.BufferedReader(jvm.java.io.InputStreamReader(stream, encoding))
        for _ in range(1000):
            line = reader.readLine()
            if line is None:
                return None
            if line.lstrip("\ufeff").strip():
                return line
        return ""
    except Exception as exc:  # noqa: BLE001 - a corrupt archive: say which file
        raise SourceError(f"cannot read the first line of {file}: {exc}") from None
    finally:
        stream.close()


def _lines(spark: SparkSession, files: list[str], encoding: str) -> DataFrame:
    """source_file, raw_line (valid text) and problem (undecodable bytes, NULs), one row per line."""
    df = spark.read.text(files).select(F.col("_metadata.file_path").alias("source_file"), F.col("value"))
    value = F.col("value")
    if encoding == "UTF-8":
        problem = (F.when(~F.is_valid_utf8(value),
                          F.lit("undecodable bytes: the line is not valid UTF-8 (set the feed's encoding if the "
                                "file uses another)"))
                   .when(F.contains(value, F.lit("\uFFFD")),
                         F.lit("contains U+FFFD replacement characters: the text was mis-decoded before it got here")))
        line = F.make_valid_utf8(value)
    else:
        problem = F.lit(None).cast("string")
        line = F.decode(value.cast("binary"), encoding)
    df = df.select("source_file", line.alias("raw_line"), problem.alias("_problem"))
    nul = F.when(F.contains(F.col("raw_line"), F.lit("\x00")),
                 F.lit("contains NUL bytes: UTF-16 text or binary data, not a text line"))
    return df.select("source_file", "raw_line", F.coalesce("_problem", nul).alias("_problem"))


def _clean_value(column: Column, nulls: list[str]) -> Column:
    text = F.trim(column)
    return F.when(text.isin("", *nulls), F.lit(None).cast("string")).otherwise(text)


def _quoted_field_count(line: Column, delimiter: str) -> Column:
    """Number of delimited fields, not counting delimiters inside double quotes."""
    unquoted = F.regexp_replace(line, r'"[^"]*"', "")
    return F.size(F.split(unquoted, _regex_escape(delimiter), -1))


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in r".^$*+?()[]{}|\/" else c for c in text)


def _oversized_line(limits: _Limits) -> tuple[Column, Column]:
    length = F.length("raw_line")
    return length > limits.max_line_chars, F.format_string(
        f"line is %d characters, above input.max_line_chars = {limits.max_line_chars}", length)


def _with_field_check(df: DataFrame, wanted: list[str], limits: _Limits) -> DataFrame:
    """Name the first wanted column longer than input.max_field_chars as the row's shape problem."""
    too_long = F.lit(None).cast("string")
    for i, name in reversed(list(enumerate(wanted))):
        length = F.length(F.col(f"_v{i}"))
        too_long = F.when(length > limits.max_field_chars, F.format_string(
            f"column {name!r} is %d characters, above input.max_field_chars = {limits.max_field_chars}",
            length)).otherwise(too_long)
    return df.withColumn("malformed", F.coalesce(F.col("malformed"), too_long))


def _csv_group(spark: SparkSession, src: _Files, files: list[str], names: list[str], header_line: str | None,
               wanted: list[str], limits: _Limits) -> tuple[DataFrame, DataFrame]:
    lines = _lines(spark, files, src.encoding)
    stripped = F.trim(F.col("raw_line"))
    is_blank = stripped.isin("", "\ufeff")
    header = header_line.lstrip("\ufeff").strip() if header_line is not None else None
    is_header = stripped.isin(header, "\ufeff" + header) if header is not None else F.lit(False)
    skipped = lines.where(is_blank | is_header).select(
        "source_file", F.when(is_blank, F.lit("blank")).otherwise(F.lit("header")).alias("kind"))
    rows = lines.where(~(is_blank | is_header))

    n = len(names)
    # Lines without quotes (nearly all) are split on the delimiter, much cheaper than the CSV parser,
    # and the split, computed once, also gives their field count.
    quoted_line = F.contains(F.col("raw_line"), F.lit('"'))
    rows = rows.withColumn("_split", F.when(~quoted_line, F.split(F.col("raw_line"), _regex_escape(src.delimiter), -1)))
    count = F.when(F.col("_split").isNotNull(), F.size("_split")).otherwise(
        _quoted_field_count(F.col("raw_line"), src.delimiter))
    oversized, oversized_text = _oversized_line(limits)
    hint = (F.when((count == 1) & F.lit(n > 1), F.lit(" (wrong delimiter?)"))
            .when(count < n, F.lit(" (truncated line?)")).otherwise(F.lit("")))
    shape = (F.when(F.col("_problem").isNotNull(), F.col("_problem"))
             .when(oversized, oversized_text)
             .when(count != n, F.format_string(
                 f"expected {n} fields separated by {describe_delimiter(src.delimiter)}, found %d%s", count, hint)))
    rows = rows.withColumn("malformed", shape)
    # Parse only well-shaped lines: the CSV parser fails the whole job on lines with >20480 fields.
    schema = ", ".join(f"_c{i} string" for i in range(n))
    quoted = F.from_csv(F.col("raw_line"), schema, {"sep": src.delimiter})
    fields = F.coalesce(F.col("_split"), F.array(*[quoted[f"_c{i}"] for i in range(n)]))
    rows = rows.withColumn("_fields", F.when(F.col("malformed").isNull(), fields))
    position = {}
    for i, name in enumerate(names):
        position.setdefault(name, i)
    values = [_clean_value(F.get(F.col("_fields"), position[w]), src.nulls) if w in position
              else F.lit(None).cast("string") for w in wanted]
    rows = rows.select("source_file", "raw_line", "malformed", *[v.alias(f"_v{i}") for i, v in enumerate(values)])
    return rows, skipped


def _header_names(header_line: str, delimiter: str) -> list[str]:
    text = header_line.lstrip("\ufeff").strip()
    return [name.strip() for name in next(csv.reader([text], delimiter=delimiter))] if text else []


def _missing_required_error(src: _Files, files: list[str], required: list[str], names: list[str],
                            header_line: str, wanted_for: dict[str, str]) -> SourceError:
    shown = ", ".join(f.rsplit("/", 1)[-1] for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    what = ", ".join(f"{c} ({wanted_for[c]})" if c in wanted_for else c for c in required)
    hint = ""
    if "\ufffd" in header_line or "\x00" in header_line:
        hint = " The header line is not readable text in the feed's encoding (wrong encoding?)."
    elif len(names) == 1 and src.delimiter not in header_line:
        hint = f" The header has no {describe_delimiter(src.delimiter)} in it: wrong delimiter, or no header line?"
    return SourceError(
        f"{src.where}: required column(s) {what} missing from {len(files)} file(s) ({shown}); their header line "
        f"{header_line[:200]!r} gives the columns {names[:30]}.{hint}")


def _header_groups(spark: SparkSession, src: _Files, files: list[str], wanted: list[str], required: set[str],
                   wanted_for: dict[str, str]) -> tuple[list[tuple[list[str], str | None, list[str]]], set, set]:
    """The files by header line, as (column names, header line, files); the wanted columns missing from
    some file and the columns no one wants. Fails naming the file when a required column is missing."""
    groups: dict[str | None, list[str]] = defaultdict(list)
    if src.header:
        empty = []
        for file in files:
            line = _first_line(spark, file, src.encoding)
            if line is None:
                empty.append(file)
            else:
                groups[line].append(file)
        for file in empty:
            log.warning("%s: %s is empty", src.where, file)
    else:
        groups[None] = list(files)
    named, missing, extra = [], set(), set()
    for header_line, group in groups.items():
        names = _header_names(header_line, src.delimiter) if header_line is not None else list(src.columns)
        absent = [w for w in wanted if w not in names]
        lacking = [w for w in absent if w in required]
        if lacking:
            raise _missing_required_error(src, group, lacking, names, header_line or "", wanted_for)
        missing |= set(absent)
        extra |= {n for n in names if n not in wanted}
        if absent or len(groups) > 1:
            log.info("%s: %d file(s) with columns %s%s", src.where, len(group), names,
                     f"; missing optional {absent}" if absent else "")
        named.append((names, header_line, group))
    return named, missing, extra


def _read_csv(spark: SparkSession, src: _Files, files: list[str], wanted: list[str], required: set[str],
              wanted_for: dict[str, str], limits: _Limits) -> _Records:
    groups, missing, extra = _header_groups(spark, src, files, wanted, required, wanted_for)
    parts, skips = [], []
    for names, header_line, group in groups:
        rows, skipped = _csv_group(spark, src, group, names, header_line, wanted, limits)
        parts.append(rows)
        skips.append(skipped)
    if not parts:  # only empty files
        return _Records(None, None, files=len(files))
    return _Records(_union(parts), _union(skips), missing, extra, len(files))


def _read_json(spark: SparkSession, src: _Files, files: list[str], wanted: list[str], required: set[str],
               wanted_for: dict[str, str], limits: _Limits) -> _Records:
    lines = _lines(spark, files, src.encoding)
    is_blank = F.trim(F.col("raw_line")) == F.lit("")
    skipped = lines.where(is_blank).select("source_file", F.lit("blank").alias("kind"))
    oversized, oversized_text = _oversized_line(limits)
    rows = (lines.where(~is_blank)
            .withColumn("_shape", F.when(F.col("_problem").isNotNull(), F.col("_problem"))
                        .when(oversized, oversized_text))
            .withColumn("_object", F.when(F.col("_shape").isNull(),
                                          F.from_json(F.col("raw_line"), "map<string,string>"))))
    rows = rows.withColumn("malformed", F.coalesce(F.col("_shape"), F.when(
        F.col("_object").isNull(), F.lit("not a JSON object (invalid or truncated JSON)"))))
    # The column names present anywhere in the feed: distinct keys only, never the rows themselves.
    keys = {r[0] for r in rows.select(F.explode(F.map_keys("_object"))).distinct().collect()}
    absent = [w for w in wanted if w not in keys]
    lacking = [w for w in absent if w in required]
    if lacking and keys:
        what = ", ".join(f"{c} ({wanted_for[c]})" if c in wanted_for else c for c in lacking)
        raise SourceError(f"{src.where}: required key(s) {what} appear in no JSON object of {len(files)} file(s) "
                          f"({', '.join(f.rsplit('/', 1)[-1] for f in files[:3])}); keys found: {sorted(keys)[:30]}")
    values = [_clean_value(F.col("_object")[w], src.nulls) for w in wanted]
    rows = rows.select("source_file", "raw_line", "malformed", *[v.alias(f"_v{i}") for i, v in enumerate(values)])
    return _Records(rows, skipped, set(absent), keys - set(wanted), len(files))


def _read_delta_table(spark: SparkSession, path: str) -> DataFrame | None:
    from synth.spark import has_delta_jars

    if has_delta_jars(spark):
        return spark.read.format("delta").load(path)
    from deltalake import DeltaTable

    local = path[len("file://"):] if path.startswith("file://") else path
    if not DeltaTable.is_deltatable(local):
        raise SourceError(f"{path} is not a Delta table (no _delta_log)")
    uris = [u if "://" in u else f"file://{u}" for u in DeltaTable(local).file_uris()]
    if not uris:
        return None
    return spark.read.option("basePath", local).parquet(*uris)


def _read_typed(spark: SparkSession, src: _Files, wanted: list[str], required: set[str],
                wanted_for: dict[str, str], limits: _Limits) -> _Records:
    """Parquet files, a Delta table or a catalog table: raw_line is the row as JSON."""
    files = 0
    if src.format == "parquet":
        paths = _only(_list_files(spark, limits.path, src.files), limits)
        if not paths:
            return _Records(None, None)
        df, files = spark.read.option("mergeSchema", "true").parquet(*paths), len(paths)
        label = F.col("_metadata.file_path")
    elif src.format == "delta":
        path = src.table or limits.path
        if not Path(path).exists() and "://" not in path:
            raise FileNotFoundError(f"{src.where}: Delta table path {path} does not exist")
        df = _read_delta_table(spark, path)
        if df is None:
            return _Records(None, None)
        label = F.col("_metadata.file_path")
    else:
        name = src.table or limits.path
        try:
            df = spark.table(name)
        except AnalysisException as exc:
            raise SourceError(f"{src.where}: cannot read table {name!r}: {str(exc).splitlines()[0]}") from None
        label = F.coalesce(F.nullif(F.input_file_name(), F.lit("")), F.lit(f"table {name}"))
    columns = df.columns
    by_lower = {c.lower(): c for c in columns}
    actual = {w: (w if w in columns else by_lower.get(w.lower())) for w in wanted}
    absent = [w for w in wanted if actual[w] is None]
    lacking = [w for w in absent if w in required]
    if lacking:
        what = ", ".join(f"{c} ({wanted_for[c]})" if c in wanted_for else c for c in lacking)
        raise SourceError(f"{src.where}: required column(s) {what} missing from {src.format} input; "
                          f"its columns: {columns[:30]}")
    raw_line = F.to_json(F.struct(*[F.col(f"`{c}`") for c in columns]), {"ignoreNullFields": "false"})
    values = [_clean_value(F.col(f"`{actual[w]}`").cast("string"), src.nulls) if actual[w] else
              F.lit(None).cast("string") for w in wanted]
    # No line-length limit here: raw_line holds unused columns too; the used ones get the field limit.
    rows = df.select(label.alias("source_file"), raw_line.alias("raw_line"),
                     F.lit(None).cast("string").alias("malformed"), *[v.alias(f"_v{i}") for i, v in enumerate(values)])
    used = {actual[w] for w in wanted if actual[w]}
    return _Records(rows, spark.createDataFrame([], _SKIPPED_SCHEMA), set(absent),
                    {c for c in columns if c not in used}, files)


def _read_records(spark: SparkSession, src: _Files, wanted: list[str], required: set[str],
                  wanted_for: dict[str, str], limits: _Limits) -> _Records:
    if src.format in ("parquet", "delta", "table"):
        records = _read_typed(spark, src, wanted, required, wanted_for, limits)
    else:
        files = _only(_list_files(spark, limits.path, src.files), limits)
        if not files:
            return _Records(None, None)
        reader = _read_csv if src.format == "csv" else _read_json
        records = reader(spark, src, files, wanted, required, wanted_for, limits)
    if records.df is not None:
        records.df = _with_field_check(records.df, wanted, limits)
    return records


def _union(frames: list[DataFrame]) -> DataFrame:
    result = frames[0]
    for frame in frames[1:]:
        result = result.unionByName(frame)
    return result


# --------------------------------------------------------------------------------------------------
# Feeds: records -> canonical rows


def _spec_columns(spec: Any, fields: dict[str, Any], seen: frozenset = frozenset()) -> list[str]:
    """Source columns a field spec reads (through field references and fallbacks)."""
    if isinstance(spec, str):
        return [spec]
    columns: list[str] = []
    if "column" in spec:
        columns.append(str(spec["column"]))
    if "field" in spec:
        ref = spec["field"]
        if ref in seen:
            raise SourceError(f"fields: circular field reference through {ref!r}")
        if ref in fields:
            columns += _spec_columns(fields[ref], fields, seen | {ref})
    if "fallback" in spec:
        columns += _spec_columns(spec["fallback"], fields, seen)
    return columns


def _spec_available(spec: Any, fields: dict[str, Any], missing: set[str]) -> bool:
    if isinstance(spec, str):
        return spec not in missing
    if "value" in spec:
        return spec["value"] is not None
    own = (str(spec["column"]) not in missing if "column" in spec
           else spec["field"] in fields and _spec_available(fields[spec["field"]], fields, missing))
    return own or ("fallback" in spec and _spec_available(spec["fallback"], fields, missing))


def _field_column(spec: Any, values: dict[str, Column], resolved: dict[str, Column], where: str) -> Column:
    if isinstance(spec, str):
        return values[spec]
    if "value" in spec:
        column = F.lit(None if spec["value"] is None else str(spec["value"])).cast("string")
    elif "column" in spec:
        column = values[str(spec["column"])]
    else:
        column = resolved[spec["field"]]
    if spec.get("prefix"):
        column = F.concat(F.lit(str(spec["prefix"])), column)
    if "fallback" in spec:
        column = F.coalesce(column, _field_column(spec["fallback"], values, resolved, where))
    return column


def _resolution_order(feed: _Feed) -> list[str]:
    try:
        return resolution_order(feed.fields)
    except ValueError as exc:
        raise SourceError(f"{feed.where}: {exc}") from None


def _canonical_fields(feed: _Feed, values: dict[str, Column]) -> dict[str, Column]:
    resolved: dict[str, Column] = {}
    for name in _resolution_order(feed):
        resolved[name] = _field_column(feed.fields[name], values, resolved, f"{feed.where}.fields.{name}")
    return {name: resolved.get(name, F.lit(None).cast("string")) for name in RAW_COLUMNS}


_VALID_PATTERNS: set[str] = set()


def _check_time_format(spark: SparkSession, feed: _Feed) -> None:
    if feed.time_format in TIME_KEYWORDS or feed.time_format in _VALID_PATTERNS:
        return
    try:
        spark.range(1).select(F.try_to_timestamp(F.lit("2000-01-01"), F.lit(feed.time_format))).collect()
        _VALID_PATTERNS.add(feed.time_format)
    except Exception as exc:  # noqa: BLE001 - Spark's pattern errors come in several types
        raise SourceError(f"{feed.where}: time_format {feed.time_format!r} is neither unix_s, unix_ms, timestamp "
                          f"nor a valid Spark datetime pattern: {str(exc).splitlines()[0][:200]}") from None


def _parse_time(raw: Column, time_format: str) -> Column:
    if time_format == "unix_s":
        seconds = raw.try_cast("decimal(30,6)")
        return F.when(F.abs(seconds) < F.lit(10**11), F.timestamp_seconds(seconds))
    if time_format == "unix_ms":
        millis = raw.try_cast("decimal(30,3)")
        return F.when(F.abs(millis) < F.lit(10**14), F.timestamp_micros((millis * 1000).cast("bigint")))
    if time_format == "timestamp":
        return raw.try_cast("timestamp")
    return F.try_to_timestamp(raw, F.lit(time_format))


def _wanted_columns(feed: _Feed) -> tuple[list[str], dict[str, str], set[str]]:
    """The source columns a feed reads, the field each is read for, and the required ones."""
    wanted: list[str] = []
    wanted_for: dict[str, str] = {}
    required: set[str] = set()
    for name, spec in feed.fields.items():
        for column in _spec_columns(spec, feed.fields):
            if column not in wanted:
                wanted.append(column)
            wanted_for.setdefault(column, name)
            if name in feed.required:
                required.add(column)
    if feed.time_offset_ms:
        offset = str(feed.time_offset_ms)
        if offset not in wanted:
            wanted.append(offset)
        wanted_for.setdefault(offset, "event_time offset")
        if "event_time" in feed.required:
            required.add(offset)
    return wanted, wanted_for, required


def _missing_fields(feed: _Feed, missing_columns: set[str]) -> set[str]:
    return {name for name in RAW_COLUMNS
            if name not in feed.fields or not _spec_available(feed.fields[name], feed.fields, missing_columns)}


def _feed_rows(spark: SparkSession, feed: _Feed, limits: _Limits):
    """(rows in SOURCE_COLUMNS, skipped, missing canonical fields, extra columns), or, when there are no
    rows to read, the number of (empty) files found."""
    wanted, wanted_for, required = _wanted_columns(feed)
    _check_time_format(spark, feed)
    records = _read_records(spark, feed, wanted, required, wanted_for, limits)
    if records.df is None:
        return records.files
    values = {w: F.col(f"_v{i}") for i, w in enumerate(wanted)}
    canonical = _canonical_fields(feed, values)
    time_raw = canonical["event_time"]
    event_time = _parse_time(time_raw, feed.time_format)
    if feed.time_offset_ms:
        offset_raw = values[str(feed.time_offset_ms)]
        offset = offset_raw.try_cast("decimal(30,3)")
        event_time = F.when(F.abs(offset) < F.lit(10**12),
                            F.timestamp_micros(F.unix_micros(event_time) + (offset * 1000).cast("bigint")))
        time_raw = F.when(time_raw.isNotNull(), F.concat(time_raw, F.lit(" + "), F.coalesce(offset_raw, F.lit("?")),
                                                          F.lit(" ms")))
    event_types = F.create_map(*[F.lit(x).cast("string") for pair in feed.event_types.items() for x in pair])
    rows = records.df.select(
        "source_file", "raw_line", "malformed",
        time_raw.alias("event_time_raw"), event_time.alias("event_time"),
        canonical["event_type"].alias("event_type_raw"),
        event_types[F.lower(F.trim(canonical["event_type"]))].alias("event_type"),
        *[canonical[name].alias(name) for name in ("item_id", "category", "category_path", "brand")],
        canonical["price"].alias("price_raw"), canonical["user_id"].alias("user_id"),
        canonical["session_id"].alias("session_id"))
    missing = _missing_fields(feed, records.missing)
    log.info("%s: %d file(s)%s%s", feed.where, records.files,
             f"; missing fields {sorted(missing)}" if missing else "",
             f"; unused columns {sorted(records.extra)}" if records.extra else "")
    return rows, records.skipped, missing, records.extra


# --------------------------------------------------------------------------------------------------
# Lookups


def _tree_paths(nodes: DataFrame, separator: str, where: str) -> DataFrame:
    """(_lk_key, _lk.path): each node's ancestor keys, root first, ending with the node, joined by separator.

    Pointer jumping: each round prepends the path of the ancestor reached so far, so the reach doubles
    and a tree of depth d takes log2(d) rounds (MAX_TREE_DEPTH bounds it; cycles end with a null path).
    """
    nodes = nodes.groupBy("id").agg(F.max("parent").alias("parent"))
    paths = nodes.select("id", F.col("id").alias("path"), F.col("parent").alias("cur")).localCheckpoint()
    reach = 1
    while paths.where(F.col("cur").isNotNull()).limit(1).count():
        if reach >= MAX_TREE_DEPTH:
            looping = paths.where(F.col("cur").isNotNull()).count()
            log.warning("%s: %d categories have a cycle or are deeper than %d levels; their path is left null",
                        where, looping, MAX_TREE_DEPTH)
            paths = paths.withColumn("path", F.when(F.col("cur").isNull(), F.col("path")))
            break
        s, a = paths.alias("s"), paths.alias("a")
        step = s.join(a, F.col("s.cur") == F.col("a.id"), "left")
        ancestor = F.coalesce(F.col("a.path"), F.col("s.cur"))  # a dangling parent id ends the chain
        paths = step.select(
            F.col("s.id").alias("id"),
            F.when(F.col("s.cur").isNotNull(), F.concat(ancestor, F.lit(separator), F.col("s.path")))
            .otherwise(F.col("s.path")).alias("path"),
            F.when(F.col("s.cur").isNotNull(), F.col("a.cur")).alias("cur")).localCheckpoint()
        reach *= 2
    return paths.select(F.col("id").alias("_lk_key"), F.struct(F.col("path")).alias("_lk"))


def _apply_lookup(spark: SparkSession, rows: DataFrame, lookup: _Lookup, limits: _Limits):
    """(rows with the lookup's fields filled, filled canonical fields, extra columns) or None without files."""
    if lookup.tree:
        wanted = [lookup.key, str(lookup.tree["parent"])]
    else:
        wanted = [lookup.key, *map(str, lookup.match), *([lookup.latest_by] if lookup.latest_by else []),
                  *lookup.fields.values()]
    wanted = list(dict.fromkeys(wanted))
    records = _read_records(spark, lookup, wanted, set(wanted), {}, replace(limits, only=None))
    if records.df is None:
        if not lookup.optional:
            raise SourceError(f"{lookup.where}: no non-empty files matching {lookup.files!r} under {limits.path}")
        log.warning("%s: no files matching %r under %s; its fields stay null", lookup.where, lookup.files,
                    limits.path)
        return None
    v = {w: F.col(f"_v{i}") for i, w in enumerate(wanted)}
    table = records.df.where(F.col("malformed").isNull() & v[lookup.key].isNotNull())
    for column, value in lookup.match.items():
        table = table.where(v[str(column)] == F.lit(str(value)))
    if lookup.tree:
        into = lookup.tree["into"]
        nodes = table.select(v[lookup.key].alias("id"), v[str(lookup.tree["parent"])].alias("parent"))
        joined_table = _tree_paths(nodes, str(lookup.tree.get("separator", ".")), lookup.where)
        fills = {into: F.col("_lk.path")}
    else:
        payload = F.struct(*[v[column].alias(f"f{i}") for i, column in enumerate(lookup.fields.values())])
        if lookup.latest_by:
            latest = v[lookup.latest_by]
            order = F.struct(latest.try_cast("double"), latest)
        else:
            order = payload
        # One row per key (the latest), so the join can never multiply event rows.
        joined_table = table.groupBy(v[lookup.key].alias("_lk_key")).agg(F.max_by(payload, order).alias("_lk"))
        fills = {name: F.col(f"_lk.f{i}") for i, name in enumerate(lookup.fields)}
    joined = rows.join(joined_table, F.col(lookup.join_on) == F.col("_lk_key"), "left")
    rows = joined.select(*[F.coalesce(F.col(c), fills[c]).alias(c) if c in fills else F.col(c)
                           for c in SOURCE_COLUMNS])
    log.info("%s: %d file(s) joined on %s%s", lookup.where, records.files, lookup.join_on,
             f"; unused columns {sorted(records.extra)}" if records.extra else "")
    return rows, set(fills), records.extra


# --------------------------------------------------------------------------------------------------
# The entry point


def _date_bound(value: Any, key: str) -> dt.date | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise SourceError(f"{key} must be a date YYYY-MM-DD, not {value!r}") from None


def _hadoop_path(jvm, path: str):
    """A Hadoop Path of a file as the listings name it: a URI, percent-encoded (a space is %20), or a
    plain path."""
    fs = jvm.org.apache.hadoop.fs
    return fs.Path(jvm.java.net.URI(path)) if "://" in path or path.startswith("file:") else fs.Path(path)


def _on_arrow(feed: _Feed) -> bool:
    """Whether the Arrow CSV reader takes this feed (else Spark's readers do)."""
    return feed.format == "csv" and not feed.time_offset_ms and arrow_time_format(feed.time_format) is not None


def _arrow_opens(path: str) -> bool:
    """Whether pyarrow can open the input's filesystem (Hadoop-only schemes stay on Spark's readers)."""
    if "://" not in path:
        return True
    try:
        _arrow.filesystem(path)
        return True
    except (OSError, ValueError) as exc:  # pyarrow's errors for unknown schemes and unreachable stores
        log.info("input.path %s: pyarrow cannot open it (%s); Spark's readers read the CSV feeds", path,
                 str(exc).splitlines()[0][:200])
        return False


def _arrow_decompresses(listing: Listing, files: list[str]) -> bool:
    """Whether pyarrow reads every compressed file as Hadoop's codec wrote it (gzip, bzip2 and zstd
    only: Hadoop's .lz4, .snappy and .deflate are framed its own way)."""
    odd = [f for f in files if listing.compressed(f) and not f.endswith((".gz", ".bz2", ".zst"))]
    if odd:
        log.info("%s is compressed with a Hadoop codec pyarrow does not read; Spark's readers read the feeds",
                 odd[0])
    return not odd


def _arrow_feed(spark: SparkSession, listing: Listing, feed: _Feed, files: list[str], limits: _Limits,
                first: dt.date | None, last: dt.date | None):
    """(the feed as a _csv.CsvFeed, its pieces with their sizes, missing canonical fields, extra columns), or,
    when there are no rows to read, the number of (empty) files found."""
    wanted, wanted_for, required = _wanted_columns(feed)
    _resolution_order(feed)  # fails here, naming the feed, rather than on an executor
    if not files:
        return 0
    groups, missing, extra = _header_groups(spark, feed, files, wanted, required, wanted_for)
    if not groups:
        return len(files)
    csv_feed = CsvFeed(
        where=feed.where, delimiter=feed.delimiter, encoding=feed.encoding, nulls=tuple(feed.nulls),
        groups=tuple((tuple(names), header) for names, header, _ in groups), wanted=tuple(wanted),
        fields=dict(feed.fields), time_format=arrow_time_format(feed.time_format),
        event_types=dict(feed.event_types), max_line_chars=limits.max_line_chars,
        max_field_chars=limits.max_field_chars, first=first, last=last)
    pieces = []
    for index, (_, _, group) in enumerate(groups):
        for path in group:
            size = listing.status(path).getLen()
            # Rows name their file as Spark's file scans do (file:/x), listings as file:///x.
            source_file = "file:" + path[len("file://"):] if path.startswith("file:///") else path
            if listing.compressed(path):
                pieces.append((Piece(path, source_file, 0, None, index), size))
            else:
                pieces += [(Piece(path, source_file, start, min(start + _SPLIT_BYTES, size), index),
                            min(_SPLIT_BYTES, size - start)) for start in range(0, size, _SPLIT_BYTES)]
    missing_fields = _missing_fields(feed, missing)
    log.info("%s: %d file(s), read in Arrow%s%s", feed.where, len(files),
             f"; missing fields {sorted(missing_fields)}" if missing_fields else "",
             f"; unused columns {sorted(extra)}" if extra else "")
    return csv_feed, pieces, missing_fields, extra


def _arrow_tasks(spark: SparkSession, feeds: list) -> list:
    """The pieces of [(CsvFeed, [(piece, size)])], numbered, packed in order into whole rounds of tasks
    over the cores, each of about the same bytes and of at most about spark.sql.files.maxPartitionBytes
    (so that no core waits through a last, half-empty round)."""
    conf = spark._jsparkSession.sessionState().conf()
    cost = conf.filesOpenCostInBytes()  # as Spark counts a file's opening
    in_order = [(csv_feed, piece, size) for csv_feed, listed in feeds for piece, size in listed]
    pieces = [(csv_feed, replace(piece, number=number), size + cost)
              for number, (csv_feed, piece, size) in enumerate(in_order)]
    total = sum(size for *_, size in pieces)
    cores = max(1, spark.sparkContext.defaultParallelism)
    count = cores * max(1, math.ceil(total / (conf.filesMaxPartitionBytes() * cores)))
    tasks: list[list] = [[] for _ in range(count)]
    filled = 0
    for csv_feed, piece, size in pieces:
        task = tasks[min(count - 1, int((filled + size / 2) * count / max(total, 1)))]
        if task and task[-1][0] is csv_feed:
            task[-1][1].append(piece)
        else:
            task.append((csv_feed, [piece]))
        filled += size
    return [task for task in tasks if task]


def list_input_files(spark: SparkSession, cfg, listing: Listing | None = None) -> list[InputFile] | None:
    """Every file the adapter of `cfg.input.source` would read, with size and modification time; None
    when a feed or lookup reads a table (Delta or catalog), whose changes files cannot describe.
    `listing`: the run's Listing, which read_source then reuses."""
    listing = listing or Listing(spark)
    _, feeds, lookups = resolve_spec(cfg)
    if any(src.format in ("delta", "table") for src in (*feeds, *lookups)):
        return None
    found: dict[str, InputFile] = {}
    for role, sources in (("feed", feeds), ("lookup", lookups)):
        for src in sources:
            try:
                paths = listing.files(str(cfg.input.path), src.files)
            except AnalysisException:  # no file matches the glob
                paths = []
            for path in paths:
                status = listing.status(path)
                modified = dt.datetime.fromtimestamp(status.getModificationTime() / 1000, dt.timezone.utc)
                found.setdefault(path, InputFile(path, status.getLen(), modified, role))
    return sorted(found.values(), key=lambda f: f.path)


def read_source(spark: SparkSession, cfg, files: set[str] | None = None, listing: Listing | None = None) -> RawInput:
    """Read `cfg.input.path` with the adapter of `cfg.input.source`, in the columns the clean stage checks.

    `files` restricts the feeds to those files (as list_input_files names them; lookups are always read
    whole); a feed without any of them is skipped, and no rows at all is then an empty result, not an error.
    `listing`: the run's Listing, where list_input_files listed the input already.
    """
    listing = listing or Listing(spark)
    source, feeds, lookups = resolve_spec(cfg)
    limits = _Limits(str(cfg.input.path), int(getattr(cfg.input, "max_line_chars", 65536)),
                     int(getattr(cfg.input, "max_field_chars", 2048)),
                     None if files is None else frozenset(files))
    first = _date_bound(getattr(cfg.input, "from_date", None), "input.from_date")
    last = _date_bound(getattr(cfg.input, "to_date", None), "input.to_date")
    if first and last and first > last:
        raise SourceError(f"input.from_date {first} is after input.to_date {last}")

    arrow = not lookups and all(_on_arrow(feed) for feed in feeds) and _arrow_opens(limits.path)
    listed = {feed.where: _only(listing.files(limits.path, feed.files), limits) for feed in feeds} if arrow else {}
    arrow = arrow and all(_arrow_decompresses(listing, files) for files in listed.values())
    parts, skips, missing, extra = [], [], set(), set()
    empty_files = 0
    for feed in feeds:
        result = (_arrow_feed(spark, listing, feed, listed[feed.where], limits, first, last) if arrow
                  else _feed_rows(spark, feed, limits))
        if isinstance(result, int):
            empty_files += result
            if result:
                log.warning("%s: all %d file(s) matching %r under %s are empty", feed.where, result, feed.files,
                            limits.path)
            elif files is not None:
                log.info("%s: none of the files to read this run", feed.where)
            elif not feed.optional:
                raise SourceError(f"{feed.where}: no input files matching {feed.files!r} under {limits.path}")
            else:
                log.info("%s: no files matching %r under %s", feed.where, feed.files, limits.path)
            continue
        rows, skipped, feed_missing, feed_extra = result
        parts.append((rows, skipped) if arrow else rows)
        if skipped is not None and not arrow:
            skips.append(skipped)
        missing |= {f for f in feed_missing if f not in feed.required}
        extra |= feed_extra
    if arrow and (parts or files is not None):
        return RawInput(None, None, sorted(extra), [f for f in RAW_COLUMNS if f in missing],
                        tasks=_arrow_tasks(spark, parts))
    if not parts and files is not None:
        empty = spark.createDataFrame([], ", ".join(
            f"{c} {'timestamp' if c == 'event_time' else 'string'}" for c in SOURCE_COLUMNS))
        return RawInput(empty, spark.createDataFrame([], _SKIPPED_SCHEMA))
    if not parts and empty_files:
        raise SourceError(f"{source}: all {empty_files} input file(s) under {limits.path} are empty")
    if not parts:
        globs = ", ".join(sorted({repr(f.files) for f in feeds}))
        raise SourceError(f"{source}: no input files matching {globs} under {limits.path} "
                          f"(is input.source right for what is there?)")
    rows = _union(parts)
    skipped = _union(skips) if skips else spark.createDataFrame([], _SKIPPED_SCHEMA)

    if first or last:
        day = F.to_date("event_time")
        outside = F.lit(False)
        if first:
            outside = outside | (day < F.lit(first.isoformat()).cast("date"))
        if last:
            outside = outside | (day > F.lit(last.isoformat()).cast("date"))
        out_of_range = F.col("malformed").isNull() & F.col("event_time").isNotNull() & outside
        skipped = skipped.unionByName(rows.where(out_of_range).select("source_file", F.lit("out_of_range").alias("kind")))
        rows = rows.where(~out_of_range)

    for lookup in lookups:
        result = _apply_lookup(spark, rows, lookup, limits)
        if result is None:
            continue
        rows, filled, lookup_extra = result
        missing -= filled
        extra |= lookup_extra
    return RawInput(rows.select(*SOURCE_COLUMNS), skipped, sorted(extra),
                    [f for f in RAW_COLUMNS if f in missing])
