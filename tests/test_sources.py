"""The input adapters on the shared real samples, on tiny fixtures in the real RetailRocket and Taobao
layouts, and the generic adapter on made-up layouts (CSV, JSON lines, Parquet, Delta, a table)."""
import datetime as dt
import gzip

import pyarrow as pa
import pytest
from pyspark.sql import functions as F

from synth import config
from synth.sources import SOURCE_COLUMNS, SourceError, read_source

from conftest import shared_data


def _cfg(**overrides):
    return config.load(overrides={"run.id": "test", **overrides})


def _read(spark, **overrides):
    return _as_dataframes(spark, read_source(spark, _cfg(**overrides)))


def _as_dataframes(spark, raw):
    """raw.rows and raw.skipped as DataFrames also where the Arrow CSV reader read the feeds: its tasks run
    on the executors and their (tiny, test-sized) rows are collected here."""
    if raw.rows is not None:
        return raw
    from synth import _arrow, _csv

    def read(tasks):
        for task in tasks:
            rows, skipped = _csv.read_task(task)
            yield (_arrow.to_ipc(rows) if rows is not None else None), skipped

    results = spark.sparkContext.parallelize(raw.tasks, max(1, len(raw.tasks))).mapPartitions(read).collect()
    table = _arrow.from_ipc([blob for blob, _ in results if blob is not None])
    if table is not None:
        table = table.select(list(SOURCE_COLUMNS))
        table = table.set_column(0, "source_file", table.column("source_file").cast(pa.string()))
    schema = ", ".join(f"{c} {'timestamp' if c == 'event_time' else 'string'}" for c in SOURCE_COLUMNS)
    raw.rows = spark.createDataFrame(table.to_pandas() if table is not None else [], schema)
    raw.skipped = spark.createDataFrame([("", kind) for _, skipped in results for kind, n in skipped.items()
                                         for _ in range(n)], "source_file string, kind string")
    return raw


def _summary(raw) -> dict:
    """Counts of one read (nothing event-level reaches the driver); keeps the rows cached for more checks."""
    raw.rows = raw.rows.persist()
    row = raw.rows.agg(
        F.count("*").alias("rows"), F.count("malformed").alias("malformed"),
        F.count("event_time").alias("timed"), F.count("category").alias("with_category"),
        F.count("user_id").alias("with_user"), F.min("event_time").alias("first"), F.max("event_time").alias("last"),
        *[F.sum((F.col("event_type") == t).cast("int")).alias(t) for t in ("view", "cart", "purchase", "search")],
        F.sum(F.col("event_type").isNull().cast("int")).alias("unmapped"),
    ).first().asDict()
    row.update({f"skipped_{r.kind}": r["count"] for r in raw.skipped.groupBy("kind").count().collect()})
    return row


def _by_line(raw, lines):
    """The parsed rows of a few known raw lines, by raw line."""
    return {r.raw_line: r for r in raw.rows.where(F.col("raw_line").isin(list(lines))).collect()}


# --- the shared real samples -----------------------------------------------------------------------


def test_rees46_sample(spark):
    path = shared_data("rees46/2019-Oct-head.csv")
    raw = _read(spark, **{"input.source": "rees46", "input.path": str(path)})
    assert tuple(raw.rows.columns) == SOURCE_COLUMNS
    assert (raw.extra_columns, raw.missing_optional) == ([], [])
    s = _summary(raw)
    assert s["rows"] == 17434 + 1  # the events plus the truncated last line
    assert s["malformed"] == 1 and s["timed"] == 17434
    assert (s["view"], s["cart"], s["purchase"]) == (17055, 165, 214)
    assert s["first"] == dt.datetime(2019, 10, 1, 0, 0) and s["last"] == dt.datetime(2019, 10, 1, 2, 50)
    assert s["skipped_header"] == 1
    raw.rows.unpersist()


