"""Train stage: fit the session model (synth/model.py) on session_tokens, one checkpoint per run.

The driver pins the input versions, derives the vocabulary from item_catalog, checks the token windows
against it with one Spark aggregation, and hands plain arguments (file URIs, sizes, hyperparameters) to
`train_fn`, which TorchDistributor runs in `train.num_processes` processes (DDP over gloo on CPU, nccl on
GPU). Each process streams its share of the training windows straight from the Delta table's Parquet
files through Petastorm; no event-level data passes through the driver. Rank 0 writes the checkpoint to
<train.checkpoint_dir>/<run id>/ (model.pt + metadata.json).
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from pathlib import Path

from pyspark.sql import functions as F

log = logging.getLogger(__name__)

TOKEN_COLUMNS = ("event_type", "item_idx", "category_idx", "gap_bucket")


# ----- driver side ---------------------------------------------------------------------------------


def run(ctx) -> dict[str, int]:
    cfg = ctx.cfg
    tokens = ctx.read("session_tokens")
    catalog = ctx.read("item_catalog")

    # Vocabulary from the catalogue, a small dimension table: collecting it to the driver is fine.
    items = catalog.df.select("item_idx", "category_idx").toPandas()
    n_items = max(1, int(items["item_idx"].max()) + 1 if len(items) else 1)
    n_categories = max(1, int(items["category_idx"].max()) + 1 if len(items) else 1)
    if len(items) and (items["item_idx"].min() < 0 or items["category_idx"].min() < 0):
        raise ValueError(f"item_catalog version {catalog.version} holds negative item_idx or category_idx")
    item_category = [0] * n_items
    for item, category in zip(items["item_idx"].tolist(), items["category_idx"].tolist()):
        item_category[int(item)] = int(category)
    n_gap_buckets = len(cfg.featurize.gap_bucket_edges) + 1
    window_tokens = cfg.featurize.window + 2  # BOS + window events + EOS

    # One aggregation over the training windows (runs on the executors) checks them against the
    # vocabulary, so a mismatch fails here with a clear message instead of deep inside a training process.
    train_df = tokens.df.where(F.col("split") == "train")
    stats = train_df.agg(
        F.count(F.lit(1)).alias("windows"),
        F.sum(F.aggregate("event_type", F.lit(0).cast("long"),
                          lambda acc, t: acc + F.when((t >= 3) & (t <= 6), 1).otherwise(0))).alias("events"),
        *[F.min(F.array_min(c)).alias(f"min_{c}") for c in TOKEN_COLUMNS],
        *[F.max(F.array_max(c)).alias(f"max_{c}") for c in TOKEN_COLUMNS],
        F.min(F.size("event_type")).alias("min_len"), F.max(F.size("event_type")).alias("max_len"),
    ).first()
    if not stats["windows"]:
        raise ValueError(f"session_tokens version {tokens.version} has no split=train windows to train on")
    _check_tokens(stats, tokens.version, window_tokens,
                  {"event_type": 7, "item_idx": n_items, "category_idx": n_categories, "gap_bucket": n_gap_buckets})

    # Petastorm reads the table's Parquet files at the pinned version, split=train only.
    files = [u for u in ctx.lake.files("session_tokens", tokens.version) if "/split=train/" in u]
    row_groups = _count_row_groups(files)
    world_size = cfg.train.num_processes
    # Petastorm shards by row group: with fewer row groups than ranks some ranks would get none (it
    # raises NoDataAvailableError). Then every rank reads all the files unsharded; each rank still draws
    # different batches, because its shuffle buffer is seeded with its rank.
    shard = row_groups >= world_size

    model_config = {
        "n_event_types": 7, "n_items": n_items, "n_categories": n_categories, "n_gap_buckets": n_gap_buckets,
        "block_size": window_tokens - 1, "d_model": cfg.train.d_model, "n_layer": cfg.train.n_layer,
        "n_head": cfg.train.n_head, "dropout": cfg.train.dropout,
    }
    checkpoint = Path(cfg.train.checkpoint_dir).expanduser().resolve() / ctx.run_id
    params = {
        "files": files,
        "shard": shard,
        "model_config": model_config,
        "item_category": item_category,
        "seed": int(cfg.run.seed),
        "learning_rate": float(cfg.train.learning_rate),
        "batch_size": int(cfg.train.batch_size),
        "max_steps": int(cfg.train.max_steps),
        "log_every": max(1, int(cfg.train.log_every)),
        "use_gpu": bool(cfg.train.use_gpu),
        "compile": bool(cfg.train.compile),
        "cpu_threads": max(0, int(cfg.train.cpu_threads)),
        "checkpoint_dir": str(checkpoint),
        "metadata": {
            "run_id": ctx.run_id,
            "run_config": ctx.cfg.to_dict(),
            "seed": int(cfg.run.seed),
            "input_versions": dict(ctx.input_versions),
            "vocab": {"n_event_types": 7, "n_items": n_items, "n_categories": n_categories,
                      "n_gap_buckets": n_gap_buckets},
            "train_windows": int(stats["windows"]),
            "train_events": int(stats["events"] or 0),
            "train_files": len(files),
            "train_row_groups": row_groups,
        },
    }
    if params["max_steps"] < 1:
        raise ValueError("train.max_steps must be at least 1")
    log.info("train: %d windows (%d events) in %d files / %d row groups%s; vocab %d items, %d categories, "
             "%d gap buckets; %d process(es), %s mode", stats["windows"], stats["events"] or 0, len(files),
             row_groups, "" if shard or world_size == 1 else " (too few row groups to shard: every rank reads all)",
             n_items, n_categories, n_gap_buckets, world_size, "local" if cfg.train.local_mode else "distributed")

    from pyspark.ml.torch.distributor import TorchDistributor

    distributor = TorchDistributor(num_processes=world_size, local_mode=cfg.train.local_mode,
                                   use_gpu=cfg.train.use_gpu)
    with _package_importable():
        result = distributor.run(train_fn, params)
    if not result:
        raise RuntimeError("training finished without a result from rank 0")
    ctx.artifacts["checkpoint"] = result["checkpoint"]
    if not Path(result["checkpoint"]).is_dir():
        log.warning("train: checkpoint %s is not visible from the driver; with train.local_mode=false, "
                    "train.checkpoint_dir must be on storage shared by the executors", result["checkpoint"])
    log.info("train: %d steps, loss %.3f -> %.3f, %.0f events/s, %.1f s; checkpoint %s", result["steps"],
             result["initial_loss"], result["final_loss"], result["events_per_s"], result["wall_seconds"],
             result["checkpoint"])
    return {
        "train_windows": int(stats["windows"]),
        "train_events": int(stats["events"] or 0),
        "steps": int(result["steps"]),
        "final_loss_x1000": int(result["final_loss"] * 1000),
        "events_per_s": int(result["events_per_s"]),
    }


def _check_tokens(stats, version: int, window_tokens: int, sizes: dict[str, int]) -> None:
    problems = []
    if stats["min_len"] != window_tokens or stats["max_len"] != window_tokens:
        problems.append(f"token arrays have {stats['min_len']}..{stats['max_len']} entries, expected "
                        f"featurize.window + 2 = {window_tokens}")
    for column, size in sizes.items():
        low, high = stats[f"min_{column}"], stats[f"max_{column}"]
        if low is None or low < 0 or high >= size:
            problems.append(f"{column} spans {low}..{high}, outside the vocabulary 0..{size - 1}")
    if problems:
        raise ValueError(f"session_tokens version {version} does not fit the model: " + "; ".join(problems)
                         + " (item and category vocabularies come from item_catalog)")


def _count_row_groups(files: list[str]) -> int:
    """Row groups across `files`, from the Parquet footers only."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    total = 0
    for uri in files:
        fs, path = pafs.FileSystem.from_uri(uri)
        with fs.open_input_file(path) as f:
            total += pq.ParquetFile(f).metadata.num_row_groups
    return total


