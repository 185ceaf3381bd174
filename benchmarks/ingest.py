#!/usr/bin/env python
"""Ingestion benchmark: clean + featurize throughput and memory on a tiled REES46 sample.

The shared REES46 sample (../shared/data/rees46/2019-Oct-head.csv, 17,434 real events) is TILED:
copied N times with user ids, product ids and sessions offset per copy and time shifted by the
sample span per copy, so the copies never collide as duplicates. Every figure this script prints
is measured on tiled data and says so.

For each Spark master (local[1], then local[2]) a fresh Python process builds the SparkSession and
runs the clean stage then the featurize stage through synth.runner.run_stage on a fresh lake; the
parent samples /proc every ~0.5 s for the peak RSS of the driver (the Python process and its JVM)
and of the Python workers (pyspark.daemon and its forked workers). Results go to stdout as a table
and to <work-dir>/ingest-<timestamp>.json.

    .venv/bin/python benchmarks/ingest.py --events 5000000
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE = ROOT.parent / "shared" / "data" / "rees46" / "2019-Oct-head.csv"
DEFAULT_WORK = ROOT / "work" / "bench"
STAGES = ("clean", "featurize")
MARKER = "@@bench "
TIME_FORMAT = "%Y-%m-%d %H:%M:%S UTC"
# Per-copy id offsets: larger than any id in the sample (products < 1e8, users < 1e9), so the
# ids of different copies can never coincide.
PRODUCT_OFFSET = 100_000_000
USER_OFFSET = 1_000_000_000
TARGET_EVENTS_PER_CORE = 150_000
TARGET_SCALING = 1.8


# --------------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------------

def read_sample(path: Path) -> tuple[str, list[str]]:
    """The header and the data lines of a REES46 CSV file (the last one may be cut off)."""
    lines = path.read_text().splitlines()
    return lines[0], [line for line in lines[1:] if line.strip()]


def sample_span(lines: list[str]) -> tuple[dt.datetime, dt.datetime]:
    stamps = set()
    for line in lines:
        stamp = line.split(",", 1)[0]
        try:
            stamps.add(dt.datetime.strptime(stamp, TIME_FORMAT))
        except ValueError:
            continue
    return min(stamps), max(stamps)


class Tiler:
    """Makes copy k of the sample: ids offset by k, sessions suffixed, time shifted by k spans.

    Copy 0 is the sample itself. Lines keep their shape: the truncated last line of the sample stays
    truncated in every copy (and is quarantined as malformed in every copy), the exact duplicate
    rows stay duplicates within their copy, the bad prices stay bad.
    """

    def __init__(self, lines: list[str]):
        first, last = sample_span(lines)
        # Timestamps have 1 s resolution: the sample covers [first, last], i.e. span + 1 s.
        self.shift = (last - first) + dt.timedelta(seconds=1)
        self.stamps = {}
        self.rows = []
        for line in lines:
            fields = line.split(",")
            stamp = fields[0]
            if stamp not in self.stamps:
                try:
                    self.stamps[stamp] = dt.datetime.strptime(stamp, TIME_FORMAT)
                except ValueError:
                    self.stamps[stamp] = None
            self.rows.append(fields)
        self.full = [(f[0], f[1], int(f[2]), ",".join(f[3:7]), int(f[7]), f[8])
                     for f in self.rows if len(f) == 9 and f[2].isdigit() and f[7].isdigit()]
        self.other = [f for f in self.rows if not (len(f) == 9 and f[2].isdigit() and f[7].isdigit())]

    def _stamp_map(self, k: int) -> dict[str, str]:
        return {s: (s if t is None else (t + k * self.shift).strftime(TIME_FORMAT))
                for s, t in self.stamps.items()}

    def copy(self, k: int) -> list[str]:
        """The lines of copy k (the well-formed rows first, then the odd ones, e.g. the cut-off line)."""
        if k == 0:
            return [",".join(f) for f in self.full_fields()] + [",".join(f) for f in self.other]
        stamps = self._stamp_map(k)
        p_off, u_off, suffix = k * PRODUCT_OFFSET, k * USER_OFFSET, f"-t{k:05d}"
        out = [f"{stamps[t]},{e},{p + p_off},{mid},{u + u_off},{s}{suffix if s else ''}"
               for t, e, p, mid, u, s in self.full]
        for f in self.other:  # best effort on whatever fields a broken line has
            g = list(f)
            g[0] = stamps.get(g[0], g[0])
            if len(g) > 2 and g[2].isdigit():
                g[2] = str(int(g[2]) + p_off)
            if len(g) > 7 and g[7].isdigit():
                g[7] = str(int(g[7]) + u_off)
            if len(g) > 8 and g[8]:
                g[8] += suffix
            out.append(",".join(g))
        return out

    def full_fields(self):
        for t, e, p, mid, u, s in self.full:
            yield (t, e, str(p), mid, str(u), s)


def tile(sample: Path, events: int, work_dir: Path, copies_per_file: int, force: bool = False) -> dict:
    """Tile `sample` into <work_dir>/rees46-tiled-<copies>x/ (cached; reused when complete)."""
    header, lines = read_sample(sample)
    copies = max(1, math.ceil(events / len(lines)))
    folder = work_dir / f"rees46-tiled-{copies}x-{copies_per_file}pf"
    manifest_path = folder / "manifest.json"
    if manifest_path.exists() and not force:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("sample_bytes") == sample.stat().st_size:
            manifest["cached"] = True
            return manifest
    started = time.perf_counter()
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tiler = Tiler(lines)
    files = []
    for start in range(0, copies, copies_per_file):
        name = f"part-{start // copies_per_file:05d}.csv"
        with open(tmp / name, "w", buffering=1 << 22) as out:
            out.write(header + "\n")
            for k in range(start, min(start + copies_per_file, copies)):
                out.write("\n".join(tiler.copy(k)))
                out.write("\n")
        files.append(name)
    manifest = {
        "sample": str(sample), "sample_bytes": sample.stat().st_size, "sample_rows": len(lines),
        "copies": copies, "rows": copies * len(lines), "files": len(files), "copies_per_file": copies_per_file,
        "bytes": sum((tmp / f).stat().st_size for f in files),
        "shift_seconds": tiler.shift.total_seconds(), "product_offset": PRODUCT_OFFSET,
        "user_offset": USER_OFFSET, "session_suffix": "-t<copy:05d> (copy 0 unchanged)",
        "seconds_to_write": round(time.perf_counter() - started, 2), "gzip": False,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    manifest["cached"] = False
    return manifest


# --------------------------------------------------------------------------------------------
# /proc sampling
# --------------------------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    # comm may hold spaces or parentheses: split after the last ')'.
    return text[text.rindex(")") + 2:].split()


def process_tree(root: int) -> list[int]:
    """root and all its descendants (scanning /proc once)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def _cmdline(pid: int) -> str:
    return (_read(f"/proc/{pid}/cmdline") or "").replace("\0", " ")


