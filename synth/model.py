"""The session generator: a small decoder-only causal transformer over session event tokens (nanoGPT style).

A session is a sequence of tokens; each token is a tuple (event_type, item_idx, category_idx, gap_bucket)
and is embedded as the sum of one embedding per field plus a position embedding. From each position the
model predicts the NEXT token, factorized in sampling order:

    p(event_type) * p(item | event_type) * p(gap_bucket | event_type)

The item and gap heads are conditioned on the (teacher-forced) next event type, so a sampled purchase
draws from the purchase item distribution, not from an average over views and purchases. The category of
the next token is not predicted: it follows from the item through the catalogue (`item_category` buffer).

Event-type tokens (session_tokens contract): 0 pad, 1 BOS, 2 EOS, 3 view, 4 cart, 5 purchase, 6 search.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PAD, BOS, EOS, VIEW, CART, PURCHASE, SEARCH = range(7)
ITEM_EVENTS = (VIEW, CART, PURCHASE)  # event types that carry an item
SAMPLED_EVENTS = (EOS, VIEW, CART, PURCHASE, SEARCH)  # event types `sample` may draw

MODEL_FILE = "model.pt"
METADATA_FILE = "metadata.json"


@dataclass
class SessionModelConfig:
    n_event_types: int = 7
    n_items: int = 1  # item vocabulary size, 0 (= no item) included
    n_categories: int = 1  # category vocabulary size, 0 (= unknown) included
    n_gap_buckets: int = 10
    block_size: int = 33  # tokens the model sees at once: window + 2 tokens minus 1 (input = tokens[:-1])
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    dropout: float = 0.1

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        if self.n_event_types < 7:
            raise ValueError("n_event_types must be at least 7 (pad, BOS, EOS, view, cart, purchase, search)")
        if min(self.n_items, self.n_categories, self.n_gap_buckets, self.block_size) < 1:
            raise ValueError(f"vocabulary sizes and block_size must be positive: {self}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SessionModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class Block(nn.Module):
    def __init__(self, cfg: SessionModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class SessionModel(nn.Module):
    def __init__(self, cfg: SessionModelConfig, item_category: torch.Tensor | np.ndarray | list | None = None):
        super().__init__()
        self.config = cfg
        if item_category is None:
            item_category = torch.zeros(cfg.n_items, dtype=torch.long)
        item_category = torch.as_tensor(np.asarray(item_category), dtype=torch.long)
        if item_category.shape != (cfg.n_items,):
            raise ValueError(f"item_category must have shape ({cfg.n_items},), not {tuple(item_category.shape)}")
        if len(item_category) and (item_category.min() < 0 or item_category.max() >= cfg.n_categories):
            raise ValueError(f"item_category holds categories outside 0..{cfg.n_categories - 1}")
        self.register_buffer("item_category", item_category)

        d = cfg.d_model
        self.event_emb = nn.Embedding(cfg.n_event_types, d)
        self.item_emb = nn.Embedding(cfg.n_items, d)
        self.category_emb = nn.Embedding(cfg.n_categories, d)
        self.gap_emb = nn.Embedding(cfg.n_gap_buckets, d)
        self.pos_emb = nn.Embedding(cfg.block_size, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d)
        # Heads. The item and gap heads see the hidden state plus an embedding of the next event type.
        self.event_head = nn.Linear(d, cfg.n_event_types, bias=False)
        self.next_event_emb = nn.Embedding(cfg.n_event_types, d)
        self.item_head = nn.Linear(d, cfg.n_items, bias=False)
        self.item_head.weight = self.item_emb.weight  # weight tying, as in GPT-2: the item table can be large
        self.gap_head = nn.Linear(d, cfg.n_gap_buckets, bias=False)

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----- forward ---------------------------------------------------------------------------------

    def hidden(self, event_type, item_idx, category_idx, gap_bucket) -> torch.Tensor:
        """Final hidden states [B, T, d] of token tensors [B, T] (T <= block_size)."""
        T = event_type.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(T, device=event_type.device)
        x = (self.event_emb(event_type) + self.item_emb(item_idx) + self.category_emb(category_idx)
             + self.gap_emb(gap_bucket) + self.pos_emb(pos))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def item_logits(self, h: torch.Tensor, next_event_type: torch.Tensor) -> torch.Tensor:
        return self.item_head(h + self.next_event_emb(next_event_type))

    def gap_logits(self, h: torch.Tensor, next_event_type: torch.Tensor) -> torch.Tensor:
        return self.gap_head(h + self.next_event_emb(next_event_type))

    def forward(self, event_type, item_idx, category_idx, gap_bucket,
                target_event_type=None, target_item_idx=None, target_gap_bucket=None):
        """Logits for the next token at every position, and the loss when targets are given.

        Inputs and targets are LongTensors [B, T]. Returns (logits, loss): logits is a dict with
        event_type [B, T, n_event_types], and, with targets, item_idx and gap_bucket (conditioned on
        the target event type); loss is None without targets.
        """
        h = self.hidden(event_type, item_idx, category_idx, gap_bucket)
        logits = {"event_type": self.event_head(h)}
        if target_event_type is None:
            return logits, None
        logits["item_idx"] = self.item_logits(h, target_event_type)
        logits["gap_bucket"] = self.gap_logits(h, target_event_type)
        return logits, self.loss(logits, target_event_type, target_item_idx, target_gap_bucket)

    @staticmethod
    def loss(logits: dict, target_event_type, target_item_idx, target_gap_bucket) -> torch.Tensor:
        """Sum of the three cross-entropies, each averaged over the positions where it applies:
        event type wherever the target is not padding, item where the target is a view/cart/purchase,
        gap where the target is a real event (view/cart/purchase/search)."""
        real = target_event_type != PAD
        has_item = (target_event_type >= VIEW) & (target_event_type <= PURCHASE)
        is_event = (target_event_type >= VIEW) & (target_event_type <= SEARCH)

        def masked_ce(lg: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            # Summed then divided by max(count, 1): an empty mask gives 0, never NaN.
            ce = F.cross_entropy(lg[mask].float(), target[mask], reduction="sum")
            return ce / mask.sum().clamp(min=1)

        return (masked_ce(logits["event_type"], target_event_type, real)
                + masked_ce(logits["item_idx"], target_item_idx, has_item)
                + masked_ce(logits["gap_bucket"], target_gap_bucket, is_event))

    # ----- sampling --------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, n_sessions: int, generator: torch.Generator, temperature: float = 1.0, top_k: int = 0,
               max_events: int = 64) -> dict[str, np.ndarray]:
        """Sample `n_sessions` sessions autoregressively from BOS, all at once.

        Per event: an event type among EOS/view/cart/purchase/search (EOS is not allowed as the first
        event, so a session has at least one event), then for a view/cart/purchase an item (never 0),
        for a search item 0, then a gap bucket. A session stops at EOS or after `max_events` events.
        Past block_size tokens the model sees the last block_size tokens (a sliding window).

        Returns flat int64 arrays over all events (no BOS/EOS), ordered by session then position:
        session (0..n_sessions-1), position (0-based within the session), event_type (3..6),
        item_idx and gap_bucket. Deterministic for a given generator state on CPU.
        """
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        was_training = self.training
        self.eval()
        try:
            return self._sample(n_sessions, generator, temperature, top_k, max_events)
        finally:
            self.train(was_training)

    def _sample(self, n, generator, temperature, top_k, max_events):
        cfg = self.config
        device = self.item_category.device
        names = ("event_type", "item_idx", "category_idx", "gap_bucket")
        # Token history [n, length]; starts with BOS (item, category and gap 0).
        seq = {k: torch.zeros(n, 1, dtype=torch.long, device=device) for k in names}
        seq["event_type"][:, 0] = BOS
        alive = torch.ones(n, dtype=torch.bool, device=device)

        allowed_first = torch.zeros(cfg.n_event_types, dtype=torch.bool, device=device)
        # Without any catalogue item (n_items == 1: only 0 = none) only searches can be sampled.
        allowed_first[[VIEW, CART, PURCHASE, SEARCH] if cfg.n_items > 1 else [SEARCH]] = True
        allowed = allowed_first.clone()
        allowed[EOS] = True
        no_item = torch.zeros(cfg.n_items, dtype=torch.bool, device=device)
        no_item[0] = True

        def draw(logits: torch.Tensor, banned: torch.Tensor | None = None) -> torch.Tensor:
            logits = logits.float() / temperature
            if banned is not None:
                logits = logits.masked_fill(banned, float("-inf"))
            if top_k and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1).to(generator.device)
            return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)

        for step in range(max_events):
            if not alive.any():
                break
            window = {k: v[:, -cfg.block_size:] for k, v in seq.items()}
            h = self.hidden(*(window[k] for k in names))[:, -1]  # [n, d]
            event = draw(self.event_head(h), ~(allowed_first if step == 0 else allowed))
            if cfg.n_items > 1:
                item = draw(self.item_logits(h, event), no_item)
                item = torch.where((event >= VIEW) & (event <= PURCHASE), item, torch.zeros_like(item))
            else:
                item = torch.zeros_like(event)
            gap = draw(self.gap_logits(h, event))
            ended = alive & (event == EOS)
            alive = alive & ~ended
            # A session that just ended gets its EOS token; finished ones get padding from then on.
            event = torch.where(alive, event, torch.full_like(event, PAD))
            event = torch.where(ended, torch.full_like(event, EOS), event)
            item = torch.where(alive, item, torch.zeros_like(item))
            gap = torch.where(alive, gap, torch.zeros_like(gap))
            new = {"event_type": event, "item_idx": item, "category_idx": self.item_category[item],
                   "gap_bucket": gap}
            seq = {k: torch.cat([seq[k], new[k][:, None]], dim=1) for k in names}

        events = seq["event_type"][:, 1:]
        is_event = (events >= VIEW) & (events <= SEARCH)
        session, position = is_event.nonzero(as_tuple=True)  # row-major: by session, then position
        return {
            "session": session.cpu().numpy().astype(np.int64),
            "position": position.cpu().numpy().astype(np.int64),
            "event_type": events[is_event].cpu().numpy().astype(np.int64),
            "item_idx": seq["item_idx"][:, 1:][is_event].cpu().numpy().astype(np.int64),
            "gap_bucket": seq["gap_bucket"][:, 1:][is_event].cpu().numpy().astype(np.int64),
        }


def split_window(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model keyword arguments from token windows [B, block_size + 1]: inputs tokens[:, :-1],
    targets tokens[:, 1:]. Call the model as model(**split_window(batch))."""
    inputs = {k: tokens[k][:, :-1] for k in ("event_type", "item_idx", "category_idx", "gap_bucket")}
    targets = {f"target_{k}": tokens[k][:, 1:] for k in ("event_type", "item_idx", "gap_bucket")}
    return {**inputs, **targets}


