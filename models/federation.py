"""Codecs between a model's wire weights and the vector space federated strategies average in, per architecture.

Strategies (FedAvg, median, trimmed mean, clustering, differential privacy, secure aggregation) are generic over
vectors; what a vector means is the model's business:

- autoencoders (``dense_ae/...``, ``lstm_ae/...``): the weights themselves, flattened (the identity);
- the subspace model (``subspace/<d>/r<r>``): its wire weights are a low-rank covariance factor L (d, r), the
  mean μ and the per-input variances v (float32, ~6 KB for d = 95). Averaging factors is meaningless (their
  columns have arbitrary signs and order), so the vector is ``[μ, vech(C + μμᵀ)]``: the mean and the upper
  triangle of the second moment, with ``C = L Lᵀ`` whose diagonal is replaced by the exact variances. A weighted
  mean of such vectors is exactly the mean and second moment of the devices' pooled distribution, so FedAvg
  of them is the covariance of the pooled data, and the coordinate-wise robust rules stay meaningful. The
  inverse rebuilds C and truncates its eigendecomposition back to a rank-r factor (negative eigenvalues, which
  noise or a coordinate-wise median can create, are dropped).

The vector lives only inside the aggregator (O(d²) floats, 37 KB for d = 95, transient); what devices send and
receive stays the small factor.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> factor = rng.normal(size=(4, 2)).astype(np.float32)
>>> a = [factor, np.ones(4, np.float32), (factor ** 2).sum(axis=1)]   # variances: the rank-2 model's own
>>> vector = federated_vector(a, "subspace/4/r2")
>>> vector.shape                                       # 4 means + 10 entries of the upper triangle
(14,)
>>> back = weights_from_vector(vector, a, "subspace/4/r2")
>>> np.allclose(back[0] @ back[0].T, factor @ factor.T, atol=1e-5), np.allclose(back[1], 1.0)
(True, True)
>>> weights_from_vector(federated_vector([np.ones(3)], "dense_ae/3"), [np.ones(3)], "dense_ae/3")[0].tolist()
[1.0, 1.0, 1.0]
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

SUBSPACE_PREFIX = "subspace/"


def is_subspace(architecture: str | None) -> bool:
    return bool(architecture) and str(architecture).startswith(SUBSPACE_PREFIX)


def subspace_moments(weights: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of subspace wire weights ``[L, μ, v]``: ``C = L Lᵀ`` with the exact variances v on its
    diagonal."""
    factor, mean, var = (np.asarray(w, dtype=np.float64) for w in weights)
    if factor.ndim != 2 or mean.shape != (factor.shape[0],) or var.shape != mean.shape:
        raise ValueError(f"subspace weights must be [factor (d, r), mean (d,), variances (d,)], got shapes "
                         f"{[np.shape(w) for w in weights]}")
    C = factor @ factor.T
    C[np.diag_indices_from(C)] = np.maximum(var, 0.0)
    return mean, C


def subspace_weights(mean: np.ndarray, C: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Wire weights ``[L, μ, v]`` shaped and typed like `like` from a mean and a covariance: the top-r
    eigenpairs of C (negative eigenvalues dropped) and its diagonal."""
    r = np.shape(like[0])[1]
    C = 0.5 * (C + C.T)
    values, vectors = np.linalg.eigh(C)
    top = np.argsort(values)[::-1][:r]
    factor = vectors[:, top] * np.sqrt(np.maximum(values[top], 0.0))
    out = [factor, mean, np.maximum(np.diag(C), 0.0)]
    return [w.astype(np.asarray(ref).dtype) for w, ref in zip(out, like)]


def federated_vector(weights: Sequence[np.ndarray], architecture: str) -> np.ndarray:
    """The float64 vector that aggregation strategies average, for wire weights of `architecture`."""
    if is_subspace(architecture):
        mean, C = subspace_moments(weights)
        second_moment = C + np.outer(mean, mean)
        return np.concatenate([mean, second_moment[np.triu_indices(mean.shape[0])]])
    return np.concatenate([np.asarray(w, dtype=np.float64).ravel() for w in weights]) if len(weights) else np.zeros(0)


def weights_from_vector(vector: np.ndarray, like: Sequence[np.ndarray], architecture: str) -> list[np.ndarray]:
    """Wire weights shaped and typed like `like` from an (aggregated) `federated_vector` of `architecture`."""
    vector = np.asarray(vector, dtype=np.float64).ravel()
    if is_subspace(architecture):
        d = np.shape(like[1])[0]
        if vector.shape[0] != d + d * (d + 1) // 2:
            raise ValueError(f"a subspace vector of {d} inputs has {d + d * (d + 1) // 2} entries, got "
                             f"{vector.shape[0]}")
        mean = vector[:d]
        second_moment = np.zeros((d, d))
        second_moment[np.triu_indices(d)] = vector[d:]
        second_moment = second_moment + np.triu(second_moment, 1).T
        return subspace_weights(mean, second_moment - np.outer(mean, mean), like)
    sizes = [int(np.prod(np.shape(w))) for w in like]
    if vector.shape[0] != sum(sizes):
        raise ValueError(f"weights of shapes {[np.shape(w) for w in like]} need {sum(sizes)} entries, got "
                         f"{vector.shape[0]}")
    parts = np.split(vector, np.cumsum(sizes)[:-1])
    return [p.reshape(np.shape(w)).astype(np.asarray(w).dtype) for p, w in zip(parts, like)]


def blend_weights(local: Sequence[np.ndarray], global_weights: Sequence[np.ndarray], blend_weight: float,
                  architecture: str) -> list[np.ndarray]:
    """``(1 − b)·local + b·global`` in the federated vector space (for the subspace model: blend the mean and
    second moment, i.e. the mixture of the two distributions, not the factors)."""
    if not 0.0 <= blend_weight <= 1.0:
        raise ValueError(f"stream.blend_weight must be in [0, 1], got {blend_weight}")
    mixed = ((1.0 - blend_weight) * federated_vector(local, architecture)
             + blend_weight * federated_vector(global_weights, architecture))
    return weights_from_vector(mixed, local, architecture)