def _rss_kib(pid: int) -> int:
    match = re.search(r"^VmRSS:\s+(\d+)", _read(f"/proc/{pid}/status") or "", re.M)
    return int(match.group(1)) if match else 0


def _pss_kib(pid: int) -> int:
    match = re.search(r"^Pss:\s+(\d+)", _read(f"/proc/{pid}/smaps_rollup") or "", re.M)
    return int(match.group(1)) if match else 0


def is_worker(pid: int) -> bool:
    """A Python worker or its daemon (`python -m <daemon module> pyspark.worker`, or a lone worker); the
    JVM's own command line may name pyspark.daemon too (--conf spark.python.daemon.module=...)."""
    return "pyspark.worker" in (_read(f"/proc/{pid}/cmdline") or "").split("\0")


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used by root's tree: live processes plus the children they reaped."""
    total = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields:
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return total / _CLK_TCK


def load_average() -> list[float]:
    return [float(x) for x in (_read("/proc/loadavg") or "0 0 0").split()[:3]]


class Sampler(threading.Thread):
    """Peak RSS (and PSS) of the driver (Python + JVM) and of the Python workers, per stage."""

    def __init__(self, root: int, interval: float):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.stage = "startup"
        self.peaks: dict[str, dict[str, int]] = {}
        self.loads: dict[str, list[float]] = {}
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.sample()
            except Exception:  # a process vanishing between reads is normal
                pass
            self.stop_event.wait(self.interval)

    def sample(self) -> None:
        driver_rss = workers_rss = workers_pss = n_workers = 0
        for pid in process_tree(self.root):
            if is_worker(pid):
                workers_rss += _rss_kib(pid)
                workers_pss += _pss_kib(pid)
                n_workers += 1
            else:
                driver_rss += _rss_kib(pid)
        now = {"driver_rss_kib": driver_rss, "workers_rss_kib": workers_rss,
               "workers_pss_kib": workers_pss, "workers": n_workers}
        for key in (self.stage, "all"):
            peak = self.peaks.setdefault(key, {k: 0 for k in now} | {"samples": 0})
            for k, v in now.items():
                peak[k] = max(peak[k], v)
            peak["samples"] += 1
        self.loads.setdefault(self.stage, []).append(load_average()[0])