def test_diginetica_sample(spark):
    path = shared_data("diginetica")
    raw = _read(spark, **{"input.source": "diginetica", "input.path": str(path)})
    assert raw.extra_columns == ["ordernumber"]
    assert raw.missing_optional == ["category_path", "brand", "price"]
    s = _summary(raw)
    assert s["rows"] == 12391 + 18025 and s["malformed"] == 0
    assert (s["view"], s["purchase"]) == (12391, 18025)
    assert s["timed"] == s["rows"] and s["with_user"] == s["rows"]
    assert s["with_category"] == s["rows"]  # every sampled item is in product-categories.csv
    assert s["skipped_header"] == 2
    rows = _by_line(raw, ["1;NA;81766;526309;2016-05-09", "150;18278;17100868;2016-05-06;16421;25911"])
    view = rows["1;NA;81766;526309;2016-05-09"]
    # event time = eventdate + timeframe (ms since the session's first event); NA user -> the session.
    assert view.event_time == dt.datetime(2016, 5, 9, 0, 8, 46, 309000)
    assert (view.event_type, view.user_id, view.session_id, view.item_id) == ("view", "session-1", "1", "81766")
    assert view.category is not None
    purchase = rows["150;18278;17100868;2016-05-06;16421;25911"]
    assert (purchase.event_type, purchase.user_id, purchase.item_id) == ("purchase", "18278", "25911")
    assert purchase.event_time == dt.datetime(2016, 5, 6, 4, 45, 0, 868000)
    raw.rows.unpersist()


def test_yoochoose_sample(spark):
    path = shared_data("yoochoose")
    raw = _read(spark, **{"input.source": "yoochoose", "input.path": str(path)})
    assert raw.missing_optional == ["category", "category_path", "brand", "price"]
    s = _summary(raw)
    assert s["rows"] == 70278 + 13568 and s["malformed"] == 0
    assert s["view"] == s["rows"] and s["timed"] == s["rows"]
    assert s["first"].date() >= dt.date(2014, 4, 1) and s["last"].date() <= dt.date(2014, 4, 8)
    sessions = {r.name: r.sessions for r in raw.rows.groupBy(
        F.regexp_extract("source_file", r"([^/]+)$", 1).alias("name")).agg(
        F.countDistinct("session_id").alias("sessions")).collect()}
    assert sessions == {"yoochoose-clicks-100k_train_full.txt": 17794, "yoochoose-clicks-100k_test.txt": 3416}
    row = _by_line(raw, ["1\t214536502\t1396860669.277"])["1\t214536502\t1396860669.277"]
    assert row.event_time == dt.datetime(2014, 4, 7, 8, 51, 9, 277000)
    assert row.user_id == row.session_id == "1"
    raw.rows.unpersist()


def test_simulator_output_reads_back_row_for_row(spark, tmp_path):
    from synth.simulate import simulate

    cfg = _cfg(**{"input.source": "simulator", "input.path": str(tmp_path), "simulator.users": 40,
                  "simulator.days": 2, "simulator.bot_events": 30, "simulator.shards": 2})
    written = simulate(spark, cfg, str(tmp_path))
    raw = _as_dataframes(spark, read_source(spark, cfg))
    s = _summary(raw)
    assert s["rows"] == written and s["malformed"] >= 1  # the simulator cuts its last line
    assert s["skipped_header"] == len(list(tmp_path.rglob("*.csv")))
    raw.rows.unpersist()


def test_date_range_skips_rows_outside_it(spark):
    path = shared_data("yoochoose/yoochoose-clicks-100k_test.txt")
    raw = _read(spark, **{"input.source": "yoochoose", "input.path": str(path),
                          "input.from_date": "2014-04-07", "input.to_date": dt.date(2014, 4, 7)})
    s = _summary(raw)
    assert s["rows"] + s["skipped_out_of_range"] == 13568
    assert 0 < s["rows"] < 13568
    assert s["first"].date() == s["last"].date() == dt.date(2014, 4, 7)
    raw.rows.unpersist()


# --- fixtures in the real RetailRocket and Taobao layouts ------------------------------------------

