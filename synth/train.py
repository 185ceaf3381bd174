"""Train stage: fit the session model (synth/model.py) on session_tokens, one checkpoint per run.

The driver pins the input versions, derives the vocabulary from item_catalog, checks the token windows
against it with one Spark aggregation, and hands plain arguments (file URIs, sizes, hyperparameters) to
`train_fn`, which TorchDistributor runs in `train.num_processes` processes (DDP over gloo on CPU, nccl on
GPU). Each process streams its share of the training windows straight from the Delta table's Parquet
files through Petastorm; no event-level data passes through the driver. Rank 0 writes the checkpoint to
<train.checkpoint_dir>/<run id>/ (model.pt + metadata.json).

Fault tolerance: every train.checkpoint_every steps rank 0 atomically saves the training state (model,
optimizer, step, curves, RNG) to <train.checkpoint_dir>/<run id>.train-state/; when a failed run is run
again (the runner re-runs a stage that did not commit), training resumes from the newest state. Every
train.eval_every steps the model is scored on the split=holdout windows; after train.patience evaluations
without improvement it stops early, and the checkpoint keeps the best evaluated weights. The driver also
derives the item -> brand id and item -> price bucket maps from the pinned catalogue and a sample of
training user contexts; all travel inside the checkpoint, so generation needs nothing else.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

from pyspark.sql import functions as F

from synth import _arrow
from synth.model import CONTEXT_DIM

log = logging.getLogger(__name__)

TOKEN_COLUMNS = ("event_type", "item_idx", "category_idx", "gap_bucket")
EVENT_TYPES = (3, 4, 5, 6)  # the event tokens view, cart, purchase, search
CONTEXT_COLUMNS = ("user_context", "user_category_idx")
READ_COLUMNS = TOKEN_COLUMNS + CONTEXT_COLUMNS
STATE_PREFIX = "state-"  # training-state files <checkpoint_dir>/<run id>.train-state/state-<step>.pt
KEEP_STATES = 2  # newest training states kept (the older one is the fallback if the newest is unreadable)

# Fault injection for tests: called as _after_step(step) after every optimizer step of rank 0 when set.
_after_step = None


# ----- driver side ---------------------------------------------------------------------------------


def run(ctx) -> dict[str, int]:
    cfg = ctx.cfg
    tokens = ctx.read("session_tokens")
    catalog = ctx.read("item_catalog")

    # Vocabulary from the catalogue, a small dimension table: collecting it to the driver is fine.
    items = catalog.df.select("item_idx", "category_idx", "brand", "price").toPandas()
    n_items = max(1, int(items["item_idx"].max()) + 1 if len(items) else 1)
    n_categories = max(1, int(items["category_idx"].max()) + 1 if len(items) else 1)
    if len(items) and (items["item_idx"].min() < 0 or items["category_idx"].min() < 0):
        raise ValueError(f"item_catalog version {catalog.version} holds negative item_idx or category_idx")
    item_category = [0] * n_items
    for item, category in zip(items["item_idx"].tolist(), items["category_idx"].tolist()):
        item_category[int(item)] = int(category)
    item_brand, n_brands = brand_ids(items, n_items)
    item_price_bucket, price_edges = price_buckets(items, n_items, int(cfg.train.price_buckets))
    n_gap_buckets = len(cfg.featurize.gap_bucket_edges) + 1
    window_tokens = cfg.featurize.window + 2  # BOS + window events + EOS

    # One aggregation over the training windows (runs on the executors) checks them against the
    # vocabulary, so a mismatch fails here with a clear message instead of deep inside a training process.
    train_df = tokens.df.where(F.col("split") == "train")

    def events(matching):
        return F.sum(F.aggregate("event_type", F.lit(0).cast("long"),
                                 lambda acc, t: acc + F.when(matching(t), 1).otherwise(0)))

    stats = train_df.agg(
        F.count(F.lit(1)).alias("windows"),
        events(lambda t: (t >= 3) & (t <= 6)).alias("events"),
        *[events(lambda t, k=k: t == k).alias(f"events_{k}") for k in EVENT_TYPES],
        *[F.min(F.array_min(c)).alias(f"min_{c}") for c in TOKEN_COLUMNS],
        *[F.max(F.array_max(c)).alias(f"max_{c}") for c in TOKEN_COLUMNS],
        F.min(F.size("event_type")).alias("min_len"), F.max(F.size("event_type")).alias("max_len"),
        F.min("user_category_idx").alias("min_user_category_idx"),
        F.max("user_category_idx").alias("max_user_category_idx"),
        F.min(F.size("user_context")).alias("min_context"), F.max(F.size("user_context")).alias("max_context"),
    ).first()
    if not stats["windows"]:
        raise ValueError(f"session_tokens version {tokens.version} has no split=train windows to train on")
    _check_tokens(stats, tokens.version, window_tokens,
                  {"event_type": 7, "item_idx": n_items, "category_idx": n_categories, "gap_bucket": n_gap_buckets,
                   "user_category_idx": n_categories})
    # A deterministic sample of training sessions' user contexts and lengths (a session's last window
    # ends at its EOS: events = window_start + length - 2), stored in the checkpoint for generation.
    sessions = train_df.groupBy("session_id").agg(
        F.first("user_context").alias("user_context"), F.first("user_category_idx").alias("user_category_idx"),
        (F.max(F.col("window_start") + F.col("length")) - 2).alias("n_events"))
    bank_rows = (sessions.orderBy(F.xxhash64("session_id", F.lit(int(cfg.run.seed))))
                 .limit(max(0, int(cfg.train.context_bank))).collect())
    context_bank = [[float(x) for x in r.user_context] for r in bank_rows]
    context_bank_category = [int(r.user_category_idx) for r in bank_rows]
    context_bank_length = [int(r.n_events) for r in bank_rows]

    # Petastorm reads the table's Parquet files at the pinned version, split=train only.
    all_files = ctx.lake.files("session_tokens", tokens.version)
    files = [u for u in all_files if "/split=train/" in u]
    holdout_files = [u for u in all_files if "/split=holdout/" in u]
    row_groups = _count_row_groups(files)
    world_size = cfg.train.num_processes
    # Petastorm shards by row group: with fewer row groups than ranks some ranks would get none (it
    # raises NoDataAvailableError). Then every rank reads all the files unsharded; each rank still draws
    # different batches, because its shuffle buffer is seeded with its rank.
    shard = row_groups >= world_size

    model_config = {
        "n_event_types": 7, "n_items": n_items, "n_categories": n_categories, "n_gap_buckets": n_gap_buckets,
        "block_size": window_tokens - 1, "d_model": cfg.train.d_model, "n_layer": cfg.train.n_layer,
        "n_head": cfg.train.n_head, "dropout": cfg.train.dropout, "n_brands": n_brands,
        "n_price_buckets": len(price_edges) + 2, "context_dim": CONTEXT_DIM,
    }
    checkpoint = Path(cfg.train.checkpoint_dir).expanduser().resolve() / ctx.run_id
    params = {
        "files": files,
        "shard": shard,
        "model_config": model_config,
        "holdout_files": holdout_files,
        "catalogue": {"item_category": item_category, "item_brand": item_brand,
                      "item_price_bucket": item_price_bucket, "context_bank": context_bank,
                      "context_bank_category": context_bank_category, "context_bank_length": context_bank_length,
                      # pad, BOS and EOS, and the event types present in the training windows
                      "event_types_seen": [k < 3 or bool(stats[f"events_{k}"]) for k in range(7)]},
        "seed": int(cfg.run.seed),
        "learning_rate": float(cfg.train.learning_rate),
        "batch_size": int(cfg.train.batch_size),
        "max_steps": int(cfg.train.max_steps),
        "log_every": max(1, int(cfg.train.log_every)),
        "checkpoint_every": max(0, int(cfg.train.checkpoint_every)),
        "eval_every": max(0, int(cfg.train.eval_every)),
        "patience": max(0, int(cfg.train.patience)),
        "eval_windows": max(0, int(cfg.train.eval_windows)),
        "use_gpu": bool(cfg.train.use_gpu),
        "compile": bool(cfg.train.compile),
        "cpu_threads": max(0, int(cfg.train.cpu_threads)),
        "checkpoint_dir": str(checkpoint),
        "state_dir": str(checkpoint.parent / f"{ctx.run_id}.train-state"),
        "metadata": {
            "run_id": ctx.run_id,
            "run_config": ctx.cfg.to_dict(),
            "seed": int(cfg.run.seed),
            "input_versions": dict(ctx.input_versions),
            "vocab": {"n_event_types": 7, "n_items": n_items, "n_categories": n_categories,
                      "n_gap_buckets": n_gap_buckets, "n_brands": n_brands,
                      "n_price_buckets": len(price_edges) + 2},
            "brand_ids": "sorted distinct item_catalog brands -> 1..n (0 = none)",
            "price_bucket_edges": price_edges,
            "context_bank_rows": len(context_bank),
            "holdout_files": len(holdout_files),
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

    with _package_importable():
        result = _distributor(cfg).run(train_fn, params)
    if not result:
        raise RuntimeError("training finished without a result from rank 0")
    ctx.artifacts["checkpoint"] = result["checkpoint"]
    if not Path(result["checkpoint"]).is_dir():
        log.warning("train: checkpoint %s is not visible from the driver; with train.local_mode=false, "
                    "train.checkpoint_dir must be on storage shared by the executors", result["checkpoint"])
    log.info("train: %d steps, loss %.3f -> %.3f, %.0f events/s, %.1f s; checkpoint %s", result["steps"],
             result["initial_loss"], result["final_loss"], result["events_per_s"], result["wall_seconds"],
             result["checkpoint"])
    clock = time.time()
    profile_rows = train_profile_model(ctx)
    return {
        "profile_rows": profile_rows,
        "train_windows": int(stats["windows"]),
        "train_events": int(stats["events"] or 0),
        "steps": int(result["steps"]),
        "final_loss_x1000": int(result["final_loss"] * 1000),
        "events_per_s": int(result["events_per_s"]),
        # Where the stage's time goes: the session model's optimizer loop and the profile model's fit.
        "session_model_ms": int(result["train_seconds"] * 1000),
        "profile_model_ms": int((time.time() - clock) * 1000),
    }


# Profile columns the tabular model learns. n_events, last_seen and recency_days are derived from them
# afterwards (n_events = the counts' sum, last_seen = first_seen + active_seconds): a model that learns
# a sum next to its terms, or two nearly equal timestamps side by side, only blurs the relation.
PROFILE_COLUMNS = ("n_sessions", "n_views", "n_carts", "n_purchases", "n_searches", "monetary", "first_seen",
                   "active_seconds", "top_category")


def _distributor(cfg):
    from pyspark.ml.torch.distributor import TorchDistributor

    return TorchDistributor(num_processes=cfg.train.num_processes, local_mode=cfg.train.local_mode,
                            use_gpu=cfg.train.use_gpu)


def profile_checkpoint(cfg, run_id: str) -> Path:
    return Path(cfg.train.checkpoint_dir) / f"{run_id}.profiles"


def train_profile_model(ctx) -> int:
    """Fit the tabular model of user profiles (profiles.model) and save it next to the session model.

    Profiles are per-user aggregates, not events: the driver collects at most profiles.max_rows of them
    and hands them to `profile_fn`, which TorchDistributor runs in train.num_processes data-parallel
    processes, like the session model.
    """
    cfg = ctx.cfg
    table = ctx.read("user_profiles").df
    active = F.col("last_seen").cast("double") - F.col("first_seen").cast("double")
    profiles = table.withColumn("active_seconds", active).select(*PROFILE_COLUMNS)
    # Epoch seconds, not a collected timestamp: Python would render that in the driver's local zone.
    total, last_seen = table.agg(F.count("*"), F.max(F.col("last_seen").cast("double"))).first()
    if total == 0:
        raise ValueError("user_profiles is empty: nothing to fit the profile model on")
    if total > cfg.profiles.max_rows:
        profiles = profiles.sample(fraction=cfg.profiles.max_rows / total, seed=cfg.run.seed)
    params = {
        "frame": profiles.toPandas(),
        "profiles": cfg.profiles.to_dict(),
        "seed": int(cfg.run.seed),
        "cpu_threads": max(0, int(cfg.train.cpu_threads)),
        "checkpoint_dir": str(profile_checkpoint(cfg, ctx.run_id).expanduser().resolve()),
        "metadata": {"run_id": ctx.run_id, "input_versions": dict(ctx.input_versions),
                     "recency_reference": dt.datetime.fromtimestamp(last_seen, dt.timezone.utc)
                     .replace(tzinfo=None).isoformat(),
                     "config": ctx.cfg.to_dict()},
    }
    started = time.time()
    with _package_importable():
        result = _distributor(cfg).run(profile_fn, params)
    ctx.artifacts["profile_checkpoint"] = result["checkpoint"]
    log.info("train: %s profile model on %d of %d profiles in %d process(es), %.1f s; validation %s",
             cfg.profiles.model, len(params["frame"]), total, cfg.train.num_processes, time.time() - started,
             result["validation"])
    return len(params["frame"])


def profile_fn(params: dict) -> dict:
    """One process fitting the profile model: synth.tabular averages the gradients across the ranks of
    the process group started here. Rank 0 saves the checkpoint; every rank returns its path and the
    validation scores."""
    import torch
    import torch.distributed as dist

    from synth.tabular import TabularMetadata, synthesizer_from_config

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # The tabular networks are small: CPU, with the machine's cores shared among its processes.
    torch.set_num_threads(params["cpu_threads"] or max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1:
        dist.init_process_group("gloo")
    try:
        frame = params["frame"]
        synthesizer = synthesizer_from_config(params["profiles"], TabularMetadata.detect(frame),
                                              seed=params["seed"]).fit(frame)
        if rank == 0:
            synthesizer.save(params["checkpoint_dir"], params["metadata"])
        return {"checkpoint": params["checkpoint_dir"], "validation": synthesizer.validation}
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def brand_ids(items, n_items: int) -> tuple[list[int], int]:
    """(brand id per item_idx, brand vocabulary size): the catalogue's distinct brands in sorted order get
    ids 1..n, items without a brand (and item 0) 0. Deterministic for a given catalogue version."""
    brands = sorted({b for b in items["brand"].tolist() if isinstance(b, str)})
    ids = {b: i + 1 for i, b in enumerate(brands)}
    item_brand = [0] * n_items
    for item, brand in zip(items["item_idx"].tolist(), items["brand"].tolist()):
        item_brand[int(item)] = ids.get(brand, 0) if isinstance(brand, str) else 0
    return item_brand, len(brands) + 1


def price_buckets(items, n_items: int, buckets: int) -> tuple[list[int], list[float]]:
    """(price bucket per item_idx, inner edges): `buckets` quantile buckets of the catalogue's prices,
    numbered 1..buckets (a price equal to an edge goes up); 0 = no price (and item 0)."""
    import numpy as np

    prices = items["price"].to_numpy(dtype=float, na_value=np.nan)
    known = np.isfinite(prices)
    edges = (np.unique(np.quantile(prices[known], np.linspace(0, 1, max(1, buckets) + 1)[1:-1])).tolist()
             if known.any() and buckets > 1 else [])
    item_price = [0] * n_items
    found = np.searchsorted(np.asarray(edges, dtype=float), prices, side="right") + 1
    for item, ok, bucket in zip(items["item_idx"].tolist(), known.tolist(), found.tolist()):
        item_price[int(item)] = int(bucket) if ok else 0
    return item_price, [float(e) for e in edges]


def _check_tokens(stats, version: int, window_tokens: int, sizes: dict[str, int]) -> None:
    problems = []
    if stats["min_len"] < 2 or stats["max_len"] > window_tokens:
        problems.append(f"token arrays have {stats['min_len']}..{stats['max_len']} entries, expected "
                        f"2..featurize.window + 2 = {window_tokens}")
    if stats["min_context"] != CONTEXT_DIM or stats["max_context"] != CONTEXT_DIM:
        problems.append(f"user_context arrays have {stats['min_context']}..{stats['max_context']} entries, "
                        f"expected {CONTEXT_DIM} (featurize.USER_CONTEXT)")
    for column, size in sizes.items():
        low, high = stats[f"min_{column}"], stats[f"max_{column}"]
        if low is None or low < 0 or high >= size:
            problems.append(f"{column} spans {low}..{high}, outside the vocabulary 0..{size - 1}")
    if problems:
        raise ValueError(f"session_tokens version {version} does not fit the model: " + "; ".join(problems)
                         + " (item and category vocabularies come from item_catalog)")


def _count_row_groups(files: list[str]) -> int:
    """Row groups across `files`, from the Parquet footers only."""
    import pyarrow.parquet as pq

    total = 0
    for uri in files:
        fs, path = _arrow.filesystem(uri)
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


def _batches(reader, batch_size: int, rng, buffer_rows: int, window_tokens: int):
    """Endless random batches {column: array [batch_size, ...]} from a Petastorm batch reader, through a
    shuffle buffer of at least `buffer_rows` windows (row groups are read whole)."""
    import numpy as np

    pool = None
    target = max(buffer_rows, batch_size)
    while True:
        while pool is None or len(pool["event_type"]) < target:
            arrays = _arrays(next(reader), window_tokens)
            if len(arrays["event_type"]) == 0:
                continue
            pool = arrays if pool is None else {c: np.concatenate([pool[c], arrays[c]]) for c in READ_COLUMNS}
        n = len(pool["event_type"])
        take = rng.choice(n, size=batch_size, replace=False)
        keep = np.ones(n, dtype=bool)
        keep[take] = False
        yield {c: pool[c][take] for c in READ_COLUMNS}
        pool = {c: pool[c][keep] for c in READ_COLUMNS}


def _windows_reader(files: list[str], window_tokens: int, **options):
    """A Petastorm batch reader of session_tokens files whose token arrays come padded to window_tokens
    (Petastorm stacks each list column of a row group into one matrix, so rows must be of one length)."""
    from petastorm import make_batch_reader
    from petastorm.transform import TransformSpec

    return make_batch_reader(files, schema_fields=list(READ_COLUMNS), reader_pool_type="dummy",
                             transform_spec=TransformSpec(functools.partial(_pad_row_group, window_tokens)),
                             **options)


class _Epochs:
    """Windows, epoch after epoch, each epoch from a one-epoch reader seeded `seed` + epoch.

    Petastorm 0.12.1's endless reader (num_epochs=None) shuffles the row groups again at an epoch's
    start each time its queue is full, so the order of every epoch after the first depended on
    thread timing; a one-epoch reader never waits for room and shuffles exactly once."""

    def __init__(self, files: list[str], window_tokens: int, seed: int, **options):
        self._open = functools.partial(_windows_reader, files, window_tokens, num_epochs=1, shuffle_row_groups=True,
                                       **options)
        self._seed, self._epoch = seed, 0
        self._reader = self._open(seed=seed)
        self._delivered = False  # whether this epoch gave a chunk yet

    def __iter__(self):
        return self

    def __next__(self):
        try:
            chunk = next(self._reader)
        except StopIteration:
            if not self._delivered:
                raise ValueError("a whole epoch of the training windows' files gave no rows") from None
            self.stop()
            self.join()
            self._epoch += 1
            self._reader = self._open(seed=self._seed + self._epoch)
            self._delivered = False
            return next(self)  # the next epoch's first chunk, or the error above
        self._delivered = True
        return chunk

    def stop(self):
        self._reader.stop()

    def join(self):
        self._reader.join()


def _pad_row_group(window_tokens: int, frame):
    """A row group (pandas) with its token arrays padded to window_tokens."""
    import numpy as np

    for column in TOKEN_COLUMNS:
        frame[column] = list(_padded(frame[column].to_numpy(), window_tokens, np.int32))
    return frame


def _arrays(chunk, window_tokens: int) -> dict:
    """One Petastorm chunk of _windows_reader (its token arrays already padded) as numpy: token columns
    int64 [rows, window_tokens], user_context float32 [rows, 7], user_category_idx int64 [rows]."""
    import numpy as np

    def matrix(column, width: int, dtype):
        return np.asarray(column, dtype=dtype).reshape(len(column), width)

    arrays = {c: matrix(getattr(chunk, c), window_tokens, np.int64) for c in TOKEN_COLUMNS}
    arrays["user_context"] = matrix(chunk.user_context, CONTEXT_DIM, np.float32)
    arrays["user_category_idx"] = np.asarray(chunk.user_category_idx, dtype=np.int64).reshape(-1)
    return arrays


def _padded(column, width: int, dtype):
    """Arrays of up to `width` entries (an object array) as [rows, width]: each row's entries, then zeros."""
    import numpy as np

    out = np.zeros((len(column), width), dtype)
    if len(column):
        lengths = np.fromiter(map(len, column), np.int64, len(column))
        out[np.arange(width)[None, :] < lengths[:, None]] = np.concatenate(column).astype(dtype, copy=False)
    return out


