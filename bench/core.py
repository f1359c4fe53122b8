"""Throughput of the per-device model core, per core, beside a plain-NumPy floor measured in the same run.

    .venv/bin/python bench/core.py [--quick] [--json OUT]

Rows: the subspace model (the default kind), the dense autoencoder and the LSTM autoencoder, per reading
(``learn_one``/``score_one`` on the bare model) and batched (``DeviceDetector.process_many``: features, scaler,
score, normalised residuals, learn, threshold, p-values, top metrics, incidents, drift) with micro-batches of 16
and 64; and two floors measured in the same run, each the model's own maths hand-written in minimal NumPy with
nothing around it (no features, scaler, residual scales, threshold, p-values, top metrics, incidents, drift):
for the subspace model, per micro-batch the residual of each (pre-built, standardised) window against the top-k
components, then the same learning step (forgetting, mean shift, the tracked basis extended by a sketch of the
batch residual, a small eigendecomposition); for the dense network, the same widths, optimiser (Adam, gradient
clipping) and step batch size. The headline is the default detector's batched learn+score readings/s. Every row
gives readings/s by wall time and per CPU second of this process (the fairer per-core figure on a shared
machine), and the JSON the load average it ran under.
"""
from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy loads BLAS: one thread, so "per core" is honest

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_output import stop_cleanly_on_sigterm, write_json  # noqa: E402  (beside this script)
from config import load_config  # noqa: E402
from models.autoencoder import DenseAutoencoder  # noqa: E402
from models.detector import DeviceDetector  # noqa: E402
from models.features import time_of_day  # noqa: E402
from models.lstm_autoencoder import LSTMAutoencoder  # noqa: E402
from models.subspace import NEW_DIRECTIONS, SubspaceModel, forgetting_factor  # noqa: E402

READING_INTERVAL_MS = 300_000  # the readings' event times, 5 minutes apart as ASD's (model.features.time_of_day)


def event_times(n: int) -> np.ndarray:
    """Event times (epoch ms) of `n` readings `READING_INTERVAL_MS` apart."""
    return np.arange(n, dtype=np.int64) * READING_INTERVAL_MS


def load_readings(n: int, data_dir: Path) -> tuple[np.ndarray, list[str], str]:
    """The first `n` ASD training rows of one server (under `paths.data_dir`), or synthetic correlated metrics if
    ASD is absent."""
    asd_train = data_dir / "asd" / "train.csv.gz"
    if asd_train.exists():
        import pandas as pd
        frame = pd.read_csv(asd_train)
        frame = frame[frame["device_id"] == frame["device_id"].iloc[0]]
        metrics = [c for c in frame.columns if c not in ("device_id", "timestamp", "label")]
        X = frame[metrics].to_numpy(np.float64)
        return np.resize(X, (n, X.shape[1])), metrics, f"ASD {frame['device_id'].iloc[0]}"
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 4)) @ rng.normal(size=(4, 19)) * 0.1 + 0.5
    return X, [f"m{i:02d}" for i in range(19)], "synthetic"


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