RETAILROCKET_EVENTS = [
    "1433221332117,257597,view,355908,",
    "1433224214164,992329,view,248676,",
    "1433221999827,111016,addtocart,5206,",
    "1433222276276,111016,transaction,5206,4000",
    "1433223000000,483717,wishlist,355908,",
]


def test_retailrocket_fixture(spark, tmp_path):
    (tmp_path / "events.csv").write_text(
        "timestamp,visitorid,event,itemid,transactionid\n" + "\n".join(RETAILROCKET_EVENTS) + "\n")
    (tmp_path / "item_properties_part1.csv").write_text(
        "timestamp,itemid,property,value\n"
        "1435460400000,355908,categoryid,1173\n"
        "1441508400000,355908,categoryid,12\n"  # the later value wins
        "1439089200000,355908,available,1\n"
        "1431226800000,248676,categoryid,5\n"
        "999999999999,248676,categoryid,1\n")  # earlier, though larger as text
    (tmp_path / "item_properties_part2.csv").write_text(
        "timestamp,itemid,property,value\n1433041200000,5206,categoryid,12\n1433041200000,5206,790,n277.200\n")
    (tmp_path / "category_tree.csv").write_text("categoryid,parentid\n1,\n5,1\n12,5\n1173,\n")
    raw = _read(spark, **{"input.source": "retailrocket", "input.path": str(tmp_path)})
    assert raw.extra_columns == ["transactionid"]
    assert raw.missing_optional == ["brand", "price", "session_id"]
    rows = {r.raw_line: r for r in raw.rows.collect()}  # a five-row fixture
    assert len(rows) == len(RETAILROCKET_EVENTS)  # the lookups never multiply rows
    types = [rows[line].event_type for line in RETAILROCKET_EVENTS]
    assert types == ["view", "view", "cart", "purchase", None]
    assert rows[RETAILROCKET_EVENTS[4]].event_type_raw == "wishlist"
    first = rows[RETAILROCKET_EVENTS[0]]
    assert first.event_time == dt.datetime(2015, 6, 2, 5, 2, 12, 117000)
    assert (first.user_id, first.item_id, first.category, first.category_path) == ("257597", "355908", "12", "1.5.12")
    assert (rows[RETAILROCKET_EVENTS[1]].category, rows[RETAILROCKET_EVENTS[1]].category_path) == ("5", "1.5")
    assert rows[RETAILROCKET_EVENTS[2]].category_path == "1.5.12"


TAOBAO = ["1,2268318,2520377,pv,1511544070", "1,2333346,2520771,pv,1511561733", "2,2576651,149192,fav,1511572885",
          "2,3830808,4181361,cart,1511593493", "3,4365585,2520377,buy,1511596146"]


def test_taobao_fixture_gzipped_and_fav_mapping(spark, tmp_path):
    with gzip.open(tmp_path / "UserBehavior.csv.gz", "wt") as out:  # no header, gzip
        out.write("\n".join(TAOBAO) + "\n")
    raw = _read(spark, **{"input.source": "taobao", "input.path": str(tmp_path)})
    assert raw.missing_optional == ["category_path", "brand", "price", "session_id"]
    rows = {r.raw_line: r for r in raw.rows.collect()}
    assert [rows[line].event_type for line in TAOBAO] == ["view", "view", None, "cart", "purchase"]
    assert rows[TAOBAO[0]].event_time == dt.datetime(2017, 11, 24, 17, 21, 10)
    assert (rows[TAOBAO[0]].user_id, rows[TAOBAO[0]].item_id, rows[TAOBAO[0]].category) == ("1", "2268318", "2520377")
    assert raw.skipped.count() == 0
    mapped = _read(spark, **{"input.source": "taobao", "input.path": str(tmp_path), "input.event_types": {"fav": "cart"}})
    assert mapped.rows.where(F.col("event_type_raw") == "fav").first().event_type == "cart"


# --- the generic adapter ---------------------------------------------------------------------------

