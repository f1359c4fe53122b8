"""Aggregation over updates that stay in the partitions that decoded them: the driver gets sums, not vectors.

A round of 10,000 subspace devices holds 10,000 codec vectors of 4,655 float64 (372 MB). Collecting them to
the Spark driver and taking a coordinate-wise median there costs more than the whole round may. Here each
partition keeps its devices' vectors (a `VectorBlock`) and the driver asks for reductions (`Partitions.map`):

1. when the blocks are made: device ids, sample counts, L2 norms, and each coordinate's range (`block_summary`);
2. the coordinate-wise median of a set of devices, exactly (`exact_coordinate_median`): one pass counts each
   coordinate's values in ``bins`` bins (at most one per device), a second returns only the values in the bins
   that hold the middle ranks (~3·n/bins values per coordinate for a unimodal coordinate, instead of n). Long
   vectors take these two passes a span of coordinates at a time, so that neither a block's reply nor its
   temporary arrays exceed `HISTOGRAM_BYTES`; a block of few rows sends its rows' bins instead of counts;
3. cosine similarities to that median, together with the partial FedAvg sums at the sample cap the cohort has
   if the cosine check refuses nobody (`block_cosines`); a further pass of partial sums only when it did and the
   cap moved (`block_weighted_sum`);
4. the coordinate-wise trimmed mean, exactly: the median's histograms locate each coordinate's first and last kept
   rank, and a second pass returns the sums of the bins between them and the values in those two bins
   (`block_trim_parts`);
5. DP-FedAvg: the sum of the sampled devices' differences from the current model, each clipped (`block_clipped_sum`);
6. clustering: k-means++ and Lloyd's passes for every restart at once (`block_kmeans_pass`: each row's distance to
   its nearest centre, each centre's sum and count), the few seed vectors fetched by id (`block_vectors`), then
   one pass of each cluster's FedAvg sums (`block_cluster_sums`).

The results equal the in-memory strategies' of `models.aggregation` and `models.privacy`: the same checks
(`cohort_rejections`, `ValidationPolicy.require`), the same reasons, the same median to the bit, the same clusters
and DP samples, and the sums up to the order in which they add (~1e-16 relative). Every strategy `make_strategy`
builds has a rule here; the driver never holds the vectors (secure aggregation's masked words take another path).

>>> rng = np.random.default_rng(0)
>>> blocks = [VectorBlock(i, [f"d{i}{j}" for j in range(5)], np.full(5, 10), rng.normal(size=(5, 3)))
...           for i in range(3)]
>>> cohort = Cohort.gather(LocalPartitions(blocks), bins=4)
>>> everyone = np.vstack([b.vectors for b in blocks])
>>> bool(np.array_equal(cohort.median(cohort.device_ids), np.median(everyone, axis=0)))
True
>>> result = aggregate(FedAvg(policy=ValidationPolicy(min_cosine=None)), cohort)
>>> bool(np.allclose(result.weights[0], everyone.mean(axis=0))), len(result.participants)
(True, 15)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from models import aggregation
from models.aggregation import (ClusteredFedAvg, FedAvg, FedMedian, FedTrimmedAvg, ValidationPolicy, bounded_weights,
                                centre_sums, cluster_models, cohort_rejections, cosine_similarity, kmeans_centres,
                                kmeans_pass, kmeans_restarts_at_once, nearest_centres, sample_cap, structure_problem,
                                trimmed_count)
from models.privacy import NOT_THIS_ARCHITECTURE, DifferentiallyPrivate, clip_by_l2_norm
from models.updates import AggregationError, AggregationResult, Update, flatten

__all__ = ["VectorBlock", "BlockSummary", "Partitions", "LocalPartitions", "Cohort", "exact_coordinate_median",
           "exact_coordinate_trimmed_mean", "histogram_counts", "aggregate", "block_summary", "bin_of",
           "PARTITIONED_RULES"]

# What one pass of the median may hold per partition: its reply (counts: coordinates × (bins + 2) int64) and its
# temporary arrays (rows binned at once × coordinates float64). Devices of 200 metrics in windows of 5 have vectors
# of 501,500 coordinates: 1 GB of counts per partition at 256 bins in one pass, which the JVM refused.
HISTOGRAM_BYTES = 32 * 1024 * 1024


@dataclass
class VectorBlock:
    """One partition's updates in the codec's vector space: row i is device ``device_ids[i]``."""

    index: int
    device_ids: list[str]
    n_samples: np.ndarray
    vectors: np.ndarray

    def rows(self, excluded: frozenset[str]) -> np.ndarray:
        """Indices of the rows whose device is not in ``excluded``."""
        return np.array([i for i, d in enumerate(self.device_ids) if d not in excluded], dtype=np.int64)


@dataclass
class BlockSummary:
    """What the driver learns of a block when it is made (`block_summary`)."""

    index: int
    device_ids: list[str]
    n_samples: list[int]
    norms: list[float]
    length: int
    low: np.ndarray | None
    high: np.ndarray | None


class Partitions(Protocol):
    """Blocks held elsewhere (a persisted Spark RDD of one block per partition, or `LocalPartitions`):
    ``map(fn)`` runs ``fn(block)`` where each block lives and returns the results, in block order."""

    def map(self, fn: Callable[[VectorBlock], Any]) -> list: ...


@dataclass
class LocalPartitions:
    """Blocks in this process (tests, and one-process runs)."""

    blocks: list[VectorBlock]

    def map(self, fn: Callable[[VectorBlock], Any]) -> list:
        return [fn(block) for block in self.blocks]


# ---------------------------------------------------------------- executor side: one block each

def block_summary(block: VectorBlock, range_norm_ratio: float | None = None) -> BlockSummary:
    """Ids, counts and norms (the numbers `validate_updates` computes), and each coordinate's range over the rows
    whose norm is at most ``range_norm_ratio`` × the block's median norm (all rows if None): the span the median
    pass bins, kept free of the scaled updates the norm check will refuse anyway. Values outside it still count
    (end bins), so the range only affects speed, never the result."""
    norms = [float(np.linalg.norm(v)) for v in block.vectors]
    low = high = None
    if norms:
        typical = np.asarray(norms) <= (range_norm_ratio or np.inf) * float(np.median(norms))
        spanned = block.vectors[typical] if typical.any() and not typical.all() else block.vectors
        low, high = spanned.min(axis=0), spanned.max(axis=0)
    return BlockSummary(block.index, list(block.device_ids), [int(n) for n in block.n_samples], norms,
                        int(block.vectors.shape[1]) if block.vectors.ndim == 2 else 0, low, high)


def bin_of(values: np.ndarray, low: np.ndarray, high: np.ndarray, bins: int) -> np.ndarray:
    """Each value's bin for its coordinate, 0..bins + 1: ``bins`` equal bins from ``low`` to ``high`` (a coordinate
    with ``low == high`` gets a sliver of width ~1e-12·|low|), 0 below, ``bins + 1`` from ``high`` up.

    Only monotonicity matters for the median (a smaller value never lands in a higher bin), and plain IEEE
    arithmetic keeps it: a value gets the same bin in every pass and on every executor. Values outside the range
    still count, in the end bins, so a range that misses values costs speed, never exactness."""
    span = high - low
    span = np.where(span > 0, span, np.maximum(np.abs(low), 1.0) * 1e-12)
    scaled = values - low
    with np.errstate(over="ignore"):  # far outside the range: ±inf, clipped to an end bin like any outlier
        scaled /= span  # first: bins / span overflows for a subnormal span, and 0 · inf is nan (no bin at all)
        scaled *= bins
    scaled += 1.0
    np.clip(scaled, 0.0, bins + 1.0, out=scaled)
    return scaled.astype(np.int32)


def rows_at_once(columns: int) -> int:
    """How many rows of ``columns`` coordinates a block bins at once (`HISTOGRAM_BYTES` of float64)."""
    return max(1, HISTOGRAM_BYTES // (8 * max(columns, 1)))


def _binned_rows(block: VectorBlock, rows: np.ndarray, low: np.ndarray, high: np.ndarray, bins: int, column: int):
    """(values, bins) of the given rows, for the coordinates from ``column`` on that ``low`` covers, a few rows at
    a time (`rows_at_once`)."""
    step = rows_at_once(low.shape[0])
    for start in range(0, rows.size, step):
        chunk = block.vectors[rows[start:start + step], column:column + low.shape[0]]
        yield chunk, bin_of(chunk, low, high, bins)


def block_histogram(block: VectorBlock, excluded: frozenset[str], low: np.ndarray, high: np.ndarray,
                    bins: int, column: int = 0) -> np.ndarray:
    """The included rows' values per coordinate and bin (`bin_of`), for the coordinates from ``column`` on that
    ``low`` and ``high`` cover: counts (columns, bins + 2; int64), or each row's bins (rows, columns; uint16) when
    those are fewer bytes. `histogram_counts` adds replies of either kind."""
    columns = low.shape[0]
    rows = block.rows(excluded)
    if rows.size * 2 < (bins + 2) * 8 and bins < np.iinfo(np.uint16).max:  # a uint16 per row < an int64 per bin
        return np.vstack([b.astype(np.uint16) for _, b in _binned_rows(block, rows, low, high, bins, column)]
                         or [np.zeros((0, columns), dtype=np.uint16)])
    offsets = np.arange(columns) * (bins + 2)
    counts = np.zeros(columns * (bins + 2), dtype=np.int64)
    for _, binned in _binned_rows(block, rows, low, high, bins, column):
        counts += np.bincount((binned + offsets).ravel(), minlength=counts.size)
    return counts.reshape(columns, bins + 2)


def histogram_counts(replies: Sequence[np.ndarray], columns: int, bins: int) -> np.ndarray:
    """The counts (columns, bins + 2) that `block_histogram` replies of either kind add up to."""
    counts = np.zeros(columns * (bins + 2), dtype=np.int64)
    offsets = np.arange(columns) * (bins + 2)
    step = rows_at_once(columns)
    for reply in replies:
        if reply.dtype == np.uint16:
            for start in range(0, reply.shape[0], step):
                counts += np.bincount((reply[start:start + step] + offsets).ravel(), minlength=counts.size)
        else:
            counts += reply.ravel()
    return counts.reshape(columns, bins + 2)


def block_bin_values(block: VectorBlock, excluded: frozenset[str], low: np.ndarray, high: np.ndarray, bins: int,
                     first: np.ndarray, last: np.ndarray, column: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(coordinate, value) of the included rows' values that fall in bins ``first[j]..last[j]`` of coordinate j,
    for the coordinates from ``column`` on that ``low`` and ``high`` cover (j counted from ``column``)."""
    coordinates, values = [], []
    for chunk, binned in _binned_rows(block, block.rows(excluded), low, high, bins, column):
        hit_rows, hit_columns = np.nonzero((binned >= first) & (binned <= last))
        coordinates.append(hit_columns.astype(np.int32))
        values.append(chunk[hit_rows, hit_columns])
    if not values:
        return np.zeros(0, dtype=np.int32), np.zeros(0)
    return np.concatenate(coordinates), np.concatenate(values)


