"""Gradient-descent optimisers for the NumPy networks, with state as plain arrays.

>>> import numpy as np
>>> w = [np.array([1.0, -2.0])]
>>> opt = make_optimizer("adam", learning_rate=0.1)
>>> opt.step(w, [np.array([0.5, -0.5])])
>>> w[0].round(3).tolist()
[0.9, -1.9]
>>> clip_by_global_norm([np.array([3.0]), np.array([4.0])], 1.0)[0].round(6).tolist()
[0.6]
"""
from __future__ import annotations

import numpy as np


def clip_by_global_norm(grads: list[np.ndarray], max_norm: float) -> list[np.ndarray]:
    """Scale all gradients together so their joint L2 norm is at most `max_norm` (no-op if `max_norm` <= 0)."""
    if max_norm <= 0:
        return grads
    norm = np.sqrt(sum(float(np.vdot(g, g)) for g in grads))
    if norm <= max_norm or not np.isfinite(norm):
        return grads if np.isfinite(norm) else [np.zeros_like(g) for g in grads]
    scale = max_norm / norm
    return [g * scale for g in grads]


class Sgd:
    """Plain stochastic gradient descent: ``w -= learning_rate * g``. Stateless."""

    name = "sgd"

    def __init__(self, learning_rate: float = 0.01):
        self.learning_rate = float(learning_rate)

    def step(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        for p, g in zip(params, grads):
            p -= self.learning_rate * g

    def state_arrays(self) -> list[np.ndarray]:
        return []

    def load_state_arrays(self, arrays: list[np.ndarray]) -> None:
        if arrays:
            raise ValueError(f"SGD has no state, got {len(arrays)} arrays")


class Adam:
    """Adam (Kingma & Ba, ICLR 2015) with the paper's defaults β1 = 0.9, β2 = 0.999, ε = 1e-8.

    Moments are created lazily at the first step, shaped like the parameters.
    """

    name = "adam"
    BETA1 = 0.9     # decay of the first-moment (mean gradient) estimate
    BETA2 = 0.999   # decay of the second-moment (squared gradient) estimate
    EPS = 1e-8      # keeps the update finite where the second moment is ~0

    def __init__(self, learning_rate: float = 0.001):
        self.learning_rate = float(learning_rate)
        self.t = 0
        self.m: list[np.ndarray] = []
        self.v: list[np.ndarray] = []

    def step(self, params: list[np.ndarray], grads: list[np.ndarray]) -> None:
        if not self.m:
            self.m = [np.zeros_like(p) for p in params]
            self.v = [np.zeros_like(p) for p in params]
        self.t += 1
        # Bias corrections folded into the step size (Kingma & Ba, section 2).
        lr = self.learning_rate * np.sqrt(1 - self.BETA2 ** self.t) / (1 - self.BETA1 ** self.t)
        for p, g, m, v in zip(params, grads, self.m, self.v):
            m *= self.BETA1
            m += (1 - self.BETA1) * g
            v *= self.BETA2
            v += (1 - self.BETA2) * g * g
            p -= lr * m / (np.sqrt(v) + self.EPS)

    def state_arrays(self) -> list[np.ndarray]:
        """``[t], m..., v...`` (just ``[t]`` before the first step)."""
        return [np.array([float(self.t)])] + self.m + self.v

    def load_state_arrays(self, arrays: list[np.ndarray]) -> None:
        self.t = int(arrays[0][0])
        k = (len(arrays) - 1) // 2
        self.m = [a.copy() for a in arrays[1:1 + k]]
        self.v = [a.copy() for a in arrays[1 + k:]]


OPTIMIZERS = {"adam": Adam, "sgd": Sgd}


def make_optimizer(name: str, learning_rate: float) -> Adam | Sgd:
    try:
        return OPTIMIZERS[name](learning_rate)
    except KeyError:
        raise ValueError(f"model.optimizer: unknown optimiser {name!r} (known: {', '.join(OPTIMIZERS)})") from None
