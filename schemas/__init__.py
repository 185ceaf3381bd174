"""Table contracts: one YAML file per output table, naming its columns, types, comments and partitioning.

Types use Delta's type names (string, long, integer, double, boolean, date, timestamp, array<T>,
map<K,V>), so a contract turns directly into a Delta schema and an identical Spark StructType.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    nullable: bool
    comment: str


@dataclass(frozen=True)
class Contract:
    table: str
    stage: str
    comment: str
    partition_by: tuple[str, ...]
    columns: tuple[Column, ...]
    # Columns whose min and max each data file's add action records (Delta data skipping).
    stats_columns: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def schema_json(self) -> dict:
        """The Delta (= Spark StructType) JSON schema, column comments in field metadata."""
        return {
            "type": "struct",
            "fields": [
                {"name": c.name, "type": _type_json(c.type), "nullable": c.nullable,
                 "metadata": {"comment": c.comment}}
                for c in self.columns
            ],
        }

    def spark_schema(self):
        from pyspark.sql.types import StructType

        return StructType.fromJson(self.schema_json())

    def delta_schema(self):
        from deltalake import Schema

        return Schema.from_json(json.dumps(self.schema_json()))

    def arrow_schema(self):
        """The Arrow schema Spark's Parquet writer would give these columns (timestamps in UTC micros)."""
        import pyarrow as pa

        return pa.schema([pa.field(c.name, _arrow_type(c.type), c.nullable) for c in self.columns])


def _type_json(type_name: str):
    type_name = type_name.replace(" ", "")
    match = re.fullmatch(r"array<(.+)>", type_name)
    if match:
        return {"type": "array", "elementType": _type_json(match.group(1)), "containsNull": True}
    match = re.fullmatch(r"map<([a-z]+),(.+)>", type_name)
    if match:
        return {"type": "map", "keyType": _type_json(match.group(1)),
                "valueType": _type_json(match.group(2)), "valueContainsNull": True}
    if type_name not in {"string", "long", "integer", "double", "float", "boolean", "date", "timestamp"}:
        raise ValueError(f"unsupported contract type {type_name!r}")
    return type_name


def _arrow_type(type_name: str):
    import pyarrow as pa

    type_name = type_name.replace(" ", "")
    match = re.fullmatch(r"array<(.+)>", type_name)
    if match:
        return pa.list_(_arrow_type(match.group(1)))
    match = re.fullmatch(r"map<([a-z]+),(.+)>", type_name)
    if match:
        return pa.map_(_arrow_type(match.group(1)), _arrow_type(match.group(2)))
    return {"string": pa.string(), "long": pa.int64(), "integer": pa.int32(), "double": pa.float64(),
            "float": pa.float32(), "boolean": pa.bool_(), "date": pa.date32(),
            "timestamp": pa.timestamp("us", tz="UTC")}[type_name]


@lru_cache(maxsize=None)
def contract(table: str) -> Contract:
    """The contract of `table`, read from schemas/<table>.yaml."""
    try:
        text = resources.files(__name__).joinpath(f"{table}.yaml").read_text()
    except FileNotFoundError:
        raise KeyError(f"no contract for table {table!r} in schemas/") from None
    spec = yaml.safe_load(text)
    columns = tuple(Column(c["name"], c["type"], bool(c.get("nullable", True)), c.get("comment", ""))
                    for c in spec["columns"])
    result = Contract(spec["table"], spec.get("stage", ""), spec.get("comment", ""),
                      tuple(spec.get("partition_by") or ()), columns, tuple(spec.get("stats_columns") or ()))
    for kind, names in (("partition", result.partition_by), ("stats", result.stats_columns)):
        missing = set(names) - set(result.names)
        if missing:
            raise ValueError(f"contract {table}: {kind} columns {sorted(missing)} are not columns")
    return result


def all_tables() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))
