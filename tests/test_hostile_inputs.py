"""Hostile raw inputs through the clean stage: every one ends in quarantine with the right reason, in the
duplicate count, or in a clear error; never a crash without a message, never a silent drop.

Most hostile files share one raw folder and one clean run (module scope), checked file by file; the
inputs that cannot be read at all each get their own run and must fail with a message naming the cause.
"""
import gzip
from collections import Counter
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from synth import config
from synth.clean import QuarantineThresholdExceeded
from synth.lake import Lake
from synth.runner import run_stage
from synth.sources import SourceError

HEADER = "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"


def _row(minute: int, user: int, event="view", item=None, brand="BrandX", price="10.00", category_code="cat.a"):
    item = item if item is not None else 100 + minute
    return f"2026-11-01 10:{minute:02d}:00 UTC,{event},{item},5,{category_code},{brand},{price},{user},s{user}"


GOOD = [_row(m, 501) for m in range(6)] + [_row(m, 502, "cart") for m in range(3)]

# file name -> (text or bytes, {reason: count} its data lines must end in; "clean" = events, "duplicate")
CORPUS = {
    "good.csv": (HEADER + "\n" + "\n".join(GOOD) + "\n", {"clean": len(GOOD)}),
    "good_copy.csv": (HEADER + "\n" + "\n".join(GOOD) + "\n", {"duplicate": len(GOOD)}),  # a duplicated file
    "crlf_bom_blank.csv": ("\ufeff" + HEADER + "\r\n" + _row(10, 503) + "\r\n\r\n   \r\n" + _row(11, 503) + "\r\n",
                           {"clean": 2}),
    "quoted.csv": (HEADER + "\n" + _row(12, 504, category_code='"a,b"') + "\n", {"clean": 1}),
    "truncated.csv": (HEADER + "\n" + _row(13, 505) + "\n" + _row(14, 505)[:30], {"clean": 1, "malformed_line": 1}),
    "wrong_delimiter_rows.csv": (HEADER + "\n" + _row(15, 506).replace(",", ";") + "\n"
                                 + _row(16, 506).replace(",", "\t") + "\n", {"malformed_line": 2}),
    "latin1.csv": ((HEADER + "\n" + _row(17, 507, brand="Café") + "\n").encode("latin-1"), {"malformed_line": 1}),
    "mojibake.csv": (HEADER + "\n" + _row(18, 508, brand="Caf\ufffd") + "\n", {"malformed_line": 1}),
    "nul_bytes.csv": (HEADER + "\n" + _row(19, 509, brand="Bra\x00nd") + "\n", {"malformed_line": 1}),
    "huge.csv": (HEADER + "\n" + _row(20, 510, brand="B" * 5000) + "\n"  # one huge field
                 + _row(21, 510, category_code="c" * 70000) + "\n"  # one huge line
                 + "x" + "," * 30000 + "\n", {"malformed_line": 3}),  # 30001 fields
    "nulls.csv": (HEADER + "\n" + ",,,,,,,,\n" + "2026-11-01 10:22:00 UTC,,,,,,,,\n"
                  + "2026-11-01 10:22:00 UTC,view,,,,,,,\n" + "2026-11-01 10:22:00 UTC,view,,,,,,511,\n"
                  + "2026-11-01 10:22:00 UTC,view,7,,,,,511,\n",
                  {"missing_time": 1, "unknown_event_type": 1, "missing_user": 1, "missing_item": 1, "bad_price": 1}),
    "comment.csv": (HEADER + "\n# exported by tool v1\n" + _row(23, 512) + "\n", {"malformed_line": 1, "clean": 1}),
    "empty.csv": ("", {}),
    "header_only.csv": (HEADER + "\n", {}),
    "drift.csv": ("user_id,event_time,event_type,referrer,product_id,category_id,category_code,price,user_session\n"
                  "513,2026-11-01 10:24:00 UTC,view,google,400,6,c.d,2.00,s513\n", {"clean": 1}),
    "compressed.csv.gz": (gzip.compress((HEADER + "\n" + _row(25, 514) + "\n").encode()), {"clean": 1}),
}
DETAILS = {  # file -> words every quarantine detail of that file contains
    "truncated.csv": "expected 9 fields",
    "wrong_delimiter_rows.csv": "wrong delimiter",
    "latin1.csv": "not valid UTF-8",
    "mojibake.csv": "U+FFFD",
    "nul_bytes.csv": "NUL bytes",
    "comment.csv": "expected 9 fields",
}


def _config(tmp: Path, **overrides):
    return config.load(overrides={
        "run.id": "hostile", "lake.root": str(tmp / "lake"), "input.path": str(tmp / "raw"),
        "input.source": "rees46", "clean.pseudonym_key_file": str(tmp / "secrets" / "key"),
        "spark.master": "local[2]", "spark.shuffle_partitions": 4, **overrides})


def _write(folder: Path, files: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())


def _balanced(counts: dict) -> bool:
    return counts["raw"] == counts["clean"] + counts["quarantined"] + counts["duplicates"]