class Stopwatch:
    """Wall time and this process's CPU time from creation: `rates(n)` gives readings/s by each. With one BLAS
    thread the CPU rate approaches the rate per core on a busy machine (caches are still shared); the wall rate
    equals it on a quiet machine and falls with the load (the other processes' share of the core)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def rates(self, n: int) -> tuple[float, float]:
        return rate(n, time.perf_counter() - self.wall), rate(n, time.process_time() - self.cpu)


def best_of(measure, repeats: int) -> dict[str, float]:
    """The best of `repeats` runs of `measure()` (wall and CPU readings/s, each the best on its own), each on fresh
    state: on a shared machine the best run is the one least disturbed by other processes (as `timeit` advises)."""
    runs = [measure() for _ in range(max(1, repeats))]
    return {"readings_per_s": max(wall for wall, _ in runs), "readings_per_cpu_s": max(cpu for _, cpu in runs)}


def per_reading(network, X: np.ndarray) -> tuple[float, float]:
    """learn_one + score_one on every reading, readings/s (wall, CPU)."""
    clock = Stopwatch()
    for x in X:
        network.score_one(x)
        network.learn_one(x)
    return clock.rates(X.shape[0])


def detector_batched(cfg, metrics: list[str], X: np.ndarray, batch: int, **overrides) -> tuple[float, float]:
    """DeviceDetector.process_many (score then learn) over micro-batches, readings/s (wall, CPU)."""
    det = DeviceDetector.create(metrics, cfg, **overrides)
    ts = event_times(X.shape[0])
    clock = Stopwatch()
    for i in range(0, X.shape[0], batch):
        det.process_many(X[i:i + batch], ts=ts[i:i + batch])
    return clock.rates(X.shape[0])


FLOOR_OMITS = "features + NaN policy, running scaler, threshold, top metrics, result object"
SUBSPACE_FLOOR_OMITS = ("window features + NaN policy, running scaler, residual scales, threshold, p-values, "
                        "top metrics, incidents, drift, result object")


def windows_of(Z: np.ndarray, window: int) -> np.ndarray:
    """Each reading's causal window (itself, then the readings before it; the first repeated at the start)."""
    lagged = [np.concatenate([np.repeat(Z[:1], lag, axis=0), Z[:Z.shape[0] - lag]]) for lag in range(window)]
    return np.concatenate(lagged, axis=1)


def subspace_floor(W: np.ndarray, micro_batch: int, rank: int, half_life: float, explained: float) -> tuple[float, float]:
    """The subspace model's maths written out by hand, readings/s: per micro-batch, score each window by its
    squared residual against the top-k components, then one learning step as `SubspaceModel._step` does it.
    Omits `SUBSPACE_FLOOR_OMITS`."""
    d = W.shape[1]
    r = min(rank, d)
    lam = forgetting_factor(half_life)
    seed = SubspaceModel(explained, rank, half_life)
    seed.learn_many(W[:micro_batch])  # the first step builds the basis; the floor times the steady state
    U, values, mean, diag, weight = (seed.basis.astype(np.float64), seed.eigenvalues.copy(), seed.mean.copy(),
                                     seed.scatter_diag.copy(), seed.weight)
    sketch = np.random.default_rng(micro_batch + 1).choice([-1.0, 1.0], size=(micro_batch + 1, NEW_DIRECTIONS))
    ages = lam ** np.arange(micro_batch - 1, -1, -1, dtype=np.float64)
    clock = Stopwatch()
    for i in range(micro_batch, W.shape[0] - micro_batch + 1, micro_batch):
        X = W[i:i + micro_batch]
        k = int(min(np.searchsorted(np.cumsum(values) / diag.sum(), explained) + 1, r))
        P = U[:, :k]
        centred = X - mean
        residual = centred - (centred @ P) @ P.T
        (residual * residual).mean(axis=1)
        decay = lam ** micro_batch
        old = weight * decay
        total = old + ages.sum()
        batch_mean = ages @ X / ages.sum()
        rows = np.empty((micro_batch + 1, d))
        rows[:micro_batch] = (X - batch_mean) * np.sqrt(ages)[:, None]
        rows[micro_batch] = np.sqrt(old * ages.sum() / total) * (mean - batch_mean)
        mean = (old * mean + ages.sum() * batch_mean) / total
        diag = decay * diag + (rows * rows).sum(axis=0)
        extension = (rows - (rows @ U) @ U.T).T @ sketch[:, :d - r]
        extension -= U @ (U.T @ extension)
        basis = np.concatenate([U, np.linalg.qr(extension)[0]], axis=1)
        projected = rows @ basis
        gram = projected.T @ projected
        gram[np.arange(r), np.arange(r)] += decay * values
        eig, vectors = np.linalg.eigh(gram)
        top = np.argsort(eig)[::-1][:r]
        U, values, weight = basis @ vectors[:, top], eig[top], total
    return clock.rates(W.shape[0] - micro_batch)


