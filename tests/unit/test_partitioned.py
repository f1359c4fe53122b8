"""models.partitioned: aggregation in partitions equals the in-memory strategies (checks, reasons, median bits)."""
from dataclasses import dataclass, field
from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from models.aggregation import (AggregationError, ClusteredFedAvg, FedAvg, FedMedian, FedTrimmedAvg, Update,
                                ValidationPolicy)
from models import aggregation
from models.privacy import DifferentiallyPrivate
from models.partitioned import (HISTOGRAM_BYTES, Cohort, LocalPartitions, VectorBlock, aggregate, bin_of,
                                block_histogram, exact_coordinate_median, exact_coordinate_trimmed_mean,
                                histogram_counts)


def split(vectors, n_samples, cuts, ids=None):
    """Rows split into blocks at ``cuts`` (sorted row indices), as partitions would hold them."""
    ids = ids or [f"d{i:03d}" for i in range(len(vectors))]
    bounds = [0, *cuts, len(vectors)]
    vectors = np.asarray(vectors)
    return [VectorBlock(k, ids[a:b], np.asarray(n_samples[a:b]), vectors[a:b])
            for k, (a, b) in enumerate(zip(bounds, bounds[1:]))]


@st.composite
def partitioned_rows(draw, max_rows=40):
    n = draw(st.integers(1, max_rows))
    length = draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["normal", "ties", "outliers"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "ties":
        vectors = rng.integers(-2, 3, size=(n, length)).astype(float)
    else:
        vectors = rng.normal(size=(n, length))
        if kind == "outliers":
            vectors[rng.random(n) < 0.2] *= 1e6
    cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=4))))
    return vectors, cuts, rng


@settings(max_examples=150, deadline=None)
@given(partitioned_rows(), st.integers(1, 9), st.data())
def test_exact_median_equals_numpy_to_the_bit(rows, bins, data):
    vectors, cuts, rng = rows
    blocks = split(vectors, [1] * len(vectors), cuts)
    ids = [d for b in blocks for d in b.device_ids]
    excluded = frozenset(d for d in ids if data.draw(st.booleans()) and len(ids) > 1 and d != ids[0])
    kept = np.array([d not in excluded for d in ids])
    # ranges that miss part of the data: values outside count in the end bins, the result stays exact
    low = np.quantile(vectors, 0.3, axis=0) if data.draw(st.booleans()) else vectors.min(axis=0)
    high = np.maximum(low, np.quantile(vectors, 0.6, axis=0))
    # histograms of all coordinates at once, of one coordinate per pass, or of three
    histogram_bytes = data.draw(st.sampled_from([HISTOGRAM_BYTES, 1, 3 * (bins + 2) * 8]))
    got = exact_coordinate_median(LocalPartitions(blocks), excluded, int(kept.sum()), low, high, bins,
                                  histogram_bytes)
    want = np.median(vectors[kept], axis=0)
    assert np.array_equal(got, want), (got, want)


