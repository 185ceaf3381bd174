"""The embedded default input: a raw clickstream simulator writing REES46-layout CSV files by date.

It stands in for the warehouse export a nightly job would read: a Zipf-popular catalogue of items
with categories, brands and prices; users with several sessions over several days; search -> view ->
cart -> purchase funnels with realistic time gaps; one bot-like user; and the dirt real exports have
(exact duplicates, null ids, malformed timestamps and prices, unknown event types, and a truncated
last line). Users are split into shards, one Spark task each, seeded by (seed, shard), so the same
configuration always writes the same files.
"""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import numpy as np
from pyspark.sql import SparkSession

from synth.config import Config
from synth.sources import REES46

log = logging.getLogger(__name__)

_WORDS = ("electronics", "appliances", "apparel", "furniture", "computers", "kids", "sport", "auto",
          "construction", "accessories", "country_yard", "medicine", "stationery")
_LEAVES = ("smartphone", "kitchen", "shoes", "tablet", "notebook", "toys", "bicycle", "tires", "tools",
           "bag", "lamp", "headphone", "clocks", "vacuum", "washer", "jacket", "camera", "chair")


def _catalog(cfg: Config) -> dict[str, np.ndarray]:
    """The item catalogue, identical in every task: it depends only on the seed and sizes."""
    sim = cfg.simulator
    rng = np.random.default_rng([cfg.run.seed, 0])
    n_items, n_cat, n_brand = sim.items, sim.categories, sim.brands
    cat_weights = 1.0 / np.arange(1, n_cat + 1) ** 0.8
    item_cat = rng.choice(n_cat, size=n_items, p=cat_weights / cat_weights.sum())
    cat_brands = [rng.choice(n_brand, size=min(n_brand, 4 + c % 5), replace=False) for c in range(n_cat)]
    item_brand = np.array([rng.choice(cat_brands[c]) for c in item_cat])
    cat_price = np.exp(rng.uniform(np.log(5), np.log(800), size=n_cat))
    item_price = np.round(cat_price[item_cat] * np.exp(rng.normal(0, 0.35, size=n_items)), 2)
    popularity = 1.0 / rng.permutation(np.arange(1, n_items + 1)) ** 1.1
    cat_code = np.array([f"{_WORDS[c % len(_WORDS)]}.{_LEAVES[(c * 7) % len(_LEAVES)]}" for c in range(n_cat)])
    return {"cat": item_cat, "brand": item_brand, "price": item_price, "pop": popularity,
            "cat_code": cat_code, "cat_id": 2053013552000000000 + np.arange(n_cat) * 7919,
            "product_id": 1000000 + np.arange(n_items) * 13}


