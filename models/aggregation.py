"""Federated aggregation: pure rules over weighted updates, per-device and cohort checks, and thin strategies.

The rules follow Flower's ``aggregate.py``: plain functions over ``list[(weights, weight)]`` returning one list of
arrays. A strategy (`models.updates.Strategy`: ``aggregate(updates, current=None)``) checks the updates, decides
who takes part and with which weight, and calls one rule. `make_strategy` builds the configured one once per
round, with differential privacy (`models.privacy.DifferentiallyPrivate`) or secure aggregation
(`models.secure_aggregation.SecureAggregation`) wrapped around it.

Bounded influence: a FedAvg weight is ``min(n_samples, cap)`` with ``cap`` = the cohort's median ``n_samples`` ×
`aggregation.sample_cap_factor`, so claiming 2⁵³ readings buys no more than a few honest devices' weight;
`newest_plausible` keeps one update per device, the newest whose counters follow its previous snapshot.

>>> a = ([np.array([0.0, 0.0])], 1)
>>> b = ([np.array([3.0, 6.0])], 2)
>>> fedavg([a, b])[0]
array([2., 4.])
>>> coordinate_median([a, b, ([np.array([1.0, 1.0])], 5)])[0]
array([1., 1.])
>>> bounded_weights([100, 120, 90, 2 ** 53], cap_factor=2.0).tolist()
[100.0, 120.0, 90.0, 220.0]
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from models.updates import (AggregationError, AggregationResult, Update, Weights, WeightedWeights, flatten,
                            unflatten)

__all__ = ["AggregationError", "AggregationResult", "Update", "fedavg", "coordinate_median", "trimmed_mean",
           "kmeans_centres", "kmeans_restarts_at_once", "kmeans_pass", "nearest_centres", "centre_sums",
           "first_appearance", "cluster_models", "trimmed_count", "cosine_similarity", "sample_cap", "bounded_weights",
           "structure_problem", "snapshot_problem", "newest_plausible", "validate_updates", "cohort_rejections",
           "ValidationPolicy", "SnapshotLimits", "FedAvg", "FedMedian", "FedTrimmedAvg", "ClusteredFedAvg",
           "make_strategy"]


# ---------------------------------------------------------------- rules

def _stack(results: Sequence[WeightedWeights]) -> tuple[np.ndarray, np.ndarray, Weights]:
    if not results:
        raise AggregationError("nothing to aggregate: no updates")
    matrix = np.stack([flatten(w) for w, _ in results])
    counts = np.array([n for _, n in results], dtype=np.float64)
    return matrix, counts, results[0][0]


def fedavg(results: Sequence[WeightedWeights]) -> Weights:
    """FedAvg (McMahan et al. 2017): the mean of the models weighted by their number of samples."""
    matrix, counts, like = _stack(results)
    if counts.sum() <= 0:
        raise AggregationError("FedAvg weights models by n_samples, and the total is not positive")
    return unflatten(counts @ matrix / counts.sum(), like)


def coordinate_median(results: Sequence[WeightedWeights]) -> Weights:
    """Coordinate-wise median (Yin et al. 2018); sample counts are ignored, so one device cannot buy influence.

    Each coordinate stays within the range of the honest values as long as fewer than half of the updates are
    poisoned, whatever their values.
    """
    matrix, _, like = _stack(results)
    return unflatten(np.median(matrix, axis=0), like)


def trimmed_mean(results: Sequence[WeightedWeights], trim_fraction: float) -> Weights:
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the ⌊βn⌋ largest and smallest values, average the rest.

    Tolerates up to ⌊βn⌋ poisoned updates. β < 0.5 keeps n > 2·⌊βn⌋ values to average; β > 0 with
    ⌊βn⌋ = 0 (fewer than 1/β updates) would trim nothing, a plain mean with no robustness, and is refused.
    """
    matrix, _, like = _stack(results)
    n = matrix.shape[0]
    k = trimmed_count(n, trim_fraction)
    ordered = np.sort(matrix, axis=0)
    return unflatten(ordered[k:n - k].mean(axis=0), like)