@settings(max_examples=150, deadline=None)
@given(partitioned_rows(), st.integers(1, 9), st.data())
def test_exact_trimmed_mean_equals_the_mean_of_the_sorted_middle(rows, bins, data):
    """Any trim (none, one value, near half), ranges that miss values, spans of one or three coordinates: the mean
    of ranks k..n−k−1 of each coordinate, as `trimmed_mean` sorts and averages them in memory."""
    vectors, cuts, rng = rows
    blocks = split(vectors, [1] * len(vectors), cuts)
    ids = [d for b in blocks for d in b.device_ids]
    excluded = frozenset(d for d in ids if data.draw(st.booleans()) and len(ids) > 1 and d != ids[0])
    kept = np.array([d not in excluded for d in ids])
    n = int(kept.sum())
    trimmed = data.draw(st.integers(0, (n - 1) // 2))
    low = np.quantile(vectors, 0.3, axis=0) if data.draw(st.booleans()) else vectors.min(axis=0)
    high = np.maximum(low, np.quantile(vectors, 0.6, axis=0))
    histogram_bytes = data.draw(st.sampled_from([HISTOGRAM_BYTES, 1, 3 * (bins + 2) * 8]))
    got = exact_coordinate_trimmed_mean(LocalPartitions(blocks), excluded, n, trimmed, low, high, bins,
                                        histogram_bytes)
    want = np.sort(vectors[kept], axis=0)[trimmed:n - trimmed].mean(axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(vectors).max())


@dataclass
class Replies(LocalPartitions):
    """`LocalPartitions` that keep every histogram a block sends back."""

    histograms: list[np.ndarray] = field(default_factory=list)

    def map(self, fn):
        out = super().map(fn)
        if getattr(fn, "func", None) is block_histogram:
            self.histograms.extend(out)
        return out


@pytest.mark.parametrize("rows, columns, bins, budget, kind, passes", [
    (9, 200_000, 256, 4 * 1024 * 1024, np.uint16, 5),  # 9 bins (one per device) of 200,000 coordinates: 14 MB
    (600, 3_000, 8, 200_000, np.int64, 2),              # 300 rows per block, 10 bins: counts are fewer bytes
])
def test_the_median_of_long_vectors_takes_passes_whose_histograms_fit_the_budget(rows, columns, bins, budget, kind,
                                                                                 passes):
    """Devices of 200 metrics have vectors of 501,500 coordinates: 1 GB of histograms per block in one pass at 256
    bins. The median bins a span of coordinates at a time, each block's reply within the budget: a few devices'
    bins (at most one bin per device), or counts when a block has many rows; the median stays exact."""
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(rows, columns))
    partitions = Replies(split(vectors, [1] * rows, [rows // 2]))
    got = exact_coordinate_median(partitions, frozenset(), rows, vectors.min(axis=0), vectors.max(axis=0), bins,
                                  budget)
    assert np.array_equal(got, np.median(vectors, axis=0))
    assert {h.dtype.type for h in partitions.histograms} == {kind}
    assert max(h.nbytes for h in partitions.histograms) <= budget and len(partitions.histograms) == 2 * passes


def test_bins_cover_every_value_once():
    values = np.array([[-1.0, 0.0], [0.0, 0.0], [0.5, 0.0], [1.0, 0.0], [2.0, 5.0]])
    low, high = np.array([0.0, 0.0]), np.array([1.0, 0.0])
    assert bin_of(values, low, high, 4).T.tolist() == [[0, 1, 3, 5, 5], [1, 1, 1, 1, 5]]
    block = VectorBlock(0, list("abcde"), np.ones(5), values)
    reply = block_histogram(block, frozenset(), low, high, 4)  # 5 rows: their bins, fewer bytes than counts
    assert reply.dtype == np.uint16 and histogram_counts([reply], 2, 4).sum(axis=1).tolist() == [5, 5]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e300, 1e300), min_size=2, max_size=30), st.floats(-1e3, 1e3),
       st.floats(0, 1e3), st.integers(1, 300))
@example([0.0, 0.0], 0.0, 2.225073858507203e-309, 1)  # a subnormal span: bins / span was inf, 0 · inf nan (CI)
def test_a_smaller_value_never_lands_in_a_higher_bin(values, low, span, bins):
    column = np.sort(np.array(values))[:, None]
    binned = bin_of(column, np.array([low]), np.array([low + span]), bins)[:, 0]
    assert (np.diff(binned) >= 0).all() and binned.min() >= 0 and binned.max() <= bins + 1


def fleet(seed, n=30, length=5, attackers=True):
    """Honest vectors near one point, plus scaled, flipped and heavy-claiming devices."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=length) + 3.0
    vectors = centre + 0.1 * rng.normal(size=(n, length))
    counts = rng.integers(50, 500, size=n)
    if attackers:
        vectors[0] *= 100.0          # scaled: the norm check
        vectors[1] = -vectors[1]     # flipped: the cosine check
        counts[2] = 2**40            # claims many readings: the sample cap
    return vectors, counts


def reply_bytes(reply) -> int:
    """Roughly what a block's reply weighs: its arrays' bytes, 8 per other number or key."""
    if isinstance(reply, np.ndarray):
        return reply.nbytes
    if isinstance(reply, dict):
        return sum(8 + reply_bytes(value) for value in reply.values())
    if isinstance(reply, (list, tuple)):
        return sum(reply_bytes(part) for part in reply)
    return 8


@dataclass
class Collecting(LocalPartitions):
    """`LocalPartitions` that keep the largest reply a block sends back (`reply_bytes`)."""

    largest_reply: int = 0
    replies: list = field(default_factory=list)

    def map(self, fn):
        out = super().map(fn)
        self.largest_reply = max(self.largest_reply, *(reply_bytes(reply) for reply in out))
        self.replies.append((getattr(fn, "func", fn).__name__, out))
        return out

    def replies_of(self, name: str) -> list:
        """Every block's reply to the passes of the block function ``name``."""
        return [reply for fn, out in self.replies if fn == name for reply in out]


def partitions_of(vectors, counts, cuts):
    """The rows in blocks, plus a block without rows (a partition whose every snapshot was refused)."""
    return Collecting(split(vectors, counts, cuts) + [VectorBlock(99, [], np.zeros(0), np.zeros((0, 0)))])


def compare(strategy, vectors, counts, cuts, **tolerance):
    """The strategy on updates in memory and on the same vectors in blocks: the same result or the same error."""
    ids = [f"d{i:03d}" for i in range(len(vectors))]
    updates = [Update(d, [v], int(c)) for d, v, c in zip(ids, vectors, counts)]
    partitions = partitions_of(vectors, counts, cuts)
    try:
        want = strategy.aggregate(updates)
    except AggregationError as exc:
        with pytest.raises(AggregationError) as raised:
            aggregate(strategy, Cohort.gather(partitions, 10.0, bins=8))
        assert str(raised.value) == str(exc)
        return None
    got = aggregate(strategy, Cohort.gather(partitions, 10.0, bins=8))
    assert got.participants == want.participants and got.rejected == want.rejected
    assert got.norms == want.norms and got.n_samples == want.n_samples and got.strategy == want.strategy
    assert got.extra.keys() == want.extra.keys()
    for key, value in want.extra.items():
        if key == "cluster_weights":
            for got_model, want_model in zip(got.extra[key], value, strict=True):
                np.testing.assert_allclose(got_model[0], want_model[0], **tolerance)
        else:
            assert got.extra[key] == value, key
    np.testing.assert_allclose(got.weights[0], want.weights[0], **tolerance)
    return got


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(3, 40), st.booleans(), st.lists(st.integers(0, 40), max_size=3),
       st.sampled_from([None, 2.0]), st.sampled_from([None, 0.0, 0.5]))
