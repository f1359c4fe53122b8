"""DP-FedAvg as a wrapper, its accountant against Google's dp-accounting, and what it releases."""
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant as ReferenceAccountant

from config import load_config
from models.aggregation import FedAvg, ValidationPolicy, make_strategy
from models.privacy import (DifferentiallyPrivate, RdpAccountant, clip_by_l2_norm, compute_epsilon,
                            epsilon_from_rdp, rdp_sampled_gaussian)
from models.updates import AggregationError, Update, flatten

SHAPES = [(3, 2), (2,)]


def gaussian_delta(epsilon, sigma):
    """Exact δ(ε) of the Gaussian mechanism with sensitivity 1 (Balle & Wang 2018, Theorem 8)."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))
    return phi(-epsilon * sigma + 1 / (2 * sigma)) - math.exp(epsilon) * phi(-epsilon * sigma - 1 / (2 * sigma))


def reference_epsilon(q, sigma, rounds, delta):
    accountant = ReferenceAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("q", [0.01, 0.2, 1.0])
@pytest.mark.parametrize("rounds", [1, 50, 1000])
def test_epsilon_equals_dp_accounting(sigma, q, rounds):
    ours, reference = compute_epsilon(q, sigma, rounds, 1e-5), reference_epsilon(q, sigma, rounds, 1e-5)
    assert ours == pytest.approx(reference, rel=1e-6)


def test_tighter_conversion_is_still_an_upper_bound():
    eps = compute_epsilon(1.0, 1.0, rounds=1, delta=1e-5)
    assert eps < 0.5 + math.sqrt(2 * math.log(1e5))   # below the older min_α α/2 + ln(1/δ)/(α−1) = 5.298
    assert gaussian_delta(eps, 1.0) <= 1e-5            # and the exact Gaussian mechanism honours it


def test_epsilon_decreases_with_noise_grows_with_rounds_and_sampling_amplifies():
    for q in (1.0, 0.1):
        eps = [compute_epsilon(q, sigma, rounds=10, delta=1e-5) for sigma in (0.7, 1.0, 2.0, 4.0)]
        assert all(a > b for a, b in zip(eps, eps[1:]))
    assert compute_epsilon(1.0, 1.0, 10, 1e-5) > compute_epsilon(1.0, 1.0, 1, 1e-5)
    assert compute_epsilon(0.01, 1.0, 100, 1e-5) < compute_epsilon(1.0, 1.0, 100, 1e-5)
    assert rdp_sampled_gaussian(0.999999, 1.5, 4) == pytest.approx(4 / (2 * 1.5 ** 2), rel=1e-3)


def test_accountant_resumes_from_its_stored_state_and_composes_mixed_rates():
    first = RdpAccountant()
    first.compose(0.5, 1.2, rounds=3)
    resumed = RdpAccountant.from_dict(first.to_dict())
    resumed.compose(0.1, 1.2, rounds=2)
    direct = RdpAccountant()
    direct.compose(0.5, 1.2, 3)
    direct.compose(0.1, 1.2, 2)
    assert resumed.rounds == 5 and resumed.epsilon(1e-5) == pytest.approx(direct.epsilon(1e-5))
    reference = ReferenceAccountant()
    reference.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.2)), 3))
    reference.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.2)), 2))
    assert resumed.epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-6)
    assert epsilon_from_rdp(direct.orders, np.zeros(len(direct.orders)), 1e-5) == 0.0


def test_clipping_bounds_each_device():
    v = np.array([3.0, 4.0])
    assert np.linalg.norm(clip_by_l2_norm(v, 1.0)) == pytest.approx(1.0)
    np.testing.assert_array_equal(clip_by_l2_norm(v, 10.0), v)


def dp(noise=2.0, q=1.0, min_devices=2):
    return DifferentiallyPrivate(FedAvg(policy=ValidationPolicy(min_devices, None, None, None, None)),
                                 clip_norm=1.0, noise_multiplier=noise, delta=1e-5, sampling_rate=q)


def test_noise_scale_clipping_and_accounting():
    current = [np.zeros(20000)]
    updates = [Update(f"d{i}", [np.full(20000, 100.0)], 10) for i in range(4)]  # huge deltas: clipped to 1 each
    mechanism = dp()
    result = mechanism.aggregate(updates, current)
    new = result.weights[0]
    assert new.mean() == pytest.approx(1.0 / np.sqrt(20000), abs=0.05)
    assert new.std() == pytest.approx(2.0 * 1.0 / 4, rel=0.05)   # σ·S / n
    assert result.extra["dp"]["rounds"] == 1
    assert result.extra["dp"]["epsilon"] == pytest.approx(compute_epsilon(1.0, 2.0, 1, 1e-5))
    assert result.extra["dp"]["round_epsilon"] == result.extra["dp"]["epsilon"]
    mechanism.aggregate(updates, current)
    assert mechanism.accountant.rounds == 2


def test_noise_comes_from_os_entropy_not_from_public_values():
    """Knowing the config, the version and every update does not regenerate the noise (issue 17.1)."""
    cfg = load_config(env={"FLEAD_PRIVACY_ENABLED": "true"})
    current = [np.zeros(s) for s in SHAPES]
    updates = [Update(f"d{i}", [np.full(s, 0.01 * i) for s in SHAPES], 10) for i in range(5)]
    runs = [flatten(make_strategy(cfg).aggregate(updates, current).weights) for _ in range(2)]
    assert not np.allclose(runs[0], runs[1])      # same inputs, same config: different noise
    exact_mean = flatten([np.full(s, 0.02) for s in SHAPES])
    noise = (runs[0] - exact_mean) * len(updates)
    sigma = cfg.privacy.noise_multiplier * cfg.privacy.clip_norm
    for version in range(0, 4):
        for seed in (cfg.model.seed, cfg.model.seed * 1_000_003 + version, version, 0):
            guess = np.random.default_rng(seed).normal(0.0, sigma, size=noise.shape)
            assert not np.allclose(guess, noise, atol=1e-6)


def test_acceptance_does_not_depend_on_other_devices():
    """With DP on, adding or removing one device changes no other device's acceptance (issue 17.2)."""
    rng = np.random.default_rng(0)
    honest = [Update(f"d{i}", [rng.normal(size=s) for s in SHAPES], int(rng.integers(10, 100))) for i in range(8)]
    broken = [Update("nan", [np.full((3, 2), np.nan), np.zeros(2)], 5), Update("shape", [np.zeros((2, 3)), np.zeros(2)], 5)]
    extremes = [Update("huge", [1e6 * w for w in honest[0].weights], 10), Update("flip", [-w for w in honest[1].weights], 10),
                Update("greedy", honest[2].weights, 2 ** 53)]
    base = honest + broken
    current = [np.zeros(s) for s in SHAPES]

    def accepted(updates):
        result = dp().aggregate(updates, current)
        return set(result.participants)

    reference = accepted(base)
    assert reference == {u.device_id for u in honest}
    for extra in extremes:   # any added device: the others keep their status, the extreme one is clipped in
        assert accepted(base + [extra]) == reference | {extra.device_id}
    for removed in honest:
        assert accepted([u for u in base if u is not removed]) == reference - {removed.device_id}


