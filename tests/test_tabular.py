"""Tabular profile synthesizers (synth/tabular.py): transformer, CTGAN, TVAE, scores, checkpoints."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from synth.model import CheckpointError
from synth.tabular import (CTGANSynthesizer, DataTransformer, TabularMetadata, TabularSynthesizer,
                           TVAESynthesizer, column_pair_score, column_shape_score, fit_gaussian_mixture,
                           load_synthesizer, make_synthesizer, synthesizer_from_config)

# Small, fast settings (a few seconds each on an idle 2-core CPU).
FAST = {
    "ctgan": dict(epochs=40, batch_size=100, embedding_dim=32, generator_dims=(64, 64),
                  discriminator_dims=(256, 256), generator_lr=1e-3, discriminator_lr=1e-3),
    "tvae": dict(epochs=40, batch_size=100, embedding_dim=32, compress_dims=(64, 64),
                 decompress_dims=(64, 64), learning_rate=3e-3),
}


def profile_table(n: int = 2000, seed: int = 0) -> pd.DataFrame:
    """A bimodal amount, a skewed count and a categorical that depends on the amount."""
    rng = np.random.default_rng(seed)
    segment = rng.random(n) < 0.4
    spend = np.where(segment, rng.normal(20, 3, n), rng.normal(80, 8, n))
    orders = rng.negative_binomial(1, 0.25, n)
    tier = np.where(spend > 50, rng.choice(["gold", "silver"], n, p=[0.8, 0.2]),
                    rng.choice(["bronze", "silver"], n, p=[0.85, 0.15]))
    return pd.DataFrame({"spend": spend, "n_orders": orders.astype(np.int64), "tier": tier})


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: threads only add contention on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def table():
    return profile_table()


@pytest.fixture(scope="module")
def meta(table):
    return TabularMetadata.detect(table)


@pytest.fixture(scope="module")
def fitted(table, meta):
    return {name: make_synthesizer(name, metadata=meta, seed=0, **params).fit(table)
            for name, params in FAST.items()}


def test_gaussian_mixture_finds_modes_and_drops_empty_ones():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(-5, 1, 3000), rng.normal(10, 2, 1000)])
    w, mu, sd = fit_gaussian_mixture(x, max_modes=10, rng=rng)
    assert len(mu) <= 4
    assert np.min(np.abs(mu - -5)) < 0.3 and np.min(np.abs(mu - 10)) < 0.5
    assert abs(w[np.argmin(np.abs(mu + 5))] - 0.75) < 0.1
    w, mu, sd = fit_gaussian_mixture(np.full(100, 3.0))
    assert list(mu) == [3.0] and list(w) == [1.0]


def test_metadata_detect_and_round_trip(table):
    meta = TabularMetadata.detect(table)
    d = meta.to_dict()
    assert d["spend"]["sdtype"] == "numerical" and not d["spend"]["integer"]
    assert d["n_orders"]["integer"] and d["n_orders"]["min"] == 0
    assert d["tier"]["sdtype"] == "categorical"
    assert TabularMetadata.from_dict(json.loads(json.dumps(d))).to_dict() == d
    with pytest.raises(ValueError):
        TabularMetadata({"x": "text"})


def test_transformer_round_trip_with_nulls_datetimes_and_rare_categories():
    rng = np.random.default_rng(2)
    n = 1000
    df = pd.DataFrame({
        "amount": np.concatenate([rng.normal(0, 1, n // 2), rng.normal(50, 5, n // 2)]),
        "visits": rng.poisson(3, n).astype(np.int64),
        "score": np.where(rng.random(n) < 0.1, np.nan, rng.normal(5, 1, n)),
        "seen": pd.Timestamp("2026-11-01") + pd.to_timedelta(rng.integers(0, 86400 * 3, n), unit="s"),
        "city": rng.choice([f"c{i}" for i in range(30)], n),
        "segment": np.where(rng.random(n) < 0.2, None, rng.choice(["a", "b"], n)),
    })
    meta = TabularMetadata.detect(df)
    t = DataTransformer(max_categories=10).fit(df, meta, seed=0)
    data = t.transform(df)
    assert data.shape == (n, t.output_dim) and np.isfinite(data).all()
    back = t.inverse_transform(data)
    assert list(back.columns) == list(df.columns)
    np.testing.assert_allclose(back["amount"], df["amount"], rtol=1e-5, atol=1e-4)
    assert back["visits"].dtype == np.int64 and (back["visits"] == df["visits"]).all()
    assert (back["score"].isna() == df["score"].isna()).all()
    np.testing.assert_allclose(back["score"].dropna(), df["score"].dropna(), rtol=1e-5, atol=1e-4)
    assert pd.api.types.is_datetime64_any_dtype(back["seen"]) and (back["seen"] == df["seen"]).all()
    assert (back["segment"].isna() == df["segment"].isna()).all()
    assert (back["segment"].dropna() == df["segment"].dropna()).all()
    # Integer counts with few values are one-hot categories; the continuous column keeps its modes.
    assert [c["encoding"] for c in t.columns[:2]] == ["modes", "category"]
    # city: the 9 most frequent kept exactly, the rest grouped into __other__, which decodes to a tail
    # city drawn with its training frequency, never to the placeholder itself.
    kept = set(t.columns[4]["categories"]) - {"__other__"}
    assert len(kept) == 9
    exact = df["city"].isin(kept)
    assert (back["city"][exact] == df["city"][exact]).all()
    tail = back["city"][~exact]
    assert set(tail) <= set(df["city"][~exact]) and "__other__" not in set(back["city"])
    real_share = df["city"][~exact].value_counts(normalize=True)
    decoded_share = tail.value_counts(normalize=True).reindex(real_share.index, fill_value=0.0)
    assert 0.5 * (real_share - decoded_share).abs().sum() < 0.2
    again = t.inverse_transform(data)
    assert (again["city"] == back["city"]).all()  # the default draw is seeded
    # Drawing the mode from its posterior (training) also decodes to the same values.
    sampled = t.inverse_transform(t.transform(df, rng=np.random.default_rng(0)))
    np.testing.assert_allclose(sampled["amount"], df["amount"], rtol=1e-5, atol=1e-4)


def test_scores_are_one_for_identical_and_low_for_unrelated(table, meta):
    assert column_shape_score(table, table, meta) == pytest.approx(1.0)
    assert column_pair_score(table, table, meta) == pytest.approx(1.0)
    shuffled = table.copy()
    shuffled["tier"] = shuffled["tier"].sample(frac=1.0, random_state=0).to_numpy()
    assert column_shape_score(table, shuffled, meta) == pytest.approx(1.0)
    assert column_pair_score(table, shuffled, meta) < 0.9  # tier/spend dependence lost
    other = pd.DataFrame({"spend": np.full(500, 1000.0), "n_orders": np.zeros(500, np.int64),
                          "tier": ["x"] * 500})
    assert column_shape_score(table, other, meta) < 0.3


@pytest.mark.parametrize("name", ["ctgan", "tvae"])
def test_synthesizer_fits_profiles(fitted, meta, name):
    synth = fitted[name]
    assert isinstance(synth, CTGANSynthesizer if name == "ctgan" else TVAESynthesizer)
    real = profile_table(4000, seed=1)  # fresh rows of the same distribution
    fake = synth.sample(4000, seed=5)
    assert list(fake.columns) == list(real.columns) and len(fake) == 4000
    assert fake["n_orders"].dtype == np.int64 and fake["n_orders"].min() >= 0
    assert set(fake["tier"]) <= {"gold", "silver", "bronze"}
    shape, pair = column_shape_score(real, fake, meta), column_pair_score(real, fake, meta)
    print(f"{name}: shape {shape:.3f} pair {pair:.3f} fit {synth.fit_info['fit_seconds']}s")
    assert shape >= 0.85
    assert pair >= 0.80
    # Recorded in the model: curves per epoch and holdout validation scores.
    assert all(len(v) == synth.epochs for v in synth.curves.values()) and synth.curves
    v = synth.validation
    assert v["holdout_rows"] == 200 and v["train_rows"] == 1800
    assert 0.0 <= v["column_pair_score"] <= 1.0 and v["column_shape_score"] >= 0.75


@pytest.mark.parametrize("name", ["ctgan", "tvae"])
def test_sampling_is_deterministic(fitted, name):
    synth = fitted[name]
    a, b, c = synth.sample(300, seed=11), synth.sample(300, seed=11), synth.sample(300, seed=12)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_fit_is_deterministic(table, meta):
    params = dict(FAST["ctgan"], epochs=2)
    a = make_synthesizer("ctgan", metadata=meta, seed=3, **params).fit(table)
    b = make_synthesizer("ctgan", metadata=meta, seed=3, **params).fit(table)
    assert a.curves == b.curves
    pd.testing.assert_frame_equal(a.sample(200, seed=1), b.sample(200, seed=1))
    params = dict(FAST["tvae"], epochs=2)
    a = make_synthesizer("tvae", metadata=meta, seed=3, **params).fit(table)
    b = make_synthesizer("tvae", metadata=meta, seed=3, **params).fit(table)
    assert a.curves == b.curves
    pd.testing.assert_frame_equal(a.sample(200, seed=1), b.sample(200, seed=1))


def test_make_synthesizer_options():
    ctgan = make_synthesizer("ctgan", pac=10, batch_size=95, learning_rate=0.1)  # TVAE-only key ignored
    assert ctgan.batch_size == 90  # PacGAN: a multiple of pac
    assert make_synthesizer("ctgan", pac=10, batch_size=3).batch_size == 10
    tvae = make_synthesizer("tvae", pac=4, loss_factor=3)
    assert isinstance(tvae, TVAESynthesizer) and tvae.loss_factor == 3.0
    with pytest.raises(ValueError):
        make_synthesizer("gaussian_copula")
    from synth import config

    for model in ("ctgan", "tvae"):  # the profiles section of pipeline.yaml serves both models
        cfg = config.load(overrides={"profiles.model": model, "profiles.epochs": 7})
        synth = synthesizer_from_config(cfg.profiles, seed=4)
        assert synth.name == model and synth.epochs == 7 and synth.seed == 4
    with pytest.raises(TypeError):
        make_synthesizer("tvae", epochz=3)


@pytest.mark.parametrize("name", ["ctgan", "tvae"])
def test_save_load_round_trip_and_tamper_detection(fitted, tmp_path, name):
    synth = fitted[name]
    target = tmp_path / "ckpt"
    synth.save(target, {"run_id": "r1"})
    synth.save(target, {"run_id": "r2"})  # replaces the earlier checkpoint atomically
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    loaded, record = load_synthesizer(target)
    assert type(loaded) is type(synth)
    assert record["run_id"] == "r2" and record["synthesizer"] == name and record["seed"] == 0
    assert record["params"]["epochs"] == FAST[name]["epochs"]
    assert record["curves"] == synth.curves and "column_pair_score" in record["validation"]
    assert record["tabular_metadata"]["tier"]["sdtype"] == "categorical"
    pd.testing.assert_frame_equal(loaded.sample(300, seed=4), synth.sample(300, seed=4))
    assert isinstance(TabularSynthesizer.load(target), type(synth))
    older = tmp_path / "older"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("synth.tabular.FORMAT_VERSION", 1)
        synth.save(older)
    with pytest.raises(CheckpointError, match="format 1, this code reads format 2"):
        load_synthesizer(older)
    model_file = target / "model.pt"
    raw = bytearray(model_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    model_file.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        load_synthesizer(target)
    (target / "model.pt").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_synthesizer(target)