def block_trim_parts(block: VectorBlock, excluded: frozenset[str], low: np.ndarray, high: np.ndarray, bins: int,
                     lower: np.ndarray, upper: np.ndarray, column: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the included rows and the coordinates from ``column`` on that ``low`` and ``high`` cover: the sum of each
    coordinate's values in the bins strictly between ``lower[j]`` and ``upper[j]`` (all kept by the trimmed mean),
    and (coordinate, value) of those in bin ``lower[j]`` or ``upper[j]`` (kept or not by their rank)."""
    between = np.zeros(low.shape[0])
    coordinates, values = [], []
    for chunk, binned in _binned_rows(block, block.rows(excluded), low, high, bins, column):
        between += np.where((binned > lower) & (binned < upper), chunk, 0.0).sum(axis=0)
        edge_rows, edge_columns = np.nonzero((binned == lower) | (binned == upper))
        coordinates.append(edge_columns.astype(np.int32))
        values.append(chunk[edge_rows, edge_columns])
    if not values:
        return between, np.zeros(0, dtype=np.int32), np.zeros(0)
    return between, np.concatenate(coordinates), np.concatenate(values)


def block_cosines(block: VectorBlock, device_ids: frozenset[str], median: np.ndarray, min_cosine: float,
                  cap: float | None) -> tuple[dict[str, float], np.ndarray]:
    """Cosine similarity to ``median`` of the rows of ``device_ids``, and the sum of ``min(n_samples, cap)`` ×
    vector over those of them the check keeps (cosine ≥ ``min_cosine``): FedAvg's partial sum if the cap holds."""
    cosines: dict[str, float] = {}
    total = np.zeros(block.vectors.shape[1] if block.vectors.ndim == 2 else 0)
    kept, weights = [], []
    for i, device in enumerate(block.device_ids):
        if device in device_ids:
            cosines[device] = cosine_similarity(block.vectors[i], median)
            if cosines[device] >= min_cosine:
                kept.append(i)
                weights.append(float(block.n_samples[i]) if cap is None else min(float(block.n_samples[i]), cap))
    if kept:
        total = np.asarray(weights) @ block.vectors[kept]
    return cosines, total


def block_weighted_sum(block: VectorBlock, weights: dict[str, float]) -> np.ndarray:
    """Σ weight × vector over the rows whose device has a weight."""
    rows = [i for i, d in enumerate(block.device_ids) if d in weights]
    if not rows:
        return np.zeros(block.vectors.shape[1] if block.vectors.ndim == 2 else 0)
    return np.array([weights[block.device_ids[i]] for i in rows]) @ block.vectors[rows]


def block_clipped_sum(block: VectorBlock, device_ids: frozenset[str], base: np.ndarray, clip_norm: float
                      ) -> np.ndarray:
    """Σ of the rows of ``device_ids``, each as its difference from ``base`` clipped to L2 norm ``clip_norm``
    (DP-FedAvg's sum, whose sensitivity is the clip norm)."""
    total = np.zeros(base.shape)
    for i, device in enumerate(block.device_ids):
        if device in device_ids:
            total += clip_by_l2_norm(block.vectors[i] - base, clip_norm)
    return total


def block_vectors(block: VectorBlock, device_ids: frozenset[str]) -> dict[str, np.ndarray]:
    """The vectors of those of ``device_ids`` this block holds."""
    return {d: block.vectors[i] for i, d in enumerate(block.device_ids) if d in device_ids}


def block_kmeans_pass(block: VectorBlock, excluded: frozenset[str], centres: np.ndarray, with_sums: bool):
    """`kmeans_pass` over the included rows (squared distances in row order)."""
    return kmeans_pass(block.vectors, centres, with_sums, block.rows(excluded))


def block_cluster_sums(block: VectorBlock, excluded: frozenset[str], centres: np.ndarray, cap: float | None
                       ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The included rows' devices, their nearest centre (k, D), and each centre's Σ min(n_samples, cap)·vector and
    Σ min(n_samples, cap) over them."""
    rows = block.rows(excluded)
    k = centres.shape[0]
    if not rows.size:
        return [], np.zeros(0, dtype=np.int64), np.zeros((k, centres.shape[1])), np.zeros(k)
    labels, _ = nearest_centres(block.vectors, centres[None])
    counted = np.full(labels.shape[1], -1)
    counted[rows] = labels[0, rows]
    weights = block.n_samples.astype(np.float64)
    if cap is not None:
        weights = np.minimum(weights, cap)
    sums, totals = centre_sums(block.vectors, counted[None], k, weights)
    return [block.device_ids[i] for i in rows], labels[0, rows], sums[0], totals[0]


# ---------------------------------------------------------------- driver side

def exact_coordinate_median(partitions: Partitions, excluded: frozenset[str], n: int, low: np.ndarray,
                            high: np.ndarray, bins: int, histogram_bytes: int = HISTOGRAM_BYTES) -> np.ndarray:
    """The coordinate-wise median (`np.median`, to the bit) of the ``n`` rows not in ``excluded``, in two passes
    per span of coordinates whose histograms fit in ``histogram_bytes`` per partition: per-coordinate histograms
    of at most ``min(bins, n)`` bins, then the values of the bins holding ranks ⌊(n−1)/2⌋ and ⌊n/2⌋."""
    return _by_spans(partial(_span_median, partitions, excluded, n), n, low, high, bins, histogram_bytes)


def exact_coordinate_trimmed_mean(partitions: Partitions, excluded: frozenset[str], n: int, trimmed: int,
                                  low: np.ndarray, high: np.ndarray, bins: int,
                                  histogram_bytes: int = HISTOGRAM_BYTES) -> np.ndarray:
    """The coordinate-wise mean of ranks ``trimmed``..``n − trimmed − 1`` of the ``n`` rows not in ``excluded`` (the
    in-memory `trimmed_mean` up to the order in which the sum adds), in two passes per span of coordinates as
    `exact_coordinate_median`: histograms, then the sums of the bins between the two edge ranks' bins and the
    values in those two bins."""
    return _by_spans(partial(_span_trimmed_mean, partitions, excluded, n, trimmed), n, low, high, bins,
                     histogram_bytes)


def _by_spans(span_fn, n: int, low: np.ndarray, high: np.ndarray, bins: int, histogram_bytes: int) -> np.ndarray:
    """``span_fn(low, high, bins, column)`` for each span of coordinates whose histograms of at most
    ``min(bins, n)`` bins fit in ``histogram_bytes``, concatenated."""
    bins = max(1, min(bins, n))
    span = max(1, histogram_bytes // ((bins + 2) * np.dtype(np.int64).itemsize))
    return np.concatenate([span_fn(low[c:c + span], high[c:c + span], bins, c)
                           for c in range(0, low.shape[0], span)] or [np.zeros(0)])


def _rank_bins(partitions: Partitions, excluded: frozenset[str], low: np.ndarray, high: np.ndarray, bins: int,
               column: int, ranks: Sequence[int]) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """The first pass: the histograms' counts (coordinates, bins + 2) and, for each rank, each coordinate's bin
    holding it and the number of values in the bins below that one."""
    counts = histogram_counts(partitions.map(partial(block_histogram, excluded=excluded, low=low, high=high,
                                                     bins=bins, column=column)), low.shape[0], bins)
    below_rank = np.cumsum(counts, axis=1)
    columns = np.arange(counts.shape[0])
    found = []
    for rank in ranks:
        holding = (below_rank <= rank).sum(axis=1)
        found.append((holding, np.where(holding > 0, below_rank[columns, np.maximum(holding - 1, 0)], 0)))
    return counts, found


def _by_coordinate(found: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The blocks' (coordinate, value) replies in one pair of arrays, by coordinate, then value."""
    coordinates = np.concatenate([c for c, _ in found])
    values = np.concatenate([v for _, v in found])
    order = np.lexsort((values, coordinates))
    return coordinates[order], values[order]


def _span_median(partitions: Partitions, excluded: frozenset[str], n: int, low: np.ndarray, high: np.ndarray,
                 bins: int, column: int) -> np.ndarray:
    """`exact_coordinate_median` of the coordinates from ``column`` on that ``low`` and ``high`` cover."""
    lower, upper = (n - 1) // 2, n // 2
    _, [(first, before), (last, _)] = _rank_bins(partitions, excluded, low, high, bins, column, (lower, upper))
    coordinates, values = _by_coordinate(partitions.map(partial(block_bin_values, excluded=excluded, low=low,
                                                                high=high, bins=bins, first=first, last=last,
                                                                column=column)))
    starts = np.searchsorted(coordinates, np.arange(low.shape[0]))
    low_value = values[starts + lower - before]
    if n % 2:
        return low_value
    return (low_value + values[starts + upper - before]) / 2


def _span_trimmed_mean(partitions: Partitions, excluded: frozenset[str], n: int, trimmed: int, low: np.ndarray,
                       high: np.ndarray, bins: int, column: int) -> np.ndarray:
    """`exact_coordinate_trimmed_mean` of the coordinates from ``column`` on that ``low`` and ``high`` cover."""
    first_rank, last_rank = trimmed, n - trimmed - 1
    counts, [(lower, before_lower), (upper, before_upper)] = _rank_bins(partitions, excluded, low, high, bins,
                                                                          column, (first_rank, last_rank))
    found = partitions.map(partial(block_trim_parts, excluded=excluded, low=low, high=high, bins=bins,
                                   lower=lower, upper=upper, column=column))
    between = np.sum([b for b, _, _ in found], axis=0)
    coordinates, values = _by_coordinate([(c, v) for _, c, v in found])
    columns = np.arange(low.shape[0])
    position = np.arange(coordinates.size) - np.searchsorted(coordinates, columns)[coordinates]
    in_lower = counts[columns, lower][coordinates]   # a coordinate's values of its lower bin come first
    rank = np.where(position < in_lower, before_lower[coordinates] + position,
                    before_upper[coordinates] + position - in_lower)
    kept = (rank >= first_rank) & (rank <= last_rank)
    edges = np.bincount(coordinates[kept], weights=values[kept], minlength=columns.size)
    return (between + edges) / (n - 2 * trimmed)


def _total(partial_sums: list[np.ndarray]) -> np.ndarray:
    """The sum of the blocks' partial sums (a block without rows contributes an empty array)."""
    return np.sum([s for s in partial_sums if s.size], axis=0)


@dataclass
class Cohort:
    """The driver's view of partitioned updates: ids (in block order), counts and norms; the vectors stay in the
    partitions, reached through reductions (`median`, `trimmed_mean`, `cosines_and_sums`, `weighted_sum`,
    `clipped_sum`, `kmeans_pass`, `cluster_sums`) and, for a few seed vectors, `vectors_of`."""

    partitions: Partitions
    summaries: list[BlockSummary]
    bins: int = 256
    device_ids: list[str] = field(init=False)
    n_samples: dict[str, int] = field(init=False)
    norms: dict[str, float] = field(init=False)

    def __post_init__(self):
        self.device_ids = [d for s in self.summaries for d in s.device_ids]
        self.n_samples = {d: n for s in self.summaries for d, n in zip(s.device_ids, s.n_samples)}
        self.norms = {d: x for s in self.summaries for d, x in zip(s.device_ids, s.norms)}
        if len(self.n_samples) != len(self.device_ids):
            raise ValueError("partitioned updates: a device appears in more than one row (one update per device)")

    @classmethod
    def gather(cls, partitions: Partitions, range_norm_ratio: float | None = None, bins: int = 256) -> "Cohort":
        """Summarise every block (the pass that also makes and caches them, on Spark)."""
        return cls(partitions, partitions.map(partial(block_summary, range_norm_ratio=range_norm_ratio)), bins)

    @property
    def length(self) -> int:
        """The vectors' length (0 without any update)."""
        return max((s.length for s in self.summaries if s.device_ids), default=0)

    def _excluding(self, device_ids: Sequence[str]) -> frozenset[str]:
        keep = set(device_ids)
        return frozenset(d for d in self.device_ids if d not in keep)

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        """Each coordinate's range over the blocks' summaries (the span the histograms bin)."""
        spans = [(s.low, s.high) for s in self.summaries if s.low is not None]
        return np.min([lo for lo, _ in spans], axis=0), np.max([hi for _, hi in spans], axis=0)

    def median(self, device_ids: Sequence[str]) -> np.ndarray:
        """The coordinate-wise median of these devices' vectors."""
        return exact_coordinate_median(self.partitions, self._excluding(device_ids), len(device_ids),
                                       *self._range(), self.bins)

    def trimmed_mean(self, device_ids: Sequence[str], trimmed: int) -> np.ndarray:
        """The coordinate-wise mean of these devices' vectors without the ``trimmed`` lowest and highest values."""
        return exact_coordinate_trimmed_mean(self.partitions, self._excluding(device_ids), len(device_ids), trimmed,
                                             *self._range(), self.bins)

    def cosines_and_sums(self, device_ids: Sequence[str], median: np.ndarray, min_cosine: float,
                         cap: float | None) -> tuple[dict[str, float], np.ndarray]:
        """Cosines to ``median`` and Σ min(n, cap)·vector over the devices the cosine check keeps (`block_cosines`)."""
        found = self.partitions.map(partial(block_cosines, device_ids=frozenset(device_ids), median=median,
                                            min_cosine=min_cosine, cap=cap))
        cosines = {d: c for part, _ in found for d, c in part.items()}
        return cosines, _total([total for _, total in found])

    def weighted_sum(self, weights: dict[str, float]) -> np.ndarray:
        """Σ weight × vector over the devices in ``weights``."""
        return _total(self.partitions.map(partial(block_weighted_sum, weights=weights)))

    def clipped_sum(self, device_ids: Sequence[str], base: np.ndarray, clip_norm: float) -> np.ndarray:
        """Σ over these devices of their vector's difference from ``base``, clipped to L2 norm ``clip_norm``."""
        found = self.partitions.map(partial(block_clipped_sum, device_ids=frozenset(device_ids), base=base,
                                            clip_norm=clip_norm))
        return np.sum(found, axis=0) if found else np.zeros(base.shape)

    def vectors_of(self, device_ids: Sequence[str]) -> np.ndarray:
        """These devices' vectors (n, D), in the order asked (a device may be asked for more than once)."""
        found: dict[str, np.ndarray] = {}
        for part in self.partitions.map(partial(block_vectors, device_ids=frozenset(device_ids))):
            found.update(part)
        return np.stack([found[d] for d in device_ids])

    def kmeans_pass(self, excluded: frozenset[str], centres: np.ndarray, with_sums: bool):
        """`kmeans_pass` over the rows not in ``excluded``, in every partition: distances in cohort order, sums."""
        found = self.partitions.map(partial(block_kmeans_pass, excluded=excluded, centres=centres,
                                            with_sums=with_sums))
        d2 = np.concatenate([f[0] for f in found], axis=1)
        if not with_sums:
            return d2, None, None
        return d2, np.sum([f[1] for f in found], axis=0), np.sum([f[2] for f in found], axis=0)

    def cluster_sums(self, excluded: frozenset[str], centres: np.ndarray, cap: float | None
                     ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """`block_cluster_sums` over every partition: devices and labels in cohort order, summed sums and totals."""
        found = self.partitions.map(partial(block_cluster_sums, excluded=excluded, centres=centres, cap=cap))
        return ([d for ids, _, _, _ in found for d in ids], np.concatenate([labels for _, labels, _, _ in found]),
                np.sum([sums for _, _, sums, _ in found], axis=0), np.sum([t for _, _, _, t in found], axis=0))

def _checked(policy: ValidationPolicy, cohort: Cohort, min_cosine: float | None, cosines_to
             ) -> tuple[list[str], list[tuple[str, str]]]:
    """`validate_updates` on the cohort: the per-device checks ran on the wire weights when the blocks were made
    (`spark_jobs.snapshots.check_snapshot`, one update per device), so in codec space only the length can be off."""
    valid, rejected = list(cohort.device_ids), []
    if policy.reference_shapes is not None and cohort.length:
        stand_in = [np.zeros(cohort.length)]
        problems = {d: structure_problem(Update(d, stand_in, cohort.n_samples[d]), policy.reference_shapes)
                    for d in valid}
        rejected = [(d, p) for d, p in problems.items() if p]
        valid = [d for d in valid if not problems[d]]
    if not valid:
        return [], rejected
    accepted, refused = cohort_rejections(valid, cohort.norms, policy.max_norm_ratio, min_cosine, cohort.median,
                                          cosines_to)
    return accepted, rejected + refused


def _cosines(cohort: Cohort, min_cosine: float, within: list[str], median: np.ndarray) -> dict[str, float]:
    """The cosine check's similarities of ``within`` to ``median`` (rules that need no FedAvg sums with them)."""
    return cohort.cosines_and_sums(within, median, min_cosine, None)[0]


def fedavg_partitioned(strategy: FedAvg, cohort: Cohort) -> AggregationResult:
    """`FedAvg.aggregate` on a partitioned cohort (module docstring)."""
    policy = strategy.policy
    prefetched: dict[str, Any] = {}

    def cosines_to(within: list[str], median: np.ndarray) -> dict[str, float]:
        cap = sample_cap([cohort.n_samples[d] for d in within], policy.sample_cap_factor)  # if nobody is refused
        cosines, total = cohort.cosines_and_sums(within, median, policy.min_cosine, cap)
        prefetched.update(cap=cap, total=total, kept={d for d in within if cosines[d] >= policy.min_cosine})
        return cosines

    accepted, rejected = _checked(policy, cohort, policy.min_cosine, cosines_to)
    policy.require(len(accepted), rejected, strategy.name)
    counts = [cohort.n_samples[d] for d in accepted]
    weights = bounded_weights(counts, policy.sample_cap_factor)
    cap = sample_cap(counts, policy.sample_cap_factor)
    if prefetched and prefetched["kept"] == set(accepted) and prefetched["cap"] == cap:
        total = prefetched["total"]
    else:
        total = cohort.weighted_sum(dict(zip(accepted, weights.tolist())))
    if weights.sum() <= 0:
        raise AggregationError("FedAvg weights models by n_samples, and the total is not positive")
    return AggregationResult([total / weights.sum()], accepted, rejected, dict(cohort.norms), strategy.name,
                             extra={"n_samples": int(round(float(weights.sum())))})


def median_partitioned(strategy: FedMedian, cohort: Cohort) -> AggregationResult:
    """`FedMedian.aggregate` on a partitioned cohort."""
    policy = strategy.policy

    accepted, rejected = _checked(policy, cohort, policy.min_cosine, partial(_cosines, cohort, policy.min_cosine))
    policy.require(len(accepted), rejected, strategy.name, strategy.needed, strategy.why)
    weights = bounded_weights([cohort.n_samples[d] for d in accepted], policy.sample_cap_factor)
    return AggregationResult([cohort.median(accepted)], accepted, rejected, dict(cohort.norms), strategy.name,
                             extra={"n_samples": int(round(float(weights.sum())))})


def trimmed_mean_partitioned(strategy: FedTrimmedAvg, cohort: Cohort) -> AggregationResult:
    """`FedTrimmedAvg.aggregate` on a partitioned cohort."""
    policy = strategy.policy

    accepted, rejected = _checked(policy, cohort, policy.min_cosine, partial(_cosines, cohort, policy.min_cosine))
    policy.require(len(accepted), rejected, strategy.name, strategy.needed, strategy.why)
    trimmed = trimmed_count(len(accepted), strategy.trim_fraction)
    weights = bounded_weights([cohort.n_samples[d] for d in accepted], policy.sample_cap_factor)
    return AggregationResult([cohort.trimmed_mean(accepted, trimmed)], accepted, rejected, dict(cohort.norms),
                             strategy.name, extra={"trim_fraction": strategy.trim_fraction,
                                                   "n_samples": int(round(float(weights.sum())))})


def dp_fedavg_partitioned(strategy: DifferentiallyPrivate, cohort: Cohort, current: list[np.ndarray] | None
                          ) -> AggregationResult:
    """`DifferentiallyPrivate.aggregate` around FedAvg on a partitioned cohort: the same checks (each device on its
    own), sampling and noise; the clipped differences from ``current`` are summed in the partitions."""
    shapes = strategy.inner.policy.reference_shapes or (
        [np.shape(w) for w in current] if current is not None else None)
    accepted, rejected = list(cohort.device_ids), []
    if shapes is not None:
        lengths = {d: s.length for s in cohort.summaries for d in s.device_ids}
        wrong = {d for d in accepted if structure_problem(Update(d, [np.zeros(lengths[d])], 1), shapes)}
        rejected = [(d, NOT_THIS_ARCHITECTURE) for d in accepted if d in wrong]
        accepted = [d for d in accepted if d not in wrong]
    sampled = strategy.sample(accepted)
    if len(sampled) < max(1, strategy.inner.policy.min_devices):
        raise strategy.too_few(len(sampled), len(cohort.device_ids))
    base = flatten(current) if current is not None else np.zeros(cohort.length)
    like = current if current is not None else [np.zeros(cohort.length)]
    total = cohort.clipped_sum(sampled, base, strategy.clip_norm)
    return strategy.release(base + total / len(sampled), sampled, rejected, len(accepted), like)


def clustered_partitioned(strategy: ClusteredFedAvg, cohort: Cohort) -> AggregationResult:
    """`ClusteredFedAvg.aggregate` on a partitioned cohort: k-means passes, then one pass of each cluster's sums."""
    policy = strategy.policy

    accepted, rejected = _checked(policy, cohort, policy.min_cosine, partial(_cosines, cohort, policy.min_cosine))
    policy.require(len(accepted), rejected, strategy.name, strategy.needed, strategy.why)
    counts = [cohort.n_samples[d] for d in accepted]
    weights = bounded_weights(counts, policy.sample_cap_factor)
    if len(accepted) * cohort.length * 8 <= aggregation.KMEANS_FETCH_BYTES:  # a few devices: fetched once
        fleet, assignment, cluster_vectors = strategy.cluster(cohort.vectors_of(accepted), accepted, weights)
    else:
        cap = sample_cap(counts, policy.sample_cap_factor)
        excluded = cohort._excluding(accepted)
        centres = kmeans_centres(len(accepted), lambda indices: cohort.vectors_of([accepted[i] for i in indices]),
                                 partial(cohort.kmeans_pass, excluded), strategy.clusters, strategy.seed,
                                 at_once=kmeans_restarts_at_once(strategy.clusters, cohort.length))
        fleet, assignment, cluster_vectors = cluster_models(*cohort.cluster_sums(excluded, centres, cap))
    return AggregationResult([fleet], accepted, rejected, dict(cohort.norms), strategy.name,
                             extra={"clusters": assignment, "cluster_weights": [[v] for v in cluster_vectors],
                                    "n_samples": int(round(float(weights.sum())))})


PARTITIONED_RULES = {FedAvg: fedavg_partitioned, FedMedian: median_partitioned, FedTrimmedAvg: trimmed_mean_partitioned,
                     ClusteredFedAvg: clustered_partitioned}


def aggregate(strategy, cohort: Cohort, current: list[np.ndarray] | None = None) -> AggregationResult:
    """``strategy.aggregate`` on partitioned updates: in the partitions for the strategies in `PARTITIONED_RULES`
    (FedAvg, the median and the trimmed mean, each with its validation policy) and DP-FedAvg, else on the collected
    vectors."""
    if isinstance(strategy, DifferentiallyPrivate) and type(strategy.inner) is FedAvg:
        return dp_fedavg_partitioned(strategy, cohort, current)
    rule = PARTITIONED_RULES.get(type(strategy))
    if rule is None:
        raise AggregationError(f"{getattr(strategy, 'name', type(strategy).__name__)}: no form that aggregates "
                               f"inside the partitions (models.partitioned.PARTITIONED_RULES)")
    return rule(strategy, cohort)