def trimmed_count(n: int, trim_fraction: float) -> int:
    """⌊βn⌋, the values the trimmed mean drops from each end of a coordinate; `AggregationError` when β is outside
    [0, 0.5) or trims nothing of n > 0 values (a plain mean sold as a robust one)."""
    if not 0.0 <= trim_fraction < 0.5:
        raise AggregationError(
            f"trim_fraction must be in [0, 0.5), got {trim_fraction}: the trimmed mean removes that fraction "
            "from each end, so 0.5 or more would remove every value")
    k = int(np.floor(trim_fraction * n))
    if trim_fraction > 0 and k == 0:
        raise AggregationError(f"trimmed mean with β={trim_fraction} over n={n} updates trims ⌊βn⌋=0 from each end, "
                               f"i.e. it is the plain mean with no robustness; it needs n ≥ 1/β = "
                               f"{int(np.ceil(1 / trim_fraction))} updates")
    return k


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """cos(a, b), and 0 when either vector is zero (no direction to agree or disagree with)."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


# What one k-means pass may send back per partition: its centres' sums (restarts × k × vector length float64).
KMEANS_PASS_BYTES = 32 * 1024 * 1024
# A partitioned cohort whose vectors take at most this many bytes is clustered on the driver, its vectors fetched
# once: a few wide devices' passes would send more (12 devices of 400 metrics: 200 MB once, against 50 MB in each of
# ~40 passes: 12 s against 27 s for their round). 10,000 ASD-shaped devices (372 MB) take the passes.
KMEANS_FETCH_BYTES = 8 * KMEANS_PASS_BYTES


def nearest_centres(points: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each point's nearest centre under each of R sets of centres (R, m, D): labels (R, n) and squared distances
    (R, n), from ‖x‖² − 2x·c + ‖c‖² (one matrix product, no (n, m, D) temporary)."""
    R, m, _ = centres.shape
    flat = centres.reshape(R * m, -1)
    d2 = np.einsum("ij,ij->i", points, points)[:, None] - 2.0 * (points @ flat.T) + np.einsum("ij,ij->i", flat, flat)
    d2 = np.maximum(d2, 0.0).reshape(points.shape[0], R, m)
    labels = d2.argmin(axis=2)
    return labels.T, np.take_along_axis(d2, labels[:, :, None], axis=2)[:, :, 0].T