PIPE_LINES = ["01/11/2026 10:00|u1|click|sku1|9.99|shoes", "01/11/2026 10:05|u1|basket|sku1|9.99|shoes",
              "01/11/2026 10:07|u1|order|sku1|9.99|shoes", "01/11/2026 10:09|u1|like|sku1|9.99|shoes"]


def test_generic_csv_other_delimiter_no_header(spark, tmp_path):
    (tmp_path / "export_2026-11-01.txt").write_text("\n".join(PIPE_LINES) + "\n")
    mapping = {"files": "export_*.txt", "delimiter": "|", "header": False,
               "columns": ["ts", "uid", "action", "sku", "amount", "cat"],
               "fields": {"event_time": "ts", "user_id": "uid", "event_type": "action", "item_id": "sku",
                          "price": "amount", "category": "cat"},
               "time_format": "dd/MM/yyyy HH:mm", "event_types": {"click": "view", "basket": "cart", "order": "purchase"}}
    raw = _read(spark, **{"input.source": "generic", "input.path": str(tmp_path), "input.mapping": mapping})
    assert raw.missing_optional == ["category_path", "brand", "session_id"]
    rows = {r.raw_line: r for r in raw.rows.collect()}
    assert [rows[line].event_type for line in PIPE_LINES] == ["view", "cart", "purchase", None]
    first = rows[PIPE_LINES[0]]
    assert first.event_time == dt.datetime(2026, 11, 1, 10, 0)
    assert (first.user_id, first.item_id, first.price_raw, first.category) == ("u1", "sku1", "9.99", "shoes")


def test_field_references_that_cannot_resolve_fail_naming_them(spark, tmp_path):
    (tmp_path / "export_2026-11-01.txt").write_text("\n".join(PIPE_LINES) + "\n")
    mapping = {"files": "export_*.txt", "delimiter": "|", "header": False,
               "columns": ["ts", "uid", "action", "sku", "amount", "cat"],
               "fields": {"event_time": "ts", "user_id": {"field": "session_id"}, "event_type": "action",
                          "item_id": "sku"},
               "time_format": "dd/MM/yyyy HH:mm"}
    with pytest.raises(SourceError, match=r"field references \['user_id'\] cannot be resolved"):
        read_source(spark, _cfg(**{"input.source": "generic", "input.path": str(tmp_path), "input.mapping": mapping}))


def test_generic_json_lines(spark, tmp_path):
    (tmp_path / "events.jsonl").write_text(
        '{"when": "2026-11-01T10:00:00Z", "who": 7, "what": "VIEW", "sku": "A1", "amount": 3.5, "ua": "x"}\n'
        '{"when": 1762000000, "who": 8, "what": "cart", "sku": "A2"}\n')
    mapping = {"format": "json", "files": "*.jsonl",
               "fields": {"event_time": "when", "user_id": "who", "event_type": "what", "item_id": "sku",
                          "price": "amount", "brand": "maker"}}
    raw = _read(spark, **{"input.source": "generic", "input.path": str(tmp_path), "input.mapping": mapping})
    assert raw.extra_columns == ["ua"] and "brand" in raw.missing_optional
    rows = sorted(raw.rows.collect(), key=lambda r: r.user_id)
    assert rows[0].event_time == dt.datetime(2026, 11, 1, 10, 0) and rows[0].event_type == "view"
    assert (rows[0].user_id, rows[0].price_raw) == ("7", "3.5")
    assert rows[1].event_time is None and rows[1].event_time_raw == "1762000000"  # not ISO: bad_timestamp later
    assert rows[1].raw_line.startswith('{"when": 1762000000')


