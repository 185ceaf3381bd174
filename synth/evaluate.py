"""The evaluate stage: how close are this run's synthetic sessions to real sessions the generator never saw?

Every subject is compared with the held-out real sessions (sessions.split = 'holdout'):

- synthetic: this run's synthetic_events (run_id = the run id), grouped into sessions by session_id,
  ordered by position;
- train_resample: a deterministic sample of real train sessions, as many as there are synthetic
  sessions (evaluate.baseline_sessions overrides it): the fidelity ceiling, what a perfect
  generator could reach at that sample size;
- independent_columns: sessions whose length, event types, items (with their category) and time
  gaps are drawn independently from the train marginals, with seeded Spark `rand`: the naive floor
  a generator has to beat (each drawn item carries its catalogue price);
- real_train (recommender utility only): all real train sessions.

Beyond the histogram metrics: a classifier two-sample test (C2ST) on per-session feature vectors
(pyspark.ml, seeded folds), the attribute realism of synthetic events against item_catalog, the hit
rate of a next-item co-occurrence recommender trained on each subject and tested on the holdout,
and, when synth.tabular and a synthetic_user_profiles table exist, profile column/pair fidelity.

Everything event-level stays in Spark. The driver only collects small aggregates (counts per event
type, session length, item, category and gap bin), from which small pure functions (`tvd`,
`ks_from_histograms`, `jsd`, `metric_rows`) compute the metrics; they are unit-testable without
Spark. The stage writes the metrics table (one commit, replacing this run's partition) and a
self-contained HTML report with embedded PNG plots.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import logging
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

log = logging.getLogger(__name__)

HOLDOUT = "holdout"
SYNTHETIC = "synthetic"
TRAIN_RESAMPLE = "train_resample"
INDEPENDENT = "independent_columns"
COMPARED = (SYNTHETIC, TRAIN_RESAMPLE, INDEPENDENT)
SUBJECTS = (HOLDOUT,) + COMPARED
REAL_TRAIN = "real_train"  # all real train sessions: the reference of the recommender utility
REPORT_SUBJECTS = SUBJECTS + (REAL_TRAIN,)
RECOMMENDER_K = 10
HIT_RATE = f"recommender_hit_rate@{RECOMMENDER_K}"

# Null marker and separator of the item-sequence fingerprint (control characters, not expected in item ids).
_NULL_ITEM = "\u0000"
_ITEM_SEP = "\u0001"

DESCRIPTIONS = {
    "event_type_tvd": "Total variation distance between the event-type mix (view/cart/purchase/search shares) "
                      "of the subject and of the holdout sessions; 0 = identical mix, 1 = disjoint; lower is better.",
    "session_length_ks": "Kolmogorov-Smirnov statistic (largest CDF gap) between the subject's and the holdout's "
                         "session lengths in events; 0 = identical distributions, 1 = disjoint; lower is better.",
    "item_popularity_jsd": "Jensen-Shannon divergence (base 2) between item frequency distributions of the subject "
                           "and the holdout, over the union of their items; 0 = identical, 1 = disjoint; lower is better.",
    "category_popularity_jsd": "Jensen-Shannon divergence (base 2) between category frequency distributions of the "
                               "subject and the holdout; 0 = identical, 1 = disjoint; lower is better.",
    "gap_seconds_ks": "Kolmogorov-Smirnov statistic between the time gaps (seconds, binned by "
                      "evaluate.gap_bin_seconds) of consecutive events within sessions, subject vs holdout; "
                      "lower is better.",
    "purchase_after_view_share": "Share of purchases preceded in the same session by a view of the same item; "
                                 "for the holdout it is the real value, for other subjects closer to the holdout "
                                 "value is better.",
    "catalog_consistency": "Share of synthetic events whose item exists in item_catalog with the same category and "
                           "brand (a search without an item counts as consistent); 1 = fully consistent; higher is better.",
    "exact_copy_share": "Share of the subject's sessions whose full item sequence equals a real train session of "
                        "2+ events (memorization); for the holdout it is the chance rate among real sessions; "
                        "lower is better, near the holdout value is expected.",
    "category_transition_jsd": "Jensen-Shannon divergence (base 2) between the distributions of consecutive "
                               "(category, next category) pairs within sessions, subject vs holdout (pairs "
                               "with an unknown category left out); 0 = identical, 1 = disjoint; lower is better.",
    "c2st_auc": "Classifier two-sample test: test ROC AUC of a classifier (evaluate.two_sample_classifier, "
                "evaluate.two_sample_folds-fold, seeded) telling the subject's sessions from as many holdout sessions "
                "by per-session features (length, event-type shares, distinct item/category shares, log gap "
                "mean/median/max, purchase-after-view, log price mean/std); 0.5 = indistinguishable, 1 = "
                "fully distinguishable; lower (towards 0.5) is better.",
    "attribute_realism": "Share of synthetic non-search events (events with an item) whose item exists in "
                         "item_catalog with the same category and brand and whose price lies within "
                         "evaluate.price_band times the catalogue price; 1 = all realistic; higher is better.",
    HIT_RATE: f"Hit rate@{RECOMMENDER_K} of a next-item recommender (the {RECOMMENDER_K} items most often "
              "following an item within the subject's sessions, ties by item id) trained on the subject's "
              "sessions alone and tested on holdout sessions with 2+ item events: share whose last item is "
              "among the recommendations for the item before it; higher is better.",
    "recommender_hit_rate_ratio": f"{HIT_RATE} of the subject divided by that of the recommender trained on "
                                  "all real train sessions (real_train); 1 = the subject is as useful as "
                                  "real data; higher is better.",
    "profile_column_shape": "Mean over user-profile columns of 1 - TVD between synthetic_user_profiles and the "
                            "real user_profiles (synth.tabular.column_shape_score); 1 = identical; higher is better.",
    "profile_column_pair": "Mean over user-profile column pairs of 1 - TVD of their joint distributions, "
                           "synthetic vs real (synth.tabular.column_pair_score); 1 = identical; higher is better.",
    "n_sessions": "Number of sessions of the subject (the sample size behind its metrics); informational.",
    "n_events": "Number of events of the subject (the sample size behind its metrics); informational.",
}


# --------------------------------------------------------------------------------------------------
# Pure metric functions on collected histograms ({value: count}).
# --------------------------------------------------------------------------------------------------

def _normalized(hist: Mapping[Any, float], name: str) -> dict[Any, float]:
    total = float(sum(hist.values()))
    if total <= 0 or any(v < 0 for v in hist.values()):
        raise ValueError(f"{name} must hold non-negative counts with a positive total")
    return {k: v / total for k, v in hist.items()}


def tvd(p: Mapping[Any, float], q: Mapping[Any, float]) -> float:
    """Total variation distance of two count histograms: half the L1 distance of their shares (0..1)."""
    a, b = _normalized(p, "p"), _normalized(q, "q")
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def ks_from_histograms(p: Mapping[float, float], q: Mapping[float, float]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic, sup |F_p - F_q|, from count histograms of ordered values."""
    a, b = _normalized(p, "p"), _normalized(q, "q")
    cdf_a = cdf_b = stat = 0.0
    for value in sorted(set(a) | set(b)):
        cdf_a += a.get(value, 0.0)
        cdf_b += b.get(value, 0.0)
        stat = max(stat, abs(cdf_a - cdf_b))
    return min(stat, 1.0)


