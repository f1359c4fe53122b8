"""DP-FedAvg and the RDP accountant."""
import math

import numpy as np
import pytest

from models.privacy import DPFedAvgMechanism, clip_by_l2_norm, compute_epsilon, rdp_sampled_gaussian


def gaussian_delta(epsilon, sigma):
    """Exact δ(ε) of the Gaussian mechanism with sensitivity 1 (Balle & Wang 2018, Theorem 8)."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))
    return phi(-epsilon * sigma + 1 / (2 * sigma)) - math.exp(epsilon) * phi(-epsilon * sigma - 1 / (2 * sigma))


def test_documented_case_q1_sigma1_one_round():
    # Full participation: RDP(α) = α/2, so ε = min_α α/2 + ln(1/δ)/(α−1) = 1/2 + sqrt(2 ln(1/δ)) at α = 1 + sqrt(2 ln(1/δ)).
    eps = compute_epsilon(1.0, 1.0, rounds=1, delta=1e-5)
    assert eps == pytest.approx(0.5 + math.sqrt(2 * math.log(1e5)), abs=0.01)   # 5.298
    # RDP is an upper bound: the exact Gaussian mechanism at this ε has δ below 1e-5 (its exact ε is ≈ 4.4).
    assert gaussian_delta(eps, 1.0) <= 1e-5


def test_epsilon_decreases_as_noise_increases_and_grows_with_rounds():
    for q in (1.0, 0.1):
        eps = [compute_epsilon(q, sigma, rounds=10, delta=1e-5) for sigma in (0.7, 1.0, 2.0, 4.0)]
        assert all(a > b for a, b in zip(eps, eps[1:]))
    assert compute_epsilon(1.0, 1.0, 10, 1e-5) > compute_epsilon(1.0, 1.0, 1, 1e-5)


def test_subsampling_amplifies_privacy():
    assert compute_epsilon(0.01, 1.0, 100, 1e-5) < compute_epsilon(1.0, 1.0, 100, 1e-5)
    # At q = 1 the binomial expansion reduces to the plain Gaussian α/(2σ²).
    assert rdp_sampled_gaussian(0.999999, 1.5, 4) == pytest.approx(4 / (2 * 1.5 ** 2), rel=1e-3)


def test_clipping_bounds_each_device():
    v = np.array([3.0, 4.0])
    assert np.linalg.norm(clip_by_l2_norm(v, 1.0)) == pytest.approx(1.0)
    np.testing.assert_array_equal(clip_by_l2_norm(v, 10.0), v)


def test_dp_fedavg_noise_scale_and_clipping():
    current = [np.zeros(20000)]
    models = [[np.full(20000, 100.0)] for _ in range(4)]   # huge deltas: clipped to norm 1 each
    dp = DPFedAvgMechanism(clip_norm=1.0, noise_multiplier=2.0, delta=1e-5, seed=0)
    new = dp.aggregate(models, current)[0]
    mean_clipped = 1.0 / np.sqrt(20000)
    assert new.mean() == pytest.approx(mean_clipped, abs=0.05)
    assert new.std() == pytest.approx(2.0 * 1.0 / 4, rel=0.05)   # σ·S / n
    assert dp.rounds_done == 1 and dp.epsilon() == pytest.approx(compute_epsilon(1.0, 2.0, 1, 1e-5))
    with pytest.raises(ValueError, match="current global model"):
        dp.aggregate(models, None)
