"""Device-level differential privacy for federated averaging, and its accountant.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent Language Models"):
each device's model delta is clipped to L2 norm ``S`` (so one device moves the sum by at most ``S``), the
clipped deltas are averaged, and Gaussian noise of standard deviation ``σ·S`` is added to their sum. A round is
then the (subsampled) Gaussian mechanism with noise multiplier ``σ``.

Accounting uses Rényi differential privacy (Mironov 2017, "Rényi Differential Privacy"): RDP of order α
composes additively over rounds and converts to (ε, δ) by ``ε = min_α RDP(α) + log(1/δ)/(α − 1)``
(Mironov 2017, Proposition 3). The Gaussian mechanism has ``RDP(α) = α / (2σ²)``; with device sampling rate
``q < 1`` the sampled Gaussian mechanism's RDP at integer α comes from Mironov, Talwar, Zhang 2019
("Rényi Differential Privacy of the Sampled Gaussian Mechanism", Section 3.3).

>>> round(compute_epsilon(sampling_rate=1.0, noise_multiplier=1.0, rounds=1, delta=1e-5), 2)
5.3
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from models.aggregation import Weights, flatten, unflatten

# Orders α searched by the accountant: a fine grid near 1 (where small budgets are won) and the integers up
# to 256 (large α wins for heavy noise). The sampled mechanism's closed form needs integer α.
RDP_ORDERS = tuple([1.0 + x / 20 for x in range(1, 220)] + [float(a) for a in range(12, 257)])


def clip_by_l2_norm(vector: np.ndarray, clip_norm: float) -> np.ndarray:
    """``vector`` scaled down to L2 norm ``clip_norm`` if it is longer; unchanged otherwise."""
    norm = float(np.linalg.norm(vector))
    return vector if norm <= clip_norm else vector * (clip_norm / norm)


def _log_add(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def rdp_sampled_gaussian(sampling_rate: float, noise_multiplier: float, order: float) -> float:
    """RDP of order α of one step of the (sampled) Gaussian mechanism with sensitivity 1 and noise σ.

    ``q = 1``: α/(2σ²) (Mironov 2017, Table II). ``q < 1``, integer α: ``log A_α / (α − 1)`` with
    ``A_α = Σ_k C(α,k) (1−q)^(α−k) q^k exp((k² − k)/(2σ²))`` (Mironov, Talwar, Zhang 2019, Section 3.3).
    """
    q, sigma = sampling_rate, noise_multiplier
    if not 0 < q <= 1 or sigma <= 0 or order <= 1:
        raise ValueError(f"need 0 < q ≤ 1, σ > 0, α > 1; got q={q}, σ={sigma}, α={order}")
    if q == 1.0:
        return order / (2 * sigma ** 2)
    if order != int(order):
        raise ValueError(f"the sampled Gaussian closed form needs an integer order α, got {order}")
    alpha = int(order)
    log_a = -math.inf
    for k in range(alpha + 1):
        term = (math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
                + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma ** 2))
        log_a = _log_add(log_a, term)
    return log_a / (alpha - 1)


def compute_epsilon(sampling_rate: float, noise_multiplier: float, rounds: int, delta: float,
                    orders: Sequence[float] = RDP_ORDERS) -> float:
    """ε of ``rounds`` compositions of the (sampled) Gaussian mechanism at the given δ (RDP accountant)."""
    if rounds <= 0:
        return 0.0
    if not 0 < delta < 1:
        raise ValueError(f"δ must be in (0, 1), got {delta}")
    usable = [a for a in orders if sampling_rate == 1.0 or a == int(a)]
    return min(rounds * rdp_sampled_gaussian(sampling_rate, noise_multiplier, a) + math.log(1 / delta) / (a - 1)
               for a in usable)


class DPFedAvgMechanism:
    """Clip each device's delta from the current global model to ``clip_norm``, average, add Gaussian noise.

    The mean is unweighted (each device counts once), so one device changes the sum of clipped deltas by at
    most ``clip_norm``; the noise ``N(0, (σ·clip_norm)²)`` is added to that sum before dividing by the number
    of participants, which is treated as public. ``sampling_rate`` is the probability that a device takes part
    in a round (1.0: every device, every round). ``rounds_done`` lets a restarted aggregator resume accounting.

    >>> dp = DPFedAvgMechanism(clip_norm=1.0, noise_multiplier=0.0001, delta=1e-5, seed=0)
    >>> current = [np.zeros(2)]
    >>> new = dp.aggregate([[np.array([3.0, 4.0])], [np.array([0.3, 0.4])]], current)
    >>> np.round(new[0], 2)   # deltas clipped to norm 1 and 0.5, then averaged
    array([0.45, 0.6 ])
    """

    def __init__(self, clip_norm: float, noise_multiplier: float, delta: float, seed: int = 0,
                 sampling_rate: float = 1.0, rounds_done: int = 0):
        if clip_norm <= 0 or noise_multiplier <= 0:
            raise ValueError(f"DP-FedAvg needs clip_norm > 0 and noise_multiplier > 0, got {clip_norm}, "
                             f"{noise_multiplier}")
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.sampling_rate = sampling_rate
        self.rounds_done = rounds_done
        self._rng = np.random.default_rng(seed)

    def aggregate(self, models: Sequence[Weights], current: Weights | None) -> Weights:
        """The new global model: ``current`` + noisy mean of the clipped deltas ``model − current``."""
        if current is None:
            raise ValueError("DP-FedAvg clips each device's change to the current global model, so it needs that "
                             "model; in the first round pass the initial weights every device starts from "
                             "(deterministic from model.seed)")
        if not models:
            raise ValueError("DP-FedAvg: no models to aggregate")
        base = flatten(current)
        total = sum(clip_by_l2_norm(flatten(m) - base, self.clip_norm) for m in models)
        noise = self._rng.normal(0.0, self.noise_multiplier * self.clip_norm, size=base.shape)
        self.rounds_done += 1
        return unflatten(base + (total + noise) / len(models), current)

    def epsilon(self) -> float:
        """ε spent after ``rounds_done`` rounds at this mechanism's δ."""
        return compute_epsilon(self.sampling_rate, self.noise_multiplier, self.rounds_done, self.delta)
