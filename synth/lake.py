"""The Delta lake access layer: pinned reads and one atomic, idempotent commit per table per stage run.

Two engines produce the same standard Delta tables:
- delta-spark, when the Delta Lake JVM jars are on the classpath (a cluster image, `--packages`);
- delta-rs otherwise: the executors write Parquet files straight into the table folder and return
  only their add actions (path, size, partition values, stats); the driver commits them all in one
  Delta transaction. No event data passes through the driver.

Every commit carries an application transaction (app id = "<stage>:<run id>"), the mechanism Delta
uses for exactly-once streaming writes; `committed()` reads it back so a re-run can tell that a run
already landed.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from schemas import Contract, contract
from synth import _arrow
from synth.spark import has_delta_jars

log = logging.getLogger(__name__)

ADD_ACTIONS_DDL = "path string, size long, partition_values string, modification_time long, stats string"
_ROWS_PER_FILE = 2_000_000


@dataclass(frozen=True)
class Commit:
    """What one write committed: the table's new version, its rows and files."""

    table: str
    version: int
    rows: int
    files: int


@dataclass(frozen=True)
class Snapshot:
    """A table read at one pinned Delta version."""

    table: str
    version: int
    load: Callable[[], DataFrame] = field(repr=False, compare=False)

    @cached_property
    def df(self) -> DataFrame:
        """The rows as a DataFrame, built on first use: stages that read the files with pyarrow never
        pay for Spark's listing of them (2-4 s for a few hundred files)."""
        return self.load()


def _to_uri(root: str) -> str:
    if "://" in root:
        return root.rstrip("/")
    return Path(root).expanduser().resolve().as_uri()