# --------------------------------------------------------------------------------------------
# The child: one SparkSession, clean then featurize
# --------------------------------------------------------------------------------------------

def code_digest(root: Path = ROOT) -> str:
    """A short hash of the pipeline code (synth/ and schemas/), to tell runs of different code apart."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted([*root.glob("synth/*.py"), *root.glob("synth/*.yaml"), *root.glob("schemas/*")]):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def child_main(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    import synth
    from synth import config
    from synth.lake import Lake
    from synth.runner import run_stage, setup_logging
    from synth.spark import build_session

    if args.pin_cpus:
        # Pin before the JVM starts: it and the Python workers inherit the affinity, so local[1] really
        # gets one core (without it the JVM's GC/JIT threads and the Python writer use a second one).
        os.sched_setaffinity(0, set(args.pin_cpus))
    overrides = {
        "run.id": "bench",
        "input.source": "rees46",
        "input.path": args.input,
        "lake.root": args.lake,
        "spark.master": args.master,
        "spark.shuffle_partitions": args.shuffle_partitions,
        "spark.driver_memory": args.driver_memory,
        "clean.max_quarantine_share": 0.5,
        "clean.pseudonym_key_file": str(Path(args.lake).parent / "bench-pseudonym.key"),
    }
    if args.events_per_task:
        overrides["spark.events_per_task"] = args.events_per_task
    if args.driver_java_options:
        overrides["spark.driver_java_options"] = args.driver_java_options
    cfg = config.load(overrides=overrides)
    setup_logging()
    me = os.getpid()
    result: dict = {"master": args.master, "config": overrides, "stages": {},
                    "cpu_affinity": sorted(os.sched_getaffinity(0)),
                    "code": {"synth": str(Path(synth.__file__).parent), "digest": code_digest()}}
    clock = time.perf_counter()
    spark = build_session(cfg)
    result["session_start_seconds"] = round(time.perf_counter() - clock, 2)
    result["default_parallelism"] = spark.sparkContext.defaultParallelism
    lake = Lake(spark, cfg.lake.root, cfg.lake.engine)
    for stage in STAGES:
        print(f"{MARKER}stage {stage}", flush=True)
        load0, cpu0 = load_average(), tree_cpu_seconds(me)
        clock, wall_clock = time.perf_counter(), time.time()
        counts = run_stage(stage, cfg, spark, lake, force=True)
        seconds = time.perf_counter() - clock
        result["stages"][stage] = {
            "seconds": round(seconds, 3), "seconds_realtime_clock": round(time.time() - wall_clock, 3),
            "cpu_seconds": round(tree_cpu_seconds(me) - cpu0, 2),
            "load_start": load0, "load_end": load_average(), "counts": counts}
        print(f"{MARKER}done {stage} {seconds:.1f}", flush=True)
    print(f"{MARKER}stage ledger", flush=True)
    ledger = lake.read("pipeline_runs").df.where("run_id = 'bench'").select("stage", "counts").collect()
    result["ledger"] = {r.stage: dict(r.counts or {}) for r in ledger}
    Path(args.result).write_text(json.dumps(result, indent=2, default=str))
    spark.stop()
    return 0


# --------------------------------------------------------------------------------------------
# The parent: tile, run one child per master, sample, report
# --------------------------------------------------------------------------------------------

def cores_of(master: str) -> int:
    match = re.fullmatch(r"local\[(\d+)\]", master)
    if match:
        return int(match.group(1))
    if master == "local":
        return 1
    return os.cpu_count() or 1


def run_master(args, master: str, tiles: Path, stamp: str, shuffle_partitions: int, round_: int = 1) -> dict:
    tag = re.sub(r"[^A-Za-z0-9]+", "", master) + (f"-r{round_}" if args.repeat > 1 else "")
    lake = args.work_dir / f"lake-{stamp}-{tag}"
    shutil.rmtree(lake, ignore_errors=True)
    result_path = args.work_dir / f"child-{stamp}-{tag}.json"
    log_path = args.work_dir / "logs" / f"ingest-{stamp}-{tag}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--master", master,
               "--input", str(tiles), "--lake", str(lake), "--result", str(result_path),
               "--shuffle-partitions", str(shuffle_partitions), "--driver-memory", args.driver_memory,
               "--events-per-task", str(args.events_per_task)]
    if args.driver_java_options:
        command.append(f"--driver-java-options={args.driver_java_options}")
    if args.pin:
        available = sorted(os.sched_getaffinity(0))
        if cores_of(master) > len(available):
            raise SystemExit(f"--pin: {master} needs {cores_of(master)} CPUs, this process may use {available}")
        command += ["--pin-cpus", ",".join(map(str, available[:cores_of(master)]))]
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if args.conf:
        env["PYSPARK_SUBMIT_ARGS"] = " ".join(f"--conf {c}" for c in args.conf) + " pyspark-shell"
    print(f"\n== {master}: fresh process, lake {lake}, log {log_path}", flush=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT)
        sampler = Sampler(child.pid, args.sample_interval)
        sampler.start()
        for line in child.stdout:
            if line.startswith(MARKER):
                words = line[len(MARKER):].split()
                if words[0] == "stage":
                    sampler.stage = words[1]
                elif words[0] == "done":
                    print(f"   {master} {words[1]} finished in {float(words[2]):.1f} s", flush=True)
                continue
            print(f"   [{master}] {line.rstrip()}", flush=True)
        rc = child.wait()
        sampler.stop_event.set()
        sampler.join()
    if rc != 0 or not result_path.exists():
        tail = log_path.read_text().splitlines()[-40:]
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"benchmark child for {master} failed (exit {rc}); full log: {log_path}")
    result = json.loads(result_path.read_text())
    result_path.unlink()
    result["total_seconds"] = round(time.perf_counter() - started, 2)
    result["cores"] = cores_of(master)
    result["log"] = str(log_path)
    result["commits"] = parse_commits(log_path)
    for stage, figures in result["stages"].items():
        peak = sampler.peaks.get(stage, {})
        figures["peak_driver_rss_mib"] = round(peak.get("driver_rss_kib", 0) / 1024, 1)
        figures["peak_workers_rss_mib"] = round(peak.get("workers_rss_kib", 0) / 1024, 1)
        figures["peak_workers_pss_mib"] = round(peak.get("workers_pss_kib", 0) / 1024, 1)
        figures["peak_workers"] = peak.get("workers", 0)
        figures["memory_samples"] = peak.get("samples", 0)
        loads = sampler.loads.get(stage, [])
        figures["load1_mean"] = round(sum(loads) / len(loads), 2) if loads else None
    overall = sampler.peaks.get("all", {})
    result["peak_driver_rss_mib"] = round(overall.get("driver_rss_kib", 0) / 1024, 1)
    result["peak_workers_rss_mib"] = round(overall.get("workers_rss_kib", 0) / 1024, 1)
    if not args.keep_lake:
        shutil.rmtree(lake, ignore_errors=True)
    return result


_COMMIT = re.compile(r"committed (\S+) version \d+: (\d+) rows in (\d+) files \((\w+):\S+\) in ([\d.]+) s")


def parse_commits(log_path: Path) -> list[dict]:
    """The lake commits of the run, from its log: table, rows, files, stage, seconds."""
    commits = []
    for line in log_path.read_text(errors="replace").splitlines():
        match = _COMMIT.search(line)
        if match:
            table, rows, files, stage, seconds = match.groups()
            commits.append({"table": table, "rows": int(rows), "files": int(files), "stage": stage,
                            "seconds": float(seconds)})
    return commits


def figures(results: list[dict]) -> None:
    """Add events, events/s and events/s/core to every stage and to clean+featurize together."""
    for run in results:
        ledger = run["ledger"]
        raw = ledger["clean"]["raw"]
        events = {"clean": raw, "featurize": ledger["clean"]["clean"]}
        for stage in STAGES:
            s = run["stages"][stage]
            s["events"] = events[stage]
            s["events_per_s"] = round(s["events"] / s["seconds"], 1)
            s["events_per_s_per_core"] = round(s["events_per_s"] / run["cores"], 1)
            s["events_per_cpu_s"] = round(s["events"] / s["cpu_seconds"], 1) if s["cpu_seconds"] else None
            s["cores_used"] = round(s["cpu_seconds"] / s["seconds"], 2)
        seconds = sum(run["stages"][s]["seconds"] for s in STAGES)
        run["together"] = {
            "events": raw, "seconds": round(seconds, 3), "events_per_s": round(raw / seconds, 1),
            "events_per_s_per_core": round(raw / seconds / run["cores"], 1),
            "cpu_seconds": round(sum(run["stages"][s]["cpu_seconds"] for s in STAGES), 2),
            "cores_used": round(sum(run["stages"][s]["cpu_seconds"] for s in STAGES) / seconds, 2),
            "peak_driver_rss_mib": max(run["stages"][s]["peak_driver_rss_mib"] for s in STAGES),
            "peak_workers_rss_mib": max(run["stages"][s]["peak_workers_rss_mib"] for s in STAGES),
            "peak_workers_pss_mib": max(run["stages"][s]["peak_workers_pss_mib"] for s in STAGES),
        }


def _by_cores(results: list[dict]) -> dict[int, list[dict]]:
    by_cores: dict[int, list] = {}
    for run in results:
        by_cores.setdefault(run["cores"], []).append(run)
    return by_cores


def median_runs(results: list[dict]) -> dict[int, dict]:
    """Per core count, the run with the median clean+featurize throughput (the lower middle one of an
    even count): with --repeat, what the targets are checked on."""
    return {cores: sorted(runs, key=lambda r: r["together"]["events_per_s"])[(len(runs) - 1) // 2]
            for cores, runs in _by_cores(results).items()}


def ratios(results: list[dict]) -> dict:
    """local[2] over local[1] throughput, per stage and together, of the median runs (with --repeat:
    medians of each stage over the rounds)."""
    by_cores = _by_cores(results)
    if 1 not in by_cores or 2 not in by_cores:
        return {}

    def median(runs, value):
        values = sorted(value(r) for r in runs)
        return values[(len(values) - 1) // 2]

    one, two = by_cores[1], by_cores[2]
    out = {stage: round(median(two, lambda r: r["stages"][stage]["events_per_s"])
                        / median(one, lambda r: r["stages"][stage]["events_per_s"]), 3) for stage in STAGES}
    out["clean+featurize"] = round(median(two, lambda r: r["together"]["events_per_s"])
                                   / median(one, lambda r: r["together"]["events_per_s"]), 3)
    return out


def round_ratios(results: list[dict]) -> list[float]:
    """The clean+featurize ratio of each round's local[2] run over the same round's local[1] run."""
    rounds: dict[int, dict] = {}
    for run in results:
        rounds.setdefault(run.get("round", 1), {})[run["cores"]] = run
    return [round(r[2]["together"]["events_per_s"] / r[1]["together"]["events_per_s"], 3)
            for _, r in sorted(rounds.items()) if 1 in r and 2 in r]


def print_report(manifest: dict, results: list[dict], scale: dict, load_now: list[float]) -> None:
    print(f"\nIngestion benchmark on TILED data: the REES46 sample ({manifest['sample_rows']:,} events) "
          f"copied {manifest['copies']}x = {manifest['rows']:,} raw events in {manifest['files']} files "
          f"({manifest['bytes'] / 2**20:.0f} MiB, uncompressed); per copy user ids +{USER_OFFSET:,}, product ids "
          f"+{PRODUCT_OFFSET:,}, sessions suffixed, time +{manifest['shift_seconds']:.0f} s.")
    header = (f"{'master':<12} {'stage':<16} {'events':>10} {'seconds':>8} {'events/s':>10} {'ev/s/core':>10} "
              f"{'ev/CPU-s':>9} {'CPU used':>8} {'driver RSS':>11} {'workers RSS':>12} {'workers PSS':>12} {'load1':>11}")
    print(header)
    print("-" * len(header))
    for run in results:
        name = run["master"] + (f" #{run['round']}" if run.get("rounds", 1) > 1 else "")
        for stage in (*STAGES, "clean+featurize"):
            s = run["together"] if stage == "clean+featurize" else run["stages"][stage]
            if stage == "clean+featurize":
                loads = [run["stages"][x]["load_start"][0] for x in STAGES] + [run["stages"]["featurize"]["load_end"][0]]
                load = f"{loads[0]:.2f}-{loads[-1]:.2f}"
                per_cpu = f"{s['events'] / s['cpu_seconds']:.0f}" if s["cpu_seconds"] else "-"
            else:
                load = f"{s['load_start'][0]:.2f}-{s['load_end'][0]:.2f}"
                per_cpu = f"{s['events_per_cpu_s']:.0f}" if s["events_per_cpu_s"] else "-"
            print(f"{name:<12} {stage:<16} {s['events']:>10,} {s['seconds']:>8.1f} {s['events_per_s']:>10,.0f} "
                  f"{s['events_per_s_per_core']:>10,.0f} {per_cpu:>9} {s['cores_used']:>8.2f} {s['peak_driver_rss_mib']:>8.0f} MiB "
                  f"{s['peak_workers_rss_mib']:>8.0f} MiB {s['peak_workers_pss_mib']:>8.0f} MiB {load:>11}")
    print("(ev/CPU-s: events per CPU second of driver + JVM + workers; CPU used: those CPU seconds / wall "
          "seconds, i.e. the cores the run actually got; load1: 1-min load average at stage start-end; "
          "RSS/PSS: peaks sampled from /proc)")
    for run in results:
        for stage in STAGES:
            s = run["stages"][stage]
            other = s.get("seconds_realtime_clock")
            if other and abs(other - s["seconds"]) > max(2.0, 0.01 * s["seconds"]):
                print(f"NOTE {run['master']} {stage}: the monotonic clock measured {s['seconds']:.1f} s but the "
                      f"wall clock {other:.1f} s (clock step or VM pause); the table uses the monotonic clock")
    for run in results:
        c = run["ledger"]["clean"]
        name = run["master"] + (f" #{run['round']}" if run.get("rounds", 1) > 1 else "")
        print(f"{name}: CPU affinity {run.get('cpu_affinity', '?')}; ledger raw {c['raw']:,} = clean {c['clean']:,} + quarantined {c['quarantined']:,} "
              f"+ duplicates {c['duplicates']:,}; featurize {run['ledger']['featurize']}; "
              f"session start {run['session_start_seconds']:.1f} s")
        print(f"{name}: lake commits (wall s, incl. computing what they write): " + ", ".join(
            f"{c['stage']}/{c['table']} {c['seconds']:.1f} ({c['files']} files)" for c in run["commits"]))
    digests = {run["code"]["digest"] for run in results}
    print(f"code: {results[0]['code']['synth']} digest {', '.join(sorted(digests))}"
          + (" -- WARNING: the code changed between the runs; the ratio compares different code"
             if len(digests) > 1 else ""))
    repeated = any(run.get("rounds", 1) > 1 for run in results)
    if scale:
        print(("local[2]/local[1] throughput, medians over the rounds: " if repeated else
               "local[2]/local[1] throughput: ") + ", ".join(f"{k} {v:.2f}x" for k, v in scale.items()))
        if repeated:
            print("clean+featurize ratio of each round: " + ", ".join(f"{r:.2f}x" for r in round_ratios(results)))
    print("Targets (on tiled data" + (", median runs):" if repeated else "):"))
    for run in median_runs(results).values():
        got = run["together"]["events_per_s_per_core"]
        verdict = "MET" if got >= TARGET_EVENTS_PER_CORE else "NOT MET"
        print(f"  {run['master']}: clean+featurize {got:,.0f} events/s/core vs >= {TARGET_EVENTS_PER_CORE:,}: {verdict}")
    if scale:
        got = scale["clean+featurize"]
        print(f"  scaling 1 -> 2 cores {got:.2f}x vs >= {TARGET_SCALING}x: "
              f"{'MET' if got >= TARGET_SCALING else 'NOT MET'}")
    print(f"load average now {load_now[0]:.2f} {load_now[1]:.2f} {load_now[2]:.2f} "
          f"on {os.cpu_count()} CPUs (the machine is shared: high load lowers every figure)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Opt-in ingestion benchmark: tiles the shared REES46 sample to --events events and "
                    "measures the clean and featurize stages under local[1] and local[2] (events/s, "
                    "events/s per core, peak driver and worker memory, the 2-core/1-core ratio). "
                    "All figures are on tiled data.")
    parser.add_argument("--events", type=int, default=5_000_000,
                        help="tile the sample to at least this many raw events [default: %(default)s]")
    parser.add_argument("--masters", default="local[1],local[2]",
                        help="comma-separated Spark masters, one fresh process each [default: %(default)s]")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds over the masters, alternating them (local[1], local[2], local[1], ...); "
                             "the targets are checked on the median runs and the ratio on the medians, "
                             "which a shared machine's passing load moves less than single runs [default: 1]")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK,
                        help="tiles cache, lakes, logs and the JSON result [default: ./work/bench]")
    parser.add_argument("--sample", type=Path, default=DEFAULT_SAMPLE,
                        help="the REES46 sample to tile [default: ../shared/data/rees46/2019-Oct-head.csv]")
    parser.add_argument("--copies-per-file", type=int, default=16,
                        help="sample copies per tiled CSV file (~37 MiB at 16) [default: %(default)s]")
    parser.add_argument("--shuffle-partitions", type=int, default=0,
                        help="spark.shuffle_partitions (0 = one per ~250k events, even, at least 4)")
    parser.add_argument("--driver-memory", default="4g", help="spark.driver_memory [default: %(default)s]")
    parser.add_argument("--driver-java-options", default=None,
                        help="spark.driver_java_options, e.g. '-XX:-DontCompileHugeMethods -XX:TieredStopAtLevel=1' "
                             "(pass it as --driver-java-options=...) [default: the pipeline's]")
    parser.add_argument("--events-per-task", type=int, default=0,
                        help="spark.events_per_task, events per task of the Arrow steps (0 = the pipeline's default)")
    parser.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Spark setting for the children (repeatable), e.g. spark.sql.adaptive.enabled=false")
    parser.add_argument("--sample-interval", type=float, default=0.5,
                        help="seconds between /proc memory samples [default: %(default)s]")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the figures [default: <work-dir>/ingest-<timestamp>.json]")
    parser.add_argument("--keep-lake", action="store_true", help="keep each run's lake (deleted by default)")
    parser.add_argument("--retile", action="store_true", help="rewrite the tiles even when cached")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="pin each run to as many CPUs as its master has cores (local[1] -> 1 CPU), so "
                             "that per-core figures and the 2/1 ratio are honest; --no-pin lets the JVM's "
                             "GC/JIT threads and the Python workers spread over every CPU [default: pin]")
    parser.add_argument("--report", type=Path, metavar="JSON",
                        help="print the table of an earlier run's JSON file again, and run nothing")
    # Internal: the per-master child process.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--master", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--lake", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--pin-cpus", type=lambda text: [int(c) for c in text.split(",")], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    if args.report:
        saved = json.loads(args.report.read_text())
        figures(saved["runs"])
        print_report(saved["data"], saved["runs"], ratios(saved["runs"]), saved["load_average_end"])
        return 0
    if not args.sample.exists():
        print(f"SKIPPED: the shared sample {args.sample} is absent (../shared/data is not mounted); "
              "nothing to benchmark.")
        return 0
    args.work_dir = args.work_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    masters = [m.strip() for m in args.masters.split(",") if m.strip()]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    load_start = load_average()
    print(f"load average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} on {os.cpu_count()} CPUs")
    manifest = tile(args.sample, args.events, args.work_dir, args.copies_per_file, force=args.retile)
    tiles = args.work_dir / f"rees46-tiled-{manifest['copies']}x-{manifest['copies_per_file']}pf"
    print(f"data is TILED: {manifest['copies']} copies of {args.sample.name} -> {manifest['rows']:,} raw events, "
          f"{manifest['files']} files, {manifest['bytes'] / 2**20:.0f} MiB in {tiles} "
          + ("(cached)" if manifest["cached"] else f"(written in {manifest['seconds_to_write']:.1f} s)"))
    shuffle = args.shuffle_partitions or max(4, 2 * math.ceil(manifest["rows"] / 500_000))
    results = []
    for round_ in range(1, args.repeat + 1):
        for master in masters:
            run = run_master(args, master, tiles, stamp, shuffle, round_)
            run.update({"round": round_, "rounds": args.repeat})
            results.append(run)
    figures(results)
    scale = ratios(results)
    load_end = load_average()
    print_report(manifest, results, scale, load_end)
    out = args.json or args.work_dir / f"ingest-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "ingest", "tiled": True, "timestamp": stamp, "data": manifest,
        "shuffle_partitions": shuffle, "driver_memory": args.driver_memory,
        "driver_java_options": args.driver_java_options, "conf": args.conf,
        "events_per_task": args.events_per_task or None,
        "cpus": os.cpu_count(), "load_average_start": load_start, "load_average_end": load_end,
        "targets": {"events_per_s_per_core": TARGET_EVENTS_PER_CORE, "scaling_1_to_2": TARGET_SCALING},
        "runs": results, "ratio_2_over_1": scale, "ratio_2_over_1_by_round": round_ratios(results),
    }, indent=2, default=str))
    print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