def test_generic_parquet_delta_and_table(spark, tmp_path):
    from deltalake import write_deltalake

    import pandas as pd

    frame = pd.DataFrame({"ts": pd.to_datetime(["2026-11-01 10:00", "2026-11-01 10:01"], utc=True).astype("datetime64[us, UTC]"), "customer": [501, 501],
                          "kind": ["view", "cart"], "item": ["i1", "i1"], "price": [10.5, 10.5]})
    (tmp_path / "pq").mkdir()
    frame.to_parquet(tmp_path / "pq" / "part-0.parquet")
    fields = {"event_time": "ts", "user_id": "customer", "event_type": "kind", "item_id": "item", "price": "price"}
    raw = _read(spark, **{"input.source": "generic", "input.path": str(tmp_path / "pq"),
                          "input.mapping": {"format": "parquet", "fields": fields}})
    rows = sorted(raw.rows.collect(), key=lambda r: r.event_time)
    assert [r.event_type for r in rows] == ["view", "cart"]
    assert rows[0].event_time == dt.datetime(2026, 11, 1, 10, 0) and rows[0].user_id == "501"
    assert '"customer":501' in rows[0].raw_line and rows[0].source_file.endswith(".parquet")

    write_deltalake(str(tmp_path / "delta"), frame)
    raw = _read(spark, **{"input.source": "generic", "input.path": str(tmp_path / "delta"),
                          "input.mapping": {"format": "delta", "fields": fields}})
    assert sorted(r.event_type for r in raw.rows.collect()) == ["cart", "view"]

    spark.createDataFrame(frame).createOrReplaceTempView("warehouse_clicks")
    raw = _read(spark, **{"input.source": "generic", "input.path": "warehouse_clicks",
                          "input.mapping": {"format": "table", "fields": fields}})
    assert raw.rows.where(F.col("event_type") == "cart").count() == 1
    assert raw.rows.first().source_file == "table warehouse_clicks"


# --- schema drift and configuration errors ---------------------------------------------------------

REES46_HEADER = "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"


def test_schema_drift_extra_and_missing_columns(spark, tmp_path):
    (tmp_path / "day1.csv").write_text(REES46_HEADER + "\n2026-11-01 10:00:00 UTC,view,100,5,a.b,X,1.00,501,s1\n")
    # A later export: columns reordered, one added (referrer), one optional dropped (brand).
    (tmp_path / "day2.csv").write_text(
        "user_id,event_time,event_type,referrer,product_id,category_id,category_code,price,user_session\n"
        "502,2026-11-02 10:00:00 UTC,cart,google,200,6,c.d,2.00,s2\n")
    raw = _read(spark, **{"input.source": "rees46", "input.path": str(tmp_path)})
    assert (raw.extra_columns, raw.missing_optional) == (["referrer"], ["brand"])
    rows = sorted(raw.rows.collect(), key=lambda r: r.user_id)
    assert [(r.user_id, r.item_id, r.event_type, r.brand, r.malformed) for r in rows] == [
        ("501", "100", "view", "X", None), ("502", "200", "cart", None, None)]
    assert raw.skipped.count() == 2

    (tmp_path / "day3.csv").write_text(
        "event_time,event_type,product_id,price,user_session\n2026-11-03 10:00:00 UTC,view,300,3.00,s3\n")
    with pytest.raises(SourceError, match=r"required column\(s\) user_id \(user_id\) missing .*day3\.csv"):
        _read(spark, **{"input.source": "rees46", "input.path": str(tmp_path)})


@pytest.mark.parametrize("overrides, error, match", [
    ({"input.source": "warehouse"}, SourceError, "input.source must be one of"),
    ({"input.source": "generic"}, SourceError, "input.mapping is empty"),
    ({"input.source": "generic", "input.mapping": {"fields": {"event_time": "t"}}}, SourceError,
     "required field.*event_type, item_id, user_id are not mapped"),
    ({"input.source": "generic", "input.mapping": {"delimeter": ";"}}, SourceError, "unknown key.*delimeter"),
    ({"input.source": "rees46", "input.mapping": {"time_format": "yyyy-MM-dd QQQQQ"}}, SourceError, "time_format"),
    ({"input.source": "taobao", "input.event_types": {"fav": "wishlist"}}, SourceError, "maps to 'wishlist'"),
    ({"input.source": "rees46", "input.from_date": "yesterday"}, SourceError, "input.from_date"),
    ({"input.source": "rees46", "input.path": "/nonexistent/raw"}, FileNotFoundError, "/nonexistent/raw"),
])
def test_configuration_errors_are_named(spark, tmp_path, overrides, error, match):
    (tmp_path / "a.csv").write_text(REES46_HEADER + "\n")
    with pytest.raises(error, match=match):
        _read(spark, **{"input.path": str(tmp_path), **overrides})


