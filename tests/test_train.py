"""The train stage end to end on a tiny lake: TorchDistributor, Petastorm, checkpoint and metadata."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

WINDOW = 8  # featurize.window: token arrays hold WINDOW + 2 entries
N_ITEMS = 12  # catalogue items 1..12
TRAIN_OVERRIDES = {
    "featurize.window": WINDOW, "train.max_steps": 20, "train.batch_size": 16, "train.learning_rate": 0.01,
    "train.d_model": 32, "train.n_layer": 1, "train.n_head": 2, "train.dropout": 0.0, "train.log_every": 5,
    "train.cpu_threads": 1, "profiles.epochs": 2,
}


def catalog_df(spark):
    rows = [(i, f"item-{i}", f"cat-{(i - 1) % 3 + 1}", (i - 1) % 3 + 1, "brand", 10.0 * i, 9.0 * i, 11.0 * i,
             10.0 * i, 100 - i) for i in range(1, N_ITEMS + 1)]
    return spark.createDataFrame(rows, "item_idx int, item_id string, category string, category_idx int, "
                                       "brand string, price double, price_min double, price_max double, "
                                       "price_mean double, popularity long")


def session_tokens_df(spark, n_train=120, n_holdout=30, seed=0):
    """Windows of a learnable habit: view an item, cart it, buy it, search, then view another item."""
    rng = random.Random(seed)
    rows = []
    for n, split in [(n_train, "train"), (n_holdout, "holdout")]:
        for s in range(n):
            item, other = rng.randint(1, N_ITEMS), rng.randint(1, N_ITEMS)
            events = [(3, item, 3), (4, item, 2), (5, item, 4), (6, 0, 1), (3, other, 5)]
            tokens = [(1, 0, 0)] + events + [(2, 0, 0)]
            tokens += [(0, 0, 0)] * (WINDOW + 2 - len(tokens))
            category = [0 if i == 0 else (i - 1) % 3 + 1 for _, i, _ in tokens]
            rows.append((f"{split}-{s}", 0, len(events) + 2, [t for t, _, _ in tokens], [i for _, i, _ in tokens],
                         category, [g for _, _, g in tokens], [0.5] * 7, 1, split))
    return spark.createDataFrame(rows, "session_id string, window_start int, length int, event_type array<int>, "
                                       "item_idx array<int>, category_idx array<int>, gap_bucket array<int>, "
                                       "user_context array<float>, user_category_idx int, split string")


def version_of(commit) -> int:
    return commit.version


@pytest.fixture
def tiny_lake(spark, lake):
    catalog_version = version_of(lake.write(catalog_df(spark), "item_catalog", app_id="test-featurize"))
    lake.write(session_tokens_df(spark, seed=1), "session_tokens", app_id="test-featurize-0")
    # A second commit: the stage must pin and record the latest version, not version 0.
    tokens_version = version_of(
        lake.write(session_tokens_df(spark, seed=2), "session_tokens", app_id="test-featurize-1"))
    profiles_version = version_of(lake.write(profiles_df(spark), "user_profiles", app_id="test-featurize"))
    return lake, {"item_catalog": catalog_version, "session_tokens": tokens_version,
                  "user_profiles": profiles_version}


def profiles_df(spark, n=200):
    import datetime as dt

    start = dt.datetime(2026, 11, 1)
    rows = [(f"u{i}", 1 + i % 3, 4 + i % 5, 3 + i % 4, i % 2, int(i % 3 == 0), int(i % 4 == 0),
             10.0 * (i % 3 == 0), start + dt.timedelta(hours=i % 24), start + dt.timedelta(hours=24 + i % 24),
             (i % 24) / 24.0, f"c{i % 3}", {f"c{i % 3}": 1.0}) for i in range(n)]
    return spark.createDataFrame(rows, "user_id string, n_sessions long, n_events long, n_views long, n_carts long, "
                                       "n_purchases long, n_searches long, monetary double, first_seen timestamp, "
                                       "last_seen timestamp, recency_days double, top_category string, "
                                       "category_affinity map<string,double>")


def run_train(spark, lake, cfg):
    from synth import train
    from synth.runner import StageContext

    ctx = StageContext(cfg, spark, lake, "train")
    return ctx, train.run(ctx)


def test_train_stage_writes_a_checkpoint_that_learned(spark, tiny_lake, make_cfg, capfd):
    from synth.model import load_checkpoint

    lake, versions = tiny_lake
    assert versions["session_tokens"] == 1
    cfg = make_cfg(**TRAIN_OVERRIDES)
    ctx, counts = run_train(spark, lake, cfg)

    checkpoint = Path(cfg.train.checkpoint_dir).resolve() / "test"
    assert ctx.artifacts["checkpoint"] == str(checkpoint)
    assert (checkpoint / "model.pt").is_file() and (checkpoint / "metadata.json").is_file()
    model, metadata = load_checkpoint(checkpoint)

    assert ctx.input_versions == versions
    assert metadata["input_versions"] == {t: versions[t] for t in ("item_catalog", "session_tokens")}
    assert Path(ctx.artifacts["profile_checkpoint"], "metadata.json").exists()
    assert metadata["seed"] == cfg.run.seed
    assert metadata["run_config"]["train"]["max_steps"] == 20
    assert metadata["vocab"] == {"n_event_types": 7, "n_items": N_ITEMS + 1, "n_categories": 4,
                                 "n_gap_buckets": len(cfg.featurize.gap_bucket_edges) + 1, "n_brands": 2,
                                 "n_price_buckets": 11}
    assert model.config.block_size == WINDOW + 1 and model.config.d_model == 32
    assert model.item_category.tolist() == [0] + [(i - 1) % 3 + 1 for i in range(1, N_ITEMS + 1)]
    # Brand ids and price quantile buckets from the catalogue, stored in the checkpoint.
    assert model.item_brand.tolist() == [0] + [1] * N_ITEMS and metadata["vocab"]["n_brands"] == 2
    prices = model.item_price_bucket.tolist()
    assert prices[0] == 0 and prices[1:] == sorted(prices[1:]) and prices[1] == 1 and prices[-1] == 10
    assert model.config.n_price_buckets == 11 and len(metadata["price_bucket_edges"]) == 9
    assert model.context_bank.shape == (120, 7) and set(model.context_bank_category.tolist()) == {1}
    assert set(model.context_bank_length.tolist()) == {5}  # one bank row per training session, with its length
    # Scored on the holdout windows at the last step (eval_every 50 > 20 steps); no state left behind.
    assert [step for step, _ in metadata["val_curve"]] == [20] and metadata["best_step"] == 20
    assert metadata["stopped_early"] is False and metadata["resumed_from_steps"] == []
    assert not (checkpoint.parent / "test.train-state").exists()
    # Only the split=train windows count (the holdout ones are in other files).
    assert counts["train_windows"] == metadata["train_windows"] == 120
    assert counts["steps"] == metadata["steps"] == 20
    assert metadata["train_files"] == len([u for u in lake.files("session_tokens", 1) if "/split=train/" in u])

    curve = metadata["loss_curve"]
    assert [step for step, _ in curve] == [1, 5, 10, 15, 20]
    assert curve[-1][1] < 0.7 * curve[0][1]
    assert counts["final_loss_x1000"] == int(metadata["final_loss"] * 1000)
    assert metadata["events_per_s"] > 0 and metadata["wall_seconds"] > 0
    out = capfd.readouterr().out
    assert "step 20/20 loss" in out and "events/s" in out

    # The trained model samples valid sessions.
    import torch

    generator = torch.Generator().manual_seed(0)
    context, category, lengths = model.draw_contexts(20)
    sample = model.sample(20, generator, context=context, context_category=category, max_events=10, lengths=lengths)
    assert np.bincount(sample["session"], minlength=20).tolist() == [5] * 20
    assert set(sample["event_type"].tolist()) <= {3, 4, 5, 6}
    assert (sample["item_idx"][sample["event_type"] != 6] > 0).all()


def test_same_seed_and_input_train_the_same_models(spark, lake, make_cfg, tmp_path):
    """Several token files (row groups a reader pool could deliver in any order), same models twice."""
    import torch

    from synth.model import load_checkpoint
    from synth.tabular import load_synthesizer

    lake.write(catalog_df(spark), "item_catalog", app_id="test-featurize")
    lake.write(profiles_df(spark), "user_profiles", app_id="test-featurize")
    lake.write(session_tokens_df(spark).repartition(4), "session_tokens", app_id="test-featurize")
    models = []
    for attempt in ("a", "b"):
        cfg = make_cfg(**{**TRAIN_OVERRIDES, "train.max_steps": 8, "train.checkpoint_dir": str(tmp_path / attempt)})
        ctx, _ = run_train(spark, lake, cfg)
        session_model, _ = load_checkpoint(ctx.artifacts["checkpoint"])
        profile_model, _ = load_synthesizer(ctx.artifacts["profile_checkpoint"])
        models.append((session_model.state_dict(), profile_model.decoder.state_dict()))
    for first, second in zip(*models):
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("partitions", [1, 2])
def test_train_stage_two_ranks_ddp(spark, lake, make_cfg, partitions):
    """Two gloo DDP ranks, sharding the row groups between them (2 files of one row group each) or, with
    fewer row groups than ranks (1 file), each reading all of them, as Petastorm would leave a rank empty."""
    from synth.model import load_checkpoint

    lake.write(catalog_df(spark), "item_catalog", app_id="test-featurize")
    lake.write(profiles_df(spark), "user_profiles", app_id="test-featurize")
    tokens = session_tokens_df(spark).repartition(partitions)
    version = version_of(lake.write(tokens, "session_tokens", app_id="test-featurize"))
    train_files = [u for u in lake.files("session_tokens", version) if "/split=train/" in u]
    assert len(train_files) == partitions

    cfg = make_cfg(**{**TRAIN_OVERRIDES, "train.num_processes": 2, "train.max_steps": 10})
    ctx, counts = run_train(spark, lake, cfg)
    model, metadata = load_checkpoint(ctx.artifacts["checkpoint"])
    assert metadata["world_size"] == 2
    assert metadata["sharded"] is (partitions == 2)
    assert metadata["input_versions"] == {"item_catalog": 0, "session_tokens": version}
    assert counts["steps"] == 10
    assert metadata["loss_curve"][-1][1] < metadata["loss_curve"][0][1]
    # The profile model trains data-parallel over the same two processes.
    from synth.tabular import load_synthesizer

    profiles, record = load_synthesizer(ctx.artifacts["profile_checkpoint"])
    assert record["fit"]["processes"] == 2 and len(profiles.sample(50, seed=1)) == 50


def test_train_stage_rejects_tokens_outside_the_vocabulary(spark, lake, make_cfg):
    lake.write(catalog_df(spark).where("item_idx <= 5"), "item_catalog", app_id="test-featurize")
    lake.write(session_tokens_df(spark), "session_tokens", app_id="test-featurize")
    with pytest.raises(ValueError, match="item_idx spans 0..12, outside the vocabulary 0..5"):
        run_train(spark, lake, make_cfg(**TRAIN_OVERRIDES))


# ----- train_fn in this process (no Spark): resume after a crash, early stopping -----------------------


def _token_files(tmp_path) -> dict[str, list[str]]:
    """session_tokens-like Parquet files (one per split) written with pyarrow, as Petastorm reads them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    files = {}
    for split, n in [("train", 64), ("holdout", 16)]:
        columns = {c: [] for c in ("event_type", "item_idx", "category_idx", "gap_bucket")}
        for _ in range(n):
            item = rng.randint(1, N_ITEMS)
            tokens = [(1, 0, 0), (3, item, 3), (4, item, 2), (5, item, 4), (6, 0, 1), (2, 0, 0)]
            tokens += [(0, 0, 0)] * (WINDOW + 2 - len(tokens))
            columns["event_type"].append([t for t, _, _ in tokens])
            columns["item_idx"].append([i for _, i, _ in tokens])
            columns["category_idx"].append([0 if i == 0 else (i - 1) % 3 + 1 for _, i, _ in tokens])
            columns["gap_bucket"].append([g for _, _, g in tokens])
        table = pa.table({**{c: pa.array(v, pa.list_(pa.int32())) for c, v in columns.items()},
                          "user_context": pa.array([[0.5] * 7] * n, pa.list_(pa.float32())),
                          "user_category_idx": pa.array([1] * n, pa.int32())})
        path = tmp_path / "tokens" / f"split={split}" / "part-0.parquet"
        path.parent.mkdir(parents=True)
        pq.write_table(table, path)
        files[split] = [f"file://{path}"]
    return files