# ----- checkpoints ---------------------------------------------------------------------------------


class CheckpointError(RuntimeError):
    """A checkpoint folder that is missing files or whose model file does not match its recorded hash."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unwrap(model: nn.Module) -> SessionModel:
    """The SessionModel inside DistributedDataParallel (.module) and torch.compile (._orig_mod) wrappers."""
    while not isinstance(model, SessionModel):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"not a SessionModel: {type(model).__name__}")
        model = inner
    return model


def save_checkpoint(model: nn.Module, directory: str | os.PathLike, metadata: dict) -> Path:
    """Write `directory`/model.pt (state_dict + model config) and metadata.json (`metadata` plus
    model_config and model_sha256), atomically: both files are written to a temporary sibling folder
    that is then renamed to `directory`, replacing an earlier checkpoint there."""
    model = _unwrap(model)
    target = Path(directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        model_file = staging / MODEL_FILE
        with open(model_file, "wb") as f:
            torch.save({"model_config": asdict(model.config), "state_dict": state}, f)
            f.flush()
            os.fsync(f.fileno())
        record = {**metadata, "model_config": asdict(model.config), "model_file": MODEL_FILE,
                  "model_sha256": _sha256(model_file)}
        with open(staging / METADATA_FILE, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        # A folder cannot be renamed over a non-empty one: move the old checkpoint aside first.
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
        staging.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu"
                    ) -> tuple[SessionModel, dict]:
    """Load a checkpoint written by save_checkpoint, after checking model.pt against its recorded
    sha256; returns (model in eval mode, metadata). Raises CheckpointError on a missing or altered file."""
    directory = Path(directory)
    meta_file, model_file = directory / METADATA_FILE, directory / MODEL_FILE
    for path in (meta_file, model_file):
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete: {path.name} is missing")
    metadata = json.loads(meta_file.read_text())
    expected = metadata.get("model_sha256")
    actual = _sha256(model_file)
    if expected != actual:
        raise CheckpointError(f"checkpoint {directory}: {MODEL_FILE} has sha256 {actual} but metadata.json "
                              f"records {expected}; the file was altered or belongs to another checkpoint")
    payload = torch.load(model_file, map_location=map_location, weights_only=True)
    cfg = SessionModelConfig(**payload["model_config"])
    model = SessionModel(cfg, item_category=payload["state_dict"]["item_category"])
    model.load_state_dict(payload["state_dict"])
    model.to(map_location)
    return model.eval(), metadata