@contextlib.contextmanager
def _package_importable():
    """Make this package importable in the processes TorchDistributor starts.

    TorchDistributor pickles `train_fn` (cloudpickle stores a module-level function by reference:
    module + name), writes a small runner script to a temporary folder and starts it through
    `python -m torch.distributed.run`. Python puts the *script's* folder first on sys.path, not the
    working directory, so when this project is run from a source checkout rather than installed,
    unpickling fails with "No module named 'synth'" and the run dies before training starts. The
    processes inherit the driver's environment, so putting the folder that holds `synth/` on
    PYTHONPATH for the duration of the run fixes it (harmless where the package is installed).
    """
    root = str(Path(__file__).resolve().parents[1])
    old = os.environ.get("PYTHONPATH")
    parts = [p for p in (old or "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([root] + [p for p in parts if p != root])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


# ----- training processes --------------------------------------------------------------------------


def _batches(reader, batch_size: int, rng, buffer_rows: int):
    """Endless random batches {column: int64 array [batch_size, tokens]} from a Petastorm batch reader,
    through a shuffle buffer of at least `buffer_rows` windows (row groups are read whole)."""
    import numpy as np

    pool = None
    target = max(buffer_rows, batch_size)
    while True:
        while pool is None or len(pool["event_type"]) < target:
            chunk = next(reader)
            arrays = {c: _stack(getattr(chunk, c)) for c in TOKEN_COLUMNS}
            if len(arrays["event_type"]) == 0:
                continue
            pool = arrays if pool is None else {c: np.concatenate([pool[c], arrays[c]]) for c in TOKEN_COLUMNS}
        n = len(pool["event_type"])
        take = rng.choice(n, size=batch_size, replace=False)
        keep = np.ones(n, dtype=bool)
        keep[take] = False
        yield {c: pool[c][take] for c in TOKEN_COLUMNS}
        pool = {c: pool[c][keep] for c in TOKEN_COLUMNS}


def _stack(column):
    """A Petastorm array column (an object array of equal-length arrays, or already 2-D) as int64 [rows, tokens]."""
    import numpy as np

    if isinstance(column, np.ndarray) and column.dtype != object:
        return column.astype(np.int64, copy=False)
    return np.stack([np.asarray(v, dtype=np.int64) for v in column]) if len(column) else np.zeros((0, 0), np.int64)


def train_fn(params: dict) -> dict | None:
    """One training process (DDP rank). Takes and returns plain picklable values: the checkpoint
    metadata written by rank 0, plus the checkpoint path (every rank returns rank 0's copy)."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from petastorm import make_batch_reader

    from synth.model import SessionModel, SessionModelConfig, save_checkpoint, split_window

    started = time.time()
    # petastorm 0.12 reads through pyarrow's legacy ParquetDataset API (the reason for the pyarrow 14 pin),
    # which warns on every use; the warnings say nothing actionable here.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm(\.|$)")
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    use_cuda = params["use_gpu"] and torch.cuda.is_available()
    if params["use_gpu"] and not use_cuda:
        raise RuntimeError("train.use_gpu is true but this training process sees no CUDA device")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Processes on one machine share its cores; oversubscribed threads slow every rank down (intra-op
        # threads wait on each other: on a busy 2-core machine 2 threads ran 3-8x slower than 1).
        torch.set_num_threads(params["cpu_threads"] or max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")

    def say(message: str) -> None:
        if rank == 0:
            print(f"[train rank 0/{world_size}] {message}", flush=True)

    reader = None
    try:
        torch.manual_seed(params["seed"])
        cfg = SessionModelConfig(**params["model_config"])
        model = SessionModel(cfg, item_category=params["item_category"]).to(device)
        net = model
        if world_size > 1:
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
        if use_cuda and params["compile"]:
            net = torch.compile(net)
        # bf16 autocast on GPUs that support it; full precision on CPU.
        use_amp = use_cuda and torch.cuda.is_bf16_supported()
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext
        optimizer = torch.optim.Adam(model.parameters(), lr=params["learning_rate"])

        shard = {"cur_shard": rank, "shard_count": world_size} if params["shard"] and world_size > 1 else {}
        # The same seed on every rank: Petastorm shuffles row groups with it before dealing them out
        # to shards, so the shards only partition the data when all ranks agree on it.
        reader = make_batch_reader(params["files"], schema_fields=list(TOKEN_COLUMNS), num_epochs=None,
                                   seed=params["seed"], shuffle_row_groups=True, reader_pool_type="thread",
                                   workers_count=2, **shard)
        rng = np.random.default_rng([params["seed"], rank])
        batches = _batches(reader, params["batch_size"], rng, buffer_rows=8 * params["batch_size"])
        say(f"{model.num_parameters():,} parameters on {device}; {len(params['files'])} files"
            f"{' sharded' if shard else ''}; {params['max_steps']} steps of {params['batch_size']} windows")

        loss_curve: list[list[float]] = []
        interval = torch.zeros(3, dtype=torch.float64)  # loss sum, steps, events (this rank)
        total_events = 0.0
        train_clock = interval_clock = time.time()
        net.train()
        for step in range(1, params["max_steps"] + 1):
            batch = {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in next(batches).items()}
            inputs = split_window(batch)
            with autocast():
                _, loss = net(**inputs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            target = inputs["target_event_type"]
            interval += torch.tensor([loss.item(), 1.0, float(((target >= 3) & (target <= 6)).sum())],
                                     dtype=torch.float64)
            if step == 1 or step % params["log_every"] == 0 or step == params["max_steps"]:
                if world_size > 1:
                    summed = interval.to(device)  # gloo reduces CPU tensors, nccl GPU tensors
                    dist.all_reduce(summed)
                    interval = summed.cpu()
                now = time.time()
                mean_loss = float(interval[0] / interval[1])
                events_per_s = float(interval[2]) / max(now - interval_clock, 1e-9)
                total_events += float(interval[2])
                loss_curve.append([step, round(mean_loss, 6)])
                say(f"step {step}/{params['max_steps']} loss {mean_loss:.4f} {events_per_s:,.0f} events/s")
                interval.zero_()
                interval_clock = now
        train_seconds = time.time() - train_clock

        result = None
        if rank == 0:
            metadata = {
                **params["metadata"],
                "steps": params["max_steps"],
                "batch_size": params["batch_size"],
                "learning_rate": params["learning_rate"],
                "world_size": world_size,
                "sharded": bool(shard),
                "device": str(device),
                "torch_threads": torch.get_num_threads(),
                "mixed_precision": "bf16" if use_amp else None,
                "compiled": bool(use_cuda and params["compile"]),
                "loss_curve": loss_curve,
                "initial_loss": loss_curve[0][1],
                "final_loss": loss_curve[-1][1],
                "events_per_s": total_events / max(train_seconds, 1e-9),
                "train_seconds": train_seconds,
                "wall_seconds": time.time() - started,
                "torch_version": torch.__version__,
            }
            path = save_checkpoint(model, params["checkpoint_dir"], metadata)
            say(f"checkpoint written to {path}")
            result = {**metadata, "checkpoint": str(path)}
        if world_size > 1:
            # Every rank returns rank 0's result. In local mode TorchDistributor has each process pickle
            # its return value to the same file and reads it after all exit, so whichever rank finishes
            # last decides what the driver gets; a None from rank 1 would lose the metadata.
            shared = [result]
            dist.broadcast_object_list(shared, src=0)
            result = shared[0]
        return result
    finally:
        if reader is not None:
            reader.stop()
            reader.join()
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