def centre_sums(points: np.ndarray, labels: np.ndarray, m: int, weights: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per set of labels (R, n): each centre's Σ weight·point (R, m, D) and Σ weight (R, m); weights 1 if None."""
    w = np.ones(points.shape[0]) if weights is None else weights
    onehot = (labels[:, None, :] == np.arange(m)[None, :, None]) * w  # (R, m, n)
    R, n = labels.shape  # one 2-D product: a stacked (R, m, n) @ (n, D) is 100 times slower in NumPy
    return (onehot.reshape(R * m, n) @ points).reshape(R, m, -1), onehot.sum(axis=2)


def kmeans_pass(points: np.ndarray, centres: np.ndarray, with_sums: bool, rows: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One k-means pass over the points (only those at ``rows`` count, if given) for R sets of centres (R, m, D):
    the squared distance of each point to its nearest centre (R, n) and, ``with_sums``, each centre's sum and count
    of the points nearest it."""
    R, m, D = centres.shape
    if points.shape[0] == 0 or (rows is not None and rows.size == 0):
        return np.zeros((R, 0)), np.zeros((R, m, D)) if with_sums else None, np.zeros((R, m)) if with_sums else None
    labels, d2 = nearest_centres(points, centres)
    if rows is not None:
        counted = np.zeros(points.shape[0], dtype=bool)
        counted[rows] = True
        labels[:, ~counted] = -1  # a label of no centre: left out of the sums
        d2 = d2[:, rows]
    if not with_sums:
        return d2, None, None
    sums, counts = centre_sums(points, labels, m)
    return d2, sums, counts


def kmeans_centres(n: int, fetch: Callable[[Sequence[int]], np.ndarray], run_pass: Callable[..., tuple],
                   k: int, seed: int, restarts: int = 5, iterations: int = 50, at_once: int | None = None
                   ) -> np.ndarray:
    """Seeded k-means++ (Arthur & Vassilvitskii 2007) with restarts, wherever the n points are: ``fetch(indices)``
    returns those points, ``run_pass(centres, with_sums)`` concatenates `kmeans_pass` over all of them. Restarts run
    side by side, ``at_once`` of them per pass (all if None; see `kmeans_restarts_at_once`). Returns the k centres
    (k, D) of the restart of least inertia (the first of equals), the centres its last assignment was made to."""
    if not 1 <= k <= n:
        raise AggregationError(f"k-means with k={k} needs 1 ≤ k ≤ number of points ({n})")
    rng = np.random.default_rng(seed)
    at_once = max(1, at_once or restarts)
    best, least = None, np.inf
    for first in range(0, restarts, at_once):
        centres, inertia = _kmeans_restarts(n, fetch, run_pass, k, rng, min(at_once, restarts - first), iterations)
        if inertia.min() < least:
            best, least = centres[int(np.argmin(inertia))], float(inertia.min())
    return best if best is not None else centres[0]


def _kmeans_restarts(n: int, fetch, run_pass, k: int, rng: np.random.Generator, restarts: int, iterations: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """`kmeans_centres` for ``restarts`` restarts side by side: each one's centres (R, k, D) and inertia (R,)."""
    centres = fetch(rng.integers(n, size=restarts).tolist())[:, None, :]
    for _ in range(1, k):  # each next centre drawn with probability ∝ squared distance to the nearest so far
        d2, _, _ = run_pass(centres, False)
        picks = [int(rng.choice(n, p=row / row.sum() if row.sum() > 0 else np.full(n, 1.0 / n))) for row in d2]
        centres = np.concatenate([centres, fetch(picks)[:, None, :]], axis=1)
    inertia = np.full(restarts, np.inf)
    active = np.arange(restarts)
    for step in range(iterations):
        d2, sums, counts = run_pass(centres[active], True)
        inertia[active] = d2.sum(axis=1)
        if step == iterations - 1:
            break
        updated = np.where(counts[:, :, None] > 0, sums / np.maximum(counts, 1)[:, :, None], centres[active])
        moved = np.array([not np.allclose(u, c) for u, c in zip(updated, centres[active])], dtype=bool)
        centres[active[moved]] = updated[moved]
        active = active[moved]
        if not active.size:
            break
    return centres, inertia


def kmeans_restarts_at_once(k: int, length: int) -> int:
    """How many k-means restarts one pass serves: as many as keep a pass's sums (restarts × k × length float64)
    within `KMEANS_PASS_BYTES`, at least one (wide devices: 3 centres of 2.1 million entries are 50 MB)."""
    return max(1, KMEANS_PASS_BYTES // (8 * k * max(length, 1)))


def first_appearance(labels: Sequence[int]) -> dict[int, int]:
    """Centre index → cluster number, in the order the labels first use them: the same clusters get the same
    numbers whichever restart or partitioning found them."""
    return {old: new for new, old in enumerate(dict.fromkeys(int(label) for label in labels))}


def cluster_models(device_ids: Sequence[str], labels: np.ndarray, sums: np.ndarray, totals: np.ndarray
                   ) -> tuple[np.ndarray, dict[str, int], list[np.ndarray]]:
    """The models of a clustered round from each centre's Σ weight·vector (k, D) and Σ weight (k,): the fleet's
    FedAvg, each device's cluster (centres numbered by first appearance in ``device_ids`` order, an unused centre
    after them) and each cluster's FedAvg (the fleet's for a cluster without members: nobody adopts it)."""
    if totals.sum() <= 0:
        raise AggregationError("FedAvg weights models by n_samples, and the total is not positive")
    fleet = sums.sum(axis=0) / totals.sum()
    order = first_appearance(labels)
    order |= {c: len(order) + i for i, c in enumerate(c for c in range(len(totals)) if c not in order)}
    by_number = sorted(order, key=order.get)
    return (fleet, {d: order[int(label)] for d, label in zip(device_ids, labels)},
            [sums[c] / totals[c] if totals[c] > 0 else fleet for c in by_number])


def sample_cap(n_samples: Sequence[float], cap_factor: float | None) -> float | None:
    """The most a device's claimed count weighs in FedAvg: median(n) × ``cap_factor`` (None: no cap, or no counts).

    The median moves only if half of the cohort lies, so one device claiming any count weighs at most
    ``cap_factor`` honest medians.
    """
    if cap_factor is None or len(n_samples) == 0:
        return None
    if cap_factor < 1:
        raise AggregationError(f"aggregation.sample_cap_factor must be ≥ 1 (a cap below the median would cut "
                               f"honest devices' weights), got {cap_factor}")
    return float(np.median(np.asarray(n_samples, dtype=np.float64))) * cap_factor


def bounded_weights(n_samples: Sequence[float], cap_factor: float | None) -> np.ndarray:
    """FedAvg weights ``min(n, cap)``, ``cap`` the `sample_cap` (None: the counts as they are)."""
    counts = np.asarray(n_samples, dtype=np.float64)
    cap = sample_cap(counts, cap_factor)
    return counts if cap is None else np.minimum(counts, cap)


# ---------------------------------------------------------------- per-device checks

def structure_problem(update: Update, reference_shapes: Sequence[tuple[int, ...]]) -> str | None:
    """Why ``update`` cannot take part on its own (counts, layers, shapes, dtype, finite values), or None.

    Depends on nothing but the update and the architecture's shapes, so it may run under differential privacy.
    """
    n = update.n_samples
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
        return f"n_samples must be a positive integer, got {n!r}"
    if update.n_seen is not None and update.n_seen < n:
        return f"n_samples {n} exceeds n_seen {update.n_seen}: a device cannot learn from more readings than it saw"
    if len(update.weights) != len(reference_shapes):
        return f"wrong number of layers: {len(update.weights)}, expected {len(reference_shapes)}"
    for i, (layer, shape) in enumerate(zip(update.weights, reference_shapes)):
        layer = np.asarray(layer)
        if layer.shape != tuple(shape):
            return f"layer {i}: wrong shape {layer.shape}, expected {tuple(shape)}"
        if layer.dtype.kind != "f":
            return f"layer {i}: wrong dtype {layer.dtype}, expected a floating-point type"
        if not np.isfinite(layer).all():
            return f"layer {i}: non-finite values (NaN or infinity)"
    return None


@dataclass(frozen=True)
class SnapshotLimits:
    """How fast a device's counters may grow between two of its snapshots (`snapshot_problem`).

    ``max_readings_per_s``: readings one device can learn per second of ``created_at`` (replays run much faster
    than real time, so this is generous; it still makes 2⁵³ readings take millennia).
    """

    max_readings_per_s: float = 10_000.0


def snapshot_problem(update: Update, previous: Update | None, limits: SnapshotLimits) -> str | None:
    """Why ``update`` cannot follow ``previous`` (the same device's preceding snapshot), or None.

    Each snapshot needs at least one new reading (versions cannot outrun readings); the readings learned since
    the previous snapshot (``n_samples``) cannot exceed those seen since (``n_seen`` growth); and ``n_seen``
    cannot grow faster than ``limits.max_readings_per_s`` over the ``created_at`` gap.
    """
    if update.n_seen is not None and update.version > update.n_seen:
        return f"version {update.version} exceeds n_seen {update.n_seen}: every snapshot needs a new reading"
    if previous is None:
        return None
    if update.version <= previous.version:
        return f"version {update.version} does not follow the device's previous snapshot v{previous.version}"
    if update.n_seen is None or previous.n_seen is None:
        return "n_seen missing: cannot check the snapshot against the device's previous one"
    seen = update.n_seen - previous.n_seen
    if seen < update.version - previous.version:
        return (f"v{previous.version} → v{update.version} with {seen} new readings: every snapshot needs a new "
                "reading")
    if update.n_samples > seen:
        return (f"n_samples {update.n_samples} exceeds the {seen} readings seen since the device's previous "
                f"snapshot v{previous.version}")
    if update.created_at is not None and previous.created_at is not None:
        elapsed_s = max(update.created_at - previous.created_at, 0) / 1000
        allowed = limits.max_readings_per_s * max(elapsed_s, 1.0)
        if seen > allowed:
            return (f"{seen} readings in {elapsed_s:.0f} s since v{previous.version} exceeds "
                    f"{limits.max_readings_per_s:g} readings/s (aggregation.max_readings_per_s)")
    return None


def newest_plausible(candidates: Sequence[Update], limits: SnapshotLimits,
                     previous: Update | None = None) -> tuple[Update | None, list[tuple[str, str]]]:
    """One device's update for a round: the newest of ``candidates`` (its snapshots in the round's window,
    checked on their own already) whose counters follow the device's preceding accepted snapshot.

    Returns the chosen update (None if none is plausible) and ``(device_id, reason)`` for the ones skipped. A
    forged version 10⁶ cannot displace the device's honest snapshot: it fails against its predecessor and the
    honest one is chosen.
    """
    chosen, rejected = None, []
    reference = previous
    for update in sorted(candidates, key=lambda u: u.version):
        problem = snapshot_problem(update, reference, limits)
        if problem:
            rejected.append((update.device_id, f"v{update.version}: {problem}"))
        else:
            chosen = reference = update
    return chosen, rejected


# ---------------------------------------------------------------- cohort checks

def validate_updates(updates: Sequence[Update], reference_shapes: Sequence[tuple[int, ...]] | None = None,
                     max_norm_ratio: float | None = 10.0, min_cosine: float | None = 0.0,
                     ) -> tuple[list[Update], list[tuple[str, str]], dict[str, float]]:
    """Split updates into accepted and rejected ``(device_id, reason)``; also return the L2 norm of each.

    Checks, in order: one update per device; `structure_problem` against ``reference_shapes`` (default: the
    shapes most updates share); then, relative to the cohort, L2 norm at most ``max_norm_ratio`` × the cohort's
    median norm (scaled-up updates) and cosine similarity to the coordinate-wise median of the cohort at least
    ``min_cosine`` (sign-flipped updates keep their norm but point the other way). The cosine check needs three
    or more updates, since with two the median is the mean and cannot say which one is honest. ``None`` switches
    a cohort check off; with both off, whether a device is accepted depends on nothing but its own update.
    """
    if reference_shapes is None:
        signatures = Counter(tuple(np.shape(w) for w in u.weights) for u in updates)
        reference_shapes = list(signatures.most_common(1)[0][0]) if signatures else []
    rejected: list[tuple[str, str]] = []
    valid: list[Update] = []
    seen: set[str] = set()
    for update in updates:
        if update.device_id in seen:
            rejected.append((update.device_id, "duplicate update from the same device in this round"))
            continue
        seen.add(update.device_id)
        problem = structure_problem(update, reference_shapes)
        if problem:
            rejected.append((update.device_id, problem))
        else:
            valid.append(update)
    if not valid:
        return [], rejected, {}
    vectors = {u.device_id: flatten(u.weights) for u in valid}
    norms = {d: float(np.linalg.norm(v)) for d, v in vectors.items()}
    accepted_ids, cohort_rejected = cohort_rejections(
        list(vectors), norms, max_norm_ratio, min_cosine,
        median_of=lambda ids: np.median(np.stack([vectors[d] for d in ids]), axis=0),
        cosines_to=lambda ids, median: {d: cosine_similarity(vectors[d], median) for d in ids})
    accepted_set = set(accepted_ids)
    return [u for u in valid if u.device_id in accepted_set], rejected + cohort_rejected, norms


def cohort_rejections(device_ids: Sequence[str], norms: dict[str, float], max_norm_ratio: float | None,
                      min_cosine: float | None, median_of, cosines_to) -> tuple[list[str], list[tuple[str, str]]]:
    """The cohort checks of `validate_updates` on structurally valid updates, wherever their vectors are.

    ``norms`` holds each device's L2 norm; ``median_of(ids)`` returns the coordinate-wise median of those
    devices' vectors and ``cosines_to(ids, median)`` their cosine similarities to it (in memory here,
    per Spark partition in `models.partitioned`). Returns the accepted ids in the order of ``device_ids``
    and the ``(device_id, reason)`` of the others.
    """
    rejected: list[tuple[str, str]] = []
    within = list(device_ids)
    if max_norm_ratio is not None:
        median_norm = float(np.median([norms[d] for d in device_ids]))
        limit = max_norm_ratio * median_norm
        within = []
        for d in device_ids:
            if median_norm > 0 and norms[d] > limit:
                rejected.append((d, f"norm {norms[d]:.4g} exceeds {max_norm_ratio:g} × the cohort median norm "
                                    f"{median_norm:.4g}"))
            else:
                within.append(d)
    if min_cosine is None or len(within) < 3:
        return within, rejected
    cosines = cosines_to(within, median_of(within))
    accepted = []
    for d in within:
        if cosines[d] < min_cosine:
            rejected.append((d, f"cosine similarity {cosines[d]:.3f} to the coordinate-wise median is below "
                                f"{min_cosine:g} (points away from the cohort, e.g. a sign flip)"))
        else:
            accepted.append(d)
    return accepted, rejected


# ---------------------------------------------------------------- strategies

@dataclass
class _Validated:
    accepted: list[Update]
    rejected: list[tuple[str, str]]
    norms: dict[str, float]
    weights: np.ndarray

    @property
    def pairs(self) -> list[WeightedWeights]:
        return [(u.weights, float(w)) for u, w in zip(self.accepted, self.weights)]

    def result(self, weights: Weights, strategy: str, **extra: Any) -> AggregationResult:
        extra.setdefault("n_samples", int(round(float(self.weights.sum()))))
        return AggregationResult(weights=weights, participants=[u.device_id for u in self.accepted],
                                 rejected=self.rejected, norms=self.norms, strategy=strategy, extra=extra)


@dataclass
class ValidationPolicy:
    """What every strategy checks first (see `validate_updates`), how many devices a round needs, and how a
    device's claimed ``n_samples`` turns into its weight (`bounded_weights`; None: as claimed)."""

    min_devices: int = 2
    max_norm_ratio: float | None = 10.0
    min_cosine: float | None = 0.0
    reference_shapes: list[tuple[int, ...]] | None = None
    sample_cap_factor: float | None = 2.0

    @property
    def cohort_checks(self) -> bool:
        """Whether accepting one device depends on the others' updates (norm ratio, cosine, sample cap)."""
        return self.max_norm_ratio is not None or self.min_cosine is not None or self.sample_cap_factor is not None

    def individual(self) -> "ValidationPolicy":
        """This policy without the checks that compare devices: what differential privacy and secure
        aggregation allow (each device's acceptance must not depend on another's update)."""
        return ValidationPolicy(self.min_devices, None, None, self.reference_shapes, None)

    def apply(self, updates: Sequence[Update], strategy: str, needed: int = 1, why: str = "") -> _Validated:
        accepted, rejected, norms = validate_updates(updates, self.reference_shapes, self.max_norm_ratio,
                                                     self.min_cosine)
        self.require(len(accepted), rejected, strategy, needed, why)
        weights = bounded_weights([u.n_samples for u in accepted], self.sample_cap_factor)
        return _Validated(accepted, rejected, norms, weights)

    def require(self, n_accepted: int, rejected: Sequence[tuple[str, str]], strategy: str, needed: int = 1,
                why: str = "") -> None:
        """Raise `AggregationError` (with the first reasons) when fewer than ``needed`` (and ``min_devices``)
        updates passed the checks."""
        needed = max(needed, self.min_devices)
        if n_accepted < needed:
            reasons = "; ".join(f"{d}: {r}" for d, r in rejected[:5])
            reasons += f"; and {len(rejected) - 5} more" if len(rejected) > 5 else ""
            raise AggregationError(f"{strategy}: {n_accepted} valid update(s), needs at least {needed}"
                                   f"{' (' + why + ')' if why else ''}" + (f"; rejected: {reasons}" if reasons else ""))


@dataclass
class FedAvg:
    """Weighted mean of the valid updates (McMahan et al. 2017), each weighing ``min(n_samples, cap)``.
    Efficient, not robust by itself: the policy's norm and cosine checks keep scaled and flipped updates out."""

    policy: ValidationPolicy = field(default_factory=ValidationPolicy)
    name: str = "fedavg"

    def aggregate(self, updates: Sequence[Update], current: Weights | None = None) -> AggregationResult:
        checked = self.policy.apply(updates, self.name)
        return checked.result(fedavg(checked.pairs), self.name)


@dataclass
class FedMedian:
    """Coordinate-wise median: robust while fewer than half of the updates are poisoned (needs ≥ 3 to out-vote one)."""

    policy: ValidationPolicy = field(default_factory=ValidationPolicy)
    name: str = "median"
    needed: ClassVar[int] = 3
    why: ClassVar[str] = "the median of two values is their mean, so it cannot out-vote a bad one"

    def aggregate(self, updates: Sequence[Update], current: Weights | None = None) -> AggregationResult:
        checked = self.policy.apply(updates, self.name, needed=self.needed, why=self.why)
        return checked.result(coordinate_median(checked.pairs), self.name)


@dataclass
class FedTrimmedAvg:
    """Coordinate-wise trimmed mean with fraction β: tolerates ⌊βn⌋ poisoned updates, needs n ≥ 1/β to trim any."""

    trim_fraction: float = 0.1
    policy: ValidationPolicy = field(default_factory=ValidationPolicy)
    name: str = "trimmed_mean"

    @property
    def needed(self) -> int:
        """Updates the round needs: 1/β, the fewest of which β trims one from each end."""
        return int(np.ceil(1 / self.trim_fraction)) if self.trim_fraction > 0 else 1

    @property
    def why(self) -> str:
        return f"β={self.trim_fraction} trims ⌊βn⌋ updates per end, 0 below n=1/β"

    def aggregate(self, updates: Sequence[Update], current: Weights | None = None) -> AggregationResult:
        checked = self.policy.apply(updates, self.name, needed=self.needed, why=self.why)
        return checked.result(trimmed_mean(checked.pairs, self.trim_fraction), self.name,
                              trim_fraction=self.trim_fraction)


@dataclass
class ClusteredFedAvg:
    """K groups of similar devices (seeded k-means on the flattened weights), one FedAvg model per group.

    Suits fleets whose devices behave in a few distinct ways (non-IID), where one global model fits nobody
    well (cf. Ghosh et al. 2020, IFCA). ``weights`` is still the FedAvg of all valid updates, for new devices;
    ``extra["clusters"]`` maps device → cluster and ``extra["cluster_weights"][c]`` is cluster c's model.
    """

    clusters: int = 3
    seed: int = 7
    policy: ValidationPolicy = field(default_factory=ValidationPolicy)
    name: str = "clustered"

    @property
    def needed(self) -> int:
        return self.clusters

    @property
    def why(self) -> str:
        return f"k-means into {self.clusters} clusters needs at least one device each"

    def cluster(self, points: np.ndarray, device_ids: Sequence[str], weights: np.ndarray
                ) -> tuple[np.ndarray, dict[str, int], list[np.ndarray]]:
        """k-means on the points in memory (row i is device ``device_ids[i]``, FedAvg weight ``weights[i]``), then
        `cluster_models`: the fleet's vector, each device's cluster and each cluster's vector."""
        centres = kmeans_centres(points.shape[0], lambda indices: points[list(indices)], partial(kmeans_pass, points),
                                 self.clusters, self.seed, at_once=kmeans_restarts_at_once(self.clusters,
                                                                                           points.shape[1]))
        labels = nearest_centres(points, centres[None])[0][0]
        sums, totals = centre_sums(points, labels[None], self.clusters, weights)
        return cluster_models(device_ids, labels, sums[0], totals[0])

    def aggregate(self, updates: Sequence[Update], current: Weights | None = None) -> AggregationResult:
        checked = self.policy.apply(updates, self.name, needed=self.needed, why=self.why)
        points = np.stack([flatten(u.weights) for u in checked.accepted])
        fleet, assignment, cluster_vectors = self.cluster(points, [u.device_id for u in checked.accepted],
                                                          checked.weights)
        like = checked.accepted[0].weights
        return checked.result(unflatten(fleet, like), self.name, clusters=assignment,
                              cluster_weights=[unflatten(v, like) for v in cluster_vectors])


# Strategies whose rule is a weighted sum: the only ones that combine with differential privacy (noise calibrated
# to a sum of clipped updates) and secure aggregation (which reveals only a sum).
SUM_STRATEGIES = ("fedavg",)


def make_strategy(cfg, reference_shapes: list[tuple[int, ...]] | None = None, dp_history: dict | None = None,
                  secure_round=None):
    """The strategy named by ``cfg.aggregation.strategy``, built once for one round.

    With ``cfg.privacy.enabled`` it is wrapped in `models.privacy.DifferentiallyPrivate` (accounting resumed from
    ``dp_history``, the previous global model's ``dp`` field); with ``cfg.privacy.secure_aggregation`` in
    `models.secure_aggregation.SecureAggregation` (``secure_round``: the round's announced cohort and the pair
    seeds survivors revealed for dropped devices). Both need a sum strategy and per-device checks only.
    """
    agg, privacy = cfg.aggregation, cfg.privacy
    policy = ValidationPolicy(min_devices=agg.min_devices, max_norm_ratio=agg.max_norm_ratio,
                              min_cosine=agg.min_cosine, reference_shapes=reference_shapes,
                              sample_cap_factor=agg.sample_cap_factor)
    name = agg.strategy
    wrapped = privacy.enabled or privacy.secure_aggregation
    if wrapped and name not in SUM_STRATEGIES:
        raise AggregationError(
            f"privacy.enabled and privacy.secure_aggregation combine only with aggregation.strategy "
            f"{' or '.join(SUM_STRATEGIES)}, got {name!r}: DP noise is calibrated to a sum of clipped updates, "
            f"and secure aggregation reveals only the sum, not the individual updates that a median, a trimmed "
            f"mean, clustering or norm and cosine checks need")
    if privacy.enabled and privacy.secure_aggregation:
        raise AggregationError("privacy.enabled with privacy.secure_aggregation is not supported: DP-FedAvg clips "
                               "each update on the aggregator, which secure aggregation hides from it (that needs "
                               "clipping and noise on the devices: distributed DP)")
    if name == "fedavg":
        if privacy.enabled:
            from models.privacy import DifferentiallyPrivate
            return DifferentiallyPrivate.from_config(FedAvg(policy=policy.individual()), privacy, dp_history)
        if privacy.secure_aggregation:
            from models.secure_aggregation import SecureAggregation
            if secure_round is None:
                raise AggregationError("secure aggregation: no announced cohort for this round")
            return SecureAggregation(FedAvg(policy=policy.individual()), secure_round)
        return FedAvg(policy=policy)
    if name == "median":
        return FedMedian(policy=policy)
    if name == "trimmed_mean":
        return FedTrimmedAvg(trim_fraction=agg.trim_fraction, policy=policy)
    if name == "clustered":
        return ClusteredFedAvg(clusters=agg.clusters, seed=cfg.model.seed, policy=policy)
    raise AggregationError(f"aggregation.strategy: unknown {name!r}; choose fedavg, median, trimmed_mean or clustered")