def jsd(p: Mapping[Any, float], q: Mapping[Any, float]) -> float:
    """Jensen-Shannon divergence, base 2 (0..1), of two count histograms over the union of their keys."""
    a, b = _normalized(p, "p"), _normalized(q, "q")

    def kl_to_mid(x: dict, y: dict) -> float:
        return sum(px * math.log2(px / (0.5 * (px + y.get(k, 0.0)))) for k, px in x.items() if px > 0)

    return min(max(0.5 * kl_to_mid(a, b) + 0.5 * kl_to_mid(b, a), 0.0), 1.0)


def share(part: int, whole: int) -> float | None:
    """part / whole, or None when there is nothing to measure."""
    return part / whole if whole else None


@dataclass
class Profile:
    """The collected aggregates of one subject: everything the metrics and plots need."""

    event_types: dict[str, int] = field(default_factory=dict)
    lengths: dict[int, int] = field(default_factory=dict)
    items: dict[str, int] = field(default_factory=dict)
    categories: dict[str, int] = field(default_factory=dict)
    gaps: dict[int, int] = field(default_factory=dict)  # gap bin index -> count
    purchases: int = 0
    purchases_after_view: int = 0
    copies: int = 0  # sessions whose item sequence equals a train session of 2+ events
    transitions: dict[tuple[str, str], int] = field(default_factory=dict)  # (category, next category) -> count

    @property
    def n_sessions(self) -> int:
        return sum(self.lengths.values())

    @property
    def n_events(self) -> int:
        return sum(self.event_types.values())


def metric_rows(profiles: Mapping[str, Profile],
                catalog_consistency: float | None = None,
                extra: Mapping[tuple[str, str], float | None] | None = None) -> list[tuple[str, str, float, str]]:
    """(metric, subject, value, description) rows; a metric without data for a subject is left out.

    `extra` holds metrics computed elsewhere, {(metric, subject): value} (C2ST, recommender, ...).
    """
    holdout = profiles[HOLDOUT]
    rows: list[tuple[str, str, float, str]] = []

    def add(metric: str, subject: str, value: float | None) -> None:
        if value is None:
            log.warning("evaluate: %s is undefined for %s (no data); not reported", metric, subject)
        else:
            rows.append((metric, subject, float(value), DESCRIPTIONS[metric]))

    def compare(fn, mine: dict, theirs: dict) -> float | None:
        return fn(mine, theirs) if sum(mine.values()) and sum(theirs.values()) else None

    for subject in COMPARED:
        if subject not in profiles:
            continue
        prof = profiles[subject]
        add("event_type_tvd", subject, compare(tvd, prof.event_types, holdout.event_types))
        add("session_length_ks", subject, compare(ks_from_histograms, prof.lengths, holdout.lengths))
        add("item_popularity_jsd", subject, compare(jsd, prof.items, holdout.items))
        add("category_popularity_jsd", subject, compare(jsd, prof.categories, holdout.categories))
        add("gap_seconds_ks", subject, compare(ks_from_histograms, prof.gaps, holdout.gaps))
        add("category_transition_jsd", subject, compare(jsd, prof.transitions, holdout.transitions))
    for subject in SUBJECTS:
        if subject in profiles:
            add("purchase_after_view_share", subject,
                share(profiles[subject].purchases_after_view, profiles[subject].purchases))
    if catalog_consistency is not None:
        add("catalog_consistency", SYNTHETIC, catalog_consistency)
    for (metric, subject), value in (extra or {}).items():
        add(metric, subject, value)
    for subject in (SYNTHETIC, INDEPENDENT, HOLDOUT):
        if subject in profiles:
            add("exact_copy_share", subject, share(profiles[subject].copies, profiles[subject].n_sessions))
    for subject in SUBJECTS:
        if subject in profiles:
            add("n_sessions", subject, profiles[subject].n_sessions)
            add("n_events", subject, profiles[subject].n_events)
    return rows


# --------------------------------------------------------------------------------------------------
# Spark side: events of every subject in one shape.
# --------------------------------------------------------------------------------------------------

EVENT_COLUMNS = ["subject", "session_id", "position", "event_type", "item_id", "category", "gap_bin", "price"]


def _gap_bin(seconds: Column, bin_seconds: float) -> Column:
    return F.floor(seconds / F.lit(float(bin_seconds))).cast("long")