# --- the Arrow CSV reader against Spark's ----------------------------------------------------------


def _spark_and_arrow_rows(spark, cfg):
    """The raw rows and skipped-line counts of each feed, read by Spark's reader and by the Arrow reader."""
    from synth import sources

    _, feeds, _ = sources.resolve_spec(cfg)
    limits = sources._Limits(str(cfg.input.path), 65536, 2048)
    spark_rows, spark_skipped, arrow_raw = [], {}, []
    for feed in feeds:
        rows, skipped, _, _ = sources._feed_rows(spark, feed, limits)
        spark_rows += rows.collect()
        for r in skipped.groupBy("kind").count().collect():
            spark_skipped[r.kind] = spark_skipped.get(r.kind, 0) + r["count"]
        listing = sources.Listing(spark)
        files = listing.files(limits.path, feed.files)
        csv_feed, pieces, _, _ = sources._arrow_feed(spark, listing, feed, files, limits, None, None)
        arrow_raw.append((csv_feed, pieces))
    raw = _as_dataframes(spark, sources.RawInput(None, None, tasks=sources._arrow_tasks(spark, arrow_raw)))
    arrow_skipped = {r.kind: r["count"] for r in raw.skipped.groupBy("kind").count().collect()}
    return sorted(map(tuple, spark_rows), key=repr), spark_skipped, sorted(map(tuple, raw.rows.collect()), key=repr), arrow_skipped


def test_arrow_reader_reads_the_hostile_corpus_as_spark_does(spark, tmp_path):
    from test_hostile_inputs import CORPUS, _write

    _write(tmp_path, {name: content for name, (content, _) in CORPUS.items()})
    cfg = _cfg(**{"input.source": "rees46", "input.path": str(tmp_path)})
    spark_rows, spark_skipped, arrow_rows, arrow_skipped = _spark_and_arrow_rows(spark, cfg)
    assert len(arrow_rows) == len(spark_rows) > 20
    assert arrow_rows == spark_rows  # every field, raw line and shape detail
    assert arrow_skipped == spark_skipped


def test_arrow_reader_reads_the_real_samples_as_spark_does(spark):
    for source, path in (("rees46", "rees46/2019-Oct-head.csv"), ("yoochoose", "yoochoose/yoochoose-clicks-100k_test.txt")):
        cfg = _cfg(**{"input.source": source, "input.path": str(shared_data(path))})
        spark_rows, spark_skipped, arrow_rows, arrow_skipped = _spark_and_arrow_rows(spark, cfg)
        assert len(arrow_rows) == len(spark_rows) > 10000
        assert arrow_rows == spark_rows
        assert arrow_skipped == spark_skipped


def test_arrow_reader_cuts_large_files_at_line_starts(spark, tmp_path, monkeypatch):
    """Byte ranges that end mid-line, on a \\r\\n or right before a line: every line read exactly once."""
    from synth import sources

    lines = [f"2026-11-01 10:{m % 60:02d}:00 UTC,view,{100 + m},5,c,b,1.00,{m % 7},s{m % 7}" for m in range(200)]
    text = "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\r\n"
    (tmp_path / "a.csv").write_text(text + "\r\n".join(lines) + "\r\n")
    monkeypatch.setattr(sources, "_SPLIT_BYTES", 97)  # a prime: ranges end everywhere in a line
    cfg = _cfg(**{"input.source": "rees46", "input.path": str(tmp_path)})
    raw = _as_dataframes(spark, read_source(spark, cfg))
    assert len(raw.tasks) > 1
    assert sorted(r.raw_line for r in raw.rows.collect()) == sorted(lines)
    assert raw.rows.where(F.col("malformed").isNotNull()).count() == 0


