"""The ingestion benchmark (benchmarks/ingest.py): opt-in, `pytest -m benchmark` (or `make benchmark`).

The end-to-end test runs the script at a small size (tiled to 200k events) under local[1] and
local[2] and checks its figures; the tiling checks need no Spark and take under a second.
"""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, shared_data

SCRIPT = ROOT / "benchmarks" / "ingest.py"
pytestmark = pytest.mark.benchmark


def _ingest_module():
    spec = importlib.util.spec_from_file_location("bench_ingest", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiles_do_not_collide_as_duplicates(tmp_path):
    ingest = _ingest_module()
    sample = shared_data("rees46/2019-Oct-head.csv")
    manifest = ingest.tile(sample, 3 * 17_435, tmp_path, copies_per_file=2)
    assert manifest["copies"] == 3 and manifest["files"] == 2 and not manifest["gzip"]
    folder = tmp_path / "rees46-tiled-3x-2pf"
    lines = [line for f in sorted(folder.glob("*.csv")) for line in f.read_text().splitlines()]
    header = sample.read_text().splitlines()[0]
    rows = [line for line in lines if line != header]
    assert len(rows) == manifest["rows"] == 3 * manifest["sample_rows"]
    full = [r.split(",") for r in rows if r.count(",") == 8]
    # Within a copy the sample's 5 exact duplicates stay; across copies nothing repeats.
    assert len(full) - len({tuple(f) for f in full}) == 3 * 5
    users = [{f[7] for f in full if int(f[7]) // ingest.USER_OFFSET == k} for k in range(3)]
    assert all(users) and not (users[0] & users[1])
    sessions = {f[8] for f in full}
    assert any(s.endswith("-t00002") for s in sessions)
    times = sorted({f[0] for f in full})
    assert times[0] == "2019-10-01 00:00:00 UTC" and times[-1] == "2019-10-01 08:30:02 UTC"


def test_skips_cleanly_without_the_shared_data(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--sample", str(tmp_path / "absent.csv"),
                           "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "SKIPPED" in done.stdout


def test_small_benchmark_reports_positive_figures_and_accounting_holds(tmp_path):
    shared_data("rees46/2019-Oct-head.csv")
    out = tmp_path / "ingest.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--events", "200000", "--work-dir", str(tmp_path),
                           "--json", str(out)], capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "TILED" in done.stdout and "local[2]/local[1] throughput" in done.stdout
    report = json.loads(out.read_text())
    assert report["tiled"] is True and report["data"]["rows"] >= 200_000
    assert [run["master"] for run in report["runs"]] == ["local[1]", "local[2]"]
    for run in report["runs"]:
        assert run["cores"] in (1, 2)
        for stage in ("clean", "featurize"):
            s = run["stages"][stage]
            for key in ("events", "seconds", "events_per_s", "events_per_s_per_core", "peak_driver_rss_mib",
                        "peak_workers_rss_mib"):
                assert s[key] > 0, (run["master"], stage, key, s[key])
            assert s["events_per_s_per_core"] == pytest.approx(s["events_per_s"] / run["cores"], rel=1e-3)
            assert f"{run['master']:<12} {stage:<16} {s['events']:>10,}" in done.stdout
        assert run["together"]["events_per_s"] > 0
        # Accounting from the ledger: every tiled raw row is clean, quarantined or a duplicate.
        c = run["ledger"]["clean"]
        assert c["raw"] == report["data"]["rows"] == c["clean"] + c["quarantined"] + c["duplicates"]
        copies = report["data"]["copies"]
        assert c["duplicates"] == 5 * copies  # the sample's 5 exact duplicates, once per copy
        assert c["quarantined.malformed_line"] == copies  # the sample's cut-off last line, once per copy
        assert run["stages"]["featurize"]["events"] == c["clean"]
        assert run["ledger"]["featurize"]["sessions"] > 0
    ratios = report["ratio_2_over_1"]
    assert set(ratios) == {"clean", "featurize", "clean+featurize"} and all(v > 0 for v in ratios.values())


def test_stage_profile_times_every_step_in_one_process(tmp_path):
    shared_data("rees46/2019-Oct-head.csv")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stage_profile.py"), "--events", "35000",
                          "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    steps = dict(re.findall(r"^  (clean map|clean buckets|item map|item buckets|catalogue|user groups) +"
                            r"([\d.]+) s$", out.stdout, re.M))
    # Clean's files hold disjoint user ranges, so the user pass reads user groups (no user shuffle).
    assert len(steps) == 6 and float(steps["clean map"]) > 0 and float(steps["user groups"]) > 0
    events = int(re.search(r"^([\d,]+) events, ", out.stdout, re.M).group(1).replace(",", ""))
    assert 3 * 17_000 < events <= 3 * 17_435  # the clean events of three copies of the sample
    assert re.search(r"^    parquet write +[\d.]+ s +\d+ calls$", out.stdout, re.M)
