"""Device-level differential privacy for federated averaging, and its accountant.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent Language Models"):
each device's model delta is clipped to L2 norm ``S`` (so one device moves the sum by at most ``S``), the
clipped deltas are averaged, and Gaussian noise of standard deviation ``σ·S`` is added to their sum. With each
device taking part with probability ``q`` (Poisson sampling), a round is the sampled Gaussian mechanism with noise
multiplier ``σ``. `DifferentiallyPrivate` wraps a sum strategy (`models.aggregation.FedAvg`) to do this.

What the guarantee needs, and how it is kept here:

- Noise nobody can regenerate: every draw comes from a generator seeded with 128 bits of operating-system entropy
  (`secrets`), never from the configuration or a version number.
- Sensitivity ``S`` whatever the cohort: a device is accepted or refused on its own update only (structure, finite
  values; the wrapped strategy's policy has no norm, cosine or sample-cap checks), and then clipped.
- Nothing per-device and unnoised released: the result is marked ``private``; the round's documents then carry
  counts, the noised model and the accounting only (no participants, norms, losses or reasons).

Accounting uses Rényi differential privacy (Mironov 2017). RDP of the sampled Gaussian mechanism at order α
(Mironov, Talwar, Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism", Section 3.3: the
binomial sum for integer α, the two-sided erfc series for fractional α) composes additively over rounds, and
converts to (ε, δ) with the tighter bound ``ε = RDP(α) + log(1 − 1/α) − (log δ + log α)/(α − 1)`` (Canonne,
Kamath, Steinke 2020, Proposition 12; Asoodeh et al. 2021), minimised over the orders. The orders are those of
Google's ``dp-accounting`` library, whose RdpAccountant the tests check this one against on a grid of σ, q and
rounds.

>>> round(compute_epsilon(sampling_rate=1.0, noise_multiplier=1.0, rounds=1, delta=1e-5), 2)
4.73
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from models.updates import AggregationError, AggregationResult, Update, Weights, flatten, unflatten

# The orders dp-accounting's RdpAccountant uses by default: fine steps near 1 (small budgets), integers up to 63
# and a few large ones (heavy noise, many rounds).
RDP_ORDERS = tuple([1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])
_MAX_SERIES_TERMS = 1000
NOT_THIS_ARCHITECTURE = "not a valid update for this architecture"  # DP's one refusal: it quotes no value


def clip_by_l2_norm(vector: np.ndarray, clip_norm: float) -> np.ndarray:
    """``vector`` scaled down to L2 norm ``clip_norm`` if it is longer; unchanged otherwise."""
    norm = float(np.linalg.norm(vector))
    return vector if norm <= clip_norm else vector * (clip_norm / norm)


def os_entropy_generator() -> np.random.Generator:
    """A NumPy generator seeded with 128 bits from the operating system (`secrets`): nothing public reproduces it."""
    return np.random.default_rng(secrets.randbits(128))


# ---------------------------------------------------------------- RDP of the sampled Gaussian mechanism

def _log_add(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def _log_comb(n: float, k: float) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _log_erfc(x: float) -> float:
    """log(erfc(x)), also where erfc underflows (asymptotic series of the tail)."""
    value = math.erfc(x)
    if value > 0:
        return math.log(value)
    return (-math.log(math.pi) / 2 - math.log(x) - x ** 2 - 0.5 * x ** -2 + 0.625 * x ** -4
            - 37.0 / 24.0 * x ** -6 + 353.0 / 64.0 * x ** -8)


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """log A_α = log Σ_k C(α,k) (1−q)^(α−k) q^k exp((k² − k)/(2σ²))."""
    log_a, log1mq = -math.inf, math.log1p(-q)
    for k in range(alpha + 1):
        log_a = _log_add(log_a, _log_comb(alpha, k) + k * math.log(q) + (alpha - k) * log1mq
                         + (k * k - k) / (2 * sigma ** 2))
    return log_a


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    """log A_α for fractional α: the integrals over (−∞, z₀] and [z₀, ∞) as series (MTZ 2019, Section 3.3)."""
    log_a0 = log_a1 = -math.inf
    z0 = sigma ** 2 * math.log(1 / q - 1) + 0.5
    log1mq = math.log1p(-q)
    last0 = last1 = -math.inf
    for i in range(_MAX_SERIES_TERMS):
        j = alpha - i
        log_coef = _log_comb(alpha, i)
        s0 = (log_coef + i * math.log(q) + j * log1mq + (i * i - i) / (2 * sigma ** 2)
              + math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma)))
        s1 = (log_coef + j * math.log(q) + i * log1mq + (j * j - j) / (2 * sigma ** 2)
              + math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma)))
        log_a0, log_a1 = _log_add(log_a0, s0), _log_add(log_a1, s1)
        total = _log_add(log_a0, log_a1)
        if s0 < last0 and s1 < last1 and max(s0, s1) < total - 30:
            return total
        last0, last1 = s0, s1
    return math.inf  # the series did not converge: this order gives no bound


def rdp_sampled_gaussian(sampling_rate: float, noise_multiplier: float, order: float) -> float:
    """RDP of order α of one step of the Poisson-sampled Gaussian mechanism (sensitivity 1, noise σ).

    ``q = 1``: α/(2σ²) (Mironov 2017, Table II); ``q < 1``: ``log A_α / (α − 1)`` (MTZ 2019).
    """
    q, sigma = sampling_rate, noise_multiplier
    if not 0 <= q <= 1 or sigma <= 0 or order <= 1:
        raise ValueError(f"need 0 ≤ q ≤ 1, σ > 0, α > 1; got q={q}, σ={sigma}, α={order}")
    if q == 0:
        return 0.0
    if q == 1.0:
        return order / (2 * sigma ** 2)
    if float(order).is_integer():
        return _log_a_integer(q, sigma, int(order)) / (order - 1)
    return _log_a_fractional(q, sigma, order) / (order - 1)


def epsilon_from_rdp(orders: Sequence[float], rdp: Sequence[float], delta: float) -> float:
    """The smallest ε over the orders at which the RDP curve gives (ε, δ)-DP (Canonne, Kamath, Steinke 2020)."""
    if not 0 < delta < 1:
        raise ValueError(f"δ must be in (0, 1), got {delta}")
    best = math.inf
    for alpha, r in zip(orders, rdp):
        r = float(r)
        if r < 0 or delta ** 2 + math.expm1(-r) > 0:  # below the KL bound δ ≥ sqrt(1 − e^(−r)): ε = 0
            return 0.0
        if alpha > 1.01:  # the bound is unstable as α → 1 and useless there
            best = min(best, r + math.log1p(-1 / alpha) - math.log(delta * alpha) / (alpha - 1))
    return float(max(0.0, best))


def compute_epsilon(sampling_rate: float, noise_multiplier: float, rounds: int, delta: float,
                    orders: Sequence[float] = RDP_ORDERS) -> float:
    """ε of ``rounds`` compositions of the (sampled) Gaussian mechanism at the given δ."""
    accountant = RdpAccountant(orders)
    accountant.compose(sampling_rate, noise_multiplier, rounds)
    return accountant.epsilon(delta)


@dataclass
class RdpAccountant:
    """Rényi DP spent so far (one value per order), composed round by round; stored with each global model so
    a later round, on another run, resumes it."""

    orders: tuple = RDP_ORDERS
    rdp: np.ndarray = field(default=None)
    rounds: int = 0

    def __post_init__(self):
        self.orders = tuple(float(a) for a in self.orders)
        self.rdp = np.zeros(len(self.orders)) if self.rdp is None else np.asarray(self.rdp, dtype=np.float64)

    def step_rdp(self, sampling_rate: float, noise_multiplier: float) -> np.ndarray:
        return np.array([rdp_sampled_gaussian(sampling_rate, noise_multiplier, a) for a in self.orders])

    def compose(self, sampling_rate: float, noise_multiplier: float, rounds: int = 1) -> np.ndarray:
        """Add ``rounds`` rounds at this sampling rate and noise; returns one round's RDP curve."""
        step = self.step_rdp(sampling_rate, noise_multiplier)
        self.rdp = self.rdp + rounds * step
        self.rounds += rounds
        return step

    def epsilon(self, delta: float) -> float:
        return epsilon_from_rdp(self.orders, self.rdp, delta) if self.rounds else 0.0

    def to_dict(self) -> dict:
        """JSON-ready: an order whose bound did not converge (infinite RDP) is stored as "inf"."""
        return {"orders": list(self.orders), "rdp": [r if math.isfinite(r) else "inf" for r in self.rdp.tolist()],
                "rounds": self.rounds}

    @classmethod
    def from_dict(cls, state: dict | None) -> "RdpAccountant":
        """The accountant stored by `to_dict` (None: nothing spent yet)."""
        if not state:
            return cls()
        if len(state["orders"]) != len(state["rdp"]):
            raise AggregationError("privacy accounting: stored orders and RDP values differ in length")
        rdp = [float(r) for r in state["rdp"]]  # float("inf") reads the stored "inf"
        return cls(tuple(state["orders"]), np.array(rdp, dtype=np.float64), int(state["rounds"]))


