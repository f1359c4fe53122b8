"""The subspace model's codec for aggregation (`models.updates.VectorCodec`), and blending in codec space.

Strategies (FedAvg, median, trimmed mean, clustering, differential privacy, secure aggregation) work on
vectors; `models.updates.codec_for(architecture)` says what a vector means. The autoencoders' codec is the
identity. The subspace model (``subspace/<d>/r<r>``) sends a low-rank covariance factor L (d, r), the mean μ
and the per-input variances v (float32, ~6.8 KB for d = 95): averaging factors is meaningless (their columns
have arbitrary signs and order), so `SubspaceCodec` maps them to ``[μ, vech(C + μμᵀ)]``, the mean and the upper
triangle of the second moment, with ``C = L Lᵀ`` whose diagonal is replaced by the exact variances. A weighted
mean of such vectors is exactly the mean and second moment of the devices' pooled distribution, so FedAvg of
them is the covariance of the pooled data, and the coordinate-wise robust rules stay meaningful. The inverse
rebuilds C and truncates its eigendecomposition back to a rank-r factor (negative eigenvalues, which noise or a
coordinate-wise median can create, are dropped). The vector lives only inside the aggregator (O(d²) floats,
37 KB for d = 95, transient); what devices send and receive stays the small factor.

The codec registers itself for the ``subspace`` kind when `models` is imported (`models/__init__.py`).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> factor = rng.normal(size=(4, 2)).astype(np.float32)
>>> a = [factor, np.ones(4, np.float32), (factor ** 2).sum(axis=1)]   # variances: the rank-2 model's own
>>> codec = codec_for("subspace/4/r2")
>>> vector = codec.federated_vector(a)
>>> vector.shape                                       # 4 means + 10 entries of the upper triangle
(14,)
>>> back = codec.weights_from_vector(vector, a)
>>> np.allclose(back[0] @ back[0].T, factor @ factor.T, atol=1e-5), np.allclose(back[1], 1.0)
(True, True)
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import numpy as np

from models.updates import codec_for, register_codec

SUBSPACE_KIND = "subspace"


def subspace_parts(weights: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The factor L (d, r), mean μ (d,) and variances v (d,) of subspace wire weights, float64; ValueError when
    their shapes do not fit together."""
    factor, mean, var = (np.asarray(w, dtype=np.float64) for w in weights)
    if factor.ndim != 2 or mean.shape != (factor.shape[0],) or var.shape != mean.shape:
        raise ValueError(f"subspace weights must be [factor (d, r), mean (d,), variances (d,)], got shapes "
                         f"{[np.shape(w) for w in weights]}")
    return factor, mean, var