def test_files_pyarrow_cannot_decompress_are_read_by_spark(spark, tmp_path):
    """Hadoop's .deflate is a zlib stream pyarrow does not detect: such a feed stays on Spark's reader."""
    import zlib

    header = "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
    lines = [f"2026-11-01 10:0{m}:00 UTC,view,{100 + m},5,c,b,1.00,7,s7" for m in range(3)]
    (tmp_path / "a.csv.deflate").write_bytes(zlib.compress(("\n".join([header, *lines]) + "\n").encode()))
    raw = read_source(spark, _cfg(**{"input.source": "rees46", "input.path": str(tmp_path)}))
    assert raw.tasks is None and raw.rows is not None
    assert sorted(r.raw_line for r in raw.rows.collect()) == lines


def test_arrow_reader_reads_quoted_exports_as_spark_does(spark, tmp_path):
    """Exports that quote every field, with delimiters and quotes inside fields and lines of the wrong count."""
    header = '"event_time","event_type","product_id","category_id","category_code","brand","price","user_id","user_session"'
    lines = [f'"2026-11-01 10:{m:02d}:00 UTC","view","{100 + m}","5","a,b","Br X","1.50","{m % 3}","s{m % 3}"'
             for m in range(40)]
    lines += ['"2026-11-01 11:00:00 UTC","view","1","5","c","b","1.5","7"',  # a field short
              '"2026-11-01 11:01:00 UTC","view","1","5","c, d","b","1.5","7","s7",""']  # one too many
    (tmp_path / "quoted.csv").write_text(header + "\n" + "\n".join(lines) + "\n")
    cfg = _cfg(**{"input.source": "rees46", "input.path": str(tmp_path)})
    spark_rows, spark_skipped, arrow_rows, arrow_skipped = _spark_and_arrow_rows(spark, cfg)
    assert len(arrow_rows) == len(spark_rows) == 42
    assert arrow_rows == spark_rows
    assert arrow_skipped == spark_skipped == {"header": 1}


def test_arrow_reader_reads_doubled_quotes_as_rfc_4180_does(spark, tmp_path):
    """Where the readers differ on purpose: Spark's CSV parser (escape character \\) keeps a field with
    doubled quotes as written; the Arrow reader decodes it as RFC 4180 says ("" inside quotes is one ")."""
    header = "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
    line = '2026-11-01 10:00:00 UTC,view,100,5,c,"Br ""X""",1.50,7,s7'
    (tmp_path / "a.csv").write_text(header + "\n" + line + "\n")
    raw = _as_dataframes(spark, read_source(spark, _cfg(**{"input.source": "rees46", "input.path": str(tmp_path)})))
    assert raw.rows.first().brand == 'Br "X"'


def test_raw_lines_read_again_name_a_file_that_changed(spark, tmp_path):
    from synth import _csv

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "part-0.csv").write_text(
        "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n"
        "2026-11-01 10:00:00 UTC,view,1,2,a.b,x,1.0,7,s1\n2026-11-01 10:01:00 UTC,view,2,2,a.b,x,1.0,7,s1\n")
    tasks = read_source(spark, _cfg(**{"input.source": "rees46", "input.path": str(raw)})).tasks
    feed, pieces = tasks[0][0]
    assert _csv.raw_lines(feed, pieces[0], [1]).to_pylist() == ["2026-11-01 10:01:00 UTC,view,2,2,a.b,x,1.0,7,s1"]
    (raw / "part-0.csv").write_text("event_time,event_type,product_id,category_id,category_code,brand,price,"
                                    "user_id,user_session\n")
    with pytest.raises(RuntimeError, match="part-0.csv changed while the clean stage read it"):
        _csv.raw_lines(feed, pieces[0], [1])
