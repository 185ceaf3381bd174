"""Raw input adapters: each turns a source's files into one raw-row DataFrame the clean stage checks.

Every adapter keeps the raw text of each row and its file, so a rejected row reaches quarantine
unchanged. `read_source` returns rows with these columns (strings null where absent or empty):
- source_file, raw_line, malformed (what is wrong with the row's shape; null when it has the expected shape)
- event_time_raw and event_time (the parsed timestamp; null when unparseable)
- event_type_raw and event_type (the canonical view/cart/purchase/search; null when unmapped)
- item_id, category, category_path, brand, price_raw, user_id, session_id
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

RAW_COLUMNS = ("event_time", "event_type", "item_id", "category", "category_path", "brand", "price",
               "user_id", "session_id")
SOURCE_COLUMNS = ("source_file", "raw_line", "malformed", "event_time_raw", "event_time", "event_type_raw",
                  "event_type", "item_id", "category", "category_path", "brand", "price_raw", "user_id",
                  "session_id")


@dataclass(frozen=True)
class Layout:
    """A delimited text layout: its header, delimiter and where each canonical field is."""

    name: str
    header: tuple[str, ...]
    delimiter: str
    columns: dict[str, str]
    time_format: str
    event_types: dict[str, str] = field(default_factory=dict)


# The REES46 multi-category store layout; the built-in simulator writes it too.
REES46 = Layout(
    name="rees46",
    header=("event_time", "event_type", "product_id", "category_id", "category_code", "brand", "price",
            "user_id", "user_session"),
    delimiter=",",
    columns={"event_time": "event_time", "event_type": "event_type", "item_id": "product_id",
             "category": "category_id", "category_path": "category_code", "brand": "brand", "price": "price",
             "user_id": "user_id", "session_id": "user_session"},
    time_format="yyyy-MM-dd HH:mm:ss 'UTC'",
    event_types={"view": "view", "cart": "cart", "purchase": "purchase", "search": "search"},
)

LAYOUTS = {"rees46": REES46, "simulator": REES46}


def layout_for(source: str) -> Layout:
    try:
        return LAYOUTS[source]
    except KeyError:
        raise ValueError(f"input.source must be one of {sorted(LAYOUTS)}, not {source!r}") from None


def _field_count(line: Column, delimiter: str) -> Column:
    """Number of delimited fields, not counting delimiters inside double quotes."""
    unquoted = F.regexp_replace(line, r'"[^"]*"', "")
    return F.size(F.split(unquoted, _regex_escape(delimiter), -1))


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in r".^$*+?()[]{}|\/" else c for c in text)


@dataclass
class RawInput:
    rows: DataFrame
    skipped: DataFrame  # source_file, kind: lines that are not rows (headers, blank lines)


def read_source(spark: SparkSession, cfg) -> RawInput:
    """Read `cfg.input.path` with the adapter of `cfg.input.source`, in the columns the clean stage checks."""
    layout = layout_for(cfg.input.source)
    rows, skipped = read_raw(spark, str(cfg.input.path), layout)
    event_types = F.create_map(*[F.lit(x) for pair in layout.event_types.items() for x in pair])
    return RawInput(rows.select(
        "source_file", "raw_line", "malformed",
        F.col("event_time").alias("event_time_raw"),
        F.try_to_timestamp(F.col("event_time"), F.lit(layout.time_format)).alias("event_time"),
        F.col("event_type").alias("event_type_raw"),
        event_types[F.lower(F.col("event_type"))].alias("event_type"),
        "item_id", "category", "category_path", "brand", F.col("price").alias("price_raw"), "user_id",
        "session_id"), skipped)


def read_raw(spark: SparkSession, path: str, layout: Layout) -> tuple[DataFrame, DataFrame]:
    """Return (rows, skipped): the raw rows to type, and the header and blank lines that are not rows."""
    lines = (spark.read.option("recursiveFileLookup", "true").option("pathGlobFilter", "*.csv*")
             .text(path)
             .select(F.col("_metadata.file_path").alias("source_file"), F.col("value").alias("raw_line")))
    header_line = layout.delimiter.join(layout.header)
    is_header = F.trim(F.col("raw_line")) == F.lit(header_line)
    is_blank = F.trim(F.col("raw_line")) == F.lit("")
    skipped = lines.where(is_header | is_blank).select(
        "source_file", F.when(is_header, F.lit("header")).otherwise(F.lit("blank")).alias("kind"))
    rows = lines.where(~(is_header | is_blank))

    expected = len(layout.header)
    count = _field_count(F.col("raw_line"), layout.delimiter)
    schema = ", ".join(f"`{name}` string" for name in layout.header)
    parsed = F.from_csv(F.col("raw_line"), schema, {"sep": layout.delimiter, "mode": "PERMISSIVE"})
    rows = rows.select(
        "source_file", "raw_line",
        F.when(count != expected,
               F.format_string(f"expected {expected} fields, found %d", count)).alias("malformed"),
        parsed.alias("_fields"))
    fields = {canonical: F.col(f"_fields.`{source}`") for canonical, source in layout.columns.items()}
    return rows.select(
        "source_file", "raw_line", "malformed",
        *[F.nullif(F.trim(fields[name]), F.lit("")).alias(name) if name in fields
          else F.lit(None).cast("string").alias(name) for name in RAW_COLUMNS],
    ), skipped