def real_events(sessions: DataFrame, subject: str, bin_seconds: float) -> DataFrame:
    """One row per event of real sessions (arrays per session); the first event of a session has no gap."""
    exploded = sessions.select(
        "session_id", F.posexplode(F.arrays_zip("event_types", "item_ids", "categories", "gap_seconds", "prices")))
    return exploded.select(
        F.lit(subject).alias("subject"), "session_id", F.col("pos").cast("int").alias("position"),
        F.col("col.event_types").alias("event_type"), F.col("col.item_ids").alias("item_id"),
        F.col("col.categories").alias("category"),
        F.when(F.col("pos") > 0, _gap_bin(F.col("col.gap_seconds"), bin_seconds)).alias("gap_bin"),
        F.col("col.prices").cast("double").alias("price"))


def synthetic_events(events: DataFrame, bin_seconds: float) -> DataFrame:
    """Synthetic event rows in the common shape; gaps are event_time differences within the session."""
    previous = F.lag("event_time").over(Window.partitionBy("session_id").orderBy("position"))
    gap = (F.unix_micros("event_time") - F.unix_micros(previous)) / F.lit(1e6)
    return events.select(
        F.lit(SYNTHETIC).alias("subject"), "session_id", F.col("position").cast("int").alias("position"),
        "event_type", "item_id", "category", _gap_bin(gap, bin_seconds).alias("gap_bin"),
        F.col("price").cast("double").alias("price"))


# --------------------------------------------------------------------------------------------------
# The independent_columns baseline: deterministic categorical sampling in Spark.
# --------------------------------------------------------------------------------------------------

# A draw u in [0, 1) joins the lookup on bucket floor(u * _BUCKETS), then on lo <= u < hi.
_BUCKETS = 1024
MARGINALS_DDL = "dim string, length int, event_type string, item_id string, category string, gap_bin long, n long"
# The value columns drawn for each marginal ("dim").
MARGINAL_VALUES = {"length": ["length"], "event_type": ["event_type"], "item": ["item_id", "category"],
                   "gap": ["gap_bin"]}