class Lake:
    def __init__(self, spark: SparkSession, root: str, engine: str = "auto"):
        self.spark = spark
        self.root = _to_uri(root)
        if engine not in ("auto", "delta-spark", "delta-rs"):
            raise ValueError(f"lake.engine must be auto, delta-spark or delta-rs, not {engine!r}")
        jars = has_delta_jars(spark)
        if engine == "delta-spark" and not jars:
            raise RuntimeError("lake.engine is delta-spark but the Delta Lake jars are not on the classpath "
                               "(add --packages io.delta:delta-spark_2.13:4.0.0 or use lake.engine=auto)")
        self.engine = "delta-spark" if (engine == "delta-spark" or (engine == "auto" and jars)) else "delta-rs"
        log.info("Delta lake at %s, engine %s", self.root, self.engine)

    def uri(self, table: str) -> str:
        return f"{self.root}/{table}"

    def _local_path(self, table: str) -> str:
        """What Spark and pyarrow take as the table's location (a plain path for local tables)."""
        return _local(self.uri(table))

    def _delta(self, table: str, version: int | None = None):
        from deltalake import DeltaTable

        if not DeltaTable.is_deltatable(self._local_path(table)):
            return None
        return DeltaTable(self._local_path(table), version=version)

    def exists(self, table: str) -> bool:
        return self._delta(table) is not None

    def version(self, table: str) -> int | None:
        dt = self._delta(table)
        return None if dt is None else dt.version()

    def committed(self, table: str, app_id: str) -> int | None:
        """The table version holding `app_id`'s commit, or None when that run never committed here."""
        dt = self._delta(table)
        if dt is None or dt.transaction_version(app_id) is None:
            return None
        return max(entry["version"] for entry in dt.history() if _app_id_of(entry) == app_id)

    def files(self, table: str, version: int) -> list[str]:
        """Absolute URIs of the Parquet files of `table` at `version` (for Petastorm and pyarrow readers)."""
        dt = self._delta(table, version)
        if dt is None:
            raise FileNotFoundError(f"table {table} does not exist at {self.uri(table)}")
        # Not Path.as_uri(): it would percent-encode the '=' of partition folders.
        return [u if "://" in u else f"file://{u}" for u in dt.file_uris()]

    def file_ranges(self, table: str, version: int, column: str) -> list[tuple[str, int, object, object]]:
        """(URI, rows, min, max of `column`) of each Parquet file of `table` at `version`, from the add
        actions' statistics (no file is read); min and max are None where a file has no statistics."""
        import pyarrow as pa

        dt = self._delta(table, version)
        if dt is None:
            raise FileNotFoundError(f"table {table} does not exist at {self.uri(table)}")
        actions = pa.table(dt.get_add_actions(flatten=True))
        bounds = [actions.column(f"{bound}.{column}").to_pylist() if f"{bound}.{column}" in actions.column_names
                  else [None] * actions.num_rows for bound in ("min", "max")]
        # The snapshot's URIs by their path in the table, as the add actions name them.
        uris = {unquote(uri[len(self.uri(table)) + 1:]): uri for uri in self.files(table, version)}
        return [(uris[unquote(path)], rows, low, high) for path, rows, low, high in
                zip(actions.column("path").to_pylist(), actions.column("num_records").to_pylist(), *bounds)]

    def rows(self, table: str, version: int) -> int:
        """Rows of `table` at `version`, from the commit statistics (no file is read)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        actions = pa.table(self._delta(table, version).get_add_actions(flatten=True))
        return int(pc.sum(actions.column("num_records")).as_py() or 0) if actions.num_rows else 0

    def read(self, table: str, version: int | None = None) -> Snapshot:
        """Read `table` pinned at `version` (default: the latest, resolved now and recorded)."""
        spec = contract(table)
        dt = self._delta(table, version)
        if dt is None:
            raise FileNotFoundError(
                f"table {table} does not exist at {self.uri(table)}; run the {spec.stage} stage first")
        pinned = dt.version()

        def load() -> DataFrame:
            if self.engine == "delta-spark":
                df = self.spark.read.format("delta").option("versionAsOf", pinned).load(self.uri(table))
            else:
                # delta-rs names files percent-encoded (a space is %20); Spark's paths take them plain.
                files = [unquote(u) for u in dt.file_uris()]
                if files:
                    df = (self.spark.read.schema(spec.spark_schema())
                          .option("basePath", self._local_path(table)).parquet(*files))
                else:
                    df = self.spark.createDataFrame([], spec.spark_schema())
            return df.select(*spec.names)

        return Snapshot(table, pinned, load)

    def write(self, df: DataFrame, table: str, *, app_id: str,
              replace: dict[str, str | list[str]] | None = None,
              metadata: dict[str, str] | None = None) -> Commit:
        """Commit `df` as `table` in one Delta transaction.

        replace=None overwrites the whole table; replace={"run_id": "x"} replaces only the
        partitions with those values, and {"event_date": ["2026-11-01", ...]} the partitions with
        any of them (every row of `df` must carry them), leaving the rest.
        """
        spec, replace = _replacing(table, replace)
        df = _conform(df, spec)
        started = time.time()
        if self.engine == "delta-spark":
            commit = self._write_delta_spark(df, spec, app_id, replace, metadata)
        else:
            writer = _file_writer(self.uri(spec.table), spec, uuid.uuid4().hex[:8])
            # Only the add actions (one small row per file) reach the driver.
            adds = [r.asDict() for r in df.mapInArrow(writer, ADD_ACTIONS_DDL).collect()]
            commit = self._commit_adds(spec, adds, app_id, replace, metadata)
        self._log(commit, app_id, started)
        return commit

    def write_rows(self, rows: list[dict], table: str, *, app_id: str,
                   replace: dict[str, str | list[str]] | None = None,
                   metadata: dict[str, str] | None = None) -> Commit:
        """Commit a few rows built on the driver (the ledgers) as `table`, as write does: written here
        with pyarrow, no Spark job (naive datetimes are read as UTC)."""
        import pyarrow as pa

        writer = self.arrow_writer(table)
        return self.commit_files(writer, writer([pa.Table.from_pylist(rows, schema=writer.schema)]), app_id=app_id,
                                 replace=replace, metadata=metadata)

    def arrow_writer(self, table: str) -> "ArrowWriter":
        """For stages that compute in Arrow on the executors: a picklable writer an executor calls with
        its tables of rows for `table`; it writes Parquet files and returns their add actions, which
        the driver then commits with commit_files. On the delta-spark engine the files are staged
        outside the table and committed through delta-spark."""
        spec = contract(table)
        write_id = uuid.uuid4().hex[:8]
        target = self.uri(table) if self.engine == "delta-rs" else f"{self.root}/_staging/{table}-{write_id}"
        return ArrowWriter(table, target, write_id, spec)

    def commit_files(self, writer: "ArrowWriter", adds: list[dict], *, app_id: str,
                     replace: dict[str, str | list[str]] | None = None,
                     metadata: dict[str, str] | None = None) -> Commit:
        """Commit the files an arrow_writer wrote (their add actions) as `writer.table`, as write does."""
        spec, replace = _replacing(writer.table, replace)
        started = time.time()
        if writer.target == self.uri(spec.table):
            commit = self._commit_adds(spec, adds, app_id, replace, metadata)
        else:
            staged = _local(writer.target)
            paths = [f"{staged}/{a['path']}" for a in adds]
            df = (self.spark.read.schema(spec.spark_schema()).option("basePath", staged).parquet(*paths) if paths
                  else self.spark.createDataFrame([], spec.spark_schema()))
            try:
                commit = self._write_delta_spark(_conform(df, spec), spec, app_id, replace, metadata)
            finally:
                fs, base = _arrow.filesystem(writer.target)
                fs.delete_dir(base)
        self._log(commit, app_id, started)
        return commit

    @staticmethod
    def _log(commit: Commit, app_id: str, started: float) -> None:
        log.info("committed %s version %d: %d rows in %d files (%s) in %.1f s", commit.table, commit.version,
                 commit.rows, commit.files, app_id, time.time() - started)

    def _write_delta_spark(self, df, spec: Contract, app_id, replace, metadata) -> Commit:
        writer = (df.write.format("delta").mode("overwrite")
                  .option("txnAppId", app_id).option("txnVersion", 1)
                  .option("userMetadata", json.dumps({"synth.app_id": app_id, **(metadata or {})})))
        if spec.partition_by:
            writer = writer.partitionBy(*spec.partition_by)
        if replace:
            writer = writer.option("replaceWhere", " AND ".join(
                f"{k} IN ({', '.join(repr(v) for v in values)})" for k, values in replace.items()))
        writer.save(self.uri(spec.table))
        metrics = self.spark.sql(f"DESCRIBE HISTORY delta.`{self.uri(spec.table)}` LIMIT 1").first()
        operation = metrics.operationMetrics or {}
        return Commit(spec.table, metrics.version, int(operation.get("numOutputRows", 0)),
                      int(operation.get("numFiles", 0)))

    def _commit_adds(self, spec: Contract, rows: list[dict], app_id, replace, metadata) -> Commit:
        from deltalake import DeltaTable
        from deltalake.transaction import (AddAction, CommitProperties, Transaction,
                                           create_table_with_add_actions)

        adds = [AddAction(r["path"], r["size"], json.loads(r["partition_values"]), r["modification_time"], True,
                          r["stats"]) for r in rows]
        if replace:
            stray = [a.path for a in adds if any(a.partition_values.get(k) not in v for k, v in replace.items())]
            if stray:
                raise ValueError(f"{spec.table}: rows outside the replaced partition {replace}: {stray[:3]}")
        props = CommitProperties(
            custom_metadata={"synth.app_id": app_id, **(metadata or {})},
            app_transactions=[Transaction(app_id, 1, int(time.time() * 1000))],
        )
        path = self._local_path(spec.table)
        if not DeltaTable.is_deltatable(path):
            create_table_with_add_actions(
                path, spec.delta_schema(), adds, mode="error",
                partition_by=list(spec.partition_by) or None, name=spec.table, description=spec.comment,
                commit_properties=props)
        else:
            filters = [(k, "in", v) for k, v in replace.items()] if replace else None
            DeltaTable(path).create_write_transaction(
                adds, mode="overwrite", schema=spec.delta_schema(),
                partition_by=list(spec.partition_by) or None, partition_filters=filters,
                commit_properties=props)
        rows_written = sum(json.loads(a.stats)["numRecords"] for a in adds)
        return Commit(spec.table, DeltaTable(path).version(), rows_written, len(adds))


@dataclass(frozen=True)
class ArrowWriter:
    """Writes an executor's Arrow tables of one table as Parquet files under `target` (see Lake.arrow_writer)."""

    table: str
    target: str
    write_id: str
    spec: Contract

    @property
    def schema(self):
        """The table's pyarrow Schema."""
        return self.spec.arrow_schema()

    def batches(self, tables):
        """Write `tables` (pyarrow Tables with the contract's columns, in any order and castable types);
        yield the add actions of the files written as record batches (ADD_ACTIONS_DDL)."""
        write = _file_writer(self.target, self.spec, self.write_id)
        schema = self.schema
        yield from write(batch for table in tables for batch in table.select(schema.names).cast(schema).to_batches())

    def __call__(self, tables) -> list[dict]:
        """As batches, the add actions as dicts."""
        return [row for actions in self.batches(tables) for row in actions.to_pylist()]

    def discard(self, adds: list[dict]) -> None:
        """Delete files written but never committed (their run failed before the commit)."""
        fs, base = _arrow.filesystem(self.target)
        for add in adds:
            fs.delete_file(f"{base}/{add['path']}")


