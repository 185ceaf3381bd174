"""Tabular generators for profile tables (user_profiles, item_catalog): CTGAN and TVAE behind one interface.

    meta = TabularMetadata.detect(df)                       # or TabularMetadata({"age": "numerical", ...})
    synth = make_synthesizer("ctgan", metadata=meta, epochs=300, seed=7).fit(df)
    fake = synth.sample(10_000, seed=1)
    synth.save("ckpt/profiles", {"run_id": "..."})
    synth, record = load_synthesizer("ckpt/profiles")     # sha256-checked

Shared pieces
-------------
* `DataTransformer` (both models): numeric and datetime columns (datetime as epoch seconds) get
  mode-specific normalization: a 1-D Gaussian mixture fitted by EM with a sparse Dirichlet prior on the
  weights (components whose weight falls under `mode_weight_threshold` are dropped, at most `max_modes`),
  then each value becomes (one-hot of its mode, (x - mean_mode) / (4 std_mode) clipped to [-1, 1]).
  Categorical columns are one-hot; categories past the `max_categories` most frequent ones are grouped
  into '__other__', which sampling turns back into one of them, drawn with its training frequency (so
  the long tail keeps its real values and mix); a null is its own category. Integer columns with at
  most `discrete_integers` distinct values (counts: sessions, views, purchases) are encoded the same
  way, as categories, because a mixture of Gaussians rounded to integers smears their exact mass at
  0, 1, 2, ... A numeric column with nulls gets a 2-way null indicator.
* `CTGANSynthesizer`: conditional generator (residual layers, gumbel-softmax on discrete spans) and a
  PacGAN critic trained with WGAN-GP; conditional vector over the categorical columns with
  training-by-sampling (log-frequency), plus the conditional cross-entropy loss.
* `TVAESynthesizer`: MLP encoder/decoder; Gaussian loss with a learned sigma per scalar, cross-entropy per
  mode / category span, KL term.
* Data-parallel training: inside a torch.distributed process group (the train stage runs `fit` under
  TorchDistributor) every rank fits the same transformer, starts from the same weights, trains on its
  own rows and averages its gradients with the other ranks after every backward pass, as DDP does.
* Validation: `fit` holds out `holdout_fraction` of the rows, trains on the rest and records
  `column_shape_score` and `column_pair_score` of the holdout vs a sample in `self.validation`.
* Checkpoints: `save` writes model.pt (networks + transformer, everything `sample` needs) and
  metadata.json (configuration, seed, training curves, validation scores, model_sha256) into a staging
  folder renamed into place; `load` refuses a model.pt whose hash differs from the recorded one.

Everything is deterministic for a given seed on CPU: fit draws from a numpy Generator and a forked torch
RNG seeded with `seed`; sample(n, seed) likewise.
"""
from __future__ import annotations

import inspect
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from synth.model import METADATA_FILE, MODEL_FILE, CheckpointError, _sha256, write_checkpoint

SDTYPES = ("numerical", "categorical", "datetime")
OTHER = "__other__"
NULL = "__null__"
FORMAT_VERSION = 2
# Tail categories kept (most frequent first) to decode '__other__'; rarer ones are not sampled.
MAX_TAIL = 10_000


# ----- metadata ------------------------------------------------------------------------------------


@dataclass
class ColumnSpec:
    """One column: sdtype numerical | categorical | datetime (modelled as epoch seconds); numeric and
    datetime columns may be clipped to [min, max] (None = unbounded) and rounded to integers."""
    sdtype: str
    min: float | None = None
    max: float | None = None
    integer: bool = False

    def __post_init__(self):
        if self.sdtype not in SDTYPES:
            raise ValueError(f"sdtype must be one of {SDTYPES}, not {self.sdtype!r}")


