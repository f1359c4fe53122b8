"""Gradient-descent optimisers for the NumPy networks, over one flat parameter vector, with state as plain arrays.

A network keeps all its parameters in one flat float64 vector; `ParameterLayout` gives each layer's array as a
view into it. Clipping and an optimiser step are then a handful of vector operations, whatever the layer count.

>>> import numpy as np
>>> w = np.array([1.0, -2.0])
>>> opt = make_optimizer("adam", learning_rate=0.1)
>>> opt.step(w, np.array([0.5, -0.5]))
>>> w.round(3).tolist()
[0.9, -1.9]
>>> clip_by_global_norm(np.array([3.0, 4.0]), 1.0).round(6).tolist()
[0.6, 0.8]
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


class ParameterLayout:
    """Where each of a network's parameter arrays lives in its flat vector (in order, C order each)."""

    def __init__(self, shapes: Sequence[Sequence[int]]):
        self.shapes = [tuple(int(n) for n in shape) for shape in shapes]
        ends = np.cumsum([math.prod(shape) for shape in self.shapes]).tolist()
        self.bounds = list(zip([0] + ends[:-1], ends))
        self.size = ends[-1] if ends else 0

    def views(self, flat: np.ndarray) -> list[np.ndarray]:
        """The arrays as views of `flat`: writing to a view writes to `flat`."""
        return [flat[start:end].reshape(shape) for (start, end), shape in zip(self.bounds, self.shapes)]

    def flatten(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """A new flat float64 vector holding `arrays`, which must have this layout's shapes."""
        shapes = [np.shape(a) for a in arrays]
        if shapes != self.shapes:
            raise ValueError(f"expected arrays of shapes {self.shapes}, got {shapes}")
        flat = np.empty(self.size)
        for view, array in zip(self.views(flat), arrays):
            view[...] = array
        return flat


def clip_by_global_norm(grad: np.ndarray, max_norm: float) -> np.ndarray:
    """Scale the flat gradient `grad` in place so its L2 norm is at most `max_norm` (no-op if `max_norm` <= 0);
    a non-finite norm zeroes it. Returns `grad`."""
    if max_norm <= 0:
        return grad
    norm = math.sqrt(float(np.dot(grad, grad)))
    if not math.isfinite(norm):
        grad.fill(0.0)
    elif norm > max_norm:
        grad *= max_norm / norm
    return grad


class Sgd:
    """Plain stochastic gradient descent: ``w -= learning_rate * g``. Stateless."""

    name = "sgd"

    def __init__(self, learning_rate: float = 0.01):
        self.learning_rate = float(learning_rate)

    def step(self, params: np.ndarray, grad: np.ndarray) -> None:
        """Update the flat vector `params` in place from the flat gradient `grad`."""
        params -= self.learning_rate * grad

    def state_arrays(self, layout: ParameterLayout) -> list[np.ndarray]:
        return []

    def load_state_arrays(self, arrays: list[np.ndarray], layout: ParameterLayout) -> None:
        if arrays:
            raise ValueError(f"SGD has no state, got {len(arrays)} arrays")


class Adam:
    """Adam (Kingma & Ba, ICLR 2015) with the paper's defaults β1 = 0.9, β2 = 0.999, ε = 1e-8.

    The moments are flat vectors like the parameters, created at the first step; one step is a fused update of
    the whole vector, in place, into two scratch vectors.
    """

    name = "adam"
    BETA1 = 0.9     # decay of the first-moment (mean gradient) estimate
    BETA2 = 0.999   # decay of the second-moment (squared gradient) estimate
    EPS = 1e-8      # keeps the update finite where the second moment is ~0

    def __init__(self, learning_rate: float = 0.001):
        self.learning_rate = float(learning_rate)
        self.t = 0
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None
        self._scratch: tuple[np.ndarray, np.ndarray] | None = None

    def step(self, params: np.ndarray, grad: np.ndarray) -> None:
        """Update the flat vector `params` in place from the flat gradient `grad`."""
        if self.m is None:
            self.m, self.v = np.zeros_like(params), np.zeros_like(params)
        if self._scratch is None or self._scratch[0].shape != params.shape:
            self._scratch = (np.empty_like(params), np.empty_like(params))
        update, denom = self._scratch
        m, v = self.m, self.v
        self.t += 1
        # Bias corrections folded into the step size (Kingma & Ba, section 2).
        lr = self.learning_rate * math.sqrt(1 - self.BETA2 ** self.t) / (1 - self.BETA1 ** self.t)
        m *= self.BETA1                                   # m = β1·m + (1 − β1)·g
        m += np.multiply(grad, 1 - self.BETA1, out=update)
        v *= self.BETA2                                   # v = β2·v + (1 − β2)·g²
        np.multiply(grad, 1 - self.BETA2, out=update)
        v += np.multiply(update, grad, out=update)
        np.sqrt(v, out=denom)                             # p -= lr·m / (√v + ε)
        denom += self.EPS
        np.multiply(m, lr, out=update)
        params -= np.divide(update, denom, out=update)

    def state_arrays(self, layout: ParameterLayout) -> list[np.ndarray]:
        """``[t]``, then m and v each split into arrays shaped like the parameters (just ``[t]`` before the
        first step)."""
        state = [np.array([float(self.t)])]
        if self.m is not None:
            state += [a.copy() for a in layout.views(self.m) + layout.views(self.v)]
        return state

    def load_state_arrays(self, arrays: list[np.ndarray], layout: ParameterLayout) -> None:
        """Inverse of `state_arrays`."""
        n = len(layout.shapes)
        if len(arrays) not in (1, 1 + 2 * n):
            raise ValueError(f"Adam state: expected 1 or {1 + 2 * n} arrays, got {len(arrays)}")
        self.t = int(arrays[0][0])
        if len(arrays) == 1:
            self.m = self.v = None
        else:
            self.m, self.v = layout.flatten(arrays[1:1 + n]), layout.flatten(arrays[1 + n:])


OPTIMIZERS = {"adam": Adam, "sgd": Sgd}


def make_optimizer(name: str, learning_rate: float) -> Adam | Sgd:
    try:
        return OPTIMIZERS[name](learning_rate)
    except KeyError:
        raise ValueError(f"model.optimizer: unknown optimiser {name!r} (known: {', '.join(OPTIMIZERS)})") from None
