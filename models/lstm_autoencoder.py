"""LSTM autoencoder over sliding windows of readings, in NumPy with full backpropagation through time."""
from __future__ import annotations

import numpy as np

from models.autoencoder import check_weight_shapes, checked_rows
from models.optim import ParameterLayout, clip_by_global_norm, make_optimizer

SCORE_CHUNK = 1024  # windows scored at once: bounds the forward caches to ~20 MB with the default sizes
FORGET_BIAS = 1.0  # forget gates start open, so gradients flow through time early on (Jozefowicz et al., 2015)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def lstm_forward(W: np.ndarray, b: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, list]:
    """Run one LSTM layer over ``xs`` (T, B, n_in) from a zero state. Gates are packed [input, forget, output,
    candidate] in the columns of ``W`` ((n_in + H), 4H). Returns the hidden states (T, B, H) and a cache."""
    T, B, _ = xs.shape
    H = W.shape[1] // 4
    h, c = np.zeros((B, H)), np.zeros((B, H))
    hs = np.empty((T, B, H))
    cache = []
    for t in range(T):
        inp = np.concatenate([xs[t], h], axis=1)
        z = inp @ W + b
        gates = _sigmoid(z[:, :3 * H])
        i, f, o = gates[:, :H], gates[:, H:2 * H], gates[:, 2 * H:]
        g = np.tanh(z[:, 3 * H:])
        c_prev = c
        c = f * c + i * g
        tanh_c = np.tanh(c)
        h = o * tanh_c
        hs[t] = h
        cache.append((inp, i, f, o, g, c_prev, tanh_c))
    return hs, cache


