#!/usr/bin/env python
"""Quality benchmark: how close are the synthetic sessions to real held-out sessions, on real samples?

For each dataset (the shared REES46 sample, and YOOCHOOSE when its input adapter exists) the script
runs the pipeline stages through synth.runner.run_stage on a FRESH lake under
<work-dir>/<dataset>/ (clean -> featurize -> train -> generate -> merge -> evaluate, with a training
budget of --max-steps optimizer steps), then reads the run's rows of the metrics table. featurize
holds out a stable hash share of sessions (featurize.holdout_percent); the session model never sees
them, and every metric compares a subject with them. The hash is of the pseudonymized session id, so the
split follows the pseudonymization key: the script fixes it (--split-key), so that runs compare on the
same holdout sessions. The two baselines of the issue come from the same run: train_resample (real
train sessions resampled) and independent_columns (each column sampled independently from the train
marginals); real_train is the reference of the recommender.

Printed per dataset: the metrics table (subjects as columns) with the issue's targets and PASS/FAIL
for the synthetic subject, the wall seconds of each stage, and how the train stage's time splits into
the session model (with its events/s) and the profile model. Everything also goes to
<work-dir>/quality-<timestamp>.json (or --json). Without the shared data folder it prints SKIPPED
and exits 0. The numbers are small-sample numbers: the samples are slices (see ../shared/data/README.md).

    .venv/bin/python benchmarks/quality.py                       # REES46 and YOOCHOOSE, defaults
    .venv/bin/python benchmarks/quality.py --datasets rees46 --max-steps 300
    .venv/bin/python benchmarks/quality.py --datasets rees46 --max-steps 50,100,300 --seeds 0,1,2

With several budgets or seeds it runs every combination and ends with the time to the targets: per
budget, how many seeds met every target and the training seconds (mean and spread over the seeds).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_WORK = ROOT / "work" / "bench-quality"
DATASETS = ("rees46", "yoochoose")
SUBJECT_COLUMNS = ("synthetic", "train_resample", "independent_columns", "holdout", "real_train")
# The targets on the REES46 sample, for the synthetic subject: (metric, comparison, bound).
TARGETS = {
    "event_type_tvd": ("<=", 0.02),
    "session_length_ks": ("<=", 0.05),
    "c2st_auc": ("<=", 0.65),
    "attribute_realism": (">=", 0.95),
    "profile_column_pair": (">=", 0.90),
}
# Metrics printed first, in this order; any other metric of the run follows.
ORDER = ("event_type_tvd", "session_length_ks", "item_popularity_jsd", "category_popularity_jsd",
         "category_transition_jsd", "gap_seconds_ks", "purchase_after_view_share", "c2st_auc",
         "attribute_realism", "catalog_consistency", "recommender_hit_rate@10", "recommender_hit_rate_ratio",
         "profile_column_shape", "profile_column_pair", "exact_copy_share", "n_sessions", "n_events")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Quality benchmark: run the pipeline on the shared REES46 (and YOOCHOOSE) samples with a "
                    "session-level hold-out and print the evaluate metrics of the synthetic sessions and of two "
                    "baselines next to the issue's targets.")
    parser.add_argument("--datasets", default=",".join(DATASETS),
                        help=f"comma-separated datasets to run, of {', '.join(DATASETS)} (default: all)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA,
                        help="the shared samples folder (default ../shared/data); absent = SKIPPED")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK,
                        help="lakes, checkpoints, reports and the JSON result go here (default work/bench-quality)")
    parser.add_argument("--max-steps", default="300",
                        help="training budget(s): train.max_steps, comma-separated to sweep (default 300)")
    parser.add_argument("--seeds", default="0", help="run.seed value(s), comma-separated (default 0)")
    parser.add_argument("--sessions", type=int, default=2000, help="synthetic sessions to generate (default 2000)")
    parser.add_argument("--classifier", choices=("gbt", "logistic"), default="gbt",
                        help="classifier of the two-sample test (evaluate.two_sample_classifier, default gbt)")
    parser.add_argument("--master", default="local[2]", help="Spark master (default local[2])")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any other pipeline option (YAML value), repeatable, e.g. --set train.cpu_threads=1")
    parser.add_argument("--json", type=Path, default=None, help="result file (default <work-dir>/quality-<time>.json)")
    parser.add_argument("--keep-lake", action="store_true", help="keep each dataset's lake after the run")
    parser.add_argument("--split-key", default="quality-benchmark",
                        help="pseudonymization key of the runs (default quality-benchmark): it decides the hash "
                             "holdout split, so runs with the same key are scored on the same holdout sessions; "
                             "vary it to see how much the metrics move with the split ($SYNTH_PSEUDONYM_KEY wins)")
    return parser.parse_args(argv)


def adapter_exists(source: str) -> bool:
    from synth import sources

    try:
        return source in sources.builtin_specs()
    except Exception:  # noqa: BLE001 - a half-written adapter module counts as absent
        return False


def overrides_for(dataset: str, args: argparse.Namespace, folder: Path, steps: int, seed: int) -> dict:
    import yaml

    base = {
        "run.id": f"bench-{dataset}",
        "run.seed": seed,
        "input.source": dataset,
        "input.path": str(args.data_dir / dataset),
        "lake.root": str(folder / "lake"),
        "train.checkpoint_dir": str(folder / "checkpoints"),
        "evaluate.report_dir": str(folder / "reports"),
        "clean.pseudonym_key_file": str(folder / "secrets" / "pseudonym.key"),
        "spark.master": args.master,
        "train.max_steps": steps,
        "generate.sessions": args.sessions,
        "evaluate.two_sample_classifier": args.classifier,
    }
    for item in args.set:
        key, _, value = item.partition("=")
        if not _ or "." not in key:
            raise SystemExit(f"--set wants SECTION.KEY=VALUE, not {item!r}")
        base[key] = yaml.safe_load(value)
    return base


def run_dataset(dataset: str, args: argparse.Namespace, spark_holder: dict, steps: int, seed: int) -> dict:
    from synth import config
    from synth.config import STAGES
    from synth.lake import Lake
    from synth.runner import run_stage

    folder = (args.work_dir / dataset).resolve()
    if folder.exists():
        shutil.rmtree(folder)
    cfg = config.load(overrides=overrides_for(dataset, args, folder, steps, seed))
    # Without a key file the clean stage would draw a random key, and with it a different holdout split.
    key_file = Path(cfg.clean.pseudonym_key_file)
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(args.split_key)
    if "spark" not in spark_holder:
        from synth.spark import build_session

        spark_holder["spark"] = build_session(cfg)
    spark = spark_holder["spark"]
    lake = Lake(spark, cfg.lake.root, cfg.lake.engine)
    seconds, counts = {}, {}
    for stage in STAGES:
        clock = time.time()
        counts[stage] = run_stage(stage, cfg, spark, lake)
        seconds[stage] = round(time.time() - clock, 1)
        print(f"@@ {dataset}: {stage} done in {seconds[stage]:.1f} s", flush=True)
    rows = (lake.read("metrics").df.where(f"run_id = '{cfg.run.id}'")
            .select("metric", "subject", "value").collect())
    metrics: dict[str, dict[str, float]] = {}
    for r in rows:
        metrics.setdefault(r.metric, {})[r.subject] = r.value
    report = (lake.read("pipeline_runs").df.where(f"stage = 'evaluate' AND run_id = '{cfg.run.id}'")
              .select("artifacts").first())
    if not args.keep_lake:
        shutil.rmtree(folder / "lake", ignore_errors=True)
    return {"dataset": dataset, "run_id": cfg.run.id, "steps": steps, "seed": seed,
            "stage_seconds": seconds, "counts": counts,
            "metrics": metrics, "targets": verdicts(metrics),
            "report": (report.artifacts or {}).get("report") if report else None,
            "config": {k: v for k, v in overrides_for(dataset, args, folder, steps, seed).items()
                       if not k.endswith("_file")}}


def verdicts(metrics: dict[str, dict[str, float]]) -> dict[str, dict]:
    out = {}
    for metric, (op, bound) in TARGETS.items():
        value = metrics.get(metric, {}).get("synthetic")
        if value is None:
            out[metric] = {"target": f"{op} {bound}", "value": None, "verdict": "n/a"}
        else:
            ok = value <= bound if op == "<=" else value >= bound
            out[metric] = {"target": f"{op} {bound}", "value": value, "verdict": "PASS" if ok else "FAIL"}
    return out


def fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if metric.startswith("n_") else f"{value:.4f}"


def table(result: dict) -> str:
    metrics = result["metrics"]
    names = [m for m in ORDER if m in metrics] + sorted(m for m in metrics if m not in ORDER)
    names += [m for m in TARGETS if m not in names]  # targets without a value show as n/a
    head = f"{'metric':<28}" + "".join(f"{s:>21}" for s in SUBJECT_COLUMNS) + f"{'target':>10}  verdict"
    lines = [head, "-" * len(head)]
    for m in names:
        target = result["targets"].get(m)
        lines.append(f"{m:<28}" + "".join(f"{fmt(m, metrics.get(m, {}).get(s)):>21}" for s in SUBJECT_COLUMNS)
                     + (f"{target['target']:>10}  {target['verdict']}" if target else ""))
    stages = "  ".join(f"{s} {t:.1f}s" for s, t in result["stage_seconds"].items())
    lines.append(f"wall time per stage: {stages}  (total {sum(result['stage_seconds'].values()):.1f} s)")
    train = result.get("counts", {}).get("train", {})
    if "session_model_ms" in train:
        lines.append(f"train stage: session model {train['session_model_ms'] / 1000:.1f} s for {train['steps']} steps "
                     f"({train['events_per_s']:,} events/s), profile model {train['profile_model_ms'] / 1000:.1f} s")
    return "\n".join(lines)


def training_seconds(result: dict) -> float:
    train = result["counts"]["train"]
    return (train["session_model_ms"] + train["profile_model_ms"]) / 1000


def time_to_targets(results: list[dict]) -> str:
    """Per dataset and budget: seeds meeting every target, and training seconds mean +- sd (min-max)."""
    import statistics

    lines = [f"{'dataset':<10}{'steps':>6}{'seeds':>6}{'all targets met':>17}{'training s, mean +- sd (min-max)':>36}"]
    for key in sorted({(r["dataset"], r["steps"]) for r in results}):
        runs = [r for r in results if (r["dataset"], r["steps"]) == key]
        met = sum(all(t["verdict"] == "PASS" for t in r["targets"].values()) for r in runs)
        seconds = [training_seconds(r) for r in runs]
        sd = statistics.stdev(seconds) if len(seconds) > 1 else 0.0
        lines.append(f"{key[0]:<10}{key[1]:>6}{len(runs):>6}{f'{met}/{len(runs)}':>17}"
                     f"{f'{statistics.mean(seconds):.1f} +- {sd:.1f} ({min(seconds):.1f}-{max(seconds):.1f})':>36}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    budgets = [int(x) for x in args.max_steps.split(",") if x.strip()]
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    unknown = set(datasets) - set(DATASETS)
    if unknown:
        raise SystemExit(f"unknown dataset(s) {sorted(unknown)}; choose from {', '.join(DATASETS)}")
    if not args.data_dir.is_dir():
        print(f"SKIPPED: the shared data folder {args.data_dir} is absent")
        return 0
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from synth.runner import setup_logging

    setup_logging()
    results, skipped = [], {}
    spark_holder: dict = {}
    try:
        for dataset in datasets:
            if not (args.data_dir / dataset).is_dir():
                skipped[dataset] = f"no {args.data_dir / dataset}"
            elif not adapter_exists(dataset):
                skipped[dataset] = f"no input adapter for input.source {dataset} yet"
            else:
                for steps in budgets:
                    for seed in seeds:
                        results.append(run_dataset(dataset, args, spark_holder, steps, seed))
                        print(f"\n== {dataset}, {steps} steps, seed {seed} "
                              f"({results[-1]['counts'].get('evaluate', {})}) ==\n{table(results[-1])}\n", flush=True)
    finally:
        if "spark" in spark_holder:
            spark_holder["spark"].stop()
    for dataset, why in skipped.items():
        print(f"SKIPPED {dataset}: {why}")
    for result in results:
        print(f"\n== {result['dataset']}, {result['steps']} steps, seed {result['seed']} ==\n{table(result)}")
    if results:
        print(f"\nTime to the targets (training = session model + profile model, seconds of the train stage):\n"
              f"{time_to_targets(results)}")
    out = args.json or args.work_dir / f"quality-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "skipped": skipped,
                               "args": {k: str(v) for k, v in vars(args).items()}}, indent=2, default=str))
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