def numpy_floor(X: np.ndarray, hidden: list[int], micro_batch: int, step_batch: int, learning_rate: float,
                grad_clip: float) -> tuple[float, float]:
    """The detector's network and optimiser written out by hand, with nothing around them, readings/s.

    A tanh autoencoder of the same widths with every parameter in one flat vector; per micro-batch one scoring
    forward pass (mean squared error per reading), then per `step_batch` rows one step: forward, backward,
    clipping by global norm, Adam (β1 0.9, β2 0.999, ε 1e-8). Inputs are standardised once, up front.
    Omits `FLOOR_OMITS`.
    """
    rng = np.random.default_rng(0)
    widths = [X.shape[1], *hidden, X.shape[1]]
    shapes = [shape for a, b in zip(widths[:-1], widths[1:]) for shape in ((a, b), (b,))]
    ends = np.cumsum([int(np.prod(shape)) for shape in shapes]).tolist()
    params, grad = rng.uniform(-0.3, 0.3, ends[-1]), np.zeros(ends[-1])
    m, v = np.zeros_like(params), np.zeros_like(params)

    def views(flat: np.ndarray) -> list[np.ndarray]:
        return [flat[a:b].reshape(shape) for a, b, shape in zip([0] + ends[:-1], ends, shapes)]

    Ws, bs = views(params)[0::2], views(params)[1::2]
    gWs, gbs = views(grad)[0::2], views(grad)[1::2]
    Z = (X - X.mean(axis=0)) / (X.std(axis=0) + 1e-6)

    def forward(xb: np.ndarray) -> list[np.ndarray]:
        acts = [xb]
        for k, (W, b) in enumerate(zip(Ws, bs)):
            z = np.dot(acts[-1], W) + b
            acts.append(z if k == len(Ws) - 1 else np.tanh(z))
        return acts

    t = 0
    clock = Stopwatch()
    for i in range(0, Z.shape[0], micro_batch):
        batch = Z[i:i + micro_batch]
        err = forward(batch)[-1] - batch
        (err * err).mean(axis=1)
        for j in range(0, batch.shape[0], step_batch):
            xb = batch[j:j + step_batch]
            acts = forward(xb)
            delta = 2.0 * (acts[-1] - xb) / xb.size
            for k in reversed(range(len(Ws))):
                np.dot(acts[k].T, delta, out=gWs[k])
                np.add.reduce(delta, axis=0, out=gbs[k])
                if k:
                    delta = np.dot(delta, Ws[k].T) * (1.0 - acts[k] * acts[k])
            norm = np.sqrt(np.dot(grad, grad))
            if norm > grad_clip:
                grad *= grad_clip / norm
            t += 1
            m *= 0.9
            m += 0.1 * grad
            v *= 0.999
            v += 0.001 * grad * grad
            params -= learning_rate * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) * m / (np.sqrt(v) + 1e-8)
    return clock.rates(Z.shape[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer readings (a smoke run of a few seconds)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the best is reported (default 3)")
    args = parser.parse_args(argv)
    stop_cleanly_on_sigterm()

    cfg = load_config()
    m = cfg.model
    sub = m.subspace
    n_dense, n_lstm = (2000, 400) if args.quick else (20000, 3000)
    X, metrics, source = load_readings(n_dense, cfg.data_dir)
    inputs = (np.hstack([X, time_of_day(event_times(n_dense), m.features.time_of_day_harmonics)])
              if m.features.time_of_day else X)  # the detector's inputs
    Z = (inputs - inputs.mean(axis=0)) / (inputs.std(axis=0) + 1e-6)  # the bare models get standardised inputs
    W = windows_of(Z, sub.window)                       # ... and the subspace model its windows
    dense = dict(hidden=list(m.hidden), activation=m.activation, optimizer=m.optimizer,
                 learning_rate=m.learning_rate, batch_size=m.batch_size, grad_clip=m.grad_clip, seed=m.seed)
    lstm = dict(window=m.window, hidden=m.lstm_hidden, optimizer=m.optimizer, learning_rate=m.learning_rate,
                batch_size=m.batch_size, grad_clip=m.grad_clip, seed=m.seed)
    subspace = dict(explained_variance=sub.explained_variance, rank=sub.rank, half_life=sub.half_life)

    rows = []
    for batch in (16, 64):
        rows.append({"name": f"numpy floor subspace, batch {batch}", "model": "floor_subspace", "mode": f"batch{batch}",
                     **best_of(lambda: subspace_floor(W, batch, sub.rank, sub.half_life, sub.explained_variance),
                               args.repeats),
                     "omits": SUBSPACE_FLOOR_OMITS})
    rows += [{"name": f"numpy floor dense, batch {batch}", "model": "floor", "mode": f"batch{batch}",
              **best_of(lambda: numpy_floor(inputs, dense["hidden"], batch, m.batch_size, m.learning_rate,
                                            m.grad_clip),
                        args.repeats),
              "omits": FLOOR_OMITS} for batch in (16, 64)]
    rows.append({"name": "subspace learn_one+score_one", "model": "subspace", "mode": "per_reading",
                 **best_of(lambda: per_reading(SubspaceModel(**subspace), W[:n_lstm]), args.repeats)})
    for batch in (16, 64):
        rows.append({"name": f"subspace detector process_many, batch {batch}", "model": "subspace",
                     "mode": f"batch{batch}",
                     **best_of(lambda: detector_batched(cfg, metrics, X, batch, kind="subspace"), args.repeats)})
    rows.append({"name": "dense_ae learn_one+score_one", "model": "ae", "mode": "per_reading",
                 **best_of(lambda: per_reading(DenseAutoencoder(**dense), Z), args.repeats)})
    for batch in (16, 64):
        rows.append({"name": f"dense_ae detector process_many, batch {batch}", "model": "ae",
                     "mode": f"batch{batch}",
                     **best_of(lambda: detector_batched(cfg, metrics, X, batch, kind="ae"), args.repeats)})
    rows.append({"name": "lstm_ae learn_one+score_one", "model": "lstm_ae", "mode": "per_reading",
                 **best_of(lambda: per_reading(LSTMAutoencoder(**lstm), Z[:n_lstm]), 1)})
    for batch in (16, 64):
        rows.append({"name": f"lstm_ae detector process_many, batch {batch}", "model": "lstm_ae",
                     "mode": f"batch{batch}",
                     **best_of(lambda: detector_batched(cfg, metrics, X[:n_lstm], batch, kind="lstm_ae"), 1)})

    load = os.getloadavg()[0]
    print(f"data: {source}, {X.shape[1]} metrics{' + the time of day' if m.features.time_of_day else ''}; "
          f"subspace and dense {n_dense} readings (subspace per reading "
          f"{n_lstm}), lstm {n_lstm}; 1 BLAS thread; load average {load:.1f} on {os.cpu_count()} cores (readings/s "
          "by wall time falls with the load; by this process's CPU time much less)")
    print(f"{'row':48s} {'readings/s':>12s} {'per CPU s':>12s}  note")
    for row in rows:
        note = f"omits {row['omits']}" if "omits" in row else ""
        print(f"{row['name']:48s} {row['readings_per_s']:12,.0f} {row['readings_per_cpu_s']:12,.0f}  {note}")

    by_name = {row["name"]: row for row in rows}
    default, floor = by_name["subspace detector process_many, batch 64"], by_name["numpy floor subspace, batch 64"]
    headline = {"name": "subspace (default) DeviceDetector.process_many (score+learn), micro-batch 64",
                "value": default["readings_per_s"], "unit": "readings/s per core", "floor": floor["readings_per_s"],
                "value_cpu": default["readings_per_cpu_s"], "floor_cpu": floor["readings_per_cpu_s"]}
    result = {"headline": headline, "rows": rows, "data": source, "quick": args.quick, "repeats": args.repeats,
              "load_average": load, "cpus": os.cpu_count(),
              "python": platform.python_version(), "numpy": np.__version__,
              "settings": {"subspace": {**subspace, "window": sub.window}, "dense": dense, "lstm": lstm}}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