class TabularMetadata:
    """Column name -> ColumnSpec, in column order."""

    def __init__(self, columns: Mapping[str, str | Mapping | ColumnSpec]):
        self.columns: dict[str, ColumnSpec] = {}
        for name, spec in columns.items():
            if isinstance(spec, str):
                spec = ColumnSpec(spec)
            elif isinstance(spec, Mapping):
                spec = ColumnSpec(**spec)
            self.columns[str(name)] = spec

    @classmethod
    def detect(cls, df: pd.DataFrame, clip: bool = True) -> "TabularMetadata":
        """Guess sdtypes from dtypes: bool/object/string/category -> categorical, datetime -> datetime,
        other numbers -> numerical (integer dtypes rounded). With `clip`, numeric columns are clipped to
        their observed range."""
        columns = {}
        for name in df.columns:
            s = df[name]
            if pd.api.types.is_datetime64_any_dtype(s):
                columns[name] = ColumnSpec("datetime")
            elif pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s):
                columns[name] = ColumnSpec("categorical")
            else:
                values = pd.to_numeric(s, errors="coerce").astype(float)
                has = values.notna().any()
                columns[name] = ColumnSpec(
                    "numerical",
                    min=float(values.min()) if clip and has else None,
                    max=float(values.max()) if clip and has else None,
                    integer=bool(pd.api.types.is_integer_dtype(s)))
        return cls(columns)

    def to_dict(self) -> dict:
        return {name: asdict(spec) for name, spec in self.columns.items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> "TabularMetadata":
        return cls(data)

    def __repr__(self) -> str:
        return f"TabularMetadata({self.to_dict()})"


def _as_metadata(metadata) -> TabularMetadata:
    return metadata if isinstance(metadata, TabularMetadata) else TabularMetadata(metadata)


def _to_seconds(s: pd.Series) -> np.ndarray:
    """A datetime (or numeric) series as float epoch seconds, NaN for nulls."""
    if pd.api.types.is_datetime64_any_dtype(s):
        s = s.dt.tz_convert("UTC").dt.tz_localize(None) if getattr(s.dt, "tz", None) is not None else s
        values = s.to_numpy(dtype="datetime64[ns]")
        out = values.astype("int64").astype(float) / 1e9
        out[np.isnat(values)] = np.nan
        return out
    return pd.to_numeric(s, errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def _numeric(s: pd.Series, spec: ColumnSpec) -> np.ndarray:
    return _to_seconds(s) if spec.sdtype == "datetime" else \
        pd.to_numeric(s, errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def _py(value):
    """numpy scalars -> Python scalars (torch.load(weights_only=True) and JSON only take plain types)."""
    return value.item() if isinstance(value, np.generic) else value


# ----- Gaussian mixture ----------------------------------------------------------------------------


def _em(x: np.ndarray, k: int, n_iter: int, concentration: float, weight_threshold: float, tol: float):
    """EM for a k-component 1-D mixture (MAP weights under a sparse Dirichlet prior); returns
    (weights, means, variances, total log-likelihood)."""
    spread = float(x.std())
    means = np.unique(np.quantile(x, (np.arange(k) + 0.5) / k))
    k = len(means)
    var = np.full(k, (spread / k) ** 2)
    weights = np.full(k, 1.0 / k)
    floor = (1e-3 * spread) ** 2
    previous = -np.inf
    loglik = -np.inf
    for _ in range(n_iter):
        log_p = (np.log(weights) - 0.5 * np.log(2 * np.pi * var)
                 - 0.5 * (x[:, None] - means) ** 2 / var)
        top = log_p.max(axis=1, keepdims=True)
        lse = top + np.log(np.exp(log_p - top).sum(axis=1, keepdims=True))
        loglik = float(lse.sum())
        resp = np.exp(log_p - lse)
        nk = resp.sum(axis=0)
        weights = np.maximum(nk + concentration - 1.0, 0.0)
        weights = weights / weights.sum()
        keep = weights >= weight_threshold
        if not keep.any():
            keep = weights == weights.max()
        safe_nk = np.maximum(nk, 1e-12)
        means = (resp * x[:, None]).sum(axis=0) / safe_nk
        var = (resp * (x[:, None] - means) ** 2).sum(axis=0) / safe_nk + floor
        weights, means, var = weights[keep], means[keep], var[keep]
        weights = weights / weights.sum()
        if keep.all() and abs(loglik - previous) < tol * len(x):
            break
        previous = loglik
    return weights, means, var, loglik


def fit_gaussian_mixture(x: np.ndarray, max_modes: int = 10, weight_threshold: float = 0.005,
                         rng: np.random.Generator | None = None, max_rows: int = 4000,
                         n_iter: int = 100, concentration: float = 1e-3, tol: float = 1e-5
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit a 1-D Gaussian mixture for mode-specific normalization: EM with a sparse Dirichlet
    (`concentration`) prior on the weights, for 1, 2, ... components (at most `max_modes`; the search
    stops once two more components do not lower the BIC), keeping the lowest-BIC fit. Components under
    `weight_threshold` are dropped while iterating. Fitted on at most `max_rows` values (drawn with
    `rng`). Returns (weights, means, stds) sorted by mean."""
    rng = rng or np.random.default_rng(0)
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return np.ones(1), np.zeros(1), np.ones(1)
    if len(x) > max_rows:
        x = rng.choice(x, max_rows, replace=False)
    if float(x.std()) == 0.0:
        return np.ones(1), np.array([float(x[0])]), np.array([max(abs(float(x[0])) * 1e-3, 1e-3)])
    best, best_bic, worse = None, np.inf, 0
    for k in range(1, max(1, max_modes) + 1):
        w, mu, var, loglik = _em(x, k, n_iter, concentration, weight_threshold, tol)
        bic = -2 * loglik + (3 * len(w) - 1) * np.log(len(x))
        if bic < best_bic - 1e-9:
            best, best_bic, worse = (w, mu, var), bic, 0
        else:
            worse += 1
            if worse >= 2:
                break
        if len(w) < k:  # components were pruned: more would not survive either
            break
    w, mu, var = best
    order = np.argsort(mu)
    return w[order], mu[order], np.sqrt(var[order])


# ----- data transformer ----------------------------------------------------------------------------


class DataTransformer:
    """Reversible encoding of a DataFrame into a float matrix of spans.

    `spans` lists (column, role, activation, size) in matrix order: role 'scalar' (tanh, 1), 'mode'
    (softmax, number of modes), 'null' (softmax, 2: [present, null]) or 'category' (softmax, number of
    categories)."""

    def __init__(self, max_modes: int = 10, mode_weight_threshold: float = 0.005, max_categories: int = 50,
                 discrete_integers: int = 100):
        self.max_modes = max_modes
        self.mode_weight_threshold = mode_weight_threshold
        self.max_categories = max_categories
        self.discrete_integers = discrete_integers
        self.metadata: TabularMetadata | None = None
        self.columns: list[dict] = []

    # ---- fit --------------------------------------------------------------------------------------

    def fit(self, df: pd.DataFrame, metadata: TabularMetadata, seed: int = 0) -> "DataTransformer":
        rng = np.random.default_rng(seed)
        self.metadata = metadata
        self.columns = []
        for name, spec in metadata.columns.items():
            if name not in df.columns:
                raise KeyError(f"column {name!r} of the metadata is not in the data")
            discrete = (spec.sdtype == "numerical" and spec.integer
                        and df[name].nunique(dropna=True) <= self.discrete_integers)
            if spec.sdtype == "categorical" or discrete:
                values = df[name].astype(object).where(df[name].notna(), NULL)
                counts = values.value_counts(sort=False)
                ranked = [(_py(c), int(n)) for c, n in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))]
                kept, tail = ranked, []
                if len(ranked) > self.max_categories:
                    kept, tail = ranked[:self.max_categories - 1] + [(OTHER, 0)], ranked[self.max_categories - 1:]
                    kept[-1] = (OTHER, sum(n for _, n in tail))
                    tail = tail[:MAX_TAIL]
                freq = np.array([n for _, n in kept], dtype=float)
                tail_freq = np.array([n for _, n in tail], dtype=float)
                self.columns.append({"name": name, "sdtype": spec.sdtype, "encoding": "category",
                                     "categories": [c for c, _ in kept],
                                     "frequency": [float(f) for f in freq / freq.sum()],
                                     "tail": [c for c, _ in tail],
                                     "tail_frequency": [float(f) for f in tail_freq / max(tail_freq.sum(), 1.0)],
                                     "dtype": str(df[name].dtype)})
            else:
                x = _numeric(df[name], spec)
                w, mu, sd = fit_gaussian_mixture(x, self.max_modes, self.mode_weight_threshold, rng)
                tz = None
                if spec.sdtype == "datetime" and getattr(df[name].dtype, "tz", None) is not None:
                    tz = str(df[name].dtype.tz)
                self.columns.append({"name": name, "sdtype": spec.sdtype, "encoding": "modes", "weights": w.tolist(),
                                     "means": mu.tolist(), "stds": sd.tolist(),
                                     "has_null": bool(np.isnan(x).any()), "tz": tz,
                                     "dtype": str(df[name].dtype)})
        return self

    @property
    def spans(self) -> list[tuple[str, str, str, int]]:
        out = []
        for col in self.columns:
            if _as_category(col):
                out.append((col["name"], "category", "softmax", len(col["categories"])))
            else:
                out.append((col["name"], "scalar", "tanh", 1))
                out.append((col["name"], "mode", "softmax", len(col["means"])))
                if col["has_null"]:
                    out.append((col["name"], "null", "softmax", 2))
        return out

    @property
    def output_dim(self) -> int:
        return sum(s[3] for s in self.spans)

    def discrete_columns(self) -> list[tuple[int, int, np.ndarray]]:
        """(matrix offset, size, frequency) of every categorical column's one-hot span."""
        out, offset = [], 0
        freqs = {c["name"]: np.asarray(c["frequency"]) for c in self.columns if _as_category(c)}
        for name, role, _, size in self.spans:
            if role == "category":
                out.append((offset, size, freqs[name]))
            offset += size
        return out

    # ---- transform --------------------------------------------------------------------------------

    def category_codes(self, df: pd.DataFrame, col: dict) -> np.ndarray:
        cats = col["categories"]
        index = {c: i for i, c in enumerate(cats)}
        fallback = index.get(OTHER, 0)
        values = df[col["name"]].astype(object).where(df[col["name"]].notna(), NULL)
        codes = values.map(index)
        return codes.fillna(fallback).to_numpy(dtype=np.int64)

    def transform(self, df: pd.DataFrame, rng: np.random.Generator | None = None) -> np.ndarray:
        """Encode `df`. With `rng`, each numeric value's mode is drawn from its posterior over the modes
        (as CTGAN does for training); without, the most probable mode is used (deterministic)."""
        n = len(df)
        parts = []
        for col, spec in zip(self.columns, self.metadata.columns.values()):
            if _as_category(col):
                codes = self.category_codes(df, col)
                onehot = np.zeros((n, len(col["categories"])), dtype=np.float32)
                onehot[np.arange(n), codes] = 1.0
                parts.append(onehot)
                continue
            x = _numeric(df[col["name"]], spec)
            null = np.isnan(x)
            if null.any():
                present = x[~null]
                fill = (rng.choice(present, null.sum()) if rng is not None and len(present)
                        else np.full(null.sum(), np.median(present) if len(present) else col["means"][0]))
                x = x.copy()
                x[null] = fill
            w, mu, sd = (np.asarray(col[k]) for k in ("weights", "means", "stds"))
            log_p = np.log(w) - np.log(sd) - 0.5 * ((x[:, None] - mu) / sd) ** 2
            # Prefer modes within 4 std of the value (whose scalar needs no clipping): exact round trips.
            inside = np.abs(x[:, None] - mu) <= 4 * sd
            log_p = np.where(inside | ~inside.any(axis=1, keepdims=True), log_p, -np.inf)
            if rng is None:
                mode = log_p.argmax(axis=1)
            else:
                p = np.exp(log_p - log_p.max(axis=1, keepdims=True))
                cum = np.cumsum(p / p.sum(axis=1, keepdims=True), axis=1)
                mode = np.minimum((cum < rng.random(n)[:, None]).sum(axis=1), len(mu) - 1)
            scalar = np.clip((x - mu[mode]) / (4 * sd[mode]), -1.0, 1.0)
            modes = np.zeros((n, len(mu)), dtype=np.float32)
            modes[np.arange(n), mode] = 1.0
            parts += [scalar[:, None].astype(np.float32), modes]
            if col["has_null"]:
                parts.append(np.stack([~null, null], axis=1).astype(np.float32))
        return np.concatenate(parts, axis=1) if parts else np.zeros((n, 0), dtype=np.float32)

    def inverse_transform(self, data: np.ndarray, rng: np.random.Generator | None = None) -> pd.DataFrame:
        """Decode a matrix (scalars in [-1, 1], softmax spans as probabilities, logits or one-hot:
        the argmax is taken) into a DataFrame with the fitted columns, dtypes and clipping. `rng` draws
        the tail value of each '__other__' (default: a fixed seed, so decoding is deterministic)."""
        data = np.asarray(data, dtype=float)
        rng = rng if rng is not None else np.random.default_rng(0)
        out, offset = {}, 0
        for col, spec in zip(self.columns, self.metadata.columns.values()):
            if _as_category(col):
                k = len(col["categories"])
                codes = data[:, offset:offset + k].argmax(axis=1)
                offset += k
                values = np.empty(len(data), dtype=object)
                for i, c in enumerate(col["categories"]):
                    values[codes == i] = None if c == NULL else c
                other = values == OTHER
                if other.any() and col.get("tail"):
                    picks = rng.choice(len(col["tail"]), size=int(other.sum()), p=col["tail_frequency"])
                    values[other] = np.asarray(col["tail"], dtype=object)[picks]
                if col["sdtype"] == "categorical":
                    out[col["name"]] = self._restore_categorical(values, col)
                else:
                    x = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(float)
                    out[col["name"]] = self._restore_numeric(x, np.isnan(x), col, spec)
                continue
            k = len(col["means"])
            scalar = np.clip(data[:, offset], -1.0, 1.0)
            mode = data[:, offset + 1:offset + 1 + k].argmax(axis=1)
            offset += 1 + k
            mu, sd = np.asarray(col["means"]), np.asarray(col["stds"])
            x = scalar * 4 * sd[mode] + mu[mode]
            if spec.min is not None or spec.max is not None:
                x = np.clip(x, spec.min if spec.min is not None else -np.inf,
                            spec.max if spec.max is not None else np.inf)
            if spec.integer or spec.sdtype == "datetime":
                x = np.round(x)
            null = np.zeros(len(data), dtype=bool)
            if col["has_null"]:
                null = data[:, offset + 1] > data[:, offset]
                offset += 2
            out[col["name"]] = self._restore_numeric(x, null, col, spec)
        return pd.DataFrame(out)

    @staticmethod
    def _restore_categorical(values: np.ndarray, col: dict) -> pd.Series:
        s = pd.Series(values, dtype=object)
        if col["dtype"] == "bool" and not s.isna().any():
            return s.astype(bool)
        return s

    @staticmethod
    def _restore_numeric(x: np.ndarray, null: np.ndarray, col: dict, spec: ColumnSpec) -> pd.Series:
        if spec.sdtype == "datetime":
            s = pd.Series(pd.to_datetime(np.where(null, np.nan, x), unit="s"))
            s[null] = pd.NaT
            if col["tz"]:
                s = s.dt.tz_localize("UTC").dt.tz_convert(col["tz"])
            return s
        if spec.integer or col["dtype"].lower().startswith(("int", "uint")):
            if null.any():
                return pd.Series(pd.array(np.where(null, 0, x).astype(np.int64), dtype="Int64").where(~null))
            return pd.Series(x.astype(np.int64))
        return pd.Series(np.where(null, np.nan, x))

    # ---- state ------------------------------------------------------------------------------------

    def state(self) -> dict:
        return {"max_modes": self.max_modes, "mode_weight_threshold": self.mode_weight_threshold,
                "max_categories": self.max_categories, "discrete_integers": self.discrete_integers,
                "metadata": self.metadata.to_dict(), "columns": self.columns}

    @classmethod
    def from_state(cls, state: dict) -> "DataTransformer":
        t = cls(state["max_modes"], state["mode_weight_threshold"], state["max_categories"],
                state["discrete_integers"])
        t.metadata = TabularMetadata.from_dict(state["metadata"])
        t.columns = state["columns"]
        return t


def _process_group() -> tuple[int, int]:
    """(rank, world size) of this process's torch.distributed group; (0, 1) when it trains alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _average_gradients(modules, world: int) -> None:
    """Replace every rank's gradients by their mean over the ranks, in one all-reduce. Done by hand
    rather than through the DDP wrapper, because the WGAN-GP penalty differentiates twice, which DDP
    does not support."""
    if world == 1:
        return
    params = [p for m in modules for p in m.parameters()]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def _as_category(col: dict) -> bool:
    """Whether a fitted column is one-hot encoded: categorical, or an integer column with few values."""
    return col["encoding"] == "category"


def _activate(raw: torch.Tensor, spans, tau: float | None) -> torch.Tensor:
    """tanh on scalar spans; gumbel-softmax (tau) on softmax spans, or plain softmax when tau is None."""
    parts, offset = [], 0
    for _, _, act, size in spans:
        piece = raw[:, offset:offset + size]
        if act == "tanh":
            parts.append(torch.tanh(piece))
        elif tau is None:
            parts.append(torch.softmax(piece, dim=1))
        else:
            parts.append(F.gumbel_softmax(piece, tau=tau))
        offset += size
    return torch.cat(parts, dim=1)


# ----- validation scores ---------------------------------------------------------------------------


def _bin_codes(real: pd.Series, synthetic: pd.Series, spec: ColumnSpec, bins: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of both series on one scale: numeric/datetime columns in `bins` quantile bins of
    the real values (ties merged, nulls a bin of their own), categorical columns by value."""
    if spec.sdtype == "categorical":
        r = real.astype(object).where(real.notna(), NULL).astype(str)
        s = synthetic.astype(object).where(synthetic.notna(), NULL).astype(str)
        cats = {c: i for i, c in enumerate(pd.unique(pd.concat([r, s], ignore_index=True)))}
        return r.map(cats).to_numpy(np.int64), s.map(cats).to_numpy(np.int64)
    rx, sx = _numeric(real, spec), _numeric(synthetic, spec)
    present = rx[~np.isnan(rx)]
    edges = np.unique(np.quantile(present, np.linspace(0, 1, bins + 1)[1:-1])) if len(present) else np.array([])

    def code(x):
        c = np.searchsorted(edges, x, side="right")
        return np.where(np.isnan(x), len(edges) + 1, c)

    return code(rx), code(sx)


def _tvd(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) == 0 or len(b) == 0:
        return 1.0
    size = int(max(a.max(), b.max())) + 1
    pa = np.bincount(a, minlength=size) / len(a)
    pb = np.bincount(b, minlength=size) / len(b)
    return 0.5 * float(np.abs(pa - pb).sum())


def column_shapes(real: pd.DataFrame, synthetic: pd.DataFrame, metadata, bins: int = 20) -> dict[str, float]:
    """1 - total variation distance per column (numeric columns in `bins` quantile bins of `real`)."""
    metadata = _as_metadata(metadata)
    out = {}
    for name, spec in metadata.columns.items():
        r, s = _bin_codes(real[name], synthetic[name], spec, bins)
        out[name] = 1.0 - _tvd(r, s)
    return out


def column_pairs(real: pd.DataFrame, synthetic: pd.DataFrame, metadata, bins: int = 5) -> dict[str, float]:
    """1 - TVD of the joint distribution of every column pair ('a|b'), numeric columns in `bins`
    quantile bins of `real` (coarser than the shapes' bins: a 2-D table has bins**2 cells)."""
    metadata = _as_metadata(metadata)
    codes = {name: _bin_codes(real[name], synthetic[name], spec, bins) for name, spec in metadata.columns.items()}
    names = list(codes)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (ra, sa), (rb, sb) = codes[a], codes[b]
            width = int(max(rb.max(initial=0), sb.max(initial=0))) + 1
            out[f"{a}|{b}"] = 1.0 - _tvd(ra * width + rb, sa * width + sb)
    return out


def column_shape_score(real: pd.DataFrame, synthetic: pd.DataFrame, metadata, bins: int = 20) -> float:
    """Mean over columns of 1 - TVD between the real and synthetic marginals (numeric columns binned into
    `bins` quantile bins of the real data). 1.0 = identical binned marginals."""
    scores = column_shapes(real, synthetic, metadata, bins)
    return float(np.mean(list(scores.values()))) if scores else 1.0


def column_pair_score(real: pd.DataFrame, synthetic: pd.DataFrame, metadata, bins: int = 5) -> float:
    """Mean over column pairs of 1 - TVD between the real and synthetic 2-D binned distributions."""
    scores = column_pairs(real, synthetic, metadata, bins)
    return float(np.mean(list(scores.values()))) if scores else 1.0


# ----- networks ------------------------------------------------------------------------------------


class Residual(nn.Module):
    """CTGAN's generator block: Linear -> BatchNorm -> ReLU, concatenated with its input."""

    def __init__(self, i: int, o: int):
        super().__init__()
        self.fc = nn.Linear(i, o)
        self.bn = nn.BatchNorm1d(o)

    def forward(self, x):
        return torch.cat([F.relu(self.bn(self.fc(x))), x], dim=1)


class Generator(nn.Module):
    def __init__(self, input_dim: int, dims, output_dim: int):
        super().__init__()
        layers, d = [], input_dim
        for h in dims:
            layers.append(Residual(d, h))
            d += h
        layers.append(nn.Linear(d, output_dim))
        self.seq = nn.Sequential(*layers)

    def forward(self, x):
        return self.seq(x)


class Discriminator(nn.Module):
    """PacGAN critic: scores packs of `pac` rows, concatenated into one input."""

    def __init__(self, input_dim: int, dims, pac: int):
        super().__init__()
        self.pac = pac
        self.pacdim = input_dim * pac
        layers, d = [], self.pacdim
        for h in dims:
            layers += [nn.Linear(d, h), nn.LeakyReLU(0.2), nn.Dropout(0.5)]
            d = h
        layers.append(nn.Linear(d, 1))
        self.seq = nn.Sequential(*layers)

    def forward(self, x):
        return self.seq(x.view(-1, self.pacdim))

    def gradient_penalty(self, real, fake, lambda_: float = 10.0):
        alpha = torch.rand(real.size(0) // self.pac, 1, 1)
        alpha = alpha.repeat(1, self.pac, real.size(1)).view(-1, real.size(1))
        mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        grads = torch.autograd.grad(self(mixed), mixed, torch.ones(real.size(0) // self.pac, 1),
                                    create_graph=True, retain_graph=True)[0]
        norm = grads.view(-1, self.pacdim).norm(2, dim=1)
        return ((norm - 1) ** 2).mean() * lambda_


def _relu_stack(d: int, dims) -> tuple[list[nn.Module], int]:
    """Linear + ReLU layers of widths `dims` from input width `d`, and the last width."""
    layers = []
    for h in dims:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    return layers, d


class Encoder(nn.Module):
    def __init__(self, data_dim: int, dims, embedding_dim: int):
        super().__init__()
        layers, d = _relu_stack(data_dim, dims)
        self.seq = nn.Sequential(*layers)
        self.mu = nn.Linear(d, embedding_dim)
        self.logvar = nn.Linear(d, embedding_dim)

    def forward(self, x):
        h = self.seq(x)
        return self.mu(h), self.logvar(h)


class Decoder(nn.Module):
    def __init__(self, embedding_dim: int, dims, data_dim: int):
        super().__init__()
        layers, d = _relu_stack(embedding_dim, dims)
        layers.append(nn.Linear(d, data_dim))
        self.seq = nn.Sequential(*layers)
        self.sigma = nn.Parameter(torch.ones(data_dim) * 0.1)

    def forward(self, z):
        return self.seq(z), self.sigma


# ----- synthesizers --------------------------------------------------------------------------------


class TabularSynthesizer:
    """Common interface: fit(df) -> self, sample(n, seed) -> DataFrame, save(directory, metadata), load."""

    name = "base"
    _modules: tuple[str, ...] = ()

    def __init__(self, metadata: TabularMetadata | Mapping | None = None, seed: int = 0,
                 epochs: int = 300, batch_size: int = 500, embedding_dim: int = 128,
                 max_modes: int = 10, mode_weight_threshold: float = 0.005, max_categories: int = 50,
                 discrete_integers: int = 100, holdout_fraction: float = 0.1, validation_rows: int = 2000,
                 log_every: int = 0):
        self.metadata = None if metadata is None else _as_metadata(metadata)
        self.seed = int(seed)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.embedding_dim = int(embedding_dim)
        self.max_modes = int(max_modes)
        self.mode_weight_threshold = float(mode_weight_threshold)
        self.max_categories = int(max_categories)
        self.discrete_integers = int(discrete_integers)
        self.holdout_fraction = float(holdout_fraction)
        self.validation_rows = int(validation_rows)
        self.log_every = int(log_every)
        self.transformer: DataTransformer | None = None
        self.curves: dict[str, list[float]] = {}
        self.validation: dict[str, Any] = {}
        self.fit_info: dict[str, Any] = {}
        self.checkpoint_metadata: dict | None = None

    # ---- configuration ----------------------------------------------------------------------------

    def params(self) -> dict:
        """Constructor arguments (metadata and seed aside): the configuration recorded in checkpoints."""
        names = []
        for klass in type(self).__mro__:
            if klass is object:
                continue
            names += [p for p in inspect.signature(klass.__init__).parameters
                      if p not in ("self", "metadata", "seed", "common", "args", "kwargs") and p not in names]
        return {p: getattr(self, p) for p in names}

    # ---- fit --------------------------------------------------------------------------------------

    def fit(self, df: pd.DataFrame) -> "TabularSynthesizer":
        start = time.perf_counter()
        df = df.reset_index(drop=True)
        if self.metadata is None:
            self.metadata = TabularMetadata.detect(df)
        df = df[list(self.metadata.columns)]
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(df))
        n_hold = int(round(len(df) * self.holdout_fraction)) if len(df) >= 20 else 0
        holdout, train = df.iloc[order[:n_hold]], df.iloc[np.sort(order[n_hold:])]
        self.transformer = DataTransformer(self.max_modes, self.mode_weight_threshold, self.max_categories,
                                           self.discrete_integers)
        self.transformer.fit(train, self.metadata, seed=self.seed)
        data = self.transformer.transform(train, rng=rng)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.curves = self._train(data, train, rng)
        trained = time.perf_counter()
        self.validation = {"holdout_rows": int(n_hold), "train_rows": int(len(train))}
        if n_hold:
            fake = self.sample(max(n_hold, self.validation_rows), seed=self.seed + 1)
            self.validation.update({
                "sample_rows": int(len(fake)),
                "column_shape_score": column_shape_score(holdout, fake, self.metadata),
                "column_pair_score": column_pair_score(holdout, fake, self.metadata),
                "column_shapes": column_shapes(holdout, fake, self.metadata),
                # The same scores for the real training rows vs the holdout: the ceiling that sampling
                # noise of a small holdout leaves (a perfect model scores about this much).
                "real_column_shape_score": column_shape_score(holdout, train, self.metadata),
                "real_column_pair_score": column_pair_score(holdout, train, self.metadata),
            })
        self.fit_info = {"fit_seconds": round(trained - start, 3),
                         "validate_seconds": round(time.perf_counter() - trained, 3),
                         "rows": int(len(df)), "data_dim": int(data.shape[1]), "processes": _process_group()[1]}
        return self

    def _train(self, data: np.ndarray, train: pd.DataFrame, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    # ---- sample -----------------------------------------------------------------------------------

    def sample(self, n: int, seed: int = 0) -> pd.DataFrame:
        if self.transformer is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in self._modules:
                getattr(self, m).eval()
            with torch.no_grad():
                chunks = [self._sample_matrix(min(self.batch_size, n - i), np.random.default_rng([seed, i]))
                          for i in range(0, n, self.batch_size)]
        data = np.concatenate(chunks, axis=0) if chunks else np.zeros((0, self.transformer.output_dim))
        return self.transformer.inverse_transform(data, np.random.default_rng([seed, n]))

    def _sample_matrix(self, n: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    # ---- checkpoints ------------------------------------------------------------------------------

    def _network_config(self) -> dict:
        return {}

    def save(self, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
        """Write `directory`/model.pt (networks, transformer, configuration) and metadata.json (`metadata`
        plus synthesizer, params, seed, curves, validation, fit info, model_sha256), atomically."""
        if self.transformer is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted")
        payload = {"format_version": FORMAT_VERSION, "synthesizer": self.name, "seed": self.seed,
                   "params": self.params(), "network": self._network_config(),
                   "transformer": self.transformer.state(),
                   "state_dicts": {m: {k: v.detach().cpu() for k, v in getattr(self, m).state_dict().items()}
                                   for m in self._modules}}
        record = {**(metadata or {}), "synthesizer": self.name, "seed": self.seed, "params": self.params(),
                  "tabular_metadata": self.metadata.to_dict(), "curves": self.curves,
                  "validation": self.validation, "fit": self.fit_info}
        return write_checkpoint(directory, payload, record)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TabularSynthesizer":
        """Load a checkpoint written by save (any synthesizer kind) after checking model.pt's sha256;
        the metadata.json record is on `.checkpoint_metadata`. Raises CheckpointError."""
        directory = Path(directory)
        meta_file, model_file = directory / METADATA_FILE, directory / MODEL_FILE
        for path in (meta_file, model_file):
            if not path.is_file():
                raise CheckpointError(f"checkpoint {directory} is incomplete: {path.name} is missing")
        try:
            record = json.loads(meta_file.read_text())
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {directory}: {METADATA_FILE} is not valid JSON: {exc}") from exc
        expected, actual = record.get("model_sha256"), _sha256(model_file)
        if expected != actual:
            raise CheckpointError(f"checkpoint {directory}: {MODEL_FILE} has sha256 {actual} but metadata.json "
                                  f"records {expected}; the file was altered or belongs to another checkpoint")
        payload = torch.load(model_file, map_location="cpu", weights_only=True)
        if payload.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {directory} has profile model format {payload.get('format_version')}, "
                                  f"this code reads format {FORMAT_VERSION}; train the run again to replace it")
        klass = SYNTHESIZERS[payload["synthesizer"]]
        if cls is not TabularSynthesizer and not issubclass(klass, cls):
            raise CheckpointError(f"checkpoint {directory} holds a {klass.__name__}, not a {cls.__name__}")
        transformer = DataTransformer.from_state(payload["transformer"])
        synth = klass(metadata=transformer.metadata, seed=payload["seed"], **payload["params"])
        synth.transformer = transformer
        synth._build(**payload["network"])
        for m in synth._modules:
            getattr(synth, m).load_state_dict(payload["state_dicts"][m])
            getattr(synth, m).eval()
        synth.curves = record.get("curves", {})
        synth.validation = record.get("validation", {})
        synth.fit_info = record.get("fit", {})
        synth.checkpoint_metadata = record
        return synth


def _round_curve(values: list[float]) -> list[float]:
    return [round(float(v), 5) for v in values]


class CTGANSynthesizer(TabularSynthesizer):
    """Conditional tabular GAN (Xu et al. 2019): conditional vector with training-by-sampling over the
    categorical columns, residual generator with gumbel-softmax on discrete spans, PacGAN critic trained
    with WGAN-GP, and the generator's conditional cross-entropy loss."""

    name = "ctgan"
    _modules = ("generator", "discriminator")

    def __init__(self, metadata=None, seed: int = 0, epochs: int = 300, batch_size: int = 500,
                 embedding_dim: int = 128, generator_dims=(256, 256), discriminator_dims=(256, 256),
                 generator_lr: float = 2e-4, discriminator_lr: float = 2e-4, generator_decay: float = 1e-6,
                 discriminator_decay: float = 1e-6, discriminator_steps: int = 1, pac: int = 10,
                 gumbel_tau: float = 0.2, gradient_penalty: float = 10.0, **common):
        super().__init__(metadata, seed, epochs, batch_size, embedding_dim, **common)
        self.generator_dims = [int(d) for d in generator_dims]
        self.discriminator_dims = [int(d) for d in discriminator_dims]
        self.generator_lr, self.discriminator_lr = float(generator_lr), float(discriminator_lr)
        self.generator_decay, self.discriminator_decay = float(generator_decay), float(discriminator_decay)
        self.discriminator_steps = int(discriminator_steps)
        self.pac = int(pac)
        if self.pac < 1:
            raise ValueError("pac must be at least 1")
        # PacGAN packs `pac` rows: the batch is a multiple of pac (rounded down, at least one pack).
        self.batch_size = max(self.pac, self.batch_size // self.pac * self.pac)
        self.gumbel_tau = float(gumbel_tau)
        self.gradient_penalty = float(gradient_penalty)

    def _network_config(self) -> dict:
        return {"data_dim": self.transformer.output_dim, "cond_dim": self._cond_dim()}

    def _cond_dim(self) -> int:
        return sum(size for _, size, _ in self.transformer.discrete_columns())

    def _build(self, data_dim: int, cond_dim: int) -> None:
        self.generator = Generator(self.embedding_dim + cond_dim, self.generator_dims, data_dim)
        self.discriminator = Discriminator(data_dim + cond_dim, self.discriminator_dims, self.pac)

    # ---- conditional vectors ----------------------------------------------------------------------

    def _cond_tables(self, log_frequency: bool) -> tuple[list, np.ndarray]:
        discrete = self.transformer.discrete_columns()
        width = max((size for _, size, _ in discrete), default=1)
        cum = np.ones((len(discrete), width))
        for j, (_, size, freq) in enumerate(discrete):
            p = np.log(freq * self._n_train + 1) if log_frequency else freq
            p = p / p.sum()
            cum[j, :size] = np.cumsum(p)
        return discrete, cum

    def _draw_cond(self, n: int, rng: np.random.Generator, discrete, cum):
        """(cond [n, cond_dim], mask [n, n_discrete], column [n], category [n]) with a uniformly drawn
        column per row and a category drawn from that column's cum(ulative) probabilities."""
        cond = np.zeros((n, sum(s for _, s, _ in discrete)), dtype=np.float32)
        mask = np.zeros((n, len(discrete)), dtype=np.float32)
        if not discrete:
            return cond, mask, None, None
        column = rng.integers(len(discrete), size=n)
        category = (cum[column] < rng.random(n)[:, None]).sum(axis=1)
        category = np.minimum(category, np.array([discrete[c][1] - 1 for c in column]))
        starts = np.cumsum([0] + [s for _, s, _ in discrete])[:-1]
        cond[np.arange(n), starts[column] + category] = 1.0
        mask[np.arange(n), column] = 1.0
        return cond, mask, column, category

    # ---- training ---------------------------------------------------------------------------------

    def _train(self, data, train, rng):
        n, data_dim = data.shape
        self._n_train = n
        self._build(data_dim, self._cond_dim())
        rank, world = _process_group()
        if world > 1:
            # Same weights on every rank (built above from the shared seed), different draws after.
            rng = np.random.default_rng([self.seed, rank])
            torch.manual_seed(self.seed + 7919 * rank)
        spans = self.transformer.spans
        discrete, cum = self._cond_tables(log_frequency=True)
        # Training-by-sampling: rows sorted by category, per categorical column.
        by_category = []
        for offset, size, _ in discrete:
            codes = data[:, offset:offset + size].argmax(axis=1)
            order = np.argsort(codes, kind="stable")
            counts = np.bincount(codes, minlength=size)
            by_category.append((order, np.concatenate([[0], np.cumsum(counts)[:-1]]), counts))

        def real_rows(column, category, m):
            if column is None:
                return rng.integers(n, size=m)
            rows = np.empty(m, dtype=np.int64)
            u = rng.random(m)
            for j in np.unique(column):
                sel = column == j
                order, start, counts = by_category[j]
                cat = category[sel]
                rows[sel] = order[start[cat] + np.minimum((u[sel] * counts[cat]).astype(np.int64),
                                                          np.maximum(counts[cat] - 1, 0))]
            return rows

        data_t = torch.from_numpy(data)
        g, d = self.generator, self.discriminator
        opt_g = torch.optim.Adam(g.parameters(), lr=self.generator_lr, betas=(0.5, 0.9),
                                 weight_decay=self.generator_decay)
        opt_d = torch.optim.Adam(d.parameters(), lr=self.discriminator_lr, betas=(0.5, 0.9),
                                 weight_decay=self.discriminator_decay)
        cat_spans = [(o, s) for o, s, _ in discrete]
        b = self.batch_size
        steps = max(1, n // (b * world))
        curves = {"generator_loss": [], "discriminator_loss": [], "conditional_loss": [],
                  "gradient_penalty": []}
        g.train()
        d.train()
        for epoch in range(self.epochs):
            sums = np.zeros(4)
            for _ in range(steps):
                for _ in range(self.discriminator_steps):
                    cond, _, column, category = self._draw_cond(b, rng, discrete, cum)
                    perm = rng.permutation(b)
                    real = data_t[real_rows(None if column is None else column[perm],
                                            None if category is None else category[perm], b)]
                    c1, c2 = torch.from_numpy(cond), torch.from_numpy(cond[perm])
                    z = torch.randn(b, self.embedding_dim)
                    fake = _activate(g(torch.cat([z, c1], dim=1)), spans, self.gumbel_tau)
                    fake_cat, real_cat = torch.cat([fake, c1], dim=1), torch.cat([real, c2], dim=1)
                    y_fake, y_real = d(fake_cat), d(real_cat)
                    penalty = d.gradient_penalty(real_cat, fake_cat, self.gradient_penalty)
                    loss_d = -(y_real.mean() - y_fake.mean())
                    opt_d.zero_grad(set_to_none=False)
                    penalty.backward(retain_graph=True)
                    loss_d.backward()
                    _average_gradients([d], world)
                    opt_d.step()
                cond, mask, _, _ = self._draw_cond(b, rng, discrete, cum)
                c1, m1 = torch.from_numpy(cond), torch.from_numpy(mask)
                z = torch.randn(b, self.embedding_dim)
                raw = g(torch.cat([z, c1], dim=1))
                fake = _activate(raw, spans, self.gumbel_tau)
                y_fake = d(torch.cat([fake, c1], dim=1))
                cross = self._conditional_loss(raw, c1, m1, cat_spans)
                loss_g = -y_fake.mean() + cross
                opt_g.zero_grad(set_to_none=False)
                loss_g.backward()
                _average_gradients([g], world)
                opt_g.step()
                sums += [loss_g.item(), loss_d.item(), cross.item(), penalty.item()]
            for key, value in zip(curves, sums / steps):
                curves[key].append(value)
            if self.log_every and (epoch + 1) % self.log_every == 0:
                print(f"ctgan epoch {epoch + 1}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in curves.items()))
        return {k: _round_curve(v) for k, v in curves.items()}

    @staticmethod
    def _conditional_loss(raw, cond, mask, cat_spans):
        if not cat_spans:
            return torch.zeros(())
        losses, start = [], 0
        for offset, size in cat_spans:
            target = cond[:, start:start + size].argmax(dim=1)
            losses.append(F.cross_entropy(raw[:, offset:offset + size], target, reduction="none"))
            start += size
        return (torch.stack(losses, dim=1) * mask).sum() / raw.size(0)

    def _sample_matrix(self, n, rng):
        discrete, cum = self._cond_tables(log_frequency=False)
        cond, _, _, _ = self._draw_cond(n, rng, discrete, cum)
        z = torch.randn(n, self.embedding_dim)
        raw = self.generator(torch.cat([z, torch.from_numpy(cond)], dim=1))
        return _activate(raw, self.transformer.spans, self.gumbel_tau).numpy()

    _n_train = 1  # only the training log-frequency table uses it


class TVAESynthesizer(TabularSynthesizer):
    """Tabular VAE (Xu et al. 2019): MLP encoder/decoder; per column a Gaussian loss on the normalized
    scalar with a learned sigma and cross-entropy on the mode / category / null spans, plus the KL term."""

    name = "tvae"
    _modules = ("encoder", "decoder")

    def __init__(self, metadata=None, seed: int = 0, epochs: int = 300, batch_size: int = 500,
                 embedding_dim: int = 128, compress_dims=(128, 128), decompress_dims=(128, 128),
                 learning_rate: float = 1e-3, weight_decay: float = 1e-5, loss_factor: float = 2.0,
                 sample_discrete: bool = True, **common):
        super().__init__(metadata, seed, epochs, batch_size, embedding_dim, **common)
        self.compress_dims = [int(d) for d in compress_dims]
        self.decompress_dims = [int(d) for d in decompress_dims]
        self.learning_rate = float(learning_rate)
        self.weight_decay = float(weight_decay)
        self.loss_factor = float(loss_factor)
        self.sample_discrete = bool(sample_discrete)

    def _network_config(self) -> dict:
        return {"data_dim": self.transformer.output_dim}

    def _build(self, data_dim: int) -> None:
        self.encoder = Encoder(data_dim, self.compress_dims, self.embedding_dim)
        self.decoder = Decoder(self.embedding_dim, self.decompress_dims, data_dim)

    def _loss(self, recon, x, sigma, mu, logvar):
        b = x.size(0)
        losses, offset = [], 0
        for _, _, act, size in self.transformer.spans:
            if act == "tanh":
                std = sigma[offset]
                diff = x[:, offset] - torch.tanh(recon[:, offset])
                losses.append((diff ** 2 / 2 / std ** 2).sum() + torch.log(std) * b)
            else:
                losses.append(F.cross_entropy(recon[:, offset:offset + size],
                                              x[:, offset:offset + size].argmax(dim=1), reduction="sum"))
            offset += size
        kld = -0.5 * torch.sum(1 + logvar - mu ** 2 - logvar.exp())
        return sum(losses) * self.loss_factor / b, kld / b

    def _train(self, data, train, rng):
        n, data_dim = data.shape
        self._build(data_dim)
        data_t = torch.from_numpy(data)
        params = list(self.encoder.parameters()) + list(self.decoder.parameters())
        opt = torch.optim.Adam(params, lr=self.learning_rate, weight_decay=self.weight_decay)
        rank, world = _process_group()
        if world > 1:
            torch.manual_seed(self.seed + 7919 * rank)  # own noise; the weights are already the same
        # Every rank draws the same permutation (rng is seeded alike) and takes its own slice of each
        # global batch of b * world rows.
        b = min(self.batch_size, max(1, n // world))
        steps = max(1, n // (b * world))
        curves = {"loss": [], "reconstruction_loss": [], "kl_loss": []}
        self.encoder.train()
        self.decoder.train()
        for epoch in range(self.epochs):
            perm = rng.permutation(n)
            sums = np.zeros(3)
            for s in range(steps):
                x = data_t[perm[(s * world + rank) * b:(s * world + rank + 1) * b]]
                mu, logvar = self.encoder(x)
                z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
                recon, sigma = self.decoder(z)
                rec, kld = self._loss(recon, x, sigma, mu, logvar)
                loss = rec + kld
                opt.zero_grad(set_to_none=False)
                loss.backward()
                _average_gradients([self.encoder, self.decoder], world)
                opt.step()
                with torch.no_grad():
                    self.decoder.sigma.clamp_(0.01, 1.0)
                sums += [loss.item(), rec.item(), kld.item()]
            for key, value in zip(curves, sums / steps):
                curves[key].append(value)
            if self.log_every and (epoch + 1) % self.log_every == 0:
                print(f"tvae epoch {epoch + 1}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in curves.items()))
        return {k: _round_curve(v) for k, v in curves.items()}

    def _sample_matrix(self, n, rng):
        z = torch.randn(n, self.embedding_dim)
        recon, sigma = self.decoder(z)
        out = recon.clone()
        offset = 0
        for _, _, act, size in self.transformer.spans:
            if act == "tanh":
                out[:, offset] = torch.tanh(recon[:, offset]) + torch.randn(n) * sigma[offset]
            elif self.sample_discrete:
                # Draw the mode / category from the decoder's softmax rather than taking its argmax,
                # which would over-represent the most likely mode of every uncertain row.
                pick = torch.multinomial(torch.softmax(recon[:, offset:offset + size], dim=1), 1)
                out[:, offset:offset + size] = F.one_hot(pick[:, 0], size).float()
            offset += size
        return out.numpy()


SYNTHESIZERS: dict[str, type[TabularSynthesizer]] = {"ctgan": CTGANSynthesizer, "tvae": TVAESynthesizer}


def make_synthesizer(name: str, **params) -> TabularSynthesizer:
    """The synthesizer `name` (ctgan | tvae) built with the `params` it accepts; params that only the other
    model takes are ignored (so one `profiles` config section serves both), unknown ones raise."""
    if name not in SYNTHESIZERS:
        raise ValueError(f"unknown tabular model {name!r}; choose one of {', '.join(SYNTHESIZERS)}")

    def accepted(klass):
        names = set()
        for k in klass.__mro__:
            if k is object:
                continue
            names |= {p for p in inspect.signature(k.__init__).parameters if p not in ("self", "common")}
        return names

    klass = SYNTHESIZERS[name]
    own = accepted(klass)
    known = set().union(*(accepted(k) for k in SYNTHESIZERS.values()))
    unknown = set(params) - known
    if unknown:
        raise TypeError(f"unknown tabular model option(s): {', '.join(sorted(unknown))}")
    return klass(**{k: v for k, v in params.items() if k in own})


def load_synthesizer(directory: str | os.PathLike) -> tuple[TabularSynthesizer, dict]:
    """Load any synthesizer checkpoint (sha256-checked): (synthesizer, metadata.json record)."""
    synth = TabularSynthesizer.load(directory)
    return synth, synth.checkpoint_metadata


def synthesizer_from_config(section, metadata=None, seed: int = 0) -> TabularSynthesizer:
    """The synthesizer a `profiles` config section (a Config or dict: model plus options) describes."""
    options = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    name = options.pop("model")
    options.pop("max_rows", None)  # how many rows the train stage fits on, not a model option
    return make_synthesizer(name, metadata=metadata, seed=seed, **options)