# ---------------------------------------------------------------- the wrapper

@dataclass
class DifferentiallyPrivate:
    """DP-FedAvg as a wrapper: clip each device's delta from ``current`` to ``clip_norm``, let the wrapped sum
    strategy average the clipped updates with equal weights, add ``N(0, (σ·clip_norm)²)`` to the sum.

    ``sampling_rate`` q: each valid device takes part with probability q, drawn from OS entropy (q = 1: all).
    ``accountant``: the RDP spent by the model's earlier rounds. The result's ``extra["dp"]`` holds ε of this
    round alone and cumulated over the model's history, at ``delta``, with the q actually used.

    >>> from models.aggregation import FedAvg, ValidationPolicy
    >>> dp = DifferentiallyPrivate(FedAvg(policy=ValidationPolicy(1, None, None, None, None)), clip_norm=1.0,
    ...                            noise_multiplier=1e-9, delta=1e-5)
    >>> result = dp.aggregate([Update("a", [np.array([3.0, 4.0])], 5), Update("b", [np.array([0.3, 0.4])], 9)],
    ...                       current=[np.zeros(2)])
    >>> np.round(result.weights[0], 2)   # deltas clipped to norm 1 and 0.5, then averaged
    array([0.45, 0.6 ])
    >>> result.private, result.norms
    (True, {})
    """

    inner: object
    clip_norm: float
    noise_multiplier: float
    delta: float
    sampling_rate: float = 1.0
    accountant: RdpAccountant = field(default_factory=RdpAccountant)
    name: str = ""

    def __post_init__(self):
        if self.clip_norm <= 0 or self.noise_multiplier <= 0:
            raise AggregationError(f"DP-FedAvg needs privacy.clip_norm > 0 and privacy.noise_multiplier > 0, got "
                                   f"{self.clip_norm}, {self.noise_multiplier}")
        if not 0 < self.sampling_rate <= 1:
            raise AggregationError(f"privacy.sampling_rate must be in (0, 1], got {self.sampling_rate}")
        policy = getattr(self.inner, "policy", None)
        if policy is None or policy.cohort_checks:
            raise AggregationError("differential privacy needs a strategy whose checks look at each device alone "
                                   "(no norm ratio, cosine or sample cap): with them, one device's update changes "
                                   "whether others are accepted, and the sensitivity is no longer the clip norm")
        self.name = self.name or f"dp-{self.inner.name}"
        self._rng = os_entropy_generator()

    @classmethod
    def from_config(cls, inner, privacy, history: dict | None) -> "DifferentiallyPrivate":
        """From the ``privacy`` config section, resuming the accounting of ``history`` (a model's ``dp``)."""
        return cls(inner, privacy.clip_norm, privacy.noise_multiplier, privacy.delta, privacy.sampling_rate,
                   RdpAccountant.from_dict((history or {}).get("accountant")))

    def aggregate(self, updates: Sequence[Update], current: Weights | None = None) -> AggregationResult:
        """The noised mean of the clipped deltas. Without ``current`` (the first round) whole models are clipped
        (deltas from zero), which bounds the sensitivity all the same."""
        from models.aggregation import structure_problem

        shapes = self.inner.policy.reference_shapes or (
            [np.shape(w) for w in current] if current is not None else _common_shapes(updates))
        valid, rejected = [], []
        for update in updates:
            if structure_problem(update, shapes) or any(u.device_id == update.device_id for u in valid):
                rejected.append((update.device_id, NOT_THIS_ARCHITECTURE))
            else:
                valid.append(update)
        sampled = self.sample(valid)
        if current is None:
            current = [np.zeros(s) for s in shapes]
        base = flatten(current)
        clipped = [Update(u.device_id, unflatten(base + clip_by_l2_norm(flatten(u.weights) - base, self.clip_norm),
                                                 current), 1) for u in sampled]
        try:
            mean = self.inner.aggregate(clipped, current)
        except AggregationError:
            raise self.too_few(len(sampled), len(updates)) from None
        return self.release(flatten(mean.weights), mean.participants, rejected, len(valid), current)

    def sample(self, valid: Sequence) -> list:
        """The valid devices (or their updates) that take part: each with probability ``sampling_rate``."""
        return [u for u in valid if self.sampling_rate == 1.0 or self._rng.random() < self.sampling_rate]

    def too_few(self, n_sampled: int, n_updates: int) -> AggregationError:
        """The error of a round with fewer sampled valid updates than the inner strategy needs."""
        return AggregationError(f"{self.name}: {n_sampled} sampled valid update(s) of {n_updates}, needs at least "
                                f"{self.inner.policy.min_devices}")

    def release(self, mean: np.ndarray, participants: list[str], rejected: list[tuple[str, str]], n_valid: int,
                like: Weights) -> AggregationResult:
        """The result from the mean of the ``participants``' clipped updates (a flat vector, shaped like ``like``):
        noise on their sum, and this round's privacy spent added to the accountant."""
        noise = self._rng.normal(0.0, self.noise_multiplier * self.clip_norm, size=mean.shape)
        weights = unflatten(mean + noise / len(participants), like)
        step = self.accountant.compose(self.sampling_rate, self.noise_multiplier)
        dp = {"epsilon": self.accountant.epsilon(self.delta),
              "round_epsilon": epsilon_from_rdp(self.accountant.orders, step, self.delta),
              "delta": self.delta, "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
              "sampling_rate": self.sampling_rate, "rounds": self.accountant.rounds,
              "accountant": self.accountant.to_dict()}
        return AggregationResult(weights=weights, participants=list(participants), rejected=rejected, norms={},
                                 strategy=self.name, private=True,
                                 extra={"n_samples": len(participants), "n_not_sampled": n_valid - len(participants),
                                        "dp": dp})


def _common_shapes(updates: Sequence[Update]) -> list[tuple[int, ...]]:
    """The layer shapes most updates share (the architecture, before any global model exists)."""
    from collections import Counter

    shapes = Counter(tuple(np.shape(w) for w in u.weights) for u in updates)
    if not shapes:
        raise AggregationError("nothing to aggregate: no updates")
    return list(shapes.most_common(1)[0][0])
