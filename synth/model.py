"""The session generator: a decoder-only causal transformer over session event tokens, conditioned on a
user-profile context vector.

A session is a sequence of tokens (event_type, item_idx, gap_bucket). A token's input embedding is the
sum of factorized embeddings: event type, item, the item's category, brand and price bucket (looked up
from catalogue buffers, so a token needs only its item), time-gap bucket and position. The user context
(featurize.USER_CONTEXT, 7 floats, plus the user's top category) is projected to d_model and added to
EVERY position rather than prepended as a prefix token: it then never slides out of a sampling window,
costs no position of block_size, and needs no special case in the KV cache.

From each position the model predicts the NEXT event hierarchically, each head conditioned on the
choices before it (teacher-forced targets in training, the sampled values in sampling):

    p(event_type) * p(category | event) * p(item | event, category) * p(gap | event, category, item)

The item head scores only the items of the chosen category (a padded [n_categories, max_items_in_category]
table of item ids built from the catalogue), so the catalogue never needs a full softmax. The category of
an item event is the item's catalogue category, so sampled items always carry their real category.
Searches and EOS have category 0 and item 0.

Real sessions keep returning to what they already touched: the same item viewed again, carted, bought.
The category and item heads therefore add a copy bonus (pointer-network style) to the logits of the
categories and items of the window's earlier item events, weighted per kind of earlier event (view, cart,
purchase, most recent) by coefficients computed from the hidden state; the gap head is told whether the
drawn item repeats one of the window.

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
CONTEXT_DIM = 7  # len(synth.featurize.USER_CONTEXT)
# Copy features of a candidate item: viewed / carted / purchased earlier in the window, is the last item.
COPY_ITEM_FEATURES = 4
# Copy features of a candidate category: holds an earlier item of the window, holds the last item.
COPY_CATEGORY_FEATURES = 2

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
    n_brands: int = 1  # brand vocabulary size, 0 (= unknown / no item) included
    n_price_buckets: int = 1  # price buckets, 0 (= unknown / no item) included
    context_dim: int = CONTEXT_DIM

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        if self.n_event_types < 7:
            raise ValueError("n_event_types must be at least 7 (pad, BOS, EOS, view, cart, purchase, search)")
        if min(self.n_items, self.n_categories, self.n_gap_buckets, self.block_size, self.n_brands,
               self.n_price_buckets) < 1 or self.context_dim < 0:
            raise ValueError(f"vocabulary sizes and block_size must be positive: {self}")


def _as_long(values, n: int, name: str, size: int) -> torch.Tensor:
    tensor = torch.zeros(n, dtype=torch.long) if values is None else \
        torch.as_tensor(np.asarray(values), dtype=torch.long)
    if tensor.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), not {tuple(tensor.shape)}")
    if len(tensor) and (tensor.min() < 0 or tensor.max() >= size):
        what = "categories" if name == "item_category" else "ids"
        raise ValueError(f"{name} holds {what} outside 0..{size - 1}")
    return tensor


def category_item_table(item_category: torch.Tensor, n_categories: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """(table [n_categories, M] of item ids padded with 0, valid mask [n_categories, M], slot [n_items]):
    row c lists category c's items (item 0 = none excluded) in item order; slot[i] is item i's column in
    its category's row. M = the largest category's item count (at least 1)."""
    items = torch.arange(1, len(item_category))
    cats = item_category[1:]
    counts = torch.bincount(cats, minlength=n_categories)
    width = max(1, int(counts.max()) if len(cats) else 1)
    order = torch.argsort(cats, stable=True)  # items grouped by category, item order within
    starts = torch.cumsum(counts, 0) - counts
    sorted_cats = cats[order]
    columns = torch.arange(len(order)) - starts[sorted_cats]
    table = torch.zeros(n_categories, width, dtype=torch.long)
    valid = torch.zeros(n_categories, width, dtype=torch.bool)
    table[sorted_cats, columns] = items[order]
    valid[sorted_cats, columns] = True
    slot = torch.zeros(len(item_category), dtype=torch.long)
    slot[items[order]] = columns
    return table, valid, slot


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SessionModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """Causal attention over x [B, T, C]. With `cache` (a dict, per layer): an empty one is filled with
        this call's keys/values (prefill); a filled one is extended by x's single new token, which attends
        to every cached token."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        causal = True
        if cache is not None:
            if "k" in cache:
                if T != 1:
                    raise ValueError("a filled KV cache is extended one token at a time")
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                causal = False  # one query, at the end: it may see everything
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
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

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class SessionModel(nn.Module):
    def __init__(self, cfg: SessionModelConfig, item_category=None, item_brand=None, item_price_bucket=None,
                 context_bank=None, context_bank_category=None, context_bank_length=None, event_types_seen=None):
        """`item_category`, `item_brand` and `item_price_bucket` ([n_items] ids, index = item_idx) come
        from the catalogue and are stored as buffers, so a checkpoint samples with nothing else.
        `context_bank` [N, context_dim] / `context_bank_category` [N] / `context_bank_length` [N] are
        optional training sessions' user contexts and lengths (events), that `draw_contexts` samples
        for generation. `event_types_seen` [n_event_types] bools (default
        all) marks the event types of the training data; `sample` never draws another one."""
        super().__init__()
        self.config = cfg
        seen = torch.ones(cfg.n_event_types, dtype=torch.bool) if event_types_seen is None else \
            torch.as_tensor(np.asarray(event_types_seen), dtype=torch.bool)
        if seen.shape != (cfg.n_event_types,):
            raise ValueError(f"event_types_seen must have shape ({cfg.n_event_types},), not {tuple(seen.shape)}")
        self.register_buffer("event_types_seen", seen)
        self.register_buffer("item_category", _as_long(item_category, cfg.n_items, "item_category",
                                                       cfg.n_categories))
        self.register_buffer("item_brand", _as_long(item_brand, cfg.n_items, "item_brand", cfg.n_brands))
        self.register_buffer("item_price_bucket", _as_long(item_price_bucket, cfg.n_items, "item_price_bucket",
                                                           cfg.n_price_buckets))
        bank = torch.zeros(0, cfg.context_dim) if context_bank is None else \
            torch.as_tensor(np.asarray(context_bank, dtype=np.float32)).reshape(-1, cfg.context_dim)
        self.register_buffer("context_bank", bank)
        self.register_buffer("context_bank_category", _as_long(context_bank_category, len(bank),
                                                               "context_bank_category", cfg.n_categories))
        self.register_buffer("context_bank_length", torch.zeros(len(bank), dtype=torch.long)
                             if context_bank_length is None else torch.as_tensor(context_bank_length, dtype=torch.long))
        if self.context_bank_length.shape != (len(bank),):
            raise ValueError(f"context_bank_length must have {len(bank)} values")
        # Derived from item_category (not saved): the per-category item table of the item head.
        table, valid, slot = category_item_table(self.item_category, cfg.n_categories)
        self.register_buffer("category_items", table, persistent=False)
        self.register_buffer("category_item_valid", valid, persistent=False)
        self.register_buffer("item_slot", slot, persistent=False)
        self.register_buffer("category_has_items", valid.any(dim=1), persistent=False)
        self.register_buffer("category_item_count", valid.sum(dim=1), persistent=False)

        d = cfg.d_model
        self.event_emb = nn.Embedding(cfg.n_event_types, d)
        self.item_emb = nn.Embedding(cfg.n_items, d)
        self.category_emb = nn.Embedding(cfg.n_categories, d)
        self.brand_emb = nn.Embedding(cfg.n_brands, d)
        self.price_emb = nn.Embedding(cfg.n_price_buckets, d)
        self.gap_emb = nn.Embedding(cfg.n_gap_buckets, d)
        self.pos_emb = nn.Embedding(cfg.block_size, d)
        self.context_proj = nn.Linear(cfg.context_dim, d)
        self.context_category_emb = nn.Embedding(cfg.n_categories, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(d)
        # Hierarchical heads: each sees the hidden state plus embeddings of the choices made before it.
        self.event_head = nn.Linear(d, cfg.n_event_types, bias=False)
        self.next_event_emb = nn.Embedding(cfg.n_event_types, d)
        self.category_head = nn.Linear(d, cfg.n_categories, bias=False)
        self.next_category_emb = nn.Embedding(cfg.n_categories, d)
        # Item scores: <item_query(h), item_emb[item]> + item_bias[item], over the category's items only
        # (output embedding tied to the input one, as in GPT-2).
        self.item_query = nn.Linear(d, d, bias=False)
        self.item_bias = nn.Embedding(cfg.n_items, 1)
        self.next_item_proj = nn.Linear(d, d, bias=False)
        self.gap_head = nn.Linear(d, cfg.n_gap_buckets, bias=False)
        # Copy heads: real sessions mostly return to items they already touched (view -> cart -> purchase
        # of one item, repeated views), which a softmax over item embeddings learns only slowly from small
        # data. These add a learned, context-dependent bonus to the logits of the window's earlier items and
        # categories (see `history`), like a pointer network, and tell the gap head whether the item repeats.
        self.copy_item = nn.Linear(d, COPY_ITEM_FEATURES)
        self.copy_category = nn.Linear(d, COPY_CATEGORY_FEATURES)
        self.repeat_emb = nn.Embedding(3, d)  # the next item is: 0 new (or none), 1 in the window, 2 the last item

        self.apply(self._init_weights)
        nn.init.zeros_(self.item_bias.weight)
        for head in (self.copy_item, self.copy_category):
            nn.init.zeros_(head.weight)  # no bonus before training: starts as the plain hierarchical model
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

    def context_vector(self, context=None, context_category=None, batch: int = 1) -> torch.Tensor:
        """[B, 1, d]: the user context projected into the model (zeros / category 0 when not given)."""
        device = self.item_category.device
        if context is None:
            context = torch.zeros(batch, self.config.context_dim, device=device)
        context = torch.as_tensor(context, dtype=torch.float32, device=device).reshape(-1, self.config.context_dim)
        if context_category is None:
            context_category = torch.zeros(len(context), dtype=torch.long, device=device)
        context_category = torch.as_tensor(context_category, dtype=torch.long, device=device).reshape(-1)
        return (self.context_proj(context) + self.context_category_emb(context_category))[:, None, :]

    def embed(self, event_type, item_idx, gap_bucket, ctx_vec: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = event_type.shape[1]
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=event_type.device)
        return (self.event_emb(event_type) + self.item_emb(item_idx) + self.category_emb(self.item_category[item_idx])
                + self.brand_emb(self.item_brand[item_idx]) + self.price_emb(self.item_price_bucket[item_idx])
                + self.gap_emb(gap_bucket) + self.pos_emb(pos) + ctx_vec)

    def hidden(self, event_type, item_idx, gap_bucket, ctx_vec: torch.Tensor, caches: list | None = None,
               start: int = 0) -> torch.Tensor:
        """Final hidden states [B, T, d] of token tensors [B, T] (positions start..start+T-1 of the window).
        `caches` (one dict per layer) turns on the KV cache (see CausalSelfAttention)."""
        x = self.drop(self.embed(event_type, item_idx, gap_bucket, ctx_vec, start))
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.ln_f(x)

    def history(self, event_type: torch.Tensor, item_idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """What each position t of token tensors [B, T] can copy from: the window's item events at
        positions j <= t. Returns item / category / kind (0 view, 1 cart, 2 purchase) [B, T] of every
        position j, first_item (j is the first (item, kind) occurrence of the window) and first_category
        (the first item of its category) [B, T], and visible (j <= t holds an item) and last (j is t's
        most recent item event) [B, T(t), T(j)]."""
        T = event_type.shape[1]
        has_item = (event_type >= VIEW) & (event_type <= PURCHASE) & (item_idx > 0)
        item = torch.where(has_item, item_idx, torch.zeros_like(item_idx))
        category = self.item_category[item]
        kind = (event_type - VIEW).clamp(0, len(ITEM_EVENTS) - 1)
        j = torch.arange(T, device=event_type.device)
        before = j[None, :] < j[:, None]  # [j, j']: j' comes before j
        earlier = before[None] & has_item[:, None, :]
        same_item = (item[:, :, None] == item[:, None, :]) & (kind[:, :, None] == kind[:, None, :])
        same_category = category[:, :, None] == category[:, None, :]
        position = torch.where(has_item, j, torch.full_like(j, -1))
        latest = torch.cummax(position, dim=1).values  # [B, t]: t's most recent item position (-1: none)
        return {
            "item": item, "category": category, "kind": kind,
            "first_item": has_item & ~(earlier & same_item).any(-1),
            "first_category": has_item & ~(earlier & same_category).any(-1),
            "visible": (before | torch.eye(T, dtype=torch.bool, device=j.device))[None] & has_item[:, None, :],
            "last": j[None, None, :] == latest[:, :, None],
        }

    def category_logits(self, h1: torch.Tensor, hist: dict[str, torch.Tensor]) -> torch.Tensor:
        """Category logits [B, T, n_categories] of hidden states h1 [B, T, d], with the copy bonus of the
        categories of the window's earlier items (`hist`, from `history`)."""
        coef = self.copy_category(h1)  # [B, T, 2]
        visible = hist["visible"]
        bonus = ((hist["first_category"][:, None, :] & visible) * coef[..., :1]
                 + (hist["last"] & visible) * coef[..., 1:])
        index = hist["category"][:, None, :].expand_as(bonus)
        return self.category_head(h1).scatter_add(-1, index, bonus.to(h1.dtype))

    def item_bonus(self, h2: torch.Tensor, category: torch.Tensor, hist: dict[str, torch.Tensor],
                   rows: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot [N, T], bonus [N, T]): the copy bonus the window's earlier items of `category` [N] add to
        their columns of category_items, for the N positions `rows` = (batch index, position) of `hist`
        with hidden states h2 [N, d]. Entries of other categories add 0 to slot 0."""
        b, t = rows
        coef = self.copy_item(h2)  # [N, 4]
        visible = hist["visible"][b, t] & (hist["category"][b] == category[:, None])
        kind = coef.gather(1, hist["kind"][b]) * hist["first_item"][b]
        bonus = (kind + coef[:, 3:] * hist["last"][b, t]) * visible
        slot = torch.where(visible, self.item_slot[hist["item"][b]], torch.zeros_like(hist["item"][b]))
        return slot, bonus

    def item_logits(self, h2: torch.Tensor, category: torch.Tensor,
                    bonus: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Scores [N, M] of the items of `category` [N] (columns of category_items; padding -inf), plus
        the copy `bonus` (slot, value) [N, T] of item_bonus."""
        candidates = self.category_items[category]  # [N, M]
        query = self.item_query(h2)  # [N, d]
        scores = (self.item_emb(candidates) @ query.unsqueeze(-1)).squeeze(-1) + self.item_bias(candidates).squeeze(-1)
        if bonus is not None:
            scores = scores.scatter_add(-1, bonus[0], bonus[1].to(scores.dtype))
        return scores.masked_fill(~self.category_item_valid[category], float("-inf"))

    def item_cross_entropy(self, h2: torch.Tensor, category: torch.Tensor, slot: torch.Tensor,
                           bonus: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Summed cross-entropy of the items at `slot` [N] of their `category` [N], from h2 [N, d] and the
        copy `bonus` of item_bonus: the same value as item_logits + cross_entropy, computed per category
        present, so each category's item embeddings are read once per batch instead of once per position
        (one matmul per category)."""
        query = self.item_query(h2)
        total = query.new_zeros((), dtype=torch.float32)
        if not len(category):
            # Keeps the heads in the graph (DDP wants every parameter used).
            return total + query.sum() * 0.0 + self.copy_item(h2).sum() * 0.0
        order = torch.argsort(category, stable=True)
        categories, counts = torch.unique_consecutive(category[order], return_counts=True)
        for c, rows in zip(categories.tolist(), torch.split(order, counts.tolist())):
            items = self.category_items[c, :int(self.category_item_count[c])]  # a category's items: a prefix
            logits = query[rows] @ self.item_emb(items).T + self.item_bias(items).squeeze(-1)
            if bonus is not None:
                logits = logits.scatter_add(-1, bonus[0][rows], bonus[1][rows].to(logits.dtype))
            total = total + F.cross_entropy(logits.float(), slot[rows], reduction="sum")
        return total

    @staticmethod
    def repeat_kind(item: torch.Tensor, hist: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, T]: 0 when the item drawn at query position t (`item` [B, T]) is none or new to `hist`'s
        window, 2 when it is t's last item event, 1 when it is an earlier one."""
        matches = (hist["item"][:, None, :] == item[:, :, None]) & hist["visible"] & (item[:, :, None] > 0)
        last = (matches & hist["last"]).any(-1)
        return torch.where(last, 2, matches.any(-1).long())

    def forward(self, event_type, item_idx, category_idx=None, gap_bucket=None, context=None, context_category=None,
                target_event_type=None, target_item_idx=None, target_gap_bucket=None):
        """Logits for the next token at every position, and the loss when targets are given.

        Inputs and targets are LongTensors [B, T]; context [B, context_dim] floats and context_category [B]
        (both optional: zeros). `category_idx` is accepted for the token layout but ignored: the category
        always follows from the item through the catalogue. Returns (logits, loss): logits is a dict with
        event_type [B, T, n_event_types] and, with targets, category_idx [B, T, n_categories],
        and gap_bucket [B, T, n_gap_buckets] (item scores are only computed inside the loss, per category:
        see item_logits / item_cross_entropy); loss is None without targets.
        """
        ctx_vec = self.context_vector(context, context_category, event_type.shape[0])
        h = self.hidden(event_type, item_idx, gap_bucket, ctx_vec)
        logits = {"event_type": self.event_head(h)}
        if target_event_type is None:
            return logits, None
        has_item = (target_event_type >= VIEW) & (target_event_type <= PURCHASE)
        item = torch.where(has_item, target_item_idx, torch.zeros_like(target_item_idx))
        category = self.item_category[item]
        hist = self.history(event_type, item_idx)
        h1 = h + self.next_event_emb(target_event_type)
        logits["category_idx"] = self.category_logits(h1, hist)
        h2 = h1 + self.next_category_emb(category)
        rows = has_item.nonzero(as_tuple=True)
        item_ce = self.item_cross_entropy(h2[rows], category[rows], self.item_slot[item[rows]],
                                          self.item_bonus(h2[rows], category[rows], hist, rows))
        h3 = h2 + self.next_item_proj(self.item_emb(item)) + self.repeat_emb(self.repeat_kind(item, hist))
        logits["gap_bucket"] = self.gap_head(h3)
        targets = {"event_type": target_event_type, "category_idx": category, "gap_bucket": target_gap_bucket}
        return logits, self.loss(logits, targets, item_ce)

    @staticmethod
    def loss(logits: dict, targets: dict, item_ce_sum: torch.Tensor) -> torch.Tensor:
        """Sum of the four cross-entropies, each averaged over the positions where it applies:
        event type wherever the target is not padding, category and item where the target is a
        view/cart/purchase, gap where the target is a real event (view/cart/purchase/search)."""
        target_event_type = targets["event_type"]
        real = target_event_type != PAD
        has_item = (target_event_type >= VIEW) & (target_event_type <= PURCHASE)
        is_event = (target_event_type >= VIEW) & (target_event_type <= SEARCH)

        def masked_ce(lg: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            # Summed then divided by max(count, 1): an empty mask gives 0, never NaN.
            ce = F.cross_entropy(lg[mask].float(), target[mask], reduction="sum")
            return ce / mask.sum().clamp(min=1)

        item_ce = item_ce_sum / has_item.sum().clamp(min=1)
        return (masked_ce(logits["event_type"], target_event_type, real)
                + masked_ce(logits["category_idx"], targets["category_idx"], has_item)
                + item_ce
                + masked_ce(logits["gap_bucket"], targets["gap_bucket"], is_event))

    # ----- sampling --------------------------------------------------------------------------------

    def draw_contexts(self, n: int, phase: float = 0.5, first: int = 0, total: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draws first .. first + n - 1 of a stratified sample of `total` (default n) training sessions
        from the bank stored at training time: user contexts (float32 [n, context_dim]), top categories
        (int64 [n]) and lengths in events (int64 [n], 0 = unknown), drawn together, so a context keeps
        the length its user's session had. Stratified: the bank is ordered by length and draw i takes
        row floor((i + phase) * bank size / total), so the lengths of all `total` draws follow the bank's
        to within 1/total, where independent draws wander (session length KS +-0.02 for 2000 draws).
        The shards of one sample pass the same phase (in [0, 1)) and total, each its own `first`.
        Zeros when the checkpoint has no bank."""
        if not len(self.context_bank):
            return np.zeros((n, self.config.context_dim), np.float32), np.zeros(n, np.int64), np.zeros(n, np.int64)
        size = len(self.context_bank)
        order = torch.argsort(self.context_bank_length.cpu(), stable=True)
        draws = torch.arange(first, first + n, dtype=torch.float64)
        rows = order[((draws + phase) * size / (total or n)).floor().long() % size].to(self.context_bank.device)
        return (self.context_bank[rows].cpu().numpy(), self.context_bank_category[rows].cpu().numpy(),
                self.context_bank_length[rows].cpu().numpy())

    @torch.no_grad()
    def sample(self, n_sessions: int, generator: torch.Generator, context=None, context_category=None,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, max_events: int = 64,
               use_cache: bool = True, window_stride: int | None = None, lengths=None) -> dict[str, np.ndarray]:
        """Sample `n_sessions` sessions autoregressively from BOS, all at once.

        `context` [n, context_dim] and `context_category` [n] condition each session on a user profile
        (None: zeros / category 0). Per event: an event type among EOS/view/cart/purchase/search (EOS is
        not allowed first, so a session has at least one event); for a view/cart/purchase a category
        (one with items), then an item of that category; for a search item 0; then a gap bucket.
        Every draw uses `temperature`, then keeps the `top_k` most likely values (0 = all) and the
        smallest set whose probability reaches `top_p` (nucleus; 1.0 = all). A session stops at EOS
        or after `max_events` events. Event types absent from the training data (event_types_seen) are
        never drawn. `lengths` [n] (events; 0 = free) fixes a session's length instead: EOS is banned
        before it and forced at it, while every event is still drawn from the model.

        The model sees at most block_size tokens: when a session outgrows the window it restarts from
        its last block_size - window_stride tokens (default stride block_size // 2, like featurize's
        half-overlapping training windows). With `use_cache` each layer keeps the window's keys and
        values (a batched KV cache), rebuilt only when the window slides; without it every step
        recomputes the window, with the same result.

        Returns flat int64 arrays over all events (no BOS/EOS), ordered by session then position:
        session (0..n_sessions-1), position (0-based within the session), event_type (3..6),
        item_idx and gap_bucket. Deterministic for a given generator state on CPU.
        """
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        if not 0 < top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        was_training = self.training
        self.eval()
        try:
            return self._sample(n_sessions, generator, context, context_category, temperature, int(top_k or 0),
                                float(top_p), max_events, use_cache, window_stride, lengths)
        finally:
            self.train(was_training)

    def _sample(self, n, generator, context, context_category, temperature, top_k, top_p, max_events, use_cache,
                window_stride, lengths):
        cfg = self.config
        device = self.item_category.device
        ctx_vec = self.context_vector(context, context_category, n)
        if ctx_vec.shape[0] != n:
            raise ValueError(f"context has {ctx_vec.shape[0]} rows for {n} sessions")
        stride = max(1, min(cfg.block_size, window_stride or cfg.block_size // 2))
        keep = cfg.block_size - stride  # tokens kept when the window slides (>= 0)
        names = ("event_type", "item_idx", "gap_bucket")
        capacity = max_events + 1
        seq = {k: torch.zeros(n, capacity, dtype=torch.long, device=device) for k in names}
        seq["event_type"][:, 0] = BOS
        length, start = 1, 0  # tokens so far; first token of the window
        alive = torch.ones(n, dtype=torch.bool, device=device)
        target = torch.zeros(n, dtype=torch.long, device=device) if lengths is None else \
            torch.as_tensor(np.asarray(lengths), dtype=torch.long, device=device).reshape(-1)
        if target.shape != (n,):
            raise ValueError(f"lengths has {target.numel()} values for {n} sessions")
        fixed = target > 0

        allowed_first = torch.zeros(cfg.n_event_types, dtype=torch.bool, device=device)
        # Without any catalogue item (n_items == 1: only 0 = none) only searches can be sampled.
        allowed_first[[VIEW, CART, PURCHASE, SEARCH] if cfg.n_items > 1 else [SEARCH]] = True
        # An event type the training sessions never had (searches in REES46, carts in YOOCHOOSE) keeps a
        # small untrained probability; drawing it would only invent behaviour the source does not have.
        if (allowed_first & self.event_types_seen).any():
            allowed_first &= self.event_types_seen
        allowed = allowed_first.clone()
        allowed[EOS] = True
        no_category = ~self.category_has_items

        def draw(logits: torch.Tensor, banned: torch.Tensor | None = None) -> torch.Tensor:
            logits = logits.float() / temperature
            if banned is not None:
                logits = logits.masked_fill(banned, float("-inf"))
            if top_k and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            if top_p < 1.0:
                sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
                # Drop a value when the ones ranked above it already reach top_p (the first always stays).
                drop_sorted = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p
                drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
                probs = probs.masked_fill(drop, 0.0)
            return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(1).to(device)

        def window_hidden(caches):
            return self.hidden(*(seq[k][:, start:length] for k in names), ctx_vec, caches)[:, -1]

        def window_history():
            """The copy features of the window's last position (see `history`)."""
            hist = self.history(seq["event_type"][:, start:length], seq["item_idx"][:, start:length])
            return {k: v[:, -1:] if k in ("visible", "last") else v for k, v in hist.items()}

        caches = [{} for _ in self.blocks] if use_cache else None
        h = window_hidden(caches)
        rows = (torch.arange(n, device=device), torch.zeros(n, dtype=torch.long, device=device))
        for step in range(max_events):
            if not alive.any():
                break
            hist = window_history()
            banned = (~(allowed_first if step == 0 else allowed)).expand(n, -1).clone()
            banned[:, EOS] |= fixed & (step < target)
            event = draw(self.event_head(h), banned)
            event = torch.where(fixed & (step >= target), torch.full_like(event, EOS), event)
            has_item = (event >= VIEW) & (event <= PURCHASE)
            h1 = h + self.next_event_emb(event)
            if cfg.n_items > 1:
                category = draw(self.category_logits(h1[:, None], hist)[:, 0], no_category)
                h2 = h1 + self.next_category_emb(category)
                slot = draw(self.item_logits(h2, category, self.item_bonus(h2, category, hist, rows)))
                item = self.category_items[category, slot]
                item = torch.where(has_item, item, torch.zeros_like(item))
            else:
                item = torch.zeros_like(event)
            # What the gap head sees: the item's real category (0 for a search), as in training.
            category = self.item_category[item]
            h3 = (h1 + self.next_category_emb(category) + self.next_item_proj(self.item_emb(item))
                  + self.repeat_emb(self.repeat_kind(item[:, None], hist)[:, 0]))
            gap = draw(self.gap_head(h3))
            ended = alive & (event == EOS)
            alive = alive & ~ended
            # A session that just ended gets its EOS token; finished ones get padding from then on.
            event = torch.where(alive, event, torch.full_like(event, PAD))
            event = torch.where(ended, torch.full_like(event, EOS), event)
            item = torch.where(alive, item, torch.zeros_like(item))
            gap = torch.where(alive, gap, torch.zeros_like(gap))
            for k, v in (("event_type", event), ("item_idx", item), ("gap_bucket", gap)):
                seq[k][:, length] = v
            length += 1
            if step == max_events - 1 or not alive.any():
                break
            if length - start > cfg.block_size:  # the window slides: recompute from its kept tokens
                start = length - max(1, keep)
                caches = [{} for _ in self.blocks] if use_cache else None
                h = window_hidden(caches)
            elif use_cache:
                h = self.hidden(*(seq[k][:, length - 1:length] for k in names), ctx_vec, caches,
                                start=length - 1 - start)[:, -1]
            else:
                h = window_hidden(None)

        events = seq["event_type"][:, 1:length]
        is_event = (events >= VIEW) & (events <= SEARCH)
        session, position = is_event.nonzero(as_tuple=True)  # row-major: by session, then position
        return {
            "session": session.cpu().numpy().astype(np.int64),
            "position": position.cpu().numpy().astype(np.int64),
            "event_type": events[is_event].cpu().numpy().astype(np.int64),
            "item_idx": seq["item_idx"][:, 1:length][is_event].cpu().numpy().astype(np.int64),
            "gap_bucket": seq["gap_bucket"][:, 1:length][is_event].cpu().numpy().astype(np.int64),
        }


TOKEN_FIELDS = ("event_type", "item_idx", "category_idx", "gap_bucket")


def split_window(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model keyword arguments from token windows [B, block_size + 1]: inputs tokens[:, :-1],
    targets tokens[:, 1:], plus the per-window user_context [B, 7] and user_category_idx [B] when
    present. Call the model as model(**split_window(batch))."""
    inputs = {k: tokens[k][:, :-1] for k in TOKEN_FIELDS}
    targets = {f"target_{k}": tokens[k][:, 1:] for k in ("event_type", "item_idx", "gap_bucket")}
    context = {}
    if "user_context" in tokens:
        context["context"] = tokens["user_context"]
    if "user_category_idx" in tokens:
        context["context_category"] = tokens["user_category_idx"]
    return {**inputs, **context, **targets}


# ----- checkpoints ---------------------------------------------------------------------------------


CATALOGUE_BUFFERS = ("item_category", "item_brand", "item_price_bucket", "context_bank", "context_bank_category",
                     "context_bank_length", "event_types_seen")


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


def write_checkpoint(directory: str | os.PathLike, payload: dict, record: dict) -> Path:
    """Write `directory`/model.pt (torch.save of `payload`) and metadata.json (`record` plus model_file
    and model_sha256) atomically: both go to a temporary sibling folder, fsynced, which then replaces
    `directory`. Shared by every model checkpoint of the project."""
    target = Path(directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        model_file = staging / MODEL_FILE
        with open(model_file, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        record = {**record, "model_file": MODEL_FILE, "model_sha256": _sha256(model_file)}
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


def save_checkpoint(model: nn.Module, directory: str | os.PathLike, metadata: dict) -> Path:
    """Write `directory`/model.pt (state_dict + model config) and metadata.json (`metadata` plus
    model_config and model_sha256) atomically, replacing an earlier checkpoint there."""
    model = _unwrap(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    config = asdict(model.config)
    return write_checkpoint(directory, {"model_config": config, "state_dict": state},
                            {**metadata, "model_config": config})


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
    state = payload["state_dict"]
    model = SessionModel(cfg, **{k: state[k] for k in CATALOGUE_BUFFERS if k in state})
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {directory} does not fit this version of the session model (it was "
                              f"written by an older one?); retrain: {str(exc)[:300]}") from exc
    model.to(map_location)
    return model.eval(), metadata


class VocabularyError(ValueError):
    """A checkpoint whose item or category vocabulary does not fit the catalogue it is used with."""


def check_vocabulary(metadata: dict, n_items: int, n_categories: int) -> None:
    """Raise VocabularyError unless a checkpoint (its metadata.json) can be used with a catalogue of
    `n_items` items and `n_categories` categories (0 = none included in both).

    item_catalog only ever appends ids, so a checkpoint trained on an older, smaller vocabulary still
    means the same items (it never samples the newer ones); a catalogue SMALLER than the checkpoint's
    vocabulary was rebuilt or belongs to another lake, and the checkpoint's ids would point at the
    wrong items (or at none)."""
    vocab = metadata.get("vocab") or {}
    config = metadata.get("model_config") or {}
    trained_items = vocab.get("n_items", config.get("n_items"))
    trained_categories = vocab.get("n_categories", config.get("n_categories"))
    if trained_items is None or trained_categories is None:
        raise VocabularyError("checkpoint metadata records no vocabulary (vocab.n_items / vocab.n_categories); "
                              "it was not written by the train stage")
    problems = []
    if int(trained_items) > int(n_items):
        problems.append(f"{trained_items} items but the catalogue has only {n_items}")
    if int(trained_categories) > int(n_categories):
        problems.append(f"{trained_categories} categories but the catalogue has only {n_categories}")
    if problems:
        run = metadata.get("run_id", "?")
        raise VocabularyError(f"checkpoint of run {run} was trained on " + " and ".join(problems)
                              + " (0 = none included): the vocabulary was rebuilt since; retrain on this catalogue")