def _replacing(table: str, replace) -> tuple[Contract, dict[str, list[str]]]:
    spec = contract(table)
    if replace and set(replace) - set(spec.partition_by):
        raise ValueError(f"{table}: can only replace by partition columns {spec.partition_by}")
    return spec, {k: sorted(map(str, v)) if isinstance(v, (list, tuple, set)) else [str(v)]
                  for k, v in (replace or {}).items()}


def _local(uri: str) -> str:
    return unquote(urlparse(uri).path) if uri.startswith("file://") else uri


def _app_id_of(commit_info: dict) -> str | None:
    """delta-rs keeps custom commit metadata as top-level keys, delta-spark as a userMetadata string."""
    if "synth.app_id" in commit_info:
        return commit_info["synth.app_id"]
    try:
        return json.loads(commit_info.get("userMetadata") or "{}").get("synth.app_id")
    except ValueError:
        return None


def _conform(df: DataFrame, spec: Contract) -> DataFrame:
    """Select the contract's columns, in order, cast to its types, carrying its column comments."""
    missing = [c for c in spec.names if c not in df.columns]
    extra = [c for c in df.columns if c not in spec.names]
    if missing or extra:
        raise ValueError(f"{spec.table}: data does not match its contract (missing {missing}, unexpected {extra})")
    fields = {f.name: f for f in spec.spark_schema().fields}
    return df.select(*[F.col(n).cast(fields[n].dataType).alias(n, metadata=fields[n].metadata)
                       for n in spec.names])