def test_fedavg_median_and_trimmed_mean_in_partitions_equal_the_in_memory_strategies(seed, n, attackers, cuts, cap,
                                                                                      min_cosine):
    vectors, counts = fleet(seed, n, attackers=attackers)
    cuts = sorted({c for c in cuts if c <= n})
    policy = ValidationPolicy(min_devices=2, max_norm_ratio=10.0, min_cosine=min_cosine, sample_cap_factor=cap)
    compare(FedAvg(policy=policy), vectors, counts, cuts, rtol=1e-12, atol=1e-12)
    compare(FedMedian(policy=policy), vectors, counts, cuts, rtol=0, atol=0)
    compare(FedTrimmedAvg(0.1, policy=policy), vectors, counts, cuts, rtol=1e-12, atol=1e-12)
    compare(FedTrimmedAvg(0.3, policy=policy), vectors, counts, cuts, rtol=1e-12, atol=1e-12)


def test_the_cap_moves_when_the_cosine_check_refuses_devices():
    """The prefetched sums assume nobody is refused; refusals that move the median count take one more pass."""
    rng = np.random.default_rng(3)
    vectors = np.abs(rng.normal(size=(9, 4))) + 1.0
    vectors[[0, 1, 2]] = -vectors[[0, 1, 2]]          # flipped ... and they claim the smallest counts
    counts = np.array([1, 1, 1, 100, 200, 300, 400, 500, 600])
    policy = ValidationPolicy(min_devices=2, max_norm_ratio=None, min_cosine=0.0, sample_cap_factor=1.0)
    got = compare(FedAvg(policy=policy), vectors, counts, [4], rtol=1e-12)
    assert got.participants == [f"d{i:03d}" for i in range(3, 9)]


