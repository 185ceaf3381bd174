"""The session model: learning, sampling and checkpoints (CPU, tiny models, a few seconds)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from synth.model import (CheckpointError, SessionModel, SessionModelConfig, VocabularyError, check_vocabulary,
                         load_checkpoint, save_checkpoint, split_window)

ITEM_CATEGORY = [0, 1, 1, 2, 2, 3]  # item 0 = none; items 1..5
ITEM_BRAND = [0, 1, 2, 1, 2, 1]
ITEM_PRICE = [0, 1, 2, 3, 1, 2]
CATALOGUE = {"item_category": ITEM_CATEGORY, "item_brand": ITEM_BRAND, "item_price_bucket": ITEM_PRICE}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they run several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> SessionModelConfig:
    base = dict(n_items=6, n_categories=4, n_gap_buckets=5, block_size=9, d_model=32, n_layer=1, n_head=2,
                dropout=0.0, n_brands=3, n_price_buckets=4)
    base.update(overrides)
    return SessionModelConfig(**base)


def windows(event_type, item_idx, gap_bucket, copies=8) -> dict[str, torch.Tensor]:
    """A batch of `copies` identical token windows, categories looked up from ITEM_CATEGORY."""
    item = torch.tensor([item_idx] * copies)
    return {"event_type": torch.tensor([event_type] * copies), "item_idx": item,
            "category_idx": torch.tensor(ITEM_CATEGORY)[item], "gap_bucket": torch.tensor([gap_bucket] * copies)}


# BOS view(1) cart(1) purchase(1) search view(2) EOS pad pad pad: 10 tokens = block_size + 1.
PATTERN = windows([1, 3, 4, 5, 6, 3, 2, 0, 0, 0], [0, 1, 1, 1, 0, 2, 0, 0, 0, 0], [0, 0, 1, 2, 3, 1, 0, 0, 0, 0])
# A session of view/cart cycles that never ends: its first window (from BOS) and a later, overlapping
# one (as featurize cuts long sessions), so the model also learns to continue windows without BOS.
_FIRST = windows([1, 3, 4, 3, 4, 3, 4, 3, 4, 3], [0, 1, 1, 2, 2, 1, 1, 2, 2, 1], [0, 1, 2, 1, 2, 1, 2, 1, 2, 1], 4)
_LATER = windows([3, 4, 3, 4, 3, 4, 3, 4, 3, 4], [2, 2, 1, 1, 2, 2, 1, 1, 2, 2], [1, 2, 1, 2, 1, 2, 1, 2, 1, 2], 4)
ENDLESS = {k: torch.cat([_FIRST[k], _LATER[k]]) for k in _FIRST}


def train(batch, steps=80, seed=0, **overrides) -> tuple[SessionModel, list[float]]:
    torch.manual_seed(seed)
    model = SessionModel(tiny_config(**overrides), **CATALOGUE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        _, loss = model(**split_window(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model, losses


@pytest.fixture(scope="module")
def trained():
    return train(PATTERN)


def test_loss_decreases_on_repeated_pattern(trained):
    model, losses = trained
    # Untrained: about ln(7) + ln(4) + ln(2) + ln(5) = 5.6 (event, category, item within category, gap); the pattern is deterministic, so it can go near 0.
    assert losses[0] > 4.0
    assert losses[-1] < 0.5 * losses[0]
    assert losses[-1] < 0.3


def test_learned_pattern_is_what_it_samples(trained):
    model, _ = trained
    out = model.sample(4, torch.Generator().manual_seed(3), top_k=1)
    for s in range(4):
        rows = out["session"] == s
        assert out["event_type"][rows].tolist() == [3, 4, 5, 6, 3]
        assert out["item_idx"][rows].tolist() == [1, 1, 1, 0, 2]
        assert out["gap_bucket"][rows].tolist() == [0, 1, 2, 3, 1]


def test_loss_ignores_padding_and_handles_no_item_targets():
    model = SessionModel(tiny_config(), item_category=ITEM_CATEGORY)
    searches_only = windows([1, 6, 6, 2, 0, 0, 0, 0, 0, 0], [0] * 10, [0, 1, 1, 0, 0, 0, 0, 0, 0, 0], copies=2)
    _, loss = model(**split_window(searches_only))
    assert torch.isfinite(loss)  # the item loss has no positions: 0, not NaN
    # Whatever the model says at padded target positions does not change the loss.
    inputs = split_window(searches_only)
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["target_item_idx"][:, 4:] = 5
    changed["target_gap_bucket"][:, 4:] = 4
    assert torch.equal(model(**changed)[1], loss)


def test_sample_is_deterministic_and_valid():
    torch.manual_seed(1)
    model = SessionModel(tiny_config(dropout=0.1), **CATALOGUE)  # untrained: varied output
    a = model.sample(50, torch.Generator().manual_seed(7), max_events=12)
    b = model.sample(50, torch.Generator().manual_seed(7), max_events=12)
    c = model.sample(50, torch.Generator().manual_seed(8), max_events=12)
    assert set(a) == {"session", "position", "event_type", "item_idx", "gap_bucket"}
    for key in a:
        assert np.array_equal(a[key], b[key]), key
        assert a[key].dtype == np.int64 and a[key].ndim == 1 and len(a[key]) == len(a["session"])
    assert not all(np.array_equal(a[k], c[k]) for k in a)  # another seed, other sessions
    assert model.training  # sample restores the training mode

    assert set(np.unique(a["session"])) <= set(range(50))
    assert len(np.unique(a["session"])) == 50  # EOS is never the first event: no empty session
    assert set(np.unique(a["event_type"])) <= {3, 4, 5, 6}
    has_item = np.isin(a["event_type"], [3, 4, 5])
    assert (a["item_idx"][has_item] > 0).all() and (a["item_idx"][has_item] < 6).all()
    assert (a["item_idx"][a["event_type"] == 6] == 0).all()
    assert ((a["gap_bucket"] >= 0) & (a["gap_bucket"] < 5)).all()
    for s in range(50):
        positions = a["position"][a["session"] == s]
        assert positions.tolist() == list(range(len(positions)))
        assert 1 <= len(positions) <= 12


def test_sample_windows_past_block_size():
    model, _ = train(ENDLESS, steps=60, block_size=9)
    out = model.sample(3, torch.Generator().manual_seed(0), max_events=30)  # 30 events > block_size 9
    counts = np.bincount(out["session"], minlength=3)
    assert (counts == 30).all()  # never predicts EOS: each session runs to max_events through the window
    assert set(np.unique(out["event_type"])) <= {3, 4}
    assert (out["item_idx"] > 0).all()


def test_sample_top_k_one_is_greedy():
    torch.manual_seed(2)
    model = SessionModel(tiny_config(), item_category=ITEM_CATEGORY)
    a = model.sample(5, torch.Generator().manual_seed(1), top_k=1, max_events=8)
    b = model.sample(5, torch.Generator().manual_seed(99), top_k=1, max_events=8)
    for key in a:
        assert np.array_equal(a[key], b[key])


def test_item_category_buffer_is_checked_and_saved():
    with pytest.raises(ValueError, match="shape"):
        SessionModel(tiny_config(), item_category=[0, 1])
    with pytest.raises(ValueError, match="categories"):
        SessionModel(tiny_config(), item_category=[0, 1, 1, 2, 2, 9])
    model = SessionModel(tiny_config(), item_category=ITEM_CATEGORY)
    assert model.state_dict()["item_category"].tolist() == ITEM_CATEGORY


def test_checkpoint_round_trip(tmp_path, trained):
    model, _ = trained
    target = tmp_path / "checkpoints" / "run-1"
    path = save_checkpoint(model, target, {"seed": 5, "input_versions": {"session_tokens": 3}})
    assert path == target.resolve()
    assert sorted(p.name for p in target.iterdir()) == ["metadata.json", "model.pt"]
    assert [p.name for p in target.parent.iterdir()] == ["run-1"]  # no staging folder left behind

    loaded, metadata = load_checkpoint(target)
    assert metadata["seed"] == 5 and metadata["input_versions"] == {"session_tokens": 3}
    assert metadata["model_config"]["n_items"] == 6 and len(metadata["model_sha256"]) == 64
    assert loaded.config == model.config and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    a = model.sample(10, torch.Generator().manual_seed(4))
    b = loaded.sample(10, torch.Generator().manual_seed(4))
    assert all(np.array_equal(a[k], b[k]) for k in a)

    # Saving again over the same folder replaces it whole.
    save_checkpoint(model, target, {"seed": 6})
    assert load_checkpoint(target)[1]["seed"] == 6
    assert [p.name for p in target.parent.iterdir()] == ["run-1"]


def test_checkpoint_hash_detects_tampering(tmp_path, trained):
    model, _ = trained
    target = tmp_path / "ckpt"
    save_checkpoint(model, target, {})
    blob = bytearray((target / "model.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (target / "model.pt").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(target)

    # A metadata.json from another checkpoint is caught the same way.
    other = tmp_path / "other"
    save_checkpoint(SessionModel(tiny_config(), item_category=ITEM_CATEGORY), other, {})
    (target / "model.pt").write_bytes((other / "model.pt").read_bytes())
    assert json.loads((target / "metadata.json").read_text())["model_sha256"] != \
        json.loads((other / "metadata.json").read_text())["model_sha256"]
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(target)

    (other / "metadata.json").unlink()
    with pytest.raises(CheckpointError, match="metadata.json is missing"):
        load_checkpoint(other)


def test_checkpoint_of_wrapped_model(tmp_path):
    model = SessionModel(tiny_config(), item_category=ITEM_CATEGORY)
    wrapper = torch.nn.Module()
    wrapper.module = model  # what DistributedDataParallel looks like from outside
    save_checkpoint(wrapper, tmp_path / "ckpt", {})
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(loaded.item_emb.weight, model.item_emb.weight)


def _untrained(seed=1, **overrides) -> SessionModel:
    torch.manual_seed(seed)
    model = SessionModel(tiny_config(**overrides), **CATALOGUE)
    with torch.no_grad():  # larger weights than the init, so the untrained model's choices vary a lot
        for p in model.parameters():
            p.mul_(20.0)
    return model


@pytest.mark.parametrize("stride", [None, 1])
def test_cached_sampling_equals_uncached(stride):
    model = _untrained()
    context = torch.randn(40, 7, generator=torch.Generator().manual_seed(0))
    kwargs = dict(context=context, context_category=torch.arange(40) % 4, max_events=25, top_p=0.95,
                  temperature=1.3, window_stride=stride)  # 25 events > block_size 9: the window slides
    a = model.sample(40, torch.Generator().manual_seed(5), use_cache=True, **kwargs)
    b = model.sample(40, torch.Generator().manual_seed(5), use_cache=False, **kwargs)
    assert len(a["session"]) > 40 and a["position"].max() >= 9
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_sampled_items_belong_to_the_sampled_category_and_top_p():
    model = _untrained()
    out = model.sample(60, torch.Generator().manual_seed(2), max_events=10)
    has_item = np.isin(out["event_type"], [3, 4, 5])
    assert has_item.any() and (out["item_idx"][has_item] > 0).all()
    # The item head scores only the chosen category's items: [positions, largest category].
    h = torch.zeros(3, 32)
    assert model.item_logits(h, torch.tensor([1, 2, 3])).shape == (3, 2)
    assert torch.isinf(model.item_logits(h, torch.tensor([3]))[0, 1])  # category 3 has one item: padding
    # The per-category loss equals the padded-table scores' cross-entropy.
    h = torch.randn(7, 32, generator=torch.Generator().manual_seed(0))
    items = torch.tensor([1, 2, 3, 4, 5, 5, 1])
    category = model.item_category[items]
    expected = torch.nn.functional.cross_entropy(model.item_logits(h, category), model.item_slot[items],
                                                 reduction="sum")
    assert torch.allclose(model.item_cross_entropy(h, category, model.item_slot[items]), expected, rtol=1e-5)
    # A tiny nucleus keeps only the most likely value: the same as greedy.
    a = model.sample(10, torch.Generator().manual_seed(1), top_p=1e-6, max_events=8)
    b = model.sample(10, torch.Generator().manual_seed(2), top_k=1, max_events=8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="top_p"):
        model.sample(2, torch.Generator(), top_p=0.0)


def test_context_conditions_the_sessions():
    """Two user types, told apart only by their context, with different habits: the model learns both."""
    first = windows([1, 3, 4, 5, 2, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    second = windows([1, 6, 3, 2, 0, 0, 0, 0, 0, 0], [0, 0, 5, 0, 0, 0, 0, 0, 0, 0], [0, 2, 3, 0, 0, 0, 0, 0, 0, 0])
    batch = {k: torch.cat([first[k], second[k]]) for k in first}
    batch["user_context"] = torch.cat([torch.zeros(8, 7), torch.ones(8, 7)])
    batch["user_category_idx"] = torch.tensor([1] * 8 + [3] * 8)
    model, losses = train(batch, steps=80)
    assert losses[-1] < 0.3
    out = model.sample(4, torch.Generator().manual_seed(0), context=np.array([[0.0] * 7, [1.0] * 7] * 2),
                       context_category=np.array([1, 3, 1, 3]), top_k=1)
    for s in range(4):
        rows = out["session"] == s
        expected = ([3, 4, 5], [1, 1, 1]) if s % 2 == 0 else ([6, 3], [0, 5])
        assert (out["event_type"][rows].tolist(), out["item_idx"][rows].tolist()) == expected
    with pytest.raises(ValueError, match="context has 2 rows for 4 sessions"):
        model.sample(4, torch.Generator(), context=np.zeros((2, 7)))


def test_brand_and_price_buffers_feed_the_input():
    model = _untrained()
    tokens = windows([1, 3, 3, 2, 0, 0, 0, 0, 0, 0], [0, 1, 3, 0, 0, 0, 0, 0, 0, 0], [0] * 10, copies=1)
    before = model(**split_window(tokens))[0]["event_type"]
    with torch.no_grad():
        model.item_brand[3] = 2  # item 3 now has item 2's brand
    after = model(**split_window(tokens))[0]["event_type"]
    assert torch.equal(before[:, :2], after[:, :2]) and not torch.equal(before[:, 2:], after[:, 2:])
    with pytest.raises(ValueError, match="item_brand"):
        SessionModel(tiny_config(), item_category=ITEM_CATEGORY, item_brand=[0, 1, 2, 3, 1, 1])


def test_fixed_lengths_end_sessions_exactly_there():
    torch.manual_seed(0)
    model = SessionModel(tiny_config(), **CATALOGUE)
    lengths = np.array([1, 3, 0, 12, 5])
    out = model.sample(5, torch.Generator().manual_seed(1), max_events=8, lengths=lengths)
    counts = np.bincount(out["session"], minlength=5)
    assert counts[[0, 1, 4]].tolist() == [1, 3, 5] and counts[3] == 8  # 12 is cut at max_events
    assert 1 <= counts[2] <= 8  # length 0: the model's EOS decides
    again = model.sample(5, torch.Generator().manual_seed(1), max_events=8, lengths=lengths)
    assert all(np.array_equal(out[k], again[k]) for k in out)


def test_context_bank_and_vocabulary_check(tmp_path):
    bank = np.arange(21, dtype=np.float32).reshape(3, 7)
    model = SessionModel(tiny_config(), **CATALOGUE, context_bank=bank, context_bank_category=[1, 2, 3],
                         context_bank_length=[4, 7, 9])
    save_checkpoint(model, tmp_path / "ckpt", {"vocab": {"n_items": 6, "n_categories": 4}, "run_id": "r1"})
    loaded, metadata = load_checkpoint(tmp_path / "ckpt")
    assert loaded.item_brand.tolist() == ITEM_BRAND and loaded.item_price_bucket.tolist() == ITEM_PRICE
    context, category, lengths = loaded.draw_contexts(50, phase=0.3)
    assert context.shape == (50, 7) and set(category.tolist()) == {1, 2, 3}
    assert np.array_equal(context, bank[category - 1])
    assert np.array_equal(lengths, np.array([4, 7, 9])[category - 1])  # drawn together with its context
    assert sorted(np.bincount(category).tolist()) == [0, 16, 17, 17]  # stratified: each bank row 50/3 times
    # Shards of one stratified sample (same phase and total, consecutive `first`) make up the whole.
    parts = [loaded.draw_contexts(n, phase=0.3, first=first, total=50)[2] for first, n in ((0, 20), (20, 30))]
    assert np.array_equal(np.concatenate(parts), lengths)
    assert SessionModel(tiny_config(), **CATALOGUE).draw_contexts(2)[0].shape == (2, 7)

    check_vocabulary(metadata, n_items=6, n_categories=4)
    check_vocabulary(metadata, n_items=9, n_categories=5)  # appended ids: still compatible
    with pytest.raises(VocabularyError, match="run r1 was trained on 6 items but the catalogue has only 5"):
        check_vocabulary(metadata, n_items=5, n_categories=4)
    with pytest.raises(VocabularyError, match="4 categories but the catalogue has only 3"):
        check_vocabulary(metadata, n_items=6, n_categories=3)


def test_copy_bonus_learns_to_return_to_the_viewed_item():
    """view X, cart X, purchase X with X drawn from 400 items: only returning to the window's item fits.
    (Without the copy heads, 30 steps sample the viewed item again in about 1% of these sessions.)"""
    n_items = 401
    category = [0] + [1 + i % 3 for i in range(n_items - 1)]
    rng = np.random.default_rng(0)
    picked = rng.integers(1, n_items, size=64)
    batch = {"event_type": torch.tensor([[1, 3, 4, 5, 2, 0, 0, 0, 0, 0]] * 64),
             "item_idx": torch.tensor([[0, x, x, x, 0, 0, 0, 0, 0, 0] for x in picked]),
             "gap_bucket": torch.tensor([[0, 0, 1, 2, 0, 0, 0, 0, 0, 0]] * 64)}
    batch["category_idx"] = torch.tensor(category)[batch["item_idx"]]
    torch.manual_seed(0)
    model = SessionModel(tiny_config(n_items=n_items), item_category=category)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        _, loss = model(**split_window(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = model.sample(200, torch.Generator().manual_seed(1), max_events=6)
    returned = total = 0
    for s in range(200):
        rows = out["session"] == s
        types, items = out["event_type"][rows], out["item_idx"][rows]
        if types.tolist()[:3] == [3, 4, 5]:
            total += 1
            returned += int(items[1] == items[0] and items[2] == items[0])
    assert total >= 150 and returned >= 0.9 * total


def test_history_features_hand_computed():
    model = SessionModel(tiny_config(), **CATALOGUE)
    # BOS view(1) view(3) view(1) cart(1) search: items 1 and 3 (categories 1 and 2).
    hist = model.history(torch.tensor([[1, 3, 3, 3, 4, 6]]), torch.tensor([[0, 1, 3, 1, 1, 0]]))
    assert hist["first_item"][0].tolist() == [False, True, True, False, True, False]
    assert hist["first_category"][0].tolist() == [False, True, True, False, False, False]
    assert hist["visible"][0, 2].tolist() == [False, True, True, False, False, False]
    assert hist["last"][0, 5].nonzero().flatten().tolist() == [4]  # the search is not an item event
    assert hist["last"][0, 0].sum() == 0  # nothing before BOS
    # Drawn after position t: item 1 is the last item at 5; item 3 is new at 1, the last at 2, earlier after.
    repeat = model.repeat_kind(torch.tensor([[0, 0, 0, 0, 0, 1]]), hist)
    assert repeat[0, 5] == 2
    assert model.repeat_kind(torch.tensor([[3, 3, 3, 3, 3, 3]]), hist)[0].tolist() == [0, 0, 2, 1, 1, 1]
    assert model.repeat_kind(torch.tensor([[4, 4, 4, 4, 4, 0]]), hist).sum() == 0


def test_sample_draws_only_event_types_of_the_training_data():
    seen = [True, True, True, True, False, True, False]  # no carts, no searches
    torch.manual_seed(0)
    model = SessionModel(tiny_config(), **CATALOGUE)  # untrained: about uniform over the event types
    free = model.sample(80, torch.Generator().manual_seed(4), max_events=10)
    assert set(np.unique(free["event_type"])) == {3, 4, 5, 6}
    model.event_types_seen.copy_(torch.tensor(seen))
    out = model.sample(80, torch.Generator().manual_seed(4), max_events=10)
    assert set(np.unique(out["event_type"])) == {3, 5}
    with pytest.raises(ValueError, match="event_types_seen"):
        SessionModel(tiny_config(), event_types_seen=[True] * 3)