def subspace_moments(weights: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of subspace wire weights ``[L, μ, v]``: ``C = L Lᵀ`` with the exact variances v on its
    diagonal."""
    factor, mean, var = subspace_parts(weights)
    C = factor @ factor.T
    C[np.diag_indices_from(C)] = np.maximum(var, 0.0)
    return mean, C


COMMUNALITY_ITERATIONS = 200  # at most this many principal-axis steps in `subspace_weights` ...
COMMUNALITY_TOLERANCE = 1e-6  # ... stopping once the diagonal moves less than this, relative to the trace


def subspace_weights(mean: np.ndarray, C: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Wire weights ``[L, μ, v]`` shaped and typed like `like` from a mean and a covariance C whose diagonal is
    the exact variances: v is that diagonal, and L the rank-r factor of C's low-rank part.

    The diagonal of a device's C holds, beside the factor's part, the variance the factor leaves out; taking
    C's top-r eigenpairs as they are would fold that residual into the components (a device re-taking its own
    model would change: larger eigenvalues, fewer components for the explained share, another basis). So the
    factor comes from principal-axis iteration: the top-r eigenpairs of C with its diagonal replaced by the
    current factor's own diagonal (capped at the variances), repeated until it settles; each step is one step
    of orthogonal iteration from the previous eigenvectors (negative eigenvalues, which noise or a
    coordinate-wise median can create, are dropped)."""
    r = np.shape(like[0])[1]
    C = 0.5 * (C + C.T)
    variances = np.maximum(np.diag(C), 0.0)
    values, vectors = np.linalg.eigh(C)
    top = np.argsort(values)[::-1][:r]
    basis, values = vectors[:, top], values[top]
    reduced = C.copy()
    diagonal = np.diag_indices_from(C)
    for _ in range(COMMUNALITY_ITERATIONS):
        communality = np.minimum(np.einsum("ij,ij->i", basis * np.maximum(values, 0.0), basis), variances)
        moved = float(np.abs(communality - reduced[diagonal]).sum())
        if moved <= COMMUNALITY_TOLERANCE * max(float(variances.sum()), 1e-300):
            break
        reduced[diagonal] = communality
        basis = np.linalg.qr(reduced @ basis)[0]
        values, rotation = np.linalg.eigh(basis.T @ reduced @ basis)
        order = np.argsort(values)[::-1]
        basis, values = basis @ rotation[:, order], values[order]
    factor = basis * np.sqrt(np.maximum(values, 0.0))
    out = [factor, mean, variances]
    return [w.astype(np.asarray(ref).dtype) for w, ref in zip(out, like)]


@functools.lru_cache(maxsize=8)
def _upper_triangle(d: int) -> np.ndarray:
    """Flat indices of the upper triangle (diagonal included) of a d × d matrix, row by row (`np.triu_indices`)."""
    rows, cols = np.triu_indices(d)
    return rows * d + cols


class SubspaceCodec:
    """Subspace wire weights ↔ ``[μ, vech(C + μμᵀ)]`` (module docstring)."""

    chunk = 32  # devices expanded at once by `federated_vectors`: their d × d moments, 2.3 MB for d = 95, stay in
    # cache and in memory already touched (256 at once, 18 MB: 0.10-0.36 s per 2,500 devices, 32: 0.06-0.07)

    def federated_vector(self, weights: Sequence[np.ndarray]) -> np.ndarray:
        return self.federated_vectors([weights])[0]

    def federated_vectors(self, weights_list: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
        """Many devices' vectors as the rows of one matrix (batched matrix products: the aggregator's decode)."""
        if not weights_list:
            raise ValueError("federated_vectors: no weights")
        for weights in weights_list:
            factor, mean, var = (np.shape(w) for w in weights)
            if len(factor) != 2 or mean != factor[:1] or var != mean:
                raise ValueError(f"subspace weights must be [factor (d, r), mean (d,), variances (d,)], got shapes "
                                 f"{[np.shape(w) for w in weights]}")
        d = np.shape(weights_list[0][1])[0]
        if any(np.shape(w[1])[0] != d for w in weights_list):
            raise ValueError("federated_vectors: the devices' weights differ in their number of inputs")
        upper = _upper_triangle(d)
        out = np.empty((len(weights_list), d + upper.size))
        diagonal = np.arange(d)
        for start in range(0, len(weights_list), self.chunk):
            part = weights_list[start:start + self.chunk]
            r = np.shape(part[0][0])[1]
            stacked = np.empty((len(part), d, r + 1))  # [L | μ]: one product gives L Lᵀ + μ μᵀ
            stacked[:, :, :r] = np.stack([w[0] for w in part])
            stacked[:, :, r] = np.stack([w[1] for w in part])
            mean = stacked[:, :, r]
            second = stacked @ stacked.transpose(0, 2, 1)
            second[:, diagonal, diagonal] = (np.maximum(np.stack([np.asarray(w[2], dtype=np.float64) for w in part]),
                                                        0.0) + mean * mean)
            out[start:start + len(part), :d] = mean
            out[start:start + len(part), d:] = np.take(second.reshape(len(part), d * d), upper, axis=1)
        return out

    def vector_length(self, shapes: Sequence[tuple[int, ...]]) -> int:
        """``d + d(d + 1)/2`` for a model of d inputs (μ and the upper triangle of the second moment)."""
        d = int(shapes[1][0])
        return d + d * (d + 1) // 2

    def weights_from_vector(self, vector: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
        vector = np.asarray(vector, dtype=np.float64).ravel()
        d = np.shape(like[1])[0]
        length = self.vector_length([np.shape(w) for w in like])
        if vector.shape[0] != length:
            raise ValueError(f"a subspace vector of {d} inputs has {length} entries, got {vector.shape[0]}")
        mean = vector[:d]
        second_moment = np.zeros((d, d))
        second_moment[np.triu_indices(d)] = vector[d:]
        second_moment = second_moment + np.triu(second_moment, 1).T
        return subspace_weights(mean, second_moment - np.outer(mean, mean), like)


register_codec(SUBSPACE_KIND, SubspaceCodec)


def blend_subspace(local: Sequence[np.ndarray], global_weights: Sequence[np.ndarray], b: float
                   ) -> list[np.ndarray]:
    """The ``(1 − b, b)`` mixture of two subspace models' distributions as wire weights like `local`: mean
    ``(1 − b)μl + bμg``, variances ``(1 − b)vl + bvg + b(1 − b)δ²`` and the top-r factor of the mixed low-rank
    part ``(1 − b)L_l L_lᵀ + bL_g L_gᵀ + b(1 − b)δδᵀ`` (δ = μl − μg), from one thin SVD of the stacked factors. The
    low-rank part and the variances stay apart (unlike an eigendecomposition of the mixed covariance, which would
    fold each model's left-out variance into the components), so b = 0 gives back the local model."""
    (local_factor, local_mean, local_var), (global_factor, global_mean, global_var) = (
        subspace_parts(weights) for weights in (local, global_weights))
    if global_factor.shape != local_factor.shape:
        raise ValueError(f"subspace blend: factors of shapes {local_factor.shape} and {global_factor.shape}")
    delta = local_mean - global_mean
    stacked = np.hstack([math.sqrt(1.0 - b) * local_factor, math.sqrt(b) * global_factor,
                         math.sqrt(b * (1.0 - b)) * delta[:, None]])
    U, singular, _ = np.linalg.svd(stacked, full_matrices=False)
    r = local_factor.shape[1]
    out = [U[:, :r] * singular[:r], (1.0 - b) * local_mean + b * global_mean,
           (1.0 - b) * local_var + b * global_var + b * (1.0 - b) * delta * delta]
    return [w.astype(np.asarray(ref).dtype) for w, ref in zip(out, local)]


COVARIATE_RCOND = 1e-6  # directions of the covariates' covariance below this share of its largest are float32
#                        rounding of the wire weights (relative precision ~1e-7), not data: left out of the regression


def blend_subspace_given(local: Sequence[np.ndarray], global_weights: Sequence[np.ndarray], b: float,
                         covariates: np.ndarray) -> list[np.ndarray]:
    """`blend_subspace`, except that the two models' regressions of the other inputs on the `covariates` (a
    boolean mask over the inputs) are not taken as variance of the other inputs where they disagree. The blend
    keeps the mixture's means, the covariates' distribution and its regression of the other inputs on them (each
    model's weighted by how much of the covariates' range it has seen); what it leaves out is the mixture's
    ``b(1 − b)·(A_l − A_g)·C_TT·(A_l − A_g)ᵀ``-like part, the disagreement of the two regressions A. With the time
    of day as the covariates, A is a device's daily shape: servers' shapes differ, and counting their difference
    as variance of the metrics puts variance in the very direction of "the metrics at another hour's level", so
    that such a reading then scores as normal. Regressions are those of the low-rank parts, ``A = L_M L_Tᵀ
    (L_T L_Tᵀ)⁺``, so b = 0 gives back the local model; no d × d matrix is formed."""
    T = np.asarray(covariates, dtype=bool)
    M = ~T
    (local_factor, local_mean, local_var), (global_factor, global_mean, global_var) = (
        subspace_parts(weights) for weights in (local, global_weights))
    if T.shape != local_mean.shape:
        raise ValueError(f"subspace blend: a covariate mask of {T.shape[0]} inputs for a model of "
                         f"{local_mean.shape[0]}")
    if not T.any() or not M.any() or global_factor.shape != local_factor.shape:
        return blend_subspace(local, global_weights, b)

    def regression(factor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The low-rank part's regression A of the other inputs on the covariates, and a square root F of the
        covariates' own part (``F Fᵀ = L_T L_Tᵀ``, without its float32-rounding directions)."""
        spread, basis = np.linalg.eigh(factor[T] @ factor[T].T)
        kept = spread > COVARIATE_RCOND * max(float(spread.max()), 0.0)
        spread, basis = spread[kept], basis[:, kept]
        return (factor[M] @ factor[T].T @ basis) / spread @ basis.T, basis * np.sqrt(spread)

    def left_given_covariates(factor: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The other inputs' factor and variances left once the covariates are known (a projection: stable even
        where the covariates' own spread is small)."""
        explained = regression(factor)[0] @ factor[T]
        return factor[M] - explained, np.maximum(var[M] - np.einsum("ij,ij->i", explained, explained), 0.0)

    delta = local_mean - global_mean
    mixture = np.hstack([math.sqrt(1.0 - b) * local_factor, math.sqrt(b) * global_factor,
                         math.sqrt(b * (1.0 - b)) * delta[:, None]])   # the plain blend's factor, before truncation
    shape, covariate_root = regression(mixture)
    (own, own_var), (fleet, fleet_var) = (left_given_covariates(f, v) for f, v in
                                          ((local_factor, local_var), (global_factor, global_var)))
    left = np.hstack([math.sqrt(1.0 - b) * own, math.sqrt(b) * fleet, math.sqrt(b * (1.0 - b)) * delta[M, None]])
    q = covariate_root.shape[1]
    joint = np.zeros((len(local_mean), q + left.shape[1]))
    joint[T, :q] = covariate_root
    joint[np.ix_(M, np.arange(q))] = shape @ covariate_root
    joint[np.ix_(M, np.arange(q, joint.shape[1]))] = left
    # the top r of the joint's columns' Gram: cheaper than an SVD of the tall joint, and exact for what is kept
    spread, basis = np.linalg.eigh(joint.T @ joint)
    top = np.argsort(spread)[::-1][:local_factor.shape[1]]
    var = (1.0 - b) * local_var + b * global_var + b * (1.0 - b) * delta * delta
    var[M] = (np.einsum("ij,ij->i", joint[M, :q], joint[M, :q])
              + (1.0 - b) * own_var + b * fleet_var + b * (1.0 - b) * delta[M] ** 2)
    out = [joint @ basis[:, top], (1.0 - b) * local_mean + b * global_mean, var]
    return [w.astype(np.asarray(ref).dtype) for w, ref in zip(out, local)]


def blend_weights(local: Sequence[np.ndarray], global_weights: Sequence[np.ndarray], blend_weight: float,
                  architecture: str, covariates: np.ndarray | None = None) -> list[np.ndarray]:
    """``(1 − b)·local + b·global`` in the architecture's codec space (network weights as they are; for the
    subspace model the mean and second moment, i.e. the mixture of the two distributions, not the factors; with
    `covariates`, a boolean mask of its inputs, the mixture of the other inputs' distributions given them:
    `blend_subspace_given`)."""
    if not 0.0 <= blend_weight <= 1.0:
        raise ValueError(f"stream.blend_weight must be in [0, 1], got {blend_weight}")
    codec = codec_for(architecture)
    if isinstance(codec, SubspaceCodec):
        if covariates is not None:
            return blend_subspace_given(local, global_weights, blend_weight, covariates)
        return blend_subspace(local, global_weights, blend_weight)
    mixed = ((1.0 - blend_weight) * codec.federated_vector(local)
             + blend_weight * codec.federated_vector(global_weights))
    return codec.weights_from_vector(mixed, list(local))


ADOPTION_TIE = 1e-6  # validation errors within this relative margin of the lowest count as equal (codec round trips
#                      perturb identical models by ~1e-7 relative in float32): the smallest global share wins


def choose_blend_weight(candidates: Sequence[float], errors: Sequence[float], tie: float = ADOPTION_TIE) -> float:
    """The candidate share of the global model with the lowest validation error; among candidates within `tie`
    (relative) of the lowest, the smallest share, so that a device keeps its own model unless the fleet's fits
    its data measurably better. Non-finite errors never win.

    >>> choose_blend_weight([0.0, 0.5, 1.0], [2.0, 1.0, 1.5])
    0.5
    >>> choose_blend_weight([0.0, 0.5, 1.0], [1.0, 1.0, 1.0])
    0.0
    """
    if len(candidates) != len(errors) or not len(candidates):
        raise ValueError(f"choose_blend_weight: {len(candidates)} candidates and {len(errors)} errors (need as many, "
                         "at least one)")
    finite = [(float(b), float(e)) for b, e in zip(candidates, errors) if math.isfinite(e)]
    if not finite:
        return min(float(b) for b in candidates)
    lowest = min(e for _, e in finite)
    return min(b for b, e in finite if e <= lowest + tie * abs(lowest))


def validated_blend(local: Sequence[np.ndarray], global_weights: Sequence[np.ndarray], candidates: Sequence[float],
                    validation_error: Callable[[Sequence[np.ndarray]], float], architecture: str,
                    covariates: np.ndarray | None = None) -> tuple[float, list[np.ndarray], list[float]]:
    """Personalised adoption: blend ``(1 − b)·local + b·global`` (`blend_weights`) for every candidate share b,
    measure each blend's `validation_error` (the device's own error on its own held data, no labels) and keep
    the best (`choose_blend_weight`). Returns (chosen b, its weights, the errors in candidate order); b = 0 returns
    `local` itself, untouched. `covariates`: as in `blend_weights`."""
    for b in candidates:
        if not 0.0 <= b <= 1.0:
            raise ValueError(f"model.adoption.candidates must be shares in [0, 1], got {list(candidates)}")
    blends = [list(local) if b == 0.0 else blend_weights(local, global_weights, b, architecture, covariates)
              for b in candidates]
    errors = [float(validation_error(w)) for w in blends]
    chosen = choose_blend_weight(candidates, errors)
    return chosen, blends[[float(b) for b in candidates].index(chosen)], errors