def test_private_result_releases_no_per_device_statistic():
    updates = [Update(f"d{i}", [np.full(s, float(i)) for s in SHAPES], 10 + i) for i in range(4)]
    updates.append(Update("bad", [np.zeros((9, 9))], 3))
    result = dp().aggregate(updates)
    assert result.private and result.norms == {}
    assert result.rejected == [("bad", "not a valid update for this architecture")]   # no value quoted


def test_sampling_rate_samples_devices_and_is_accounted():
    updates = [Update(f"d{i}", [np.ones(s) for s in SHAPES], 10) for i in range(400)]
    result = dp(q=0.25).aggregate(updates, [np.zeros(s) for s in SHAPES])
    taken = len(result.participants)
    assert 60 < taken < 140 and result.extra["n_not_sampled"] == 400 - taken
    assert result.extra["dp"]["sampling_rate"] == 0.25
    assert result.extra["dp"]["epsilon"] == pytest.approx(compute_epsilon(0.25, 2.0, 1, 1e-5))


def test_wrapper_refuses_cohort_checks_and_bad_settings():
    with pytest.raises(AggregationError, match="sensitivity"):
        DifferentiallyPrivate(FedAvg(), 1.0, 1.0, 1e-5)
    with pytest.raises(AggregationError, match="clip_norm"):
        dp(noise=0.0)
    with pytest.raises(AggregationError, match="needs at least 2"):
        dp().aggregate([Update("one", [np.ones(s) for s in SHAPES], 1)], [np.zeros(s) for s in SHAPES])