def groups(seed, n, k, length=5):
    """Devices in ``k`` groups around their own centres (some far apart, some close), with sample counts."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, length)) * rng.choice([0.5, 5.0], size=(k, 1)) + 3.0
    vectors = centres[rng.integers(k, size=n)] + 0.2 * rng.normal(size=(n, length))
    return vectors, rng.integers(50, 500, size=n)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(3, 40), st.integers(1, 4), st.lists(st.integers(0, 40), max_size=3),
       st.sampled_from([None, 2.0]), st.sampled_from([None, 0.0]), st.sampled_from([0, 1 << 20]))
def test_clustering_in_partitions_equals_the_in_memory_strategy(seed, n, k, cuts, cap, min_cosine, fetch_bytes):
    """The same k-means++ draws and Lloyd passes whether the vectors are in memory or in blocks (passes over the
    blocks, or a small cohort's vectors fetched once): the same clusters, numbered alike, and the same models."""
    vectors, counts = groups(seed, n, k)
    cuts = sorted({c for c in cuts if c <= n})
    policy = ValidationPolicy(min_devices=2, max_norm_ratio=10.0, min_cosine=min_cosine, sample_cap_factor=cap)
    with mock.patch.object(aggregation, "KMEANS_FETCH_BYTES", fetch_bytes):
        compare(ClusteredFedAvg(clusters=min(k + 1, 3), seed=seed, policy=policy), vectors, counts, cuts, rtol=1e-9,
                atol=1e-9)


def test_a_few_devices_are_clustered_from_their_vectors_fetched_once():
    """12 devices of 200 metrics (48 MB of vectors) would send 24 MB of sums per k-means pass, dozens of passes:
    a cohort within `KMEANS_FETCH_BYTES` is fetched once and clustered on the driver."""
    vectors, counts = groups(3, 12, 3, length=20)
    partitions = Collecting(split(vectors, counts, [5]))
    aggregate(ClusteredFedAvg(clusters=3, seed=3, policy=ValidationPolicy(min_cosine=None)),
              Cohort.gather(partitions, 10.0))
    assert [fn for fn, _ in partitions.replies] == ["block_summary", "block_vectors"]


@pytest.mark.parametrize("strategy", [
    FedAvg(), FedMedian(), FedTrimmedAvg(0.1), ClusteredFedAvg(clusters=3, seed=2),
    DifferentiallyPrivate(FedAvg(policy=ValidationPolicy(2, None, None, None, None)), 1.0, 1.0, 1e-5)],
    ids=lambda strategy: strategy.name)
def test_no_block_sends_its_vectors_to_the_driver(strategy, monkeypatch):
    """Every strategy `make_strategy` builds aggregates from replies a fraction of a block's size (sums, counts,
    histograms, a few values per coordinate, a few seed vectors): the driver of a million-device round never holds
    the fleet's vectors (37 GB for ASD-shaped devices; clustering fetches a cohort within `KMEANS_FETCH_BYTES`)."""
    vectors, counts = groups(8, 300, 3, length=40)
    monkeypatch.setattr(aggregation, "KMEANS_FETCH_BYTES", vectors.nbytes - 1)
    partitions = Collecting(split(vectors, counts, [150]))
    result = aggregate(strategy, Cohort.gather(partitions, 10.0, bins=64), [vectors.mean(axis=0)])
    assert len(result.participants) == 300
    assert 0 < partitions.largest_reply < max(b.vectors.nbytes for b in partitions.blocks) / 2


@pytest.mark.parametrize("budget_restarts", [1, 2])
def test_wide_vectors_take_fewer_restarts_per_pass_with_the_same_clusters_in_memory_and_in_blocks(
        budget_restarts, monkeypatch):
    """A pass serves as many k-means restarts as keep its sums within `KMEANS_PASS_BYTES` (3 centres of a 2.1
    million-entry vector are 50 MB): in memory and in blocks alike, so the clusters still agree."""
    vectors, counts = groups(4, 30, 3, length=20)
    monkeypatch.setattr(aggregation, "KMEANS_PASS_BYTES", budget_restarts * 3 * 20 * 8)
    monkeypatch.setattr(aggregation, "KMEANS_FETCH_BYTES", 0)
    partitions = Collecting(split(vectors, counts, [12]))
    got = compare(ClusteredFedAvg(clusters=3, seed=4, policy=ValidationPolicy(min_cosine=None)), vectors, counts,
                  [12], rtol=1e-9, atol=1e-9)
    aggregate(ClusteredFedAvg(clusters=3, seed=4, policy=ValidationPolicy(min_cosine=None)),
              Cohort.gather(partitions, 10.0))
    assert len(set(got.extra["clusters"].values())) == 3
    sums_replies = max(reply_bytes(r) for r in partitions.replies_of("block_kmeans_pass"))
    assert sums_replies <= budget_restarts * 3 * 20 * 8 + 8 * 5 * 18 + 8 * 3 * 5  # sums, distances, counts


def seeded_dp(sampling_rate, min_devices=2, seed=11):
    """DP-FedAvg whose sampling and noise come from a seeded generator, so two runs draw the same."""
    dp = DifferentiallyPrivate(FedAvg(policy=ValidationPolicy(min_devices, None, None, None, None)), clip_norm=0.5,
                               noise_multiplier=0.8, delta=1e-5, sampling_rate=sampling_rate)
    dp._rng = np.random.default_rng(seed)
    return dp


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 30), st.lists(st.integers(0, 30), max_size=3),
       st.sampled_from([1.0, 0.5]), st.booleans(), st.integers(1, 4))