def _read_holdout(files: list[str], limit: int, window_tokens: int) -> dict | None:
    """Up to `limit` holdout windows (the first ones, in file order: the same set on every rank and run)."""
    import numpy as np

    if not files or limit <= 0:
        return None
    parts, rows = [], 0
    with _windows_reader(sorted(files), window_tokens, num_epochs=1, shuffle_row_groups=False) as reader:
        for chunk in reader:
            arrays = _arrays(chunk, window_tokens)
            if len(arrays["event_type"]):
                parts.append(arrays)
                rows += len(arrays["event_type"])
            if rows >= limit:
                break
    if not rows:
        return None
    return {c: np.concatenate([p[c] for p in parts])[:limit] for c in READ_COLUMNS}


def _state_files(state_dir: str) -> list:
    """Training-state files of a run, newest step first."""
    folder = Path(state_dir)
    if not folder.is_dir():
        return []
    return sorted(folder.glob(f"{STATE_PREFIX}*.pt"), reverse=True)


def save_state(state_dir: str, step: int, state: dict) -> Path:
    """Write the training state atomically (temporary file, fsync, rename) as state-<step>.pt and keep
    only the newest KEEP_STATES files."""
    import torch

    folder = Path(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{STATE_PREFIX}{step:09d}.pt"
    staging = folder / f".{target.name}.tmp-{os.getpid()}"
    with open(staging, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, target)
    for old in _state_files(state_dir)[KEEP_STATES:]:
        old.unlink(missing_ok=True)
    return target


def load_latest_state(state_dir: str, model_config: dict) -> tuple[dict | None, str | None]:
    """The newest readable training state of the same model configuration, and its path (None, None
    when there is none). An unreadable file (a crash mid-write cannot leave one, a bad disk can) is
    skipped for the one before it."""
    import torch

    for path in _state_files(state_dir):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: fall back to the previous one
            log.warning("train: skipping unreadable training state %s: %s", path, exc)
            continue
        if state.get("model_config") != model_config:
            log.warning("train: ignoring training state %s: it was written for another model configuration", path)
            return None, None
        return state, str(path)
    return None, None


def train_fn(params: dict) -> dict | None:
    """One training process (DDP rank). Takes and returns plain picklable values: the checkpoint
    metadata written by rank 0, plus the checkpoint path (every rank returns rank 0's copy).

    Rank 0 saves the training state (model, optimizer, step, curves, RNG) every `checkpoint_every` steps
    under `state_dir`; a new attempt of the same run resumes from the newest one. Every `eval_every`
    steps the model is scored on a fixed set of holdout windows; after `patience` evaluations without
    improvement training stops early, and the final checkpoint holds the best evaluated weights."""
    import numpy as np
    import torch
    import torch.distributed as dist

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

    def all_sum(values: torch.Tensor) -> torch.Tensor:
        if world_size == 1:
            return values
        summed = values.to(device)  # gloo reduces CPU tensors, nccl GPU tensors
        dist.all_reduce(summed)
        return summed.cpu()

    reader = None
    try:
        torch.manual_seed(params["seed"])
        cfg = SessionModelConfig(**params["model_config"])
        window_tokens = cfg.block_size + 1  # BOS + events + EOS: the width windows are padded to
        model = SessionModel(cfg, **params["catalogue"]).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=params["learning_rate"])

        # Resume: every rank loads the same newest state (rank 0 wrote it) before DDP wraps the model.
        state, state_path = load_latest_state(params["state_dir"], params["model_config"])
        start_step = 0
        loss_curve: list[list[float]] = []
        val_curve: list[list[float]] = []
        best = {"loss": float("inf"), "step": 0, "state": None, "bad_evals": 0}
        resumed_from: list[int] = []
        total_events, train_seconds = 0.0, 0.0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start_step = int(state["step"])
            loss_curve, val_curve = state["loss_curve"], state["val_curve"]
            best = state["best"]
            resumed_from = state["resumed_from"] + [start_step]
            total_events, train_seconds = state["total_events"], state["train_seconds"]
            torch.set_rng_state(state["torch_rng"])
            say(f"resuming from step {start_step} ({state_path})")

        net = model
        if world_size > 1:
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
        if use_cuda and params["compile"]:
            net = torch.compile(net)
        # bf16 autocast on GPUs that support it; full precision on CPU.
        use_amp = use_cuda and torch.cuda.is_bf16_supported()
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext

        holdout = None
        if params["eval_every"]:
            holdout = _read_holdout(params["holdout_files"], params["eval_windows"], window_tokens)
        # Each rank scores its share of the holdout windows; the sums are reduced, so all ranks agree.
        if holdout is not None:
            holdout = {c: torch.from_numpy(v[rank::world_size]) for c, v in holdout.items()}

        def evaluate() -> float:
            model.eval()
            totals = torch.zeros(2, dtype=torch.float64)
            with torch.no_grad(), autocast():
                n = len(holdout["event_type"])
                for lo in range(0, n, params["batch_size"]):
                    batch = {c: v[lo:lo + params["batch_size"]].to(device) for c, v in holdout.items()}
                    _, loss = model(**split_window(batch))
                    totals += torch.tensor([float(loss) * len(batch["event_type"]), len(batch["event_type"])],
                                           dtype=torch.float64)
            model.train()
            totals = all_sum(totals)
            return float(totals[0] / max(float(totals[1]), 1.0))

        shard = {"cur_shard": rank, "shard_count": world_size} if params["shard"] and world_size > 1 else {}
        # The same seed on every rank: Petastorm shuffles row groups with it before dealing them out
        # to shards, so the shards only partition the data when all ranks agree on it. A resumed attempt
        # reseeds with its start step, so it does not replay the batches of the first attempt.
        # One reading thread: a pool delivers row groups in whichever order its threads finish, and then
        # the same seed would train on different batches.
        reader = _Epochs(params["files"], window_tokens, params["seed"] + start_step, **shard)
        rng = np.random.default_rng([params["seed"], rank, start_step])
        batches = _batches(reader, params["batch_size"], rng, buffer_rows=8 * params["batch_size"],
                           window_tokens=window_tokens)
        say(f"{model.num_parameters():,} parameters on {device}; {len(params['files'])} files"
            f"{' sharded' if shard else ''}; {params['max_steps']} steps of {params['batch_size']} windows; "
            f"{0 if holdout is None else len(holdout['event_type']) * world_size} holdout windows")

        interval = torch.zeros(3, dtype=torch.float64)  # loss sum, steps, events (this rank)
        train_clock = interval_clock = time.time()
        seconds_before = train_seconds
        stopped_early = False
        step = start_step
        net.train()
        while step < params["max_steps"]:
            step += 1
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
            last = step == params["max_steps"]
            if step == start_step + 1 or step % params["log_every"] == 0 or last:
                interval = all_sum(interval)
                now = time.time()
                mean_loss = float(interval[0] / interval[1])
                events_per_s = float(interval[2]) / max(now - interval_clock, 1e-9)
                total_events += float(interval[2])
                loss_curve.append([step, round(mean_loss, 6)])
                say(f"step {step}/{params['max_steps']} loss {mean_loss:.4f} {events_per_s:,.0f} events/s")
                interval.zero_()
                interval_clock = now
            if holdout is not None and (step % params["eval_every"] == 0 or last):
                val = evaluate()
                val_curve.append([step, round(val, 6)])
                if val < best["loss"]:
                    best = {"loss": val, "step": step, "bad_evals": 0,
                            "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
                else:
                    best["bad_evals"] += 1
                say(f"step {step}/{params['max_steps']} val_loss {val:.4f} (best {best['loss']:.4f} at step "
                    f"{best['step']})")
                if params["patience"] and best["bad_evals"] >= params["patience"] and not last:
                    stopped_early = True
                    say(f"early stop at step {step}: no improvement in {params['patience']} evaluations")
            if rank == 0 and params["checkpoint_every"] and step % params["checkpoint_every"] == 0 and not last \
                    and not stopped_early:
                save_state(params["state_dir"], step, {
                    "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "model_config": params["model_config"], "loss_curve": loss_curve, "val_curve": val_curve,
                    "best": best, "resumed_from": resumed_from, "total_events": total_events,
                    "train_seconds": seconds_before + time.time() - train_clock,
                    "torch_rng": torch.get_rng_state()})
            if rank == 0 and _after_step is not None:
                _after_step(step)
            if stopped_early:
                break
        train_seconds = seconds_before + time.time() - train_clock
        if interval[1] > 0:  # steps since the last progress line (early stop between lines)
            interval = all_sum(interval)
            total_events += float(interval[2])
            loss_curve.append([step, round(float(interval[0] / interval[1]), 6)])

        result = None
        if rank == 0:
            if best["state"] is not None:
                model.load_state_dict(best["state"])  # the best evaluated weights
            metadata = {
                **params["metadata"],
                "steps": step,
                "max_steps": params["max_steps"],
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
                "val_curve": val_curve,
                "best_val_loss": None if best["state"] is None else best["loss"],
                "best_step": None if best["state"] is None else best["step"],
                "weights_from_step": best["step"] if best["state"] is not None else step,
                "stopped_early": stopped_early,
                "eval_every": params["eval_every"],
                "patience": params["patience"],
                "checkpoint_every": params["checkpoint_every"],
                "resumed_from_steps": resumed_from,
                "events_per_s": total_events / max(train_seconds, 1e-9),
                "train_seconds": train_seconds,
                "wall_seconds": time.time() - started,
                "torch_version": torch.__version__,
            }
            path = save_checkpoint(model, params["checkpoint_dir"], metadata)
            # The run is done: its training states would only make a forced re-run resume at the end.
            shutil.rmtree(params["state_dir"], ignore_errors=True)
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
