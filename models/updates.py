"""What devices send the aggregator, and the vector space aggregation works in.

`Update` is one device's model after local training. Strategies (`models.aggregation`), differential privacy
(`models.privacy`) and secure aggregation (`models.secure_aggregation`) all import it from here, so none of them
imports another.

A `VectorCodec` maps an architecture's wire weights (what a snapshot carries) to the vector strategies average,
and back. For the autoencoders averaging the weights themselves is what FedAvg means, so their codec is
`IDENTITY` (flatten / unflatten). An architecture whose wire weights do not average meaningfully (e.g. a low-rank
factor, defined only up to rotation) supplies its own codec in `models/`: the aggregation round asks
``codec_for(architecture)`` once and never looks inside.

>>> like = [np.zeros((2, 2)), np.zeros(1)]
>>> v = IDENTITY.federated_vector([np.eye(2), np.array([5.0])])
>>> v.tolist()
[1.0, 0.0, 0.0, 1.0, 5.0]
>>> [w.shape for w in IDENTITY.weights_from_vector(v, like)]
[(2, 2), (1,)]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

Weights = list[np.ndarray]
WeightedWeights = tuple[Weights, float]


class AggregationError(ValueError):
    """The updates of a round cannot be aggregated (too few, or a rule's precondition does not hold)."""


@dataclass(frozen=True)
class Update:
    """One device's model after local training: its weights, the readings they learned from (``n_samples``),
    its snapshot ``version`` and the readings it has seen in all (``n_seen``, None when unknown)."""

    device_id: str
    weights: Weights
    n_samples: int
    version: int = 0
    n_seen: int | None = None
    created_at: int | None = None
    metadata: dict = field(default_factory=dict)


@dataclass
class AggregationResult:
    """The outcome of one round.

    ``weights`` is the new global model; ``participants`` the devices whose updates it averages; ``rejected``
    ``(device_id, reason)`` pairs; ``norms`` the L2 norm of every structurally valid update. ``private`` is True
    when the round ran under differential privacy: then ``norms`` is empty, reasons quote no per-device value,
    and the round's documents publish counts only (`spark_jobs.aggregate_job.round_documents`). ``extra``
    carries strategy-specific facts: ``n_samples`` (total weight), ``dp`` (privacy accounting), ``clusters``
    (device → cluster) and ``cluster_weights`` (one model per cluster).
    """

    weights: Weights
    participants: list[str]
    rejected: list[tuple[str, str]]
    norms: dict[str, float]
    strategy: str
    private: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return int(self.extra.get("n_samples", 0))


class Strategy(Protocol):
    """How a round turns the devices' updates into a global model (Flower's shape): ``current`` is the global
    model the updates started from (None in the first round)."""

    name: str

    def aggregate(self, updates: Sequence[Update], current: Weights | None = None) -> AggregationResult: ...


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
    if start != len(vector):
        raise ValueError(f"unflatten: a vector of {len(vector)} numbers does not fit layers of {start}")
    return out


class VectorCodec(Protocol):
    """Wire weights ↔ the vector in which averaging is meaningful for one architecture."""

    def federated_vector(self, weights: Weights) -> np.ndarray: ...

    def weights_from_vector(self, vector: np.ndarray, like: Weights) -> Weights: ...

    def vector_length(self, shapes: Sequence[tuple[int, ...]]) -> int:
        """The length of the vector of weights of these shapes (known before any vector is made)."""
        ...


class IdentityCodec:
    """Weights that average as they are (the dense and LSTM autoencoders): flatten and unflatten."""

    def federated_vector(self, weights: Weights) -> np.ndarray:
        return flatten(weights)

    def vector_length(self, shapes: Sequence[tuple[int, ...]]) -> int:
        return int(sum(np.prod(shape, dtype=np.int64) for shape in shapes))

    def weights_from_vector(self, vector: np.ndarray, like: Weights) -> Weights:
        return unflatten(vector, like)


IDENTITY = IdentityCodec()


def federated_vectors(codec: VectorCodec, weights_list: Sequence[Weights]) -> np.ndarray:
    """Many devices' vectors as the rows of one matrix: the codec's batch method ``federated_vectors`` when it has
    one (the same numbers, computed together), else one `federated_vector` per device."""
    batch = getattr(codec, "federated_vectors", None)
    if batch is not None:
        return batch(weights_list)
    return np.stack([codec.federated_vector(w) for w in weights_list])
_CODECS: dict[str, Callable[[], VectorCodec]] = {}


def register_codec(kind: str, factory: Callable[[], VectorCodec]) -> None:
    """Declare the codec of a model kind whose weights must not be averaged as they are (see module doc)."""
    _CODECS[kind] = factory


def codec_for(architecture: str | None) -> VectorCodec:
    """The codec registered for the kind of ``architecture`` (a blob's ``"subspace/19-4"`` → ``"subspace"``),
    else `IDENTITY`.

    >>> codec_for("dense_ae/19-16-4-16-19/tanh") is IDENTITY
    True
    """
    factory = _CODECS.get((architecture or "").split("/")[0])
    return factory() if factory else IDENTITY