@pytest.fixture(scope="module")
def corpus_run(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    _write(tmp / "raw", {name: content for name, (content, _) in CORPUS.items()})
    cfg = _config(tmp, **{"clean.max_quarantine_share": 1.0})
    lake = Lake(spark, cfg.lake.root)
    counts = run_stage("clean", cfg, spark, lake)
    quarantine = [r.asDict() for r in lake.read("quarantine").df.select(
        F.regexp_extract("source_file", r"([^/]+)$", 1).alias("file"), "reason", "detail").collect()]
    return counts, quarantine


def test_corpus_every_line_is_accounted_for(corpus_run):
    counts, _ = corpus_run
    expected = Counter()
    for _, outcomes in CORPUS.values():
        expected.update(outcomes)
    assert counts["raw"] == sum(expected.values())  # no line silently dropped
    assert _balanced(counts)
    assert counts["clean"] == expected["clean"]
    assert counts["duplicates"] == expected["duplicate"]
    assert counts["skipped_header_lines"] == len(CORPUS) - 1  # every file but the empty one
    assert counts["skipped_blank_lines"] == 2


def test_corpus_quarantine_reasons_by_file(corpus_run):
    _, quarantine = corpus_run
    got = Counter((r["file"], r["reason"]) for r in quarantine)
    expected = Counter({(name, reason): n for name, (_, outcomes) in CORPUS.items()
                        for reason, n in outcomes.items() if reason not in ("clean", "duplicate")})
    assert got == expected


def test_corpus_quarantine_details_name_the_problem(corpus_run):
    _, quarantine = corpus_run
    for name, words in DETAILS.items():
        details = [r["detail"] for r in quarantine if r["file"] == name and r["reason"] == "malformed_line"]
        assert details and all(words in d for d in details), (name, details)
    huge = sorted(r["detail"] for r in quarantine if r["file"] == "huge.csv")
    assert any("column 'brand' is 5000 characters" in d for d in huge)
    assert any("above input.max_line_chars" in d for d in huge)
    assert any("found 30001" in d for d in huge)


def test_json_lines_with_broken_objects(spark, tmp_path):
    lines = {
        '{"when": "2026-11-01T10:00:00Z", "who": 7, "what": "view", "sku": "A1", "amount": 3.5}': "clean",
        '{"when": "2026-11-01T10:01:00Z", "who": 7, "what": "cart", "sku": "A1", "amount": 3.5}': "clean",
        '{"when": "2026-11-01T10:02:00Z", "who": 7, "what": "view"': "malformed_line",  # truncated
        '[1, 2, 3]': "malformed_line",
        'null': "malformed_line",
        '{}': "missing_time",
        '{"when": null, "who": null, "what": null, "sku": null, "amount": null}': "missing_time",
        '{"when": "soon", "who": 7, "what": "view", "sku": "A1", "amount": 3.5}': "bad_timestamp",
        '{"when": "2026-11-01T10:03:00Z", "who": 7, "what": "view", "sku": "A1", "amount": "n/a"}': "bad_price",
    }
    _write(tmp_path / "raw", {"events.jsonl": "\n".join(lines) + "\n\n"})
    mapping = {"format": "json", "files": "*.jsonl",
               "fields": {"event_time": "when", "user_id": "who", "event_type": "what", "item_id": "sku",
                          "price": "amount"}}
    cfg = _config(tmp_path, **{"input.source": "generic", "input.mapping": mapping, "clean.max_quarantine_share": 1.0})
    lake = Lake(spark, cfg.lake.root)
    counts = run_stage("clean", cfg, spark, lake)
    assert counts["raw"] == len(lines) and _balanced(counts)
    assert counts["skipped_blank_lines"] == 1
    by_line = {r.raw_line: r.reason for r in lake.read("quarantine").df.collect()}
    assert by_line == {line: reason for line, reason in lines.items() if reason != "clean"}


@pytest.mark.parametrize("files, error, match", [
    ({"a.csv": "", "b.csv": ""}, SourceError, "all 2 input file.* are empty"),
    ({"a.csv": HEADER + "\n\n"}, ValueError, "no raw rows"),
    ({"a.csv": (HEADER + "\n" + GOOD[0] + "\n").encode("utf-16")}, SourceError,
     "required column.*wrong encoding"),
    ({"a.csv": (HEADER + "\n" + GOOD[0] + "\n").replace(",", ";")}, SourceError, "wrong delimiter"),
    ({"a.csv": HEADER.replace(",user_id", "") + "\n" + GOOD[0] + "\n"}, SourceError,
     r"required column\(s\) user_id .*a\.csv"),
    ({"notes.txt": "not a clickstream\n"}, SourceError, r"rees46: no input files matching '\*\.csv\*'"),
], ids=["empty files", "only a header", "utf-16", "wrong delimiter", "missing column", "no matching files"])
def test_unreadable_inputs_fail_with_a_message(spark, tmp_path, files, error, match):
    _write(tmp_path / "raw", files)
    cfg = _config(tmp_path)
    lake = Lake(spark, cfg.lake.root)
    with pytest.raises(error, match=match):
        run_stage("clean", cfg, spark, lake)
    assert not lake.exists("events")


def test_mostly_bad_input_fails_after_quarantining_every_line(spark, tmp_path):
    # Taobao rows (no header) written with the wrong delimiter: every line is one field.
    lines = [f"{u};{1000 + u};77;pv;1511544070" for u in range(20)]
    _write(tmp_path / "raw", {"UserBehavior.csv": "\n".join(lines) + "\n"})
    cfg = _config(tmp_path, **{"input.source": "taobao"})
    lake = Lake(spark, cfg.lake.root)
    with pytest.raises(QuarantineThresholdExceeded, match="20 of 20 raw rows .* clean.max_quarantine_share"):
        run_stage("clean", cfg, spark, lake)
    rows = lake.read("quarantine").df.collect()
    assert sorted(r.raw_line for r in rows) == sorted(lines)
    assert all(r.reason == "malformed_line" and "wrong delimiter" in r.detail for r in rows)
    assert not lake.exists("events")