def lstm_backward(W: np.ndarray, cache: list, dhs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backpropagation through time for `lstm_forward`, given the loss gradient for every hidden state.
    Returns (dW, db, dxs)."""
    T, B, H = dhs.shape
    n_in = W.shape[0] - H
    dW, db = np.zeros_like(W), np.zeros(W.shape[1])
    dxs = np.empty((T, B, n_in))
    dh_next, dc_next = np.zeros((B, H)), np.zeros((B, H))
    for t in reversed(range(T)):
        inp, i, f, o, g, c_prev, tanh_c = cache[t]
        dh = dhs[t] + dh_next
        dc = dc_next + dh * o * (1.0 - tanh_c * tanh_c)
        dz = np.concatenate([dc * g * i * (1.0 - i), dc * c_prev * f * (1.0 - f),
                             dh * tanh_c * o * (1.0 - o), dc * i * (1.0 - g * g)], axis=1)
        dW += inp.T @ dz
        db += dz.sum(axis=0)
        dinp = dz @ W.T
        dxs[t], dh_next = dinp[:, :n_in], dinp[:, n_in:]
        dc_next = dc * f
    return dW, db, dxs


class LSTMAutoencoder:
    """Encode the last `window` readings into the final hidden state of an LSTM, repeat that latent vector at
    every step of a decoder LSTM, and map the decoder's states back to readings with a dense layer
    (Malhotra et al., 2016, "LSTM-based encoder-decoder for multi-sensor anomaly detection").

    Sees anomalies in time (a broken rhythm, a value at the wrong moment) that a per-reading model cannot; costs
    about `window` times more per reading than `DenseAutoencoder`, and needs standardised inputs.

    Stream contract: the model keeps the last ``window - 1`` readings it learned, so a reading's score is the
    squared error of the *last step* of the window that ends at that reading. At the start of a stream the
    window is padded by repeating the first reading. `learn_many` trains on the windows ending at every
    `train_stride`-th reading (counted over the stream), `batch_size` windows per optimiser step; the loss is the
    mean squared error over all steps of the window.

    Parameters
    ----------
    window
        Time steps per window.
    hidden
        Units of the encoder and the decoder LSTM (also the latent size).
    optimizer, learning_rate, batch_size, grad_clip, seed
        As in `DenseAutoencoder`.
    train_stride
        Learn from one window in this many readings (1: all), to trade accuracy for speed.

    >>> import numpy as np
    >>> t = np.arange(600)
    >>> X = np.stack([np.sin(t / 4), np.cos(t / 4)], axis=1)
    >>> model = LSTMAutoencoder(window=8, hidden=8, learning_rate=0.01, seed=0)
    >>> before = model.score_many(X[:100]).mean()
    >>> for start in range(0, 600, 16):
    ...     model.learn_many(X[start:start + 16])
    >>> bool(model.score_many(X[:100]).mean() < before)
    True
    """

    def __init__(self, window: int = 24, hidden: int = 16, optimizer: str = "adam", learning_rate: float = 0.003,
                 batch_size: int = 16, grad_clip: float = 5.0, seed: int = 7, train_stride: int = 1):
        if window < 1 or train_stride < 1:
            raise ValueError(f"model.window ({window}) and train_stride ({train_stride}) must be >= 1")
        self.window = int(window)
        self.hidden = int(hidden)
        self.batch_size = int(batch_size)
        self.grad_clip = float(grad_clip)
        self.seed = int(seed)
        self.train_stride = int(train_stride)
        self.optimizer = make_optimizer(optimizer, learning_rate)
        self.n_features: int | None = None
        self.layout: ParameterLayout | None = None
        self.flat = np.zeros(0)             # every parameter, in the order of `params`
        self.params: list[np.ndarray] = []  # [W_enc, b_enc, W_dec, b_dec, W_out, b_out] as views of `flat`
        self.loss: float | None = None
        self.n_seen = 0                     # readings learned, for the stride
        self._recent: np.ndarray | None = None  # last window - 1 learned readings, oldest first

    @property
    def architecture(self) -> str:
        return f"lstm_ae/{self.n_features}/h{self.hidden}/w{self.window}"

    def initialize(self, n_features: int) -> None:
        rng = np.random.default_rng(self.seed)
        d, H = n_features, self.hidden

        def glorot(fan_in: int, fan_out: int) -> np.ndarray:
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            return rng.uniform(-limit, limit, size=(fan_in, fan_out))

        def gate_bias() -> np.ndarray:
            b = np.zeros(4 * H)
            b[H:2 * H] = FORGET_BIAS
            return b

        self._store([glorot(d + H, 4 * H), gate_bias(), glorot(2 * H, 4 * H), gate_bias(), glorot(H, d),
                     np.zeros(d)])
        self.n_features = d
        self._recent = np.zeros((0, d))

    def _store(self, params: list[np.ndarray]) -> None:
        """Lay `params` out in a new flat vector."""
        self.layout = ParameterLayout([np.shape(p) for p in params])
        self.flat = self.layout.flatten(params)
        self.params = self.layout.views(self.flat)

    def _ensure(self, X: np.ndarray) -> np.ndarray:
        return checked_rows(self, X)

    def windows(self, X: np.ndarray) -> np.ndarray:
        """The window ending at each reading of `X`, after the remembered readings: shape (window, n, d)."""
        X = self._ensure(X)
        history = np.vstack([self._recent, X])
        pad = self.window - 1 - self._recent.shape[0]
        if pad > 0:
            history = np.vstack([np.repeat(history[:1], pad, axis=0), history])
        views = np.lib.stride_tricks.sliding_window_view(history, self.window, axis=0)  # (n, d, window)
        return np.ascontiguousarray(views.transpose(2, 0, 1))

    def _forward(self, xs: np.ndarray) -> tuple[np.ndarray, tuple]:
        W_enc, b_enc, W_dec, b_dec, W_out, b_out = self.params
        h_enc, cache_enc = lstm_forward(W_enc, b_enc, xs)
        latent = h_enc[-1]
        h_dec, cache_dec = lstm_forward(W_dec, b_dec, np.broadcast_to(latent, (xs.shape[0], *latent.shape)))
        return h_dec @ W_out + b_out, (cache_enc, h_enc.shape, cache_dec, h_dec)

    def loss_and_gradients(self, xs: np.ndarray) -> tuple[float, list[np.ndarray]]:
        """Mean squared reconstruction error of windows ``xs`` (window, B, d) and its gradient (BPTT)."""
        W_enc, _, W_dec, _, W_out, _ = self.params
        ys, (cache_enc, enc_shape, cache_dec, h_dec) = self._forward(xs)
        diff = ys - xs
        loss = float(np.mean(diff * diff))
        dys = 2.0 * diff / diff.size
        dW_out = np.einsum("tbh,tbd->hd", h_dec, dys)
        db_out = dys.sum(axis=(0, 1))
        dW_dec, db_dec, d_latent_steps = lstm_backward(W_dec, cache_dec, dys @ W_out.T)
        dh_enc = np.zeros(enc_shape)
        dh_enc[-1] = d_latent_steps.sum(axis=0)
        dW_enc, db_enc, _ = lstm_backward(W_enc, cache_enc, dh_enc)
        return loss, [dW_enc, db_enc, dW_dec, db_dec, dW_out, db_out]

    def learn_many(self, X: np.ndarray) -> None:
        X = self._ensure(X)
        xs = self.windows(X)
        chosen = np.flatnonzero((self.n_seen + np.arange(X.shape[0])) % self.train_stride == 0)
        for start in range(0, chosen.shape[0], self.batch_size):
            self.loss, grads = self.loss_and_gradients(xs[:, chosen[start:start + self.batch_size]])
            self.optimizer.step(self.flat, clip_by_global_norm(self.layout.flatten(grads), self.grad_clip))
        self.n_seen += X.shape[0]
        if self.window > 1:
            self._recent = np.vstack([self._recent, X])[-(self.window - 1):]

    def learn_one(self, x: np.ndarray) -> None:
        self.learn_many(x)

    def feature_errors(self, X: np.ndarray) -> np.ndarray:
        """Squared error of each feature at the last step of the window ending at each reading, shape (n, d)."""
        xs = self.windows(X)
        errors = []
        for start in range(0, xs.shape[1], SCORE_CHUNK):
            chunk = xs[:, start:start + SCORE_CHUNK]
            errors.append((self._forward(chunk)[0][-1] - chunk[-1]) ** 2)
        return np.concatenate(errors)

    def score_many(self, X: np.ndarray) -> np.ndarray:
        return self.feature_errors(X).mean(axis=1)

    def score_one(self, x: np.ndarray) -> float:
        return float(self.score_many(x)[0])

    def get_weights(self) -> list[np.ndarray]:
        return [p.copy() for p in self.params]

    def set_weights(self, weights: list[np.ndarray]) -> None:
        """Copy `weights` into the parameters (shapes must match once initialised); optimiser state is kept."""
        if self.params:
            check_weight_shapes(self.params, weights)
            for p, w in zip(self.params, weights):
                p[...] = w
        else:
            self._store([np.asarray(w, dtype=np.float64) for w in weights])
        if self.n_features is None:
            self.n_features = self.params[-1].shape[0]
            self._recent = np.zeros((0, self.n_features))

    def get_state(self) -> list[np.ndarray]:
        """Weights, optimiser state, then the remembered readings and ``[n_seen]``."""
        return (self.get_weights() + self.optimizer.state_arrays(self.layout)
                + [self._recent.copy(), np.array([float(self.n_seen)])])

    def set_state(self, arrays: list[np.ndarray]) -> None:
        self.set_weights(arrays[:6])
        self.optimizer.load_state_arrays(arrays[6:-2], self.layout)
        self._recent = np.array(arrays[-2], dtype=np.float64).reshape(-1, self.n_features)
        self.n_seen = int(arrays[-1][0])
