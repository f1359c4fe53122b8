"""Federated aggregation: pure rules over weighted updates, validation, and thin strategies.

The rules follow Flower's ``aggregate.py``: plain functions over ``list[(weights, n_samples)]`` returning one
list of arrays. A strategy validates the updates, decides who takes part and calls one rule.

>>> a = ([np.array([0.0, 0.0])], 1)
>>> b = ([np.array([3.0, 6.0])], 2)
>>> fedavg([a, b])[0]
array([2., 4.])
>>> coordinate_median([a, b, ([np.array([1.0, 1.0])], 5)])[0]
array([1., 1.])
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

Weights = list[np.ndarray]
WeightedWeights = tuple[Weights, int]


class AggregationError(ValueError):
    """The updates of a round cannot be aggregated (too few, or a rule's precondition does not hold)."""


@dataclass(frozen=True)
class Update:
    """One device's model after local training: its network weights and the readings they learned from."""

    device_id: str
    weights: Weights
    n_samples: int
    version: int = 0
    metadata: dict = field(default_factory=dict)


@dataclass
class AggregationResult:
    """The outcome of one round.

    ``weights`` is the new global model. ``rejected`` holds ``(device_id, reason)`` pairs, ``norms`` the L2 norm
    of every structurally valid update. ``extra`` carries strategy-specific facts: ``dp_epsilon`` (differential
    privacy), ``clusters`` (device → cluster) and ``cluster_weights`` (one model per cluster).
    """

    weights: Weights
    participants: list[str]
    rejected: list[tuple[str, str]]
    norms: dict[str, float]
    strategy: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return int(self.extra.get("n_samples", 0))


# ---------------------------------------------------------------- rules

def flatten(weights: Sequence[np.ndarray]) -> np.ndarray:
    """All layers as one float64 vector (the geometry norms, cosines and clustering work in)."""
    if not weights:
        return np.zeros(0)
    return np.concatenate([np.asarray(w, dtype=np.float64).ravel() for w in weights])


def unflatten(vector: np.ndarray, like: Sequence[np.ndarray]) -> Weights:
    """Split a flat vector back into layers shaped (and typed) like ``like``."""
    out, start = [], 0
    for layer in like:
        size = int(np.prod(layer.shape))
        out.append(vector[start:start + size].reshape(layer.shape).astype(layer.dtype))
        start += size
    return out


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
    if not 0.0 <= trim_fraction < 0.5:
        raise AggregationError(
            f"trim_fraction must be in [0, 0.5), got {trim_fraction}: the trimmed mean removes that fraction "
            "from each end, so 0.5 or more would remove every value")
    matrix, _, like = _stack(results)
    n = matrix.shape[0]
    k = int(np.floor(trim_fraction * n))
    if trim_fraction > 0 and k == 0:
        raise AggregationError(f"trimmed mean with β={trim_fraction} over n={n} updates trims ⌊βn⌋=0 from each end, "
                               f"i.e. it is the plain mean with no robustness; it needs n ≥ 1/β = "
                               f"{int(np.ceil(1 / trim_fraction))} updates")
    ordered = np.sort(matrix, axis=0)
    return unflatten(ordered[k:n - k].mean(axis=0), like)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """cos(a, b), and 0 when either vector is zero (no direction to agree or disagree with)."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def kmeans(points: np.ndarray, k: int, seed: int, restarts: int = 5, iterations: int = 50) -> np.ndarray:
    """Seeded k-means++ (Arthur & Vassilvitskii 2007) with restarts; labels renumbered by first appearance."""
    n = points.shape[0]
    if not 1 <= k <= n:
        raise AggregationError(f"k-means with k={k} needs 1 ≤ k ≤ number of points ({n})")
    rng = np.random.default_rng(seed)
    best_labels, best_inertia = np.zeros(n, dtype=int), np.inf
    for _ in range(restarts):
        centres = [points[rng.integers(n)]]
        for _ in range(1, k):
            d2 = np.min([((points - c) ** 2).sum(axis=1) for c in centres], axis=0)
            probs = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
            centres.append(points[rng.choice(n, p=probs)])
        centres = np.array(centres)
        for _ in range(iterations):
            labels = ((points[:, None, :] - centres[None]) ** 2).sum(axis=2).argmin(axis=1)
            updated = np.array([points[labels == j].mean(axis=0) if np.any(labels == j) else centres[j]
                                for j in range(k)])
            if np.allclose(updated, centres):
                break
            centres = updated
        inertia = ((points - centres[labels]) ** 2).sum()
        if inertia < best_inertia - 1e-12:
            best_labels, best_inertia = labels, inertia
    order = {old: new for new, old in enumerate(dict.fromkeys(best_labels.tolist()))}
    return np.array([order[label] for label in best_labels.tolist()])


# ---------------------------------------------------------------- validation

def _structure_problem(update: Update, reference_shapes: Sequence[tuple[int, ...]]) -> str | None:
    if not isinstance(update.n_samples, (int, np.integer)) or update.n_samples <= 0:
        return f"n_samples must be a positive integer, got {update.n_samples!r}"
    if len(update.weights) != len(reference_shapes):
        return f"wrong number of layers: {len(update.weights)}, expected {len(reference_shapes)}"
    for i, (layer, shape) in enumerate(zip(update.weights, reference_shapes)):
        layer = np.asarray(layer)
        if layer.shape != tuple(shape):
            return f"layer {i}: wrong shape {layer.shape}, expected {tuple(shape)}"
        if not np.issubdtype(layer.dtype, np.floating):
            return f"layer {i}: wrong dtype {layer.dtype}, expected a floating-point type"
        if not np.all(np.isfinite(layer)):
            return f"layer {i}: non-finite values (NaN or infinity)"
    return None


def validate_updates(updates: Sequence[Update], reference_shapes: Sequence[tuple[int, ...]] | None = None,
                     max_norm_ratio: float = 10.0, min_cosine: float | None = 0.0,
                     ) -> tuple[list[Update], list[tuple[str, str]], dict[str, float]]:
    """Split updates into accepted and rejected ``(device_id, reason)``; also return the L2 norm of each.

    Checks, in order: positive ``n_samples``; number of layers and shapes against ``reference_shapes`` (default:
    the shapes most updates share); floating dtype; finite values; L2 norm at most ``max_norm_ratio`` × the
    cohort's median norm (scaled-up updates); cosine similarity to the coordinate-wise median of the cohort at
    least ``min_cosine`` (sign-flipped updates keep their norm but point the other way). The cosine check needs
    three or more updates, since with two the median is the mean and cannot say which one is honest; ``None``
    switches it off.
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
        problem = _structure_problem(update, reference_shapes)
        if problem:
            rejected.append((update.device_id, problem))
        else:
            valid.append(update)
    if not valid:
        return [], rejected, {}
    vectors = {u.device_id: flatten(u.weights) for u in valid}
    norms = {d: float(np.linalg.norm(v)) for d, v in vectors.items()}
    median_norm = float(np.median(list(norms.values())))
    limit = max_norm_ratio * median_norm
    within: list[Update] = []
    for u in valid:
        if median_norm > 0 and norms[u.device_id] > limit:
            rejected.append((u.device_id, f"norm {norms[u.device_id]:.4g} exceeds {max_norm_ratio:g} × the "
                                          f"cohort median norm {median_norm:.4g}"))
        else:
            within.append(u)
    if min_cosine is None or len(within) < 3:
        return within, rejected, norms
    median_vector = np.median(np.stack([vectors[u.device_id] for u in within]), axis=0)
    accepted = []
    for u in within:
        cos = cosine_similarity(vectors[u.device_id], median_vector)
        if cos < min_cosine:
            rejected.append((u.device_id, f"cosine similarity {cos:.3f} to the coordinate-wise median is below "
                                          f"{min_cosine:g} (points away from the cohort, e.g. a sign flip)"))
        else:
            accepted.append(u)
    return accepted, rejected, norms


# ---------------------------------------------------------------- strategies

@dataclass
class _Validated:
    accepted: list[Update]
    rejected: list[tuple[str, str]]
    norms: dict[str, float]

    @property
    def pairs(self) -> list[WeightedWeights]:
        return [(u.weights, int(u.n_samples)) for u in self.accepted]

    def result(self, weights: Weights, strategy: str, **extra: Any) -> AggregationResult:
        extra.setdefault("n_samples", int(sum(u.n_samples for u in self.accepted)))
        return AggregationResult(weights=weights, participants=[u.device_id for u in self.accepted],
                                 rejected=self.rejected, norms=self.norms, strategy=strategy, extra=extra)


@dataclass
class ValidationPolicy:
    """What every strategy checks first (see `validate_updates`), and how many devices a round needs."""

    min_devices: int = 2
    max_norm_ratio: float = 10.0
    min_cosine: float | None = 0.0
    reference_shapes: list[tuple[int, ...]] | None = None

    def apply(self, updates: Sequence[Update], strategy: str, needed: int = 1, why: str = "") -> _Validated:
        accepted, rejected, norms = validate_updates(updates, self.reference_shapes, self.max_norm_ratio,
                                                     self.min_cosine)
        needed = max(needed, self.min_devices)
        if len(accepted) < needed:
            reasons = "; ".join(f"{d}: {r}" for d, r in rejected) or "none rejected"
            raise AggregationError(f"{strategy}: {len(accepted)} valid update(s), needs at least {needed}"
                                   f"{' (' + why + ')' if why else ''}; rejected: {reasons}")
        return _Validated(accepted, rejected, norms)


@dataclass
class FedAvg:
    """Sample-weighted mean of the valid updates (McMahan et al. 2017). Efficient, not robust by itself.

    With ``privacy`` (a `models.privacy.DPFedAvgMechanism`) the updates' deltas from ``current`` are clipped
    and the mean is noised (DP-FedAvg); ``extra["dp_epsilon"]`` then reports the privacy spent so far.
    With ``secure_aggregation`` the mean is computed from pairwise-masked vectors
    (`models.secure_aggregation.secure_fedavg`); the server then never sees one update, so only the structural
    checks (layers, shapes, dtype, finite values, which clients run before masking) apply, not norms or cosines.
    """

    policy: ValidationPolicy = field(default_factory=ValidationPolicy)
    privacy: Any = None
    secure_aggregation: bool = False
    rounds_done: int = 0

    def aggregate(self, updates: Sequence[Update], current: Weights | None = None) -> AggregationResult:
        if self.secure_aggregation:
            from models.secure_aggregation import secure_fedavg
            structural = ValidationPolicy(self.policy.min_devices, np.inf, None, self.policy.reference_shapes)
            checked = structural.apply(updates, "secure-fedavg")
            self.rounds_done += 1
            return checked.result(secure_fedavg(checked.accepted, round_seed=self.rounds_done), "secure-fedavg")
        checked = self.policy.apply(updates, "fedavg")
        if self.privacy is None:
            return checked.result(fedavg(checked.pairs), "fedavg")
        weights = self.privacy.aggregate([u.weights for u in checked.accepted], current)
        return checked.result(weights, "dp-fedavg", dp_epsilon=self.privacy.epsilon(), dp_delta=self.privacy.delta)


@dataclass
class FedMedian:
    """Coordinate-wise median: robust while fewer than half of the updates are poisoned (needs ≥ 3 to out-vote one)."""

    policy: ValidationPolicy = field(default_factory=ValidationPolicy)

    def aggregate(self, updates: Sequence[Update]) -> AggregationResult:
        checked = self.policy.apply(updates, "median", needed=3,
                                    why="the median of two values is their mean, so it cannot out-vote a bad one")
        return checked.result(coordinate_median(checked.pairs), "median")


@dataclass
class FedTrimmedAvg:
    """Coordinate-wise trimmed mean with fraction β: tolerates ⌊βn⌋ poisoned updates, needs n ≥ 1/β to trim any."""

    trim_fraction: float = 0.1
    policy: ValidationPolicy = field(default_factory=ValidationPolicy)

    def aggregate(self, updates: Sequence[Update]) -> AggregationResult:
        needed = int(np.ceil(1 / self.trim_fraction)) if self.trim_fraction > 0 else 1
        checked = self.policy.apply(updates, "trimmed_mean", needed=needed,
                                    why=f"β={self.trim_fraction} trims ⌊βn⌋ updates per end, 0 below n=1/β")
        return checked.result(trimmed_mean(checked.pairs, self.trim_fraction), "trimmed_mean",
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

    def aggregate(self, updates: Sequence[Update]) -> AggregationResult:
        checked = self.policy.apply(updates, "clustered", needed=self.clusters,
                                    why=f"k-means into {self.clusters} clusters needs at least one device each")
        points = np.stack([flatten(u.weights) for u in checked.accepted])
        labels = kmeans(points, self.clusters, self.seed)
        pairs = checked.pairs
        cluster_weights = [fedavg([p for p, label in zip(pairs, labels) if label == c])
                           for c in range(self.clusters)]
        assignment = {u.device_id: int(label) for u, label in zip(checked.accepted, labels)}
        return checked.result(fedavg(pairs), "clustered", clusters=assignment, cluster_weights=cluster_weights)


def make_strategy(cfg, reference_shapes: list[tuple[int, ...]] | None = None):
    """The strategy named by ``cfg.aggregation.strategy``, with DP-FedAvg when ``cfg.privacy.enabled``."""
    agg = cfg.aggregation
    policy = ValidationPolicy(min_devices=agg.min_devices, max_norm_ratio=agg.max_norm_ratio,
                              min_cosine=agg.min_cosine, reference_shapes=reference_shapes)
    name = agg.strategy
    if (cfg.privacy.enabled or cfg.privacy.secure_aggregation) and name != "fedavg":
        raise AggregationError(f"privacy.enabled and privacy.secure_aggregation need aggregation.strategy fedavg, "
                               f"got {name!r}: DP noise is calibrated to a mean of clipped updates, and secure "
                               "aggregation reveals only a sum, not the individual values a median needs")
    if name == "fedavg":
        privacy = None
        if cfg.privacy.enabled:
            from models.privacy import DPFedAvgMechanism
            privacy = DPFedAvgMechanism(clip_norm=cfg.privacy.clip_norm,
                                        noise_multiplier=cfg.privacy.noise_multiplier,
                                        delta=cfg.privacy.delta, seed=cfg.model.seed)
        if privacy is not None and cfg.privacy.secure_aggregation:
            raise AggregationError("privacy.enabled with privacy.secure_aggregation is not supported: DP-FedAvg "
                                   "clips each update on the server, which secure aggregation hides from it")
        return FedAvg(policy=policy, privacy=privacy, secure_aggregation=cfg.privacy.secure_aggregation)
    if name == "median":
        return FedMedian(policy=policy)
    if name == "trimmed_mean":
        return FedTrimmedAvg(trim_fraction=agg.trim_fraction, policy=policy)
    if name == "clustered":
        return ClusteredFedAvg(clusters=agg.clusters, seed=cfg.model.seed, policy=policy)
    raise AggregationError(f"aggregation.strategy: unknown {name!r}; choose fedavg, median, trimmed_mean or clustered")
