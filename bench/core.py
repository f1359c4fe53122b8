"""Throughput of the per-device model core, per core, beside a plain-NumPy floor measured in the same run.

    .venv/bin/python bench/core.py [--quick] [--json OUT]

Rows: the dense autoencoder and the LSTM autoencoder, per reading (``learn_one``/``score_one`` on the bare
network) and batched (``DeviceDetector.process_many``: features, scaler, score, learn, threshold, top metrics)
with micro-batches of 16 and 64; and the floor: a hand-written minimal forward + backward + SGD loop of the same
dense network on the same data, with no framework at all. The headline is batched learn+score readings/s.
"""
from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy loads BLAS: one thread, so "per core" is honest

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config import load_config  # noqa: E402
from models.autoencoder import DenseAutoencoder  # noqa: E402
from models.detector import DeviceDetector  # noqa: E402
from models.lstm_autoencoder import LSTMAutoencoder  # noqa: E402

ASD_TRAIN = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "asd" / "train.csv.gz"


def load_readings(n: int) -> tuple[np.ndarray, list[str], str]:
    """The first `n` ASD training rows of one server, or synthetic correlated metrics if ASD is absent."""
    if ASD_TRAIN.exists():
        import pandas as pd
        frame = pd.read_csv(ASD_TRAIN)
        frame = frame[frame["device_id"] == frame["device_id"].iloc[0]]
        metrics = [c for c in frame.columns if c not in ("device_id", "timestamp", "label")]
        X = frame[metrics].to_numpy(np.float64)
        return np.resize(X, (n, X.shape[1])), metrics, f"ASD {frame['device_id'].iloc[0]}"
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 4)) @ rng.normal(size=(4, 19)) * 0.1 + 0.5
    return X, [f"m{i:02d}" for i in range(19)], "synthetic"


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def per_reading(network, X: np.ndarray) -> float:
    """learn_one + score_one on every reading, readings/s."""
    start = time.perf_counter()
    for x in X:
        network.score_one(x)
        network.learn_one(x)
    return rate(X.shape[0], time.perf_counter() - start)


def detector_batched(cfg, metrics: list[str], X: np.ndarray, batch: int, **overrides) -> float:
    """DeviceDetector.process_many (score then learn) over micro-batches, readings/s."""
    det = DeviceDetector.create(metrics, cfg, **overrides)
    start = time.perf_counter()
    for i in range(0, X.shape[0], batch):
        det.process_many(X[i:i + batch])
    return rate(X.shape[0], time.perf_counter() - start)


def numpy_floor(X: np.ndarray, hidden: list[int], micro_batch: int, step_batch: int, learning_rate: float) -> float:
    """Minimal tanh autoencoder, same sizes: per micro-batch one scoring forward pass, then one SGD step
    (forward, backward, update) per `step_batch` rows, as the detector's network does (which uses Adam)."""
    rng = np.random.default_rng(0)
    widths = [X.shape[1], *hidden, X.shape[1]]
    Ws = [rng.normal(0, 0.3, (a, b)) for a, b in zip(widths[:-1], widths[1:])]
    bs = [np.zeros(b) for b in widths[1:]]
    Z = (X - X.mean(axis=0)) / (X.std(axis=0) + 1e-6)

    def forward(xb: np.ndarray) -> list[np.ndarray]:
        acts = [xb]
        for k, (W, b) in enumerate(zip(Ws, bs)):
            z = acts[-1] @ W + b
            acts.append(z if k == len(Ws) - 1 else np.tanh(z))
        return acts

    start = time.perf_counter()
    for i in range(0, Z.shape[0], micro_batch):
        batch = Z[i:i + micro_batch]
        ((forward(batch)[-1] - batch) ** 2).mean(axis=1)
        for j in range(0, batch.shape[0], step_batch):
            xb = batch[j:j + step_batch]
            acts = forward(xb)
            delta = 2.0 * (acts[-1] - xb) / xb.size
            for k in reversed(range(len(Ws))):
                gW, gb = acts[k].T @ delta, delta.sum(axis=0)
                if k:
                    delta = (delta @ Ws[k].T) * (1.0 - acts[k] * acts[k])
                Ws[k] -= learning_rate * gW
                bs[k] -= learning_rate * gb
    return rate(Z.shape[0], time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer readings (a smoke run of a few seconds)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    cfg = load_config()
    m = cfg.model
    n_dense, n_lstm = (2000, 400) if args.quick else (20000, 3000)
    X, metrics, source = load_readings(n_dense)
    Z = (X - X.mean(axis=0)) / (X.std(axis=0) + 1e-6)  # the bare networks get standardised inputs
    dense = dict(hidden=list(m.hidden), activation=m.activation, optimizer=m.optimizer,
                 learning_rate=m.learning_rate, batch_size=m.batch_size, grad_clip=m.grad_clip, seed=m.seed)
    lstm = dict(window=m.window, hidden=m.lstm_hidden, optimizer=m.optimizer, learning_rate=m.learning_rate,
                batch_size=m.batch_size, grad_clip=m.grad_clip, seed=m.seed)

    rows = [{"name": "numpy floor dense, batch 16", "model": "floor", "mode": "batch16",
             "readings_per_s": numpy_floor(X, dense["hidden"], 16, m.batch_size, 0.01)},
            {"name": "numpy floor dense, batch 64", "model": "floor", "mode": "batch64",
             "readings_per_s": numpy_floor(X, dense["hidden"], 64, m.batch_size, 0.01)},
            {"name": "dense_ae learn_one+score_one", "model": "ae", "mode": "per_reading",
             "readings_per_s": per_reading(DenseAutoencoder(**dense), Z)}]
    for batch in (16, 64):
        rows.append({"name": f"dense_ae detector process_many, batch {batch}", "model": "ae",
                     "mode": f"batch{batch}", "readings_per_s": detector_batched(cfg, metrics, X, batch, kind="ae")})
    rows.append({"name": "lstm_ae learn_one+score_one", "model": "lstm_ae", "mode": "per_reading",
                 "readings_per_s": per_reading(LSTMAutoencoder(**lstm), Z[:n_lstm])})
    for batch in (16, 64):
        rows.append({"name": f"lstm_ae detector process_many, batch {batch}", "model": "lstm_ae",
                     "mode": f"batch{batch}",
                     "readings_per_s": detector_batched(cfg, metrics, X[:n_lstm], batch, kind="lstm_ae")})

    print(f"data: {source}, {X.shape[1]} metrics; dense {n_dense} readings, lstm {n_lstm}; 1 BLAS thread")
    print(f"{'row':48s} {'readings/s':>12s}")
    for row in rows:
        print(f"{row['name']:48s} {row['readings_per_s']:12,.0f}")

    by_name = {row["name"]: row["readings_per_s"] for row in rows}
    headline = {"name": "dense_ae DeviceDetector.process_many (score+learn), micro-batch 64",
                "value": by_name["dense_ae detector process_many, batch 64"], "unit": "readings/s per core",
                "floor": by_name["numpy floor dense, batch 64"]}
    result = {"headline": headline, "rows": rows, "data": source, "quick": args.quick,
              "python": platform.python_version(), "numpy": np.__version__,
              "settings": {"dense": dense, "lstm": lstm}}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
