"""Simulated secure aggregation with pairwise additive masks (Bonawitz et al. 2017, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning").

Every pair of clients (a, b) shares a seed (in the real protocol, from a Diffie-Hellman key agreement; here
derived from the round seed). Client a adds the pseudo-random mask of each pair with a later client and
subtracts the mask of each pair with an earlier one, so all masks cancel in the sum. Vectors are encoded in
fixed point as integers modulo 2⁶⁴: a masked vector is then uniformly distributed and reveals nothing about
the update, and the masks cancel exactly, leaving only the fixed-point rounding (``2⁻²⁴`` per client).

Dropouts: if a client's masked vector never arrives, its masks with the survivors would not cancel. The
survivors then reveal their pair seeds with the dropped client (in the real protocol the server rebuilds them
from t-of-n Shamir shares) and the aggregator removes those masks. Limitation of this simulation: it has no
second, per-client "self" mask, so a client declared dropped whose vector arrives late would be exposed; the
real protocol's double masking closes that hole.

>>> session = SecureAggregationSession(["a", "b", "c"], length=2, round_seed=1)
>>> masked = {c: session.mask(c, v) for c, v in
...           {"a": np.array([1.0, 2.0]), "b": np.array([0.5, 0.5]), "c": np.array([-1.0, 0.0])}.items()}
>>> np.round(session.unmasked_sum(masked), 6)
array([0.5, 2.5])
"""
from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

import numpy as np

from models.aggregation import Update, Weights, flatten, unflatten

FIXED_POINT_BITS = 24   # fractional bits of the encoding: resolution 6e-8, range ±2³⁹ before wrap-around
_SCALE = float(2 ** FIXED_POINT_BITS)


def encode_fixed_point(vector: np.ndarray) -> np.ndarray:
    """Float vector → uint64 ring elements (two's complement of round(x · 2²⁴))."""
    vector = np.asarray(vector, dtype=np.float64)
    if not np.all(np.isfinite(vector)):
        raise ValueError("secure aggregation: cannot encode non-finite values (NaN or infinity)")
    if np.any(np.abs(vector) >= 2.0 ** (63 - FIXED_POINT_BITS)):
        raise ValueError(f"secure aggregation: values must stay below 2^{63 - FIXED_POINT_BITS} in magnitude")
    return np.round(vector * _SCALE).astype(np.int64).view(np.uint64)


def decode_fixed_point(ring: np.ndarray) -> np.ndarray:
    """uint64 ring elements → float vector (inverse of `encode_fixed_point`, also for sums)."""
    return ring.view(np.int64).astype(np.float64) / _SCALE


class SecureAggregationSession:
    """One round of masked summation among ``client_ids`` over vectors of ``length`` numbers."""

    def __init__(self, client_ids: Sequence[str], length: int, round_seed: int):
        if len(set(client_ids)) != len(client_ids):
            raise ValueError("secure aggregation: client ids must be unique")
        self.client_ids = list(client_ids)
        self.length = length
        self.round_seed = round_seed

    def _pair_mask(self, a: str, b: str) -> np.ndarray:
        low, high = sorted((a, b))
        digest = hashlib.sha256(f"{self.round_seed}|{low}|{high}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        return rng.integers(0, 2 ** 64, size=self.length, dtype=np.uint64)

    def _net_mask(self, client: str, peers: Sequence[str]) -> np.ndarray:
        """Σ masks with later peers − Σ masks with earlier peers (mod 2⁶⁴), in the sorted order of ids."""
        total = np.zeros(self.length, dtype=np.uint64)
        for peer in peers:
            if peer == client:
                continue
            if client < peer:
                total += self._pair_mask(client, peer)
            else:
                total -= self._pair_mask(client, peer)
        return total

    def mask(self, client_id: str, vector: np.ndarray) -> np.ndarray:
        """What ``client_id`` sends: its encoded vector plus its pairwise masks (looks uniformly random)."""
        if client_id not in self.client_ids:
            raise ValueError(f"secure aggregation: {client_id!r} is not in this round")
        if np.shape(vector) != (self.length,):
            raise ValueError(f"secure aggregation: expected a vector of {self.length}, got shape {np.shape(vector)}")
        return encode_fixed_point(vector) + self._net_mask(client_id, self.client_ids)

    def unmasked_sum(self, masked: Mapping[str, np.ndarray]) -> np.ndarray:
        """The sum of the received clients' vectors; masks of pairs with dropped clients are rebuilt and removed."""
        unknown = set(masked) - set(self.client_ids)
        if unknown:
            raise ValueError(f"secure aggregation: vectors from clients not in this round: {sorted(unknown)}")
        if not masked:
            raise ValueError("secure aggregation: no client vectors arrived")
        total = np.zeros(self.length, dtype=np.uint64)
        for vector in masked.values():
            total += vector
        dropped = [c for c in self.client_ids if c not in masked]
        for survivor in masked:
            # The survivor's masks with dropped peers did not cancel; remove exactly those.
            total -= self._net_mask(survivor, dropped)
        return decode_fixed_point(total)


def secure_fedavg(updates: Sequence[Update], round_seed: int) -> Weights:
    """FedAvg computed from masked vectors only: each device sends ``[n·w, n]`` masked; the sum gives the mean."""
    if not updates:
        raise ValueError("secure FedAvg: no updates")
    vectors = {u.device_id: np.append(u.n_samples * flatten(u.weights), float(u.n_samples)) for u in updates}
    length = len(next(iter(vectors.values())))
    session = SecureAggregationSession(list(vectors), length, round_seed)
    total = session.unmasked_sum({d: session.mask(d, v) for d, v in vectors.items()})
    return unflatten(total[:-1] / total[-1], updates[0].weights)