def test_dp_fedavg_in_partitions_equals_the_in_memory_wrapper(seed, n, cuts, sampling_rate, has_current,
                                                              min_devices):
    """The same devices sampled, the same clipped mean (deltas from the current model, or from zero), the same noise
    and privacy spent; a device of another length is refused with the same reason; too few sampled, the same error."""
    vectors, counts = fleet(seed, n, attackers=False)
    cuts = sorted({c for c in cuts if c <= n})
    current = [np.random.default_rng(seed).normal(size=vectors.shape[1]) + 3.0] if has_current else None
    odd = VectorBlock(50, ["odd"], np.array([9]), np.ones((1, vectors.shape[1] + 1)))
    updates = [Update(f"d{i:03d}", [v], int(c)) for i, (v, c) in enumerate(zip(vectors, counts))]
    if has_current:
        updates.append(Update("odd", [odd.vectors[0]], 9))
    blocks = split(vectors, counts, cuts) + ([odd] if has_current else [])
    try:
        want = seeded_dp(sampling_rate, min_devices).aggregate(updates, current)
    except AggregationError as exc:
        with pytest.raises(AggregationError) as raised:
            aggregate(seeded_dp(sampling_rate, min_devices), Cohort.gather(Collecting(blocks)), current)
        assert str(raised.value) == str(exc)
        return
    got = aggregate(seeded_dp(sampling_rate, min_devices), Cohort.gather(Collecting(blocks)), current)
    assert got.participants == want.participants and got.rejected == want.rejected and got.private
    assert got.extra == want.extra and got.strategy == want.strategy == "dp-fedavg"
    np.testing.assert_allclose(got.weights[0], want.weights[0], rtol=1e-12, atol=1e-12)


def test_too_few_devices_raise_the_same_error():
    vectors, counts = fleet(1, 3)
    compare(FedTrimmedAvg(0.1, policy=ValidationPolicy(min_devices=2)), vectors, counts, [1])
    compare(FedMedian(policy=ValidationPolicy(min_devices=2)), vectors, counts, [1])
    compare(FedAvg(policy=ValidationPolicy(min_devices=5)), vectors, counts, [])
