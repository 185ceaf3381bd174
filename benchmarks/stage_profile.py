#!/usr/bin/env python
"""Where clean + featurize spend their time: their task functions run in one Python process.

`ingest.py` times the stages in Spark. This runs the same task functions (clean's map and bucket
halves, featurize's item and user passes) one after another in this process, on the same tiled data,
and prints the seconds of each step and of each pyarrow call, on one core with one Arrow thread, as a
local[1] task runs. A SparkSession is started only to plan the CSV reads and to give the writers a
lake. If these seconds are close to ingest.py's, the time is in the Python work, not in Spark.

`--pair` first runs one such process alone on one core, then two at once, one per core: how much more
work two cores of this machine do than one for this code, whatever Spark does.

The Python workers' memory settings (`spark.worker_memory`) apply here too: the script restarts itself
with them (`--worker-memory default` leaves the allocators as they are).

    .venv/bin/python benchmarks/stage_profile.py --events 1000000 --buckets 1
    .venv/bin/python benchmarks/stage_profile.py --events 1000000 --buckets 1 --pair
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ingest  # noqa: E402  (the tiler)

MARKER = "@@profile "


def count_pyarrow_calls(seconds: dict, calls: collections.Counter) -> None:
    """Time every pyarrow.compute function and Parquet write (outermost calls only)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    depth = [0]

    def timed(name, function):
        @functools.wraps(function)
        def call(*args, **kwargs):
            if depth[0]:
                return function(*args, **kwargs)
            depth[0] += 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                depth[0] -= 1
                seconds[name] += time.perf_counter() - start
                calls[name] += 1
        return call

    for name in dir(pc):
        function = getattr(pc, name)
        if callable(function) and not name.startswith("_") and not isinstance(function, type):
            setattr(pc, name, timed(name, function))
    pq.ParquetWriter.write_table = timed("parquet write", pq.ParquetWriter.write_table)