def _file_writer(table_uri: str, spec: Contract, write_id: str):
    """The executor side of a delta-rs commit: write each task's rows as Parquet files laid out as the
    contract says, yield add actions (with each file's min and max of its stats_columns)."""

    def write(batches):
        import datetime as dt

        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
        from pyspark import TaskContext

        fs, base = _arrow.filesystem(table_uri)
        context = TaskContext.get()
        task = f"{context.partitionId():05d}-{context.attemptNumber()}" if context else "00000-0"
        partition_by, stats_columns = list(spec.partition_by), list(spec.stats_columns)
        open_files: dict[tuple, dict] = {}
        finished: list[dict] = []

        def partition_dir(values: tuple) -> str:
            parts = []
            for name, value in zip(partition_by, values):
                text = "__HIVE_DEFAULT_PARTITION__" if value is None else quote(str(value), safe="")
                parts.append(f"{name}={text}")
            return "/".join(parts)

        def close(state: dict) -> None:
            state["writer"].close()
            info = fs.get_file_info(f"{base}/{state['path']}")
            stats = {"numRecords": state["rows"], "nullCount": state["nulls"]}
            ranged = [c for c in stats_columns if state["min"].get(c) is not None]
            if ranged:
                stats["minValues"] = {c: state["min"][c] for c in ranged}
                stats["maxValues"] = {c: state["max"][c] for c in ranged}
            finished.append({
                "path": state["path"], "size": info.size,
                "partition_values": json.dumps({n: (None if v is None else str(v))
                                                for n, v in zip(partition_by, state["key"])}),
                "modification_time": int(time.time() * 1000), "stats": json.dumps(stats)})

        def write_slice(key: tuple, data: pa.Table) -> None:
            state = open_files.get(key)
            if state is None:
                directory = partition_dir(key)
                name = f"part-{task}-{write_id}-{uuid.uuid4().hex[:12]}.parquet"
                rel = f"{directory}/{name}" if directory else name
                fs.create_dir(f"{base}/{directory}" if directory else base, recursive=True)
                state = {"key": key, "path": rel, "rows": 0, "nulls": {n: 0 for n in data.column_names},
                         "min": {}, "max": {},
                         "writer": pq.ParquetWriter(fs.open_output_stream(f"{base}/{rel}"), data.schema,
                                                    **spec.parquet_options(data.column_names))}
                open_files[key] = state
            state["writer"].write_table(data)
            state["rows"] += data.num_rows
            for column in data.column_names:
                state["nulls"][column] += data.column(column).null_count
            for column in stats_columns:
                low, high = pc.min_max(data.column(column)).values()
                if low.is_valid:
                    known = state["min"].get(column)
                    state["min"][column] = low.as_py() if known is None else min(known, low.as_py())
                    state["max"][column] = max(state["max"].get(column, high.as_py()), high.as_py())
            if state["rows"] >= _ROWS_PER_FILE:
                close(open_files.pop(key))

        for batch in batches:
            if batch.num_rows == 0:
                continue
            table = pa.Table.from_batches([batch])
            data = table.drop(partition_by) if partition_by else table
            if not partition_by:
                write_slice((), data)
                continue
            for key in table.select(partition_by).group_by(partition_by).aggregate([]).to_pylist():
                mask = None
                for name, value in key.items():
                    column = table.column(name)
                    hit = pc.is_null(column) if value is None else pc.fill_null(pc.equal(column, value), False)
                    mask = hit if mask is None else pc.and_(mask, hit)
                normalized = tuple(v.isoformat() if isinstance(v, (dt.date, dt.datetime)) else v
                                   for v in (key[c] for c in partition_by))
                rows = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
                contiguous = rows[-1] - rows[0] + 1 == len(rows)  # rows sorted by the key: a slice, no copy
                write_slice(normalized, data.slice(rows[0], len(rows)) if contiguous else data.filter(mask))
        for state in list(open_files.values()):
            close(state)
        if finished:
            yield pa.RecordBatch.from_pylist(finished, schema=pa.schema([
                ("path", pa.string()), ("size", pa.int64()), ("partition_values", pa.string()),
                ("modification_time", pa.int64()), ("stats", pa.string())]))

    return write