def _fmt_time(seconds: float) -> str:
    return dt.datetime.fromtimestamp(int(seconds), dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _user_rows(rng, cat, user_number: int, start: float, days: int, bot_events: int) -> list[tuple[float, str]]:
    """The raw (time, line) rows of one user."""
    brands = [f"brand{b:03d}" for b in range(int(cat["brand"].max()) + 1)]
    rows: list[tuple[float, str]] = []

    def emit(t, event_type, item, session):
        if item is None:
            cat_index = int(session["category"])
            fields = [_fmt_time(t), event_type, "", str(cat["cat_id"][cat_index]), cat["cat_code"][cat_index],
                      "", "", str(user_number), session["id"]]
        else:
            c = int(cat["cat"][item])
            fields = [_fmt_time(t), event_type, str(cat["product_id"][item]), str(cat["cat_id"][c]),
                      cat["cat_code"][c] if rng.random() > 0.3 else "", brands[int(cat["brand"][item])],
                      f"{cat['price'][item]:.2f}", str(user_number), session["id"]]
        rows.append((t, ",".join(fields)))

    if bot_events:
        session = {"id": "%032x" % rng.integers(0, 2**63), "category": 0}
        t = start + rng.uniform(0, 3600)
        for item in rng.choice(len(cat["cat"]), size=bot_events):
            emit(t, "view", int(item), session)
            t += rng.uniform(1, 6)
        return rows

    favourite = rng.choice(len(cat["cat_id"]), size=rng.integers(1, 4), replace=False)
    n_sessions = 1 + rng.poisson(np.exp(rng.normal(0.6, 0.7)))
    for _ in range(n_sessions):
        day = rng.integers(0, days)
        t = start + day * 86400 + (rng.beta(3, 2) * 86400)
        category = int(rng.choice(favourite)) if rng.random() < 0.8 else int(rng.integers(len(cat["cat_id"])))
        session = {"id": "%032x" % rng.integers(0, 2**63), "category": category}
        if rng.random() < 0.15:
            emit(t, "search", None, session)
            t += rng.lognormal(2.5, 1.0)
        for _ in range(max(1, rng.geometric(0.18))):
            in_cat = np.flatnonzero(cat["cat"] == session["category"])
            pool = in_cat if len(in_cat) and rng.random() < 0.85 else np.arange(len(cat["cat"]))
            weights = cat["pop"][pool]
            item = int(rng.choice(pool, p=weights / weights.sum()))
            emit(t, "view", item, session)
            t += rng.lognormal(3.0, 1.1)
            if rng.random() < 0.09:
                emit(t, "cart", item, session)
                t += rng.lognormal(2.8, 1.0)
                if rng.random() < 0.45:
                    emit(t, "purchase", item, session)
                    t += rng.lognormal(3.5, 1.0)
            if rng.random() < 0.1:
                session["category"] = int(rng.choice(favourite))
    return rows


def _dirty(rng, line: str) -> list[str]:
    """Corrupt one raw line the ways real exports are corrupt."""
    fields = line.split(",")
    kind = rng.integers(0, 6)
    if kind == 0:
        return [line, line]
    if kind == 1:
        fields[7] = ""
    elif kind == 2:
        fields[0] = rng.choice(["2026-13-45 99:00:00 UTC", "yesterday", "1970-01-01 00:00:00 UTC"])
    elif kind == 3:
        fields[6] = rng.choice(["-1.00", "abc", "0", "9999999999"])
    elif kind == 4:
        fields[1] = rng.choice(["click", "VIEWED", "wishlist"])
    else:
        fields[2] = ""
    return [",".join(fields)]


def _shard_writer(cfg: Config, out_dir: str, n_shards: int):
    def write(batches):
        import pyarrow as pa

        catalog = _catalog(cfg)
        sim = cfg.simulator
        start = dt.datetime.fromisoformat(str(sim.start_date)).replace(tzinfo=dt.timezone.utc).timestamp()
        header = ",".join(REES46.header)
        for batch in batches:
            for shard in batch.column("id").to_pylist():
                rng = np.random.default_rng([cfg.run.seed, 1, shard])
                rows: list[tuple[float, str]] = []
                for user in range(shard, sim.users, n_shards):
                    rows += _user_rows(rng, catalog, 500000000 + user * 17, start, sim.days,
                                       bot_events=sim.bot_events if user == 1 else 0)
                rows.sort(key=lambda r: r[0])
                by_date: dict[str, list[str]] = {}
                for t, line in rows:
                    lines = _dirty(rng, line) if rng.random() < sim.dirt_rate else [line]
                    by_date.setdefault(_fmt_time(t)[:10], []).extend(lines)
                written = []
                for date, lines in sorted(by_date.items()):
                    folder = Path(out_dir) / f"event_date={date}"
                    folder.mkdir(parents=True, exist_ok=True)
                    path = folder / f"part-{shard:05d}.csv"
                    path.write_text(header + "\n" + "\n".join(lines) + "\n")
                    written.append((str(path), len(lines)))
                yield pa.RecordBatch.from_pylist(
                    [{"path": p, "rows": n} for p, n in written],
                    schema=pa.schema([("path", pa.string()), ("rows", pa.int64())]))

    return write


def simulate(spark: SparkSession, cfg: Config, out_dir: str) -> int:
    """Write the raw dataset under `out_dir` (replacing what is there); return the number of raw rows."""
    out = Path(out_dir)
    if out.exists():
        for old in sorted(out.rglob("*.csv"), reverse=True):
            old.unlink()
    shards = cfg.simulator.shards
    files = (spark.range(shards, numPartitions=shards)
             .mapInArrow(_shard_writer(cfg, str(out.resolve()), shards), "path string, rows long")
             .orderBy("path").collect())
    if not files:
        raise RuntimeError("the simulator wrote no files; check simulator.users and simulator.days")
    # A warehouse export cut off mid-write: the last file ends in half a row with no newline.
    last = Path(files[-1].path)
    text = last.read_text()
    last_line = text.rstrip("\n").rsplit("\n", 1)[-1]
    last.write_text(text + last_line[: len(last_line) // 2])
    total = sum(f.rows for f in files) + 1
    log.info("simulator: wrote %d raw rows in %d files under %s", total, len(files), out)
    return total