def _params(tmp_path, **overrides) -> dict:
    files = _token_files(tmp_path)
    item_category = [0] + [(i - 1) % 3 + 1 for i in range(1, N_ITEMS + 1)]
    params = {
        "files": files["train"], "holdout_files": files["holdout"], "shard": False,
        "model_config": {"n_event_types": 7, "n_items": N_ITEMS + 1, "n_categories": 4, "n_gap_buckets": 10,
                         "block_size": WINDOW + 1, "d_model": 16, "n_layer": 1, "n_head": 2, "dropout": 0.0,
                         "n_brands": 1, "n_price_buckets": 1, "context_dim": 7},
        "catalogue": {"item_category": item_category},
        "seed": 3, "learning_rate": 0.01, "batch_size": 8, "max_steps": 12, "log_every": 1,
        "checkpoint_every": 3, "eval_every": 4, "patience": 0, "eval_windows": 16,
        "use_gpu": False, "compile": False, "cpu_threads": 1,
        "checkpoint_dir": str(tmp_path / "ckpt" / "run"), "state_dir": str(tmp_path / "ckpt" / "run.train-state"),
        "metadata": {"run_id": "run"},
    }
    params.update(overrides)
    return params


def test_train_resumes_from_the_last_saved_step_after_a_crash(tmp_path, monkeypatch, capfd):
    from synth import train
    from synth.model import load_checkpoint

    params = _params(tmp_path)

    def crash(step):
        if step == 7:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(train, "_after_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.train_fn(params)
    states = sorted(p.name for p in Path(params["state_dir"]).iterdir())
    assert states == ["state-000000003.pt", "state-000000006.pt"]  # the newest two, written atomically
    assert not Path(params["checkpoint_dir"]).exists()
    capfd.readouterr()

    monkeypatch.setattr(train, "_after_step", None)
    result = train.train_fn(params)
    out = capfd.readouterr().out
    assert "resuming from step 6" in out
    steps = [line.split()[4] for line in out.splitlines() if " loss " in line and "val_loss" not in line]
    assert steps[0] == "7/12" and steps[-1] == "12/12"  # continues from the saved step, not from 1
    _, metadata = load_checkpoint(result["checkpoint"])
    assert metadata["resumed_from_steps"] == [6] and metadata["steps"] == 12
    assert [s for s, _ in metadata["loss_curve"]] == list(range(1, 13))
    assert [s for s, _ in metadata["val_curve"]] == [4, 8, 12]
    assert not Path(params["state_dir"]).exists()  # finished: the training states are gone


def test_train_stops_early_on_the_holdout_split(tmp_path, capfd):
    from synth import train
    from synth.model import load_checkpoint

    # Learning rate 0: the holdout loss never improves after the first evaluation.
    result = train.train_fn(_params(tmp_path, learning_rate=0.0, eval_every=2, patience=2, max_steps=50,
                                    log_every=10))
    _, metadata = load_checkpoint(result["checkpoint"])
    assert metadata["stopped_early"] is True and metadata["steps"] == 6
    assert [s for s, _ in metadata["val_curve"]] == [2, 4, 6]
    assert metadata["best_step"] == 2 and metadata["weights_from_step"] == 2
    assert metadata["loss_curve"][-1][0] == 6
    assert "early stop at step 6" in capfd.readouterr().out


def test_unpadded_windows_reach_the_model_padded_with_zeros():
    from synth.train import _padded

    column = np.empty(3, object)
    column[:] = [np.array([1, 3, 2]), np.array([1, 2]), np.array([1, 3, 3, 3, 2])]
    assert _padded(column, 5, np.int32).tolist() == [[1, 3, 2, 0, 0], [1, 2, 0, 0, 0], [1, 3, 3, 3, 2]]
    assert _padded(np.empty(0, object), 4, np.int32).shape == (0, 4)


def test_endless_window_reading_repeats_exactly(tmp_path):
    """Epoch after epoch, the same seed reads the row groups in the same order (Petastorm's own endless
    reader did not after its first epoch), and each epoch reads every row group once."""
    import itertools

    import pyarrow as pa
    import pyarrow.parquet as pq

    from synth.train import READ_COLUMNS, TOKEN_COLUMNS, _arrays, _Epochs

    rng = np.random.default_rng(0)
    files = []
    for f in range(4):
        lengths = rng.integers(2, 7, 40)
        columns = {c: pa.array([rng.integers(1, 7, n).astype(np.int32) for n in lengths], pa.list_(pa.int32()))
                   for c in TOKEN_COLUMNS}
        columns["event_type"] = pa.array([np.full(n, 100 * f + row // 10, np.int32) for row, n in enumerate(lengths)],
                                         pa.list_(pa.int32()))  # which row group a window came from
        columns["user_context"] = pa.array([rng.random(7).astype(np.float32) for _ in lengths], pa.list_(pa.float32()))
        columns["user_category_idx"] = pa.array(rng.integers(0, 5, 40).astype(np.int32))
        path = tmp_path / f"part-{f}.parquet"
        pq.write_table(pa.table(columns).select(list(READ_COLUMNS)), path, row_group_size=10)
        files.append(path.as_uri())

    def row_groups(seed: int) -> list[int]:
        reader = _Epochs(files, 8, seed)
        try:
            return [int(_arrays(chunk, 8)["event_type"][0, 0]) for chunk in itertools.islice(reader, 48)]
        finally:
            reader.stop()
            reader.join()

    first = row_groups(3)
    assert [row_groups(3) for _ in range(3)] == [first] * 3
    assert all(sorted(first[i:i + 16]) == sorted(first[:16]) and len(set(first[i:i + 16])) == 16 for i in (0, 16, 32))
    assert first[:16] != first[16:32]  # each epoch is shuffled anew
