"""Dense (fully connected) autoencoder in NumPy."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from models.optim import ParameterLayout, clip_by_global_norm, make_optimizer


def _tanh_grad(a: np.ndarray) -> np.ndarray:
    return 1.0 - a * a


def _relu_grad(a: np.ndarray) -> np.ndarray:
    return (a > 0).astype(a.dtype)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free form of 1 / (1 + exp(-z))


def _sigmoid_grad(a: np.ndarray) -> np.ndarray:
    return a * (1.0 - a)


# name -> (activation, its derivative written in terms of the activation's output)
ACTIVATIONS = {
    "tanh": (np.tanh, _tanh_grad),
    "relu": (lambda z: np.maximum(z, 0.0), _relu_grad),
    "sigmoid": (_sigmoid, _sigmoid_grad),
}


class DenseAutoencoder:
    """Reconstruct each reading through a narrow hidden layer; the reconstruction error is the anomaly score.

    Good at readings whose metrics break their usual joint pattern (one metric off while its peers are normal);
    blind to anomalies that only show in time (a normal value at an unusual moment): see `LSTMAutoencoder`.
    The output layer is linear, so inputs should be standardised (`RunningScaler`). The loss is the mean
    squared error over the batch and the features; each mini-batch is one optimiser step, with gradients
    clipped by their global norm. Weights use Glorot-uniform initialisation (Glorot & Bengio, 2010), seeded.

    Parameters
    ----------
    hidden
        Widths of the hidden layers, e.g. ``(16, 4, 16)`` (bottleneck in the middle).
    activation
        ``tanh``, ``relu`` or ``sigmoid`` for the hidden layers.
    optimizer, learning_rate
        ``adam`` or ``sgd`` and its step size.
    batch_size
        Readings per optimiser step in `learn_many`.
    grad_clip
        Maximum global L2 norm of the gradient (0 disables clipping).
    seed
        Seed of the weight initialisation.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(256, 3)) @ np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.1]])
    >>> ae = DenseAutoencoder(hidden=(8, 2, 8), seed=0)
    >>> before = ae.score_many(X).mean()
    >>> for _ in range(30):
    ...     ae.learn_many(X)
    >>> bool(ae.score_many(X).mean() < before / 4)
    True
    >>> ae.score_one(np.array([0.0, 0.0, 5.0])) > ae.score_one(X[0])
    True
    """

    def __init__(self, hidden: Sequence[int] = (16, 4, 16), activation: str = "tanh", optimizer: str = "adam",
                 learning_rate: float = 0.003, batch_size: int = 16, grad_clip: float = 5.0, seed: int = 7):
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation: unknown activation {activation!r} (known: {', '.join(ACTIVATIONS)})")
        self.hidden = tuple(int(h) for h in hidden)
        self.activation = activation
        self.batch_size = int(batch_size)
        self.grad_clip = float(grad_clip)
        self.seed = int(seed)
        self.optimizer = make_optimizer(optimizer, learning_rate)
        self._activate, self._activation_grad = ACTIVATIONS[activation]
        self.n_features: int | None = None
        self.layout: ParameterLayout | None = None
        self.flat = np.zeros(0)             # every parameter, in the order of `params`
        self.params: list[np.ndarray] = []  # [W0, b0, W1, b1, ...] as views of `flat`; W is (fan_in, fan_out)
        self.loss: float | None = None      # mean squared error of the last optimiser step
        self._grad = np.zeros(0)            # scratch flat gradient of `_step`, and its per-parameter views
        self._grad_views: list[np.ndarray] = []

    @property
    def architecture(self) -> str:
        """Shape of the network as text, e.g. ``dense_ae/19-16-4-16-19/tanh``: equal strings, compatible weights."""
        widths = [self.n_features, *self.hidden, self.n_features]
        return f"dense_ae/{'-'.join(map(str, widths))}/{self.activation}"

    def initialize(self, n_features: int) -> None:
        """Create the weights for `n_features` inputs (done lazily by the first observation)."""
        rng = np.random.default_rng(self.seed)
        widths = [n_features, *self.hidden, n_features]
        params = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            params += [rng.uniform(-limit, limit, size=(fan_in, fan_out)), np.zeros(fan_out)]
        self._store(params)

    def _store(self, params: list[np.ndarray]) -> None:
        """Lay `params` out in a new flat vector, with the gradient scratch to match."""
        self.layout = ParameterLayout([np.shape(p) for p in params])
        self.flat = self.layout.flatten(params)
        self.params = self.layout.views(self.flat)
        self._grad = np.zeros(self.layout.size)
        self._grad_views = self.layout.views(self._grad)
        self.n_features = self.params[0].shape[0]

    def _ensure(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 1:
            X = X[None, :]
        if self.n_features is None:
            self.initialize(X.shape[1])
        elif X.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features, got {X.shape[1]}")
        return X

    def _forward(self, X: np.ndarray) -> list[np.ndarray]:
        """Outputs of every layer, input first, reconstruction last."""
        outputs = [X]
        last = len(self.params) // 2 - 1
        for i in range(last + 1):
            z = np.dot(outputs[-1], self.params[2 * i])  # np.dot: less call overhead than @ on small arrays
            z += self.params[2 * i + 1]
            outputs.append(z if i == last else self._activate(z))
        return outputs

    def _backprop(self, X: np.ndarray, grads: list[np.ndarray]) -> float:
        """Write the gradient of the mean squared reconstruction error of `X` into `grads` (arrays shaped like
        `params`); return the error."""
        outputs = self._forward(X)
        diff = outputs[-1]
        diff -= X
        loss = float(np.add.reduce(diff * diff, axis=None)) / diff.size
        delta = diff * 2.0
        delta /= diff.size
        for i in reversed(range(len(self.params) // 2)):
            np.dot(outputs[i].T, delta, out=grads[2 * i])
            np.add.reduce(delta, axis=0, out=grads[2 * i + 1])
            if i:
                delta = np.dot(delta, self.params[2 * i].T)
                delta *= self._activation_grad(outputs[i])
        return loss

    def loss_and_gradients(self, X: np.ndarray) -> tuple[float, list[np.ndarray]]:
        """Mean squared reconstruction error of `X` and its gradient for every parameter (backpropagation)."""
        X = self._ensure(X)
        grads = self.layout.views(np.empty(self.layout.size))
        return self._backprop(X, grads), grads

    def learn_one(self, x: np.ndarray) -> None:
        self._step(self._ensure(x))

    def learn_many(self, X: np.ndarray) -> None:
        """One optimiser step per consecutive mini-batch of `batch_size` rows."""
        X = self._ensure(X)
        for start in range(0, X.shape[0], self.batch_size):
            self._step(X[start:start + self.batch_size])

    def _step(self, X: np.ndarray) -> None:
        self.loss = self._backprop(X, self._grad_views)
        self.optimizer.step(self.flat, clip_by_global_norm(self._grad, self.grad_clip))

    def feature_errors(self, X: np.ndarray) -> np.ndarray:
        """Squared reconstruction error of every feature, shape (n, d): where a reading is off."""
        X = self._ensure(X)
        diff = self._forward(X)[-1]
        diff -= X
        return np.multiply(diff, diff, out=diff)

    def score_one(self, x: np.ndarray) -> float:
        return float(self.score_many(x)[0])

    def score_many(self, X: np.ndarray) -> np.ndarray:
        """Mean squared reconstruction error per reading, shape (n,)."""
        return self.feature_errors(X).mean(axis=1)

    def get_weights(self) -> list[np.ndarray]:
        return [p.copy() for p in self.params]

    def set_weights(self, weights: list[np.ndarray]) -> None:
        """Copy `weights` into the parameters (shapes must match once initialised); optimiser state is kept."""
        if not self.params:
            self._store([np.asarray(w, dtype=np.float64) for w in weights])
            return
        check_weight_shapes(self.params, weights)
        for p, w in zip(self.params, weights):
            p[...] = w

    def get_state(self) -> list[np.ndarray]:
        """Weights followed by the optimiser's state: everything `set_state` needs to resume training."""
        return self.get_weights() + self.optimizer.state_arrays(self.layout)

    def set_state(self, arrays: list[np.ndarray]) -> None:
        n = 2 * (len(self.hidden) + 1)
        self.set_weights(arrays[:n])
        self.optimizer.load_state_arrays(arrays[n:], self.layout)


def checked_rows(model, X: np.ndarray) -> np.ndarray:
    """`X` as float64 rows for `model` (anything with ``n_features`` and ``initialize``), which it sets up lazily
    on the first rows; a different number of columns later is a ValueError."""
    X = np.array(X, dtype=np.float64, ndmin=2)
    if model.n_features is None:
        model.initialize(X.shape[1])
    elif X.shape[1] != model.n_features:
        raise ValueError(f"expected {model.n_features} features, got {X.shape[1]}")
    return X


def check_weight_shapes(expected: list[np.ndarray], given: list[np.ndarray]) -> None:
    """Raise ValueError naming the first weight array whose shape differs."""
    if len(given) != len(expected):
        raise ValueError(f"expected {len(expected)} weight arrays, got {len(given)}")
    for i, (e, g) in enumerate(zip(expected, given)):
        if np.shape(g) != e.shape:
            raise ValueError(f"weight array {i}: expected shape {e.shape}, got {np.shape(g)}")