def derive_seed(master_seed: int, run_id: str, purpose: str) -> int:
    """A stable 63-bit seed for one random choice of the run (independent of Python's hash salt)."""
    digest = hashlib.sha256(f"{master_seed}:{run_id}:evaluate:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def train_marginals(train: DataFrame, bin_seconds: float) -> DataFrame:
    """Counts of the train sessions' lengths, event types, (item, category) pairs and gap bins.

    One long aggregate (MARGINALS_DDL): `dim` names the marginal, its value columns are set, the
    others null. The item marginal keeps null items (searches) and the category that goes with each
    item, so an independent draw reproduces the train item column, null rate included.
    """
    def row(dim: str, **values: Column) -> Column:
        fields = [F.lit(dim).alias("dim")]
        for name, ddl in (("length", "int"), ("event_type", "string"), ("item_id", "string"),
                          ("category", "string"), ("gap_bin", "long")):
            fields.append((values[name] if name in values else F.lit(None)).cast(ddl).alias(name))
        return F.struct(*fields)

    events = real_events(train, "train", bin_seconds)
    per_event = events.select(F.inline(F.array(
        row("event_type", event_type=F.col("event_type")),
        row("item", item_id=F.col("item_id"), category=F.col("category")),
        row("gap", gap_bin=F.col("gap_bin")))))
    per_session = train.select(row("length", length=F.size("event_types")).alias("r")).select("r.*")
    rows = per_event.unionByName(per_session).where(
        ((F.col("dim") != "gap") | F.col("gap_bin").isNotNull()) & ((F.col("dim") != "length") | (F.col("length") > 0)))
    return (rows.groupBy("dim", "length", "event_type", "item_id", "category", "gap_bin")
            .agg(F.count("*").alias("n")))


def inverse_cdf(marginals: DataFrame) -> DataFrame:
    """Lookup of every marginal: within its `dim`, each value owns [_lo, _hi) of [0, 1), its share of the counts.

    A value is listed once per bucket of width 1 / _BUCKETS its range overlaps, so a draw u matches
    exactly one row of its dim on (_bucket = floor(u * _BUCKETS), _lo <= u < _hi).
    """
    values = ["length", "event_type", "item_id", "category", "gap_bin"]  # all null but the dim's own
    whole = Window.partitionBy("dim")
    running = whole.orderBy(*[F.col(v).asc_nulls_first() for v in values]).rowsBetween(
        Window.unboundedPreceding, Window.currentRow)
    total = F.sum("n").over(whole)
    bounds = marginals.where(F.col("n") > 0).select(
        "dim", *values, ((F.sum("n").over(running) - F.col("n")) / total).alias("_lo"),
        (F.sum("n").over(running) / total).alias("_hi"))
    return bounds.withColumn("_bucket", F.explode(F.sequence(
        F.floor(F.col("_lo") * _BUCKETS), F.floor(F.col("_hi") * _BUCKETS))))


def _draw(df: DataFrame, uniform: str, lookups: DataFrame, dim: str) -> DataFrame:
    """Replace the uniform [0, 1) column `uniform` by the value column(s) it draws from marginal `dim`.

    The lookup is broadcast, so the join keeps the rows' partitioning and order (and with them any
    later seeded `rand`); an empty lookup draws nulls.
    """
    lookup = lookups.where(F.col("dim") == dim).select(*MARGINAL_VALUES[dim], "_lo", "_hi", "_bucket")
    bucket = F.floor(F.col(uniform) * _BUCKETS)
    joined = df.withColumn("_b", bucket).join(
        F.broadcast(lookup),
        (F.col("_b") == F.col("_bucket")) & (F.col(uniform) >= F.col("_lo")) & (F.col(uniform) < F.col("_hi")),
        "left")
    return joined.drop(uniform, "_b", "_bucket", "_lo", "_hi")


def independent_events(lookups: DataFrame, n_sessions: int, seeds: Mapping[str, int],
                       partitions: int, prices: DataFrame | None = None) -> DataFrame:
    """`n_sessions` sessions whose length, event types, items (with category) and gaps are drawn independently.

    `prices` (item_id, price), e.g. the catalogue, gives each drawn item its price (null without it).

    `lookups` is inverse_cdf(train_marginals(...)), best persisted: each draw broadcasts a slice of it.
    Deterministic for given seeds and partitions: the rows come from spark.range with a fixed
    partition count, every random number from a seeded `rand` evaluated before any shuffle, and
    every lookup join is a broadcast join that keeps row order.
    """
    spark = lookups.sparkSession
    sessions = spark.range(0, n_sessions, 1, numPartitions=max(1, partitions))
    sessions = _draw(sessions.withColumn("_u", F.rand(seeds["length"])), "_u", lookups, "length")
    events = (sessions.where(F.col("length") > 0)
              .select(F.format_string("ind-%08d", F.col("id")).alias("session_id"),
                      F.explode(F.sequence(F.lit(0), F.col("length") - 1)).alias("position"))
              .withColumn("_ut", F.rand(seeds["event_type"]))
              .withColumn("_ui", F.rand(seeds["item"]))
              .withColumn("_ug", F.rand(seeds["gap"])))
    events = _draw(events, "_ut", lookups, "event_type")
    events = _draw(events, "_ui", lookups, "item")
    events = _draw(events, "_ug", lookups, "gap")
    if prices is not None:
        events = events.join(F.broadcast(prices.select(F.col("item_id").alias("_pi"), F.col("price"))),
                             F.col("item_id") == F.col("_pi"), "left").drop("_pi")
    else:
        events = events.withColumn("price", F.lit(None).cast("double"))
    return events.select(
        F.lit(INDEPENDENT).alias("subject"), "session_id", F.col("position").cast("int").alias("position"),
        "event_type", "item_id", "category", F.when(F.col("position") > 0, F.col("gap_bin")).alias("gap_bin"),
        F.col("price").cast("double").alias("price"))


# --------------------------------------------------------------------------------------------------
# Spark side: the aggregates of every subject.
# --------------------------------------------------------------------------------------------------

def _sequence_key(items: Column) -> Column:
    """Fingerprint of an ordered item sequence (nulls, i.e. searches, kept in place)."""
    return F.sha2(F.array_join(items, _ITEM_SEP, _NULL_ITEM), 256)


def collect_profiles(events: DataFrame, train_sessions: DataFrame) -> dict[str, Profile]:
    """Aggregate the common-shape events of all subjects into one Profile per subject."""
    profiles: dict[str, Profile] = {}

    def prof(subject: str) -> Profile:
        return profiles.setdefault(subject, Profile())

    # Event-level histograms, all dimensions in one pass.
    histograms = (events.select("subject", F.explode(F.array(
        F.struct(F.lit("event_type").alias("dim"), F.col("event_type").alias("key")),
        F.struct(F.lit("item").alias("dim"), F.col("item_id").alias("key")),
        F.struct(F.lit("category").alias("dim"), F.col("category").alias("key")),
        F.struct(F.lit("gap").alias("dim"), F.col("gap_bin").cast("string").alias("key")),
    )).alias("h")).where(F.col("h.key").isNotNull())
        .groupBy("subject", "h.dim", "h.key").count().collect())
    for row in histograms:
        target = {"event_type": "event_types", "item": "items", "category": "categories", "gap": "gaps"}[row.dim]
        key = int(row.key) if row.dim == "gap" else row.key
        getattr(prof(row.subject), target)[key] = row["count"]

    # Session lengths and exact copies of train sessions with 2+ events.
    train_keys = (train_sessions.where(F.size("item_ids") >= 2)
                  .select(_sequence_key(F.col("item_ids")).alias("key")).distinct()
                  .withColumn("is_copy", F.lit(1)))
    ordered_items = F.transform(F.array_sort(F.collect_list(F.struct("position", "item_id"))),
                                lambda e: e["item_id"])
    sessions = (events.groupBy("subject", "session_id")
                .agg(F.count("*").alias("length"), _sequence_key(ordered_items).alias("key")))
    for row in (sessions.join(train_keys, "key", "left")
                .groupBy("subject", "length")
                .agg(F.count("*").alias("n"), F.sum(F.coalesce("is_copy", F.lit(0))).alias("copies")).collect()):
        prof(row.subject).lengths[row.length] = row.n
        prof(row.subject).copies += row.copies

    # Purchases preceded by a view of the same item in the same session.
    earlier = (Window.partitionBy("subject", "session_id", "item_id").orderBy("position")
               .rowsBetween(Window.unboundedPreceding, -1))
    viewed = F.max((F.col("event_type") == "view").cast("int")).over(earlier)
    purchases = (events.where(F.col("item_id").isNotNull()).withColumn("viewed", viewed)
                 .where(F.col("event_type") == "purchase")
                 .groupBy("subject").agg(F.sum(F.coalesce("viewed", F.lit(0))).alias("after_view")).collect())
    for row in purchases:
        prof(row.subject).purchases_after_view = row.after_view
    # Consecutive (category, next category) pairs within sessions.
    following = F.lead("category").over(Window.partitionBy("subject", "session_id").orderBy("position"))
    pairs = (events.select("subject", "category", following.alias("next_category"))
             .where(F.col("category").isNotNull() & F.col("next_category").isNotNull())
             .groupBy("subject", "category", "next_category").count().collect())
    for row in pairs:
        prof(row.subject).transitions[(row.category, row.next_category)] = row["count"]
    for subject, p in profiles.items():
        p.purchases = p.event_types.get("purchase", 0)
    return profiles


def catalog_consistency(synthetic: DataFrame, catalog: DataFrame) -> float | None:
    """Share of synthetic events whose item is in the catalogue with the same category and brand."""
    entries = catalog.select(F.col("item_id").alias("_item"), F.col("category").alias("_category"),
                             F.col("brand").alias("_brand")).distinct()
    matched = synthetic.join(entries, (F.col("item_id") == F.col("_item"))
                             & F.col("category").eqNullSafe(F.col("_category"))
                             & F.col("brand").eqNullSafe(F.col("_brand")), "left")
    consistent = F.when(F.col("item_id").isNull(), F.col("event_type") == "search").otherwise(
        F.col("_item").isNotNull())
    row = matched.agg(F.count("*").alias("n"), F.sum(consistent.cast("long")).alias("ok")).first()
    return share(row.ok or 0, row.n)


def attribute_realism(synthetic: DataFrame, catalog: DataFrame, price_band: tuple[float, float]) -> float | None:
    """Share of synthetic events with an item whose item, category and brand match item_catalog and whose
    price lies in [low, high] x the catalogue price (a null price matches only a null catalogue price)."""
    low, high = (float(x) for x in price_band)
    entries = catalog.select(F.col("item_id").alias("_item"), F.col("category").alias("_category"),
                             F.col("brand").alias("_brand"), F.col("price").alias("_price"))
    priced = (F.col("_price").isNull() & F.col("price").isNull()) | (
        (F.col("_price") > 0) & (F.col("price") >= F.col("_price") * low) & (F.col("price") <= F.col("_price") * high))
    matched = (synthetic.where(F.col("item_id").isNotNull())
               .join(entries, (F.col("item_id") == F.col("_item"))
                     & F.col("category").eqNullSafe(F.col("_category"))
                     & F.col("brand").eqNullSafe(F.col("_brand")), "left"))
    ok = (F.col("_item").isNotNull() & F.coalesce(priced, F.lit(False))).cast("long")
    row = matched.agg(F.count("*").alias("n"), F.sum(ok).alias("ok")).first()
    return share(row.ok or 0, row.n)


# Per-session feature columns of the classifier two-sample test, in vector order.
SESSION_FEATURES = ["log_length", "view_share", "cart_share", "purchase_share", "search_share",
                    "distinct_item_share", "distinct_category_share", "mean_log_gap", "median_log_gap",
                    "max_log_gap", "purchase_after_view", "mean_log_price", "std_log_price"]


def session_features(events: DataFrame, bin_seconds: float) -> DataFrame:
    """One row per (subject, session_id) with the SESSION_FEATURES columns (nulls as 0), from common-shape events."""
    earlier = (Window.partitionBy("subject", "session_id", "item_id").orderBy("position")
               .rowsBetween(Window.unboundedPreceding, -1))
    viewed = F.max((F.col("event_type") == "view").cast("int")).over(earlier)
    # The first event of a session has no gap (null), which the aggregates skip.
    log_gap = F.when(F.col("gap_bin").isNotNull(), F.log1p(F.greatest(
        F.col("gap_bin").cast("double") * F.lit(float(bin_seconds)), F.lit(0.0))))
    log_price = F.when(F.col("price") > 0, F.log1p("price"))
    flagged = events.select(
        "subject", "session_id", "event_type", "item_id", "category", log_gap.alias("_lg"),
        log_price.alias("_lp"),
        F.when(F.col("item_id").isNotNull() & (F.col("event_type") == "purchase"),
               F.coalesce(viewed, F.lit(0))).otherwise(0).alias("_pav"))

    def share_of(event_type: str) -> Column:
        return F.avg((F.col("event_type") == event_type).cast("double"))

    grouped = flagged.groupBy("subject", "session_id").agg(
        F.count("*").alias("_n"),
        share_of("view").alias("view_share"), share_of("cart").alias("cart_share"),
        share_of("purchase").alias("purchase_share"), share_of("search").alias("search_share"),
        F.size(F.collect_set("item_id")).alias("_items"), F.size(F.collect_set("category")).alias("_cats"),
        F.avg("_lg").alias("mean_log_gap"), F.percentile_approx("_lg", 0.5).alias("median_log_gap"),
        F.max("_lg").alias("max_log_gap"), F.max("_pav").cast("double").alias("purchase_after_view"),
        F.avg("_lp").alias("mean_log_price"), F.stddev_pop("_lp").alias("std_log_price"))
    values = {"log_length": F.log1p(F.col("_n").cast("double")),
              "distinct_item_share": F.col("_items") / F.col("_n"),
              "distinct_category_share": F.col("_cats") / F.col("_n")}
    return grouped.select("subject", "session_id", *[
        F.coalesce(values.get(name, F.col(name)).cast("double"), F.lit(0.0)).alias(name)
        for name in SESSION_FEATURES])


def c2st_auc(features: DataFrame, subject: str, seed: int, folds: int = 2,
             classifier: str = "logistic") -> float | None:
    """Classifier two-sample test of `subject` against the holdout on session_features rows.

    Both sides are cut to the smaller side's size (sessions ranked by a seeded hash of session_id),
    labelled (subject 1, holdout 0) and dealt into `folds` folds by that rank (so every fold holds
    both labels, equally many of each up to one, and the same session id lands in the same fold on both sides); for
    each fold a classifier (logistic: standardized logistic regression; gbt: gradient-boosted trees)
    trained on the other folds scores it, and the mean test ROC AUC over the folds is returned
    (None when no fold holds both labels on both sides). Deterministic: the data is range-sorted by
    session before fitting, so partitions and row order do not depend on shuffle timing.
    """
    from pyspark.ml.classification import GBTClassifier, LogisticRegression
    from pyspark.ml.evaluation import BinaryClassificationEvaluator
    from pyspark.ml.feature import VectorAssembler

    if folds < 2:
        raise ValueError(f"evaluate.two_sample_folds must be at least 2, not {folds}")
    if classifier not in ("logistic", "gbt"):
        raise ValueError(f"evaluate.two_sample_classifier must be logistic or gbt, not {classifier!r}")
    sides = features.where(F.col("subject").isin(HOLDOUT, subject))
    sizes = {r.subject: r["count"] for r in sides.groupBy("subject").count().collect()}
    n = min(sizes.get(HOLDOUT, 0), sizes.get(subject, 0))
    if n < 2:
        return None
    rank = F.row_number().over(Window.partitionBy("subject").orderBy(
        F.xxhash64(F.lit(seed), "session_id"), "session_id"))
    data = (sides.withColumn("_rank", rank).where(F.col("_rank") <= n)
            .withColumn("label", (F.col("subject") == subject).cast("double"))
            .withColumn("fold", F.pmod(F.col("_rank") - 1, F.lit(folds)).cast("int")))
    data = VectorAssembler(inputCols=SESSION_FEATURES, outputCol="features").transform(data)
    data = data.select("label", "fold", "features", "session_id", "subject") \
        .orderBy("session_id", "subject").persist()
    try:
        aucs = []
        counts = {(r.fold, r.label): r["count"] for r in data.groupBy("fold", "label").count().collect()}
        for fold in range(folds):
            test_ok = counts.get((fold, 0.0), 0) and counts.get((fold, 1.0), 0)
            train_ok = (sum(c for (f, l), c in counts.items() if f != fold and l == 0.0)
                        and sum(c for (f, l), c in counts.items() if f != fold and l == 1.0))
            if not (test_ok and train_ok):
                continue
            if classifier == "gbt":
                model = GBTClassifier(maxIter=30, maxDepth=3, seed=seed % (2**31), labelCol="label")
            else:
                model = LogisticRegression(maxIter=100, regParam=0.01, labelCol="label")
            fitted = model.fit(data.where(F.col("fold") != fold))
            scored = fitted.transform(data.where(F.col("fold") == fold))
            aucs.append(BinaryClassificationEvaluator(labelCol="label", metricName="areaUnderROC")
                        .evaluate(scored))
        return sum(aucs) / len(aucs) if aucs else None
    finally:
        data.unpersist()


def recommender_hit_rates(train_events: DataFrame, holdout_events: DataFrame,
                          k: int = RECOMMENDER_K) -> dict[str, float | None]:
    """Hit rate@k per subject of a next-item co-occurrence recommender, tested on the holdout.

    train_events: (subject, session_id, position, item_id) rows; per subject, the recommendations for
    item A are the k items B most often directly following A (events without an item skipped) in
    that subject's sessions, ties broken by item id. holdout_events: (session_id, position, item_id);
    every holdout session with 2+ item events is one test case: a hit when its last item is among
    the recommendations for the item before it. A subject with no recommendation for a case misses.
    Returns {subject: hits / test cases}, None for every subject when there is no test case.
    """
    with_items = train_events.where(F.col("item_id").isNotNull())
    following = F.lead("item_id").over(Window.partitionBy("subject", "session_id").orderBy("position"))
    pairs = (with_items.select("subject", F.col("item_id").alias("prev"), following.alias("next"))
             .where(F.col("next").isNotNull()).groupBy("subject", "prev", "next").count())
    top = pairs.withColumn("_r", F.row_number().over(
        Window.partitionBy("subject", "prev").orderBy(F.desc("count"), "next"))).where(F.col("_r") <= k)
    backwards = Window.partitionBy("session_id").orderBy(F.desc("position"))
    tail = (holdout_events.where(F.col("item_id").isNotNull())
            .withColumn("_r", F.row_number().over(backwards)).where(F.col("_r") <= 2)
            .groupBy("session_id")
            .agg(F.max(F.when(F.col("_r") == 2, F.col("item_id"))).alias("prev"),
                 F.max(F.when(F.col("_r") == 1, F.col("item_id"))).alias("next"))
            .where(F.col("prev").isNotNull()))
    cases = tail.count()
    subjects = [r.subject for r in train_events.select("subject").distinct().collect()]
    if not cases:
        return {s: None for s in subjects}
    hits = {r.subject: r["count"] for r in
            tail.join(top, ["prev", "next"]).groupBy("subject").count().collect()}
    return {s: hits.get(s, 0) / cases for s in subjects}


def profile_metrics(ctx, run_id: str) -> dict[tuple[str, str], float | None]:
    """profile_column_shape / profile_column_pair of this run's synthetic_user_profiles vs user_profiles.

    Needs synth.tabular (column_shape_score, column_pair_score) and a synthetic_user_profiles table;
    returns {} (logged) when either is missing, so the stage never depends on the profile generator.
    """
    import importlib

    try:
        tabular = importlib.import_module("synth.tabular")
        tabular.column_shape_score, tabular.column_pair_score  # noqa: B018 - both must exist
    except (ImportError, AttributeError) as exc:
        log.info("evaluate: profile metrics skipped (synth.tabular not usable: %s)", exc)
        return {}
    try:
        if not ctx.lake.exists("synthetic_user_profiles"):
            log.info("evaluate: profile metrics skipped (no synthetic_user_profiles table)")
            return {}
        synthetic = ctx.read("synthetic_user_profiles").df
    except (FileNotFoundError, KeyError, ValueError) as exc:
        log.info("evaluate: profile metrics skipped (synthetic_user_profiles unreadable: %s)", exc)
        return {}
    if "run_id" in synthetic.columns:
        synthetic = synthetic.where(F.col("run_id") == run_id).drop("run_id")
    real = ctx.read("user_profiles").df
    scalar = {f.name for f in real.schema.fields if f.dataType.typeName() not in ("map", "array", "struct")}
    columns = [c for c in real.columns if c in synthetic.columns and c in scalar and c != "user_id"]
    # Small per-user tables: the scorers work on pandas frames.
    return profile_scores(real.select(*columns).toPandas(), synthetic.select(*columns).toPandas(), tabular)


def profile_scores(real_pd, synthetic_pd, tabular) -> dict[tuple[str, str], float | None]:
    """profile_column_shape / profile_column_pair of two pandas profile tables with the same columns,
    scored by `tabular` (synth.tabular) with metadata detected on the real table."""
    if real_pd.empty or synthetic_pd.empty or not len(real_pd.columns):
        return {}
    detect = getattr(getattr(tabular, "TabularMetadata", None), "detect", None)
    metadata = detect(real_pd) if callable(detect) else None
    return {("profile_column_shape", SYNTHETIC): float(tabular.column_shape_score(real_pd, synthetic_pd, metadata)),
            ("profile_column_pair", SYNTHETIC): float(tabular.column_pair_score(real_pd, synthetic_pd, metadata))}


# --------------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------------

_COLORS = {HOLDOUT: "#222222", SYNTHETIC: "#d62728", TRAIN_RESAMPLE: "#1f77b4", INDEPENDENT: "#999999"}


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plots(profiles: Mapping[str, Profile], gap_bin_seconds: float) -> dict[str, str]:
    """Base64 PNGs by title: event-type mix, session lengths, item popularity rank curve, gap CDF."""
    from matplotlib.figure import Figure  # the object API renders with Agg; no pyplot global state

    subjects = [s for s in SUBJECTS if s in profiles]
    out: dict[str, str] = {}

    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    types = sorted({t for s in subjects for t in profiles[s].event_types})
    width = 0.8 / max(1, len(subjects))
    for i, subject in enumerate(subjects):
        total = profiles[subject].n_events or 1
        ax.bar([x + i * width for x in range(len(types))],
               [profiles[subject].event_types.get(t, 0) / total for t in types],
               width, label=subject, color=_COLORS[subject])
    ax.set_xticks([x + width * (len(subjects) - 1) / 2 for x in range(len(types))], types)
    ax.set_ylabel("share of events")
    ax.set_title("Event type mix")
    ax.legend(fontsize=8)
    out["Event type mix"] = _png(fig)

    def log_log(title: str, xlabel: str, ylabel: str, curves: dict[str, tuple[list, list]]) -> None:
        fig = Figure(figsize=(7, 3.5))
        ax = fig.subplots()
        for subject, (xs, ys) in curves.items():
            ax.plot(xs, ys, marker="." if len(xs) < 100 else None, label=subject, color=_COLORS[subject])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        out[title] = _png(fig)

    def lengths(subject: str) -> tuple[list, list]:
        hist = profiles[subject].lengths
        total = sum(hist.values()) or 1
        return sorted(hist), [hist[x] / total for x in sorted(hist)]

    def ranks(subject: str) -> tuple[list, list]:
        counts = sorted(profiles[subject].items.values(), reverse=True)
        total = sum(counts) or 1
        return list(range(1, len(counts) + 1)), [c / total for c in counts]

    log_log("Session length distribution", "session length (events)", "share of sessions",
            {subject: lengths(subject) for subject in subjects})
    log_log("Item popularity rank curve", "item rank", "share of item events",
            {subject: ranks(subject) for subject in subjects})

    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    for subject in subjects:
        hist = profiles[subject].gaps
        total = sum(hist.values())
        if not total:
            continue
        xs, ys, running = [], [], 0
        for b in sorted(hist):
            running += hist[b]
            xs.append(max(b * gap_bin_seconds, gap_bin_seconds / 2))
            ys.append(running / total)
        ax.step(xs, ys, where="post", label=subject, color=_COLORS[subject])
    ax.set_xscale("log")
    ax.set_xlabel("gap between consecutive events (s)")
    ax.set_ylabel("CDF")
    ax.set_title("Time gaps within sessions")
    ax.legend(fontsize=8)
    out["Time gaps within sessions"] = _png(fig)
    return out


def render_report(run_id: str, rows: list[tuple[str, str, float, str]], images: Mapping[str, str],
                  notes: Mapping[str, Any]) -> str:
    """A self-contained HTML page: the metrics (metric x subject), their meaning, and the plots."""
    metrics = list(dict.fromkeys(r[0] for r in rows))
    values = {(r[0], r[1]): r[2] for r in rows}
    esc = html.escape
    head = "".join(f"<th>{esc(s)}</th>" for s in REPORT_SUBJECTS)
    body = "".join(
        f"<tr><td><b>{esc(m)}</b></td>"
        + "".join(f"<td>{_fmt(m, values[(m, s)])}</td>" if (m, s) in values else "<td>-</td>"
                  for s in REPORT_SUBJECTS)
        + f"<td class=d>{esc(DESCRIPTIONS[m])}</td></tr>"
        for m in metrics)
    facts = "".join(f"<li>{esc(str(k))}: {esc(str(v))}</li>" for k, v in notes.items())
    figures = "".join(f"<h2>{esc(title)}</h2><img alt=\"{esc(title)}\" src=\"data:image/png;base64,{data}\">"
                      for title, data in images.items())
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Synthetic sessions evaluation, run {esc(run_id)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td.d{{text-align:left;font-size:85%}}</style>
</head><body>
<h1>Synthetic sessions evaluation, run {esc(run_id)}</h1>
<p>Every subject is compared with the held-out real sessions. train_resample (real train sessions) is the
fidelity ceiling; independent_columns (length, event type, item and gap drawn independently from the train
marginals) is the floor a generator has to beat. real_train (all real train sessions) is the reference
of the recommender utility.</p>
<ul>{facts}</ul>
<table><tr><th>metric</th>{head}<th>meaning</th></tr>{body}</table>
{figures}
</body></html>
"""


def write_atomically(path: Path, text: str) -> None:
    """Write to a temporary name in the same folder, then rename: readers never see half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fmt(metric: str, value: float) -> str:
    return f"{value:.0f}" if metric.startswith("n_") else f"{value:.4f}"


def summary(rows: Iterable[tuple[str, str, float, str]]) -> str:
    """The metrics as a small text table, metric x subject, for the log."""
    values = {(r[0], r[1]): r[2] for r in rows}
    metrics = list(dict.fromkeys(m for m, _ in values))
    lines = [f"{'metric':<28}" + "".join(f"{s:>20}" for s in REPORT_SUBJECTS)]
    for m in metrics:
        lines.append(f"{m:<28}" + "".join(
            f"{_fmt(m, values[(m, s)]) if (m, s) in values else '-':>20}" for s in REPORT_SUBJECTS))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The stage.
# --------------------------------------------------------------------------------------------------

def run(ctx) -> dict[str, int]:
    cfg, spark, run_id = ctx.cfg, ctx.spark, ctx.run_id
    bin_seconds = float(cfg.evaluate.gap_bin_seconds)
    if bin_seconds <= 0:
        raise ValueError(f"evaluate.gap_bin_seconds must be positive, not {bin_seconds}")
    if int(cfg.evaluate.baseline_sessions) < 0:
        raise ValueError(f"evaluate.baseline_sessions must be >= 0, not {cfg.evaluate.baseline_sessions}")
    band = tuple(float(x) for x in cfg.evaluate.price_band)
    if len(band) != 2 or not 0 < band[0] <= 1 <= band[1]:
        raise ValueError(f"evaluate.price_band must be [low, high] with 0 < low <= 1 <= high, not {band}")
    folds, classifier = int(cfg.evaluate.two_sample_folds), str(cfg.evaluate.two_sample_classifier)

    sessions = ctx.read("sessions").df
    synthetic = ctx.read("synthetic_events").df.where(F.col("run_id") == run_id)
    catalog = ctx.read("item_catalog").df
    train = sessions.where(F.col("split") == "train")
    holdout = sessions.where(F.col("split") == "holdout")

    n_synthetic = synthetic.select("session_id").distinct().count()
    if n_synthetic == 0:
        raise RuntimeError(f"synthetic_events holds no rows for run {run_id}; run the generate stage first")
    splits = {r.split: r["count"] for r in sessions.groupBy("split").count().collect()}
    for split in ("train", "holdout"):
        if not splits.get(split):
            raise RuntimeError(f"sessions holds no {split} sessions; run the featurize stage first")
    n_baseline = int(cfg.evaluate.baseline_sessions) or n_synthetic
    seeds = {p: derive_seed(cfg.run.seed, run_id, p)
             for p in ("train_resample", "length", "event_type", "item", "gap", "c2st")}

    # train_resample: a deterministic sample of train sessions, as many as the baselines' size.
    train_sample = (train.orderBy(F.xxhash64(F.lit(seeds["train_resample"]), "session_id"), "session_id")
                    .limit(n_baseline))
    lookups = inverse_cdf(train_marginals(train, bin_seconds)).persist()
    events = (real_events(holdout, HOLDOUT, bin_seconds)
              .unionByName(synthetic_events(synthetic, bin_seconds))
              .unionByName(real_events(train_sample, TRAIN_RESAMPLE, bin_seconds))
              .unionByName(independent_events(lookups, n_baseline, seeds, cfg.spark.shuffle_partitions,
                                              prices=catalog.select("item_id", "price")))
              .select(*EVENT_COLUMNS)
              .persist(StorageLevel.MEMORY_AND_DISK))
    extra: dict[tuple[str, str], float | None] = {}
    try:
        profiles = collect_profiles(events, train)
        features = session_features(events, bin_seconds).persist()
        try:
            for subject in COMPARED:
                extra[("c2st_auc", subject)] = c2st_auc(features, subject, seeds["c2st"], folds, classifier)
        finally:
            features.unpersist()
        subjects_events = (events.where(F.col("subject") != HOLDOUT)
                           .unionByName(real_events(train, REAL_TRAIN, bin_seconds).select(*EVENT_COLUMNS)))
        hits = recommender_hit_rates(subjects_events.select("subject", "session_id", "position", "item_id"),
                                     events.where(F.col("subject") == HOLDOUT))
    finally:
        events.unpersist()
        lookups.unpersist()
    for subject in COMPARED + (REAL_TRAIN,):
        extra[(HIT_RATE, subject)] = hits.get(subject)
    for subject in COMPARED:
        real_rate, rate = hits.get(REAL_TRAIN), hits.get(subject)
        extra[("recommender_hit_rate_ratio", subject)] = (
            rate / real_rate if rate is not None and real_rate else None)
    extra[("attribute_realism", SYNTHETIC)] = attribute_realism(synthetic, catalog, band)
    extra.update(profile_metrics(ctx, run_id))
    consistency = catalog_consistency(synthetic, catalog)
    rows = metric_rows(profiles, consistency, extra)

    metrics = spark.createDataFrame(rows, "metric string, subject string, value double, description string") \
        .withColumn("run_id", F.lit(run_id))
    version = ctx.write(metrics, "metrics", replace={"run_id": run_id}).version
    log.info("evaluate: run %s metrics (metrics version %d):\n%s", run_id, version, summary(rows))

    report = Path(cfg.evaluate.report_dir).expanduser().resolve() / run_id / "report.html"
    notes = {"input versions": dict(ctx.input_versions), "metrics table version": version,
             "baseline sessions": n_baseline, "gap bin (s)": bin_seconds, "seed": cfg.run.seed,
             "C2ST": f"{classifier}, {folds} folds", "price band": band}
    write_atomically(report, render_report(run_id, rows, plots(profiles, bin_seconds), notes))
    ctx.artifacts["report"] = str(report)
    log.info("evaluate: report at %s", report)
    return {
        "metrics": len(rows),
        "synthetic_sessions": profiles[SYNTHETIC].n_sessions,
        "synthetic_events": profiles[SYNTHETIC].n_events,
        "holdout_sessions": profiles[HOLDOUT].n_sessions,
        "holdout_events": profiles[HOLDOUT].n_events,
        "baseline_sessions": n_baseline,
    }
