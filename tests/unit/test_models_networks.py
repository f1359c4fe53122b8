"""Dense and LSTM autoencoders: analytic gradients equal numerical ones, learning lowers the error, state
round-trips."""
import numpy as np
import pytest

from models.autoencoder import DenseAutoencoder
from models.lstm_autoencoder import LSTMAutoencoder
from models.optim import Adam, ParameterLayout

FD_STEP = 1e-6       # central-difference step
GRAD_RTOL = 1e-5     # float64 central differences agree to ~1e-8 relative; leave margin


def numerical_gradients(model, loss_of_params):
    grads = []
    for p in model.params:
        g = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            old = p[idx]
            p[idx] = old + FD_STEP
            up = loss_of_params()
            p[idx] = old - FD_STEP
            down = loss_of_params()
            p[idx] = old
            g[idx] = (up - down) / (2 * FD_STEP)
        grads.append(g)
    return grads


def assert_gradients_match(analytic, numeric):
    for i, (a, n) in enumerate(zip(analytic, numeric)):
        scale = max(np.abs(n).max(), 1e-8)
        assert np.abs(a - n).max() / scale < GRAD_RTOL, f"parameter {i}"


@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid"])
def test_dense_gradients_match_finite_differences(activation):
    X = np.random.default_rng(1).normal(size=(5, 4))
    ae = DenseAutoencoder(hidden=(3, 2), activation=activation, seed=3)
    ae.initialize(4)
    for p in ae.params[1::2]:  # non-zero biases so their gradients are exercised
        p += 0.1
    _, analytic = ae.loss_and_gradients(X)
    assert_gradients_match(analytic, numerical_gradients(ae, lambda: ae.loss_and_gradients(X)[0]))


def test_lstm_gradients_match_finite_differences():
    model = LSTMAutoencoder(window=4, hidden=3, seed=2)
    model.initialize(2)
    xs = np.random.default_rng(2).normal(size=(4, 3, 2))
    _, analytic = model.loss_and_gradients(xs)
    assert_gradients_match(analytic, numerical_gradients(model, lambda: model.loss_and_gradients(xs)[0]))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_dense_learning_lowers_error(optimizer):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(512, 2)) @ rng.normal(size=(2, 6))  # rank-2 data in 6-D
    ae = DenseAutoencoder(hidden=(8, 3, 8), optimizer=optimizer, learning_rate=0.01 if optimizer == "adam" else 0.05)
    before = ae.score_many(X).mean()
    for _ in range(20):
        ae.learn_many(X)
    assert ae.score_many(X).mean() < 0.3 * before
    assert ae.loss is not None and np.isfinite(ae.loss)


def test_dense_feature_errors_point_at_the_broken_feature():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(512, 2)) @ rng.normal(size=(2, 6))
    ae = DenseAutoencoder(hidden=(8, 3, 8), learning_rate=0.01)
    for _ in range(30):
        ae.learn_many(X)
    broken = X[:1].copy()
    broken[0, 4] += 8.0
    assert int(np.argmax(ae.feature_errors(broken)[0])) == 4
    assert ae.score_one(broken[0]) > 10 * ae.score_many(X).mean()


def test_gradient_clipping_bounds_the_step():
    ae = DenseAutoencoder(hidden=(4,), optimizer="sgd", learning_rate=1.0, grad_clip=0.5, seed=0)
    X = np.full((4, 3), 100.0)
    ae.initialize(3)
    before = ae.get_weights()
    ae.learn_many(X)
    step = np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(ae.get_weights(), before)))
    assert step == pytest.approx(0.5)


@pytest.mark.parametrize("make", [lambda: DenseAutoencoder(hidden=(4, 2, 4), seed=1),
                                  lambda: LSTMAutoencoder(window=5, hidden=4, seed=1)])
def test_state_round_trip_gives_identical_training(make):
    X = np.random.default_rng(3).normal(size=(40, 3))
    a = make()
    a.learn_many(X[:20])
    b = make()
    b.initialize(3)
    b.set_state([s.copy() for s in a.get_state()])
    a.learn_many(X[20:])
    b.learn_many(X[20:])
    np.testing.assert_array_equal(a.score_many(X), b.score_many(X))


def test_set_weights_rejects_wrong_shapes():
    ae = DenseAutoencoder(hidden=(4,))
    ae.initialize(3)
    weights = ae.get_weights()
    weights[0] = np.zeros((3, 5))
    with pytest.raises(ValueError, match="weight array 0"):
        ae.set_weights(weights)


def test_lstm_streamed_scores_equal_batch_scores():
    """score_one/learn_one reading by reading sees the same windows as score_many over the batch."""
    X = np.random.default_rng(4).normal(size=(30, 2))

    def frozen():  # learning rate 0: learning only moves the window buffer
        model = LSTMAutoencoder(window=6, hidden=4, seed=0, learning_rate=0.0)
        model.learn_many(X[:20])
        return model

    streamed = frozen()
    scores = []
    for x in X[20:]:
        scores.append(streamed.score_one(x))
        streamed.learn_one(x)
    np.testing.assert_allclose(scores, frozen().score_many(X[20:]))


def test_lstm_train_stride_learns_from_fewer_windows():
    X = np.random.default_rng(5).normal(size=(64, 2))
    model = LSTMAutoencoder(window=4, hidden=3, batch_size=4, train_stride=4)
    model.learn_many(X)
    assert model.optimizer.t == 4  # 16 windows, 4 per step


def test_parameters_are_views_of_one_flat_vector():
    ae = DenseAutoencoder(hidden=(4, 2, 4), seed=0)
    ae.initialize(3)
    ae.set_weights([np.full_like(w, 0.5) for w in ae.get_weights()])
    assert ae.flat.shape == (sum(w.size for w in ae.get_weights()),)
    assert all(np.shares_memory(p, ae.flat) for p in ae.params)
    np.testing.assert_array_equal(ae.flat, 0.5)


def test_adam_fused_step_equals_the_per_array_formula():
    """The flat, in-place update is Kingma & Ba's step, array by array, to the last bit."""
    rng = np.random.default_rng(6)
    shapes = [(3, 4), (4,), (4, 2)]
    layout = ParameterLayout(shapes)
    params = [rng.normal(size=s) for s in shapes]
    flat = layout.flatten(params)
    m, v = [np.zeros(s) for s in shapes], [np.zeros(s) for s in shapes]
    adam = Adam(learning_rate=0.01)
    for t in range(1, 4):
        grads = [rng.normal(size=s) for s in shapes]
        adam.step(flat, layout.flatten(grads))
        lr = 0.01 * np.sqrt(1 - Adam.BETA2 ** t) / (1 - Adam.BETA1 ** t)
        for p, g, m_i, v_i in zip(params, grads, m, v):
            m_i[...] = Adam.BETA1 * m_i + (1 - Adam.BETA1) * g
            v_i[...] = Adam.BETA2 * v_i + (1 - Adam.BETA2) * g * g
            p -= lr * m_i / (np.sqrt(v_i) + Adam.EPS)
    for got, want in zip(layout.views(flat), params):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_state_keeps_one_array_per_parameter(optimizer):
    """`get_state` splits the optimiser's flat moments per parameter array, as blobs written before the flat
    layout do, so those blobs still load."""
    ae = DenseAutoencoder(hidden=(4, 2, 4), optimizer=optimizer, seed=0)
    ae.learn_many(np.random.default_rng(7).normal(size=(32, 3)))
    shapes = [w.shape for w in ae.get_weights()]
    moments = [(1,)] + shapes + shapes if optimizer == "adam" else []
    assert [s.shape for s in ae.get_state()] == shapes + moments