def profile(tiles: Path, lake_root: Path, buckets: int) -> dict:
    """Clean then featurize over `tiles`, step by step in this process; seconds per step and per call."""
    from synth import _arrow, clean, config, featurize
    from synth.lake import Lake
    from synth.sources import read_source
    from synth.spark import build_session

    shutil.rmtree(lake_root, ignore_errors=True)
    cfg = config.load(overrides={"input.source": "rees46", "input.path": str(tiles), "lake.root": str(lake_root),
                                 "spark.master": "local[1]", "spark.worker_memory": "default", "run.id": "profile",
                                 "clean.pseudonym_key_file": str(lake_root.parent / "profile-pseudonym.key")})
    spark = build_session(cfg)
    lake = Lake(spark, cfg.lake.root, cfg.lake.engine)
    raw = read_source(spark, cfg)
    rules = clean.Rules.of(cfg, price_required=True)
    steps: dict[str, float] = collections.defaultdict(float)
    calls_seconds: dict[str, float] = collections.defaultdict(float)
    calls = collections.Counter()
    count_pyarrow_calls(calls_seconds, calls)

    def step(name, produce):
        start = time.perf_counter()
        out = list(produce())
        steps[name] += time.perf_counter() - start
        return out

    def by_bucket(records) -> dict[int, list]:
        grouped = collections.defaultdict(list)
        for record in records:
            grouped[record[0]].append(record)
        return grouped

    read_and_judge = clean._read_and_judge(rules, buckets, b"profile" * 4)
    judged = by_bucket(r for task in raw.tasks for r in step("clean map", lambda: read_and_judge(task)))
    events_writer = lake.arrow_writer("events")
    pieces = {piece.number: (feed, piece) for task in raw.tasks for feed, listed in task for piece in listed}
    route = clean._route(rules, cfg.clean.session_gap_minutes * 60, cfg.clean.max_session_events, b"profile" * 4,
                         "profile", events_writer, lake.arrow_writer("quarantine"), pieces)
    adds = [add for b in range(buckets) for summary in step("clean buckets", lambda: route(iter(judged[b])))
            for add in summary["events"]]
    files = [f"{events_writer.target}/{a['path']}" for a in adds]
    events = sum(json.loads(a["stats"])["numRecords"] for a in adds)

    counted = by_bucket(r for group in _arrow.file_groups(files, buckets)
                        for r in step("item map", lambda: featurize._item_records(buckets)(("events", group))))
    summaries = [s for b in range(buckets)
                 for s in step("item buckets", lambda: featurize._catalog_buckets(b, iter(counted[b])))]
    vocabulary = featurize.Vocabulary.of([s[:2] for s in summaries])
    catalog = [c for s in summaries for c in step("catalogue", lambda: [vocabulary.catalog(s)])]
    ids = featurize.item_lookup([_arrow.to_ipc(featurize._catalog_ids(c)) for c in catalog])
    broadcast = type("Broadcast", (), {"value": ids})
    writers = {t: lake.arrow_writer(t) for t in ("sessions", "user_profiles", "session_tokens")}
    features = featurize._user_features(writers, None, cfg.featurize.holdout_percent, cfg.featurize.window,
                                        list(cfg.featurize.gap_bucket_edges), vocabulary.category_ids,
                                        vocabulary.latest, 1)
    stats = [json.loads(a["stats"]) for a in adds]
    groups = featurize.user_groups(
        [(uri, s["numRecords"], s.get("minValues", {}).get("user_id"), s.get("maxValues", {}).get("user_id"))
         for uri, s in zip(files, stats)], max(1, events // buckets), 4 * max(1, events // buckets))
    if groups is None:  # as featurize without user groups: the events shuffled to user buckets
        by_user = by_bucket(r for group in _arrow.file_groups(files, buckets)
                            for r in step("user map", lambda: featurize._events_by_user(buckets, broadcast)(group)))
        for b in range(buckets):
            step("user buckets", lambda: featurize._shuffled_users(features)(iter(by_user[b])))
    else:
        for group in groups:
            step("user groups", lambda: featurize._grouped_users(features, broadcast)([group]))
    spark.stop()
    return {"events": events, "steps": dict(steps), "calls": {k: [calls_seconds[k], calls[k]] for k in calls}}


def print_profile(result: dict, top: int) -> None:
    total = sum(result["steps"].values())
    print(f"{result['events']:,} events, {total:.2f} s in one process: {result['events'] / total:,.0f} events/s")
    for name, seconds in result["steps"].items():
        print(f"  {name:16s} {seconds:7.2f} s")
    print("  by pyarrow call (outermost calls, all steps):")
    for name, (seconds, count) in sorted(result["calls"].items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"    {name:26s} {seconds:7.2f} s {count:6d} calls")


def run_child(args, core: int | None, tag: str) -> subprocess.Popen:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--tiles", str(args.tiles),
               "--lake", str(args.work_dir / f"profile-lake-{tag}"), "--buckets", str(args.buckets),
               "--worker-memory", args.worker_memory]
    pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
    # Spark gives each Python worker OMP_NUM_THREADS = spark.task.cpus (1), which sizes Arrow's thread pool.
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, preexec_fn=pin,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def child_result(child: subprocess.Popen) -> dict:
    out, _ = child.communicate()
    lines = [line for line in out.splitlines() if line.startswith(MARKER)]
    if child.returncode or not lines:
        raise SystemExit(f"profile child failed (exit {child.returncode}):\n{out[-2000:]}")
    return json.loads(lines[-1][len(MARKER):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="tiled events [default: %(default)s]")
    parser.add_argument("--buckets", type=int, default=1,
                        help="buckets of clean and featurize (one task each in Spark) [default: %(default)s]")
    parser.add_argument("--worker-memory", choices=("reuse", "default"), default="reuse",
                        help="the spark.worker_memory settings to run under [default: %(default)s]")
    parser.add_argument("--pair", action="store_true", help="one process alone on one core, then two at once")
    parser.add_argument("--top", type=int, default=12, help="pyarrow calls listed [default: %(default)s]")
    parser.add_argument("--sample", type=Path, default=ingest.DEFAULT_SAMPLE,
                        help="the REES46 sample tiled [default: %(default)s]")
    parser.add_argument("--work-dir", type=Path, default=ingest.DEFAULT_WORK,
                        help="tiles and lakes [default: %(default)s]")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tiles", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--lake", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from synth.spark import REUSE_MEMORY_ENV

    wanted = REUSE_MEMORY_ENV if args.worker_memory == "reuse" else {}
    if any(os.environ.get(k) != v for k, v in wanted.items()):  # glibc reads its tunables at start only
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **wanted})
    if args.child:
        print(MARKER + json.dumps(profile(args.tiles, args.lake, args.buckets)), flush=True)
        return 0
    if not args.sample.exists():
        print(f"SKIPPED: the shared sample {args.sample} is absent (../shared/data is not mounted)")
        return 0
    args.work_dir = args.work_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    manifest = ingest.tile(args.sample, args.events, args.work_dir, 16)
    args.tiles = args.work_dir / f"rees46-tiled-{manifest['copies']}x-{manifest['copies_per_file']}pf"
    print(f"TILED data: {manifest['rows']:,} raw events in {args.tiles}; worker memory: {args.worker_memory}; "
          f"{args.buckets} bucket(s)")
    cores = sorted(os.sched_getaffinity(0))
    if not args.pair:  # on one core, as a local[1] run: pyarrow's threads would otherwise use the others
        print_profile(child_result(run_child(args, cores[0], "alone")), args.top)
        return 0
    if len(cores) < 2:
        raise SystemExit(f"--pair needs two CPUs, this process may use {cores}")
    alone = child_result(run_child(args, cores[0], "alone"))
    print_profile(alone, args.top)
    pair = [run_child(args, core, f"pair{core}") for core in cores[:2]]
    together = [child_result(child) for child in pair]
    seconds = [sum(r["steps"].values()) for r in [alone, *together]]
    print(f"alone on CPU {cores[0]}: {seconds[0]:.2f} s; two at once on CPUs {cores[0]} and {cores[1]}: "
          f"{seconds[1]:.2f} s and {seconds[2]:.2f} s")
    print(f"two cores do {2 * seconds[0] / max(seconds[1:]):.2f}x the work of one on this machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
