"""Anomalies injected into a fleet's own training data: a yardstick of detection quality that reads no label.

A labelled test set is scarce, and every look at its labels is a choice fitted to it (docs/evaluation.md). This
bench makes its own labels: for each device of a multi-entity training CSV (ASD's by default; ``--train`` for any
fleet in the same format), the first `PROBE_START` of its series is history and the rest the probe part, into
which anomalies of one kind are injected at seeded places (the probe part is otherwise what the device did). Then
`models.evaluation.evaluate_fleet` compares, as `flead evaluate` does (stream protocol, the configured detector;
baselines fit on the history), the federated and local detectors with Isolation Forest, PCA and random, on each kind
in turn. No setting of the kinds was chosen by looking at a detector's figures: they are the usual taxonomy of
time-series anomalies (Lai et al., NeurIPS 2021 datasets track: point, contextual, shapelet/level, trend) in the
forms server telemetry shows them, with sizes in units of each metric's own spread on the device's history:

- ``spike``: one reading, `METRICS_PER_ANOMALY` metrics off by ±`SPIKE_SD` standard deviations;
- ``level``: a range of readings, those metrics shifted by ±`LEVEL_SD` (a stuck-high queue, a leak's plateau);
- ``noise``: a range, those metrics with added noise of `NOISE_SD` (a flapping link, a thrashing disk);
- ``decoupled``: a range, those metrics replaced by their own values from another time of the history (each value
  is one the metric takes; their relation to the other metrics is broken: a process that stopped following load);
- ``stuck``: a range, those metrics held at their value at its start (a dead exporter, a hung process: the kind
  a reconstruction model is expected to miss when the value itself is ordinary);
- ``trend``: a range, those metrics drifting linearly away to ±`LEVEL_SD` at its end (a slow leak);
- ``seasonal``: a range, every metric replaced by its own values half a day earlier (half the readings of a day at
  the median interval of the device's timestamps): the metrics keep their relations to one another and only the time
  of day is wrong (a device behaving as at another hour: traffic at its night level at noon). Added on 6 December,
  after the others, as rule v3 of detector changes (docs/evaluation.md, item 18), fixed before it judged anything.

Only metrics that move in a range are chosen for it (a metric constant there would carry no anomaly). A range is
`RANGE_READINGS` long, `RANGES_PER_DEVICE` per device (spikes: `SPIKES_PER_DEVICE` single readings), apart from one
another. What it measures is how each detector meets these shapes on this fleet's own data; what it cannot say is
how often each shape occurs in practice, or what a fleet's real anomalies look like.

Devices are pooled as `flead evaluate` pools a stream (each device's scores as robust z against its recent scores;
the JSON also gives the figures pooled on its calibration scores alone, ``*_fixed_calibration``; ``--pooling``
chooses another of flead evaluate's poolings).

Headline: the federated detector's pooled ROC-AUC, averaged over the kinds, beside Isolation Forest's as its floor.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_output import (stop_cleanly_on_sigterm, training_fleet, training_fleet_parser,  # noqa: E402
                          write_json)  # beside this script
from config import load_config  # noqa: E402
from models.aggregation import make_strategy  # noqa: E402
from models.detector import DeviceDetector  # noqa: E402
from models.evaluation import evaluate_fleet  # noqa: E402
from models.features import readings_per_day  # noqa: E402
from orchestration.evaluate_cli import POOLING, POOLINGS, pooling_options  # noqa: E402

SEED = 11
KINDS = ("spike", "level", "noise", "decoupled", "stuck", "trend", "seasonal")  # seeded by position: append only
MODELS = ("federated", "local", "isolation_forest", "pca", "random")
PROBE_START = 0.7            # share of each device's series that is history; the rest is the probe part
MIN_READINGS = 2000          # a shorter series leaves too little history or probe
METRICS_PER_ANOMALY = (1, 3)  # metrics an anomaly touches: uniform in this range (inclusive)
SPIKE_SD, LEVEL_SD, NOISE_SD = 6.0, 3.0, 2.0
RANGE_READINGS = (10, 60)    # length of a range anomaly: uniform in this range (inclusive)
RANGES_PER_DEVICE = 4
SPIKES_PER_DEVICE = 12
MOVING = 1e-9                # a metric whose spread over a range is below this (in its own sd units) does not move
QUICK = (4, 5000)            # --quick: devices, readings of each
COLUMNS = ("roc_auc", "pr_auc", "f1", "best_f1", "incident_f1")


def places(rng: np.random.Generator, n: int, count: int, lengths: tuple[int, int]) -> list[tuple[int, int]]:
    """`count` ranges ``(start, length)`` in ``[0, n)``, lengths uniform in `lengths`, each at least the longer of two
    lengths away from another, in order; fewer if they do not fit."""
    taken: list[tuple[int, int]] = []
    for _ in range(50 * count):
        if len(taken) == count:
            break
        length = int(rng.integers(lengths[0], lengths[1] + 1))
        if n <= length:
            break
        start = int(rng.integers(0, n - length))
        if all(start + length + max(length, n_) <= s or s + n_ + max(length, n_) <= start for s, n_ in taken):
            taken.append((start, length))
    return sorted(taken)


def inject(kind: str, history: np.ndarray, probe: np.ndarray, rng: np.random.Generator, half_day: int = 0
           ) -> tuple[np.ndarray, np.ndarray]:
    """The probe part with anomalies of `kind` injected (module docstring), and its labels (1: injected);
    `half_day`: readings in half a day (the ``seasonal`` kind needs it)."""
    if kind == "seasonal" and half_day < 1:
        raise ValueError("the seasonal kind needs the readings in half a day (the device's event times)")
    X, y = probe.copy(), np.zeros(len(probe), dtype=np.int64)
    series = np.concatenate([history, probe]) if kind == "seasonal" else None
    sd = np.nanstd(history, axis=0)
    spread = np.where(sd > 0, sd, 1.0)
    varies = sd > 0   # a metric constant over the history is never chosen
    spike = kind == "spike"
    for start, length in places(rng, len(X), SPIKES_PER_DEVICE if spike else RANGES_PER_DEVICE,
                                (1, 1) if spike else RANGE_READINGS):
        rows = slice(start, start + length)
        if kind == "seasonal":   # every metric, from half a day earlier (skipped if that is before the series)
            source = len(history) + start - half_day
            if source >= 0:
                X[rows] = series[source:source + length]
                y[rows] = 1
            continue
        if spike:
            moving = np.flatnonzero(varies)
        else:   # a range's metric must move over the range (and the reading before it)
            window = X[max(0, start - 1):start + length]
            moving = np.flatnonzero((np.nanstd(window, axis=0) / spread > MOVING) & varies)
        if moving.size == 0:
            continue
        cols = rng.choice(moving, min(moving.size, int(rng.integers(METRICS_PER_ANOMALY[0],
                                                                     METRICS_PER_ANOMALY[1] + 1))), replace=False)
        sign = rng.choice([-1.0, 1.0], cols.size)
        if spike:
            X[rows, cols] += sign * SPIKE_SD * spread[cols]
        elif kind == "level":
            X[rows, cols] += sign * LEVEL_SD * spread[cols]
        elif kind == "trend":
            X[rows, cols] += np.linspace(0.0, 1.0, length)[:, None] * sign * LEVEL_SD * spread[cols]
        elif kind == "noise":
            X[rows, cols] += rng.normal(size=(length, cols.size)) * NOISE_SD * spread[cols]
        elif kind == "decoupled":
            other = int(rng.integers(0, len(history) - length))
            X[rows, cols] = history[other:other + length, cols]
        elif kind == "stuck":
            X[rows, cols] = X[start, cols]
        else:
            raise ValueError(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
        y[rows] = 1
    return X, y


def split(fleet: dict[str, np.ndarray], kind: str, history: int = 0, seed: int = SEED,
          times: dict[str, np.ndarray] | None = None) -> tuple[dict, dict]:
    """History (train) and injected probe parts (test) of every device, for one kind; seeded per kind. `history`:
    only the last that many readings before the probe part are history (0: all of them), as for young devices;
    `times`: each device's event times (the ``seasonal`` kind reads its day from them)."""
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    train, test = {}, {}
    for device, X in fleet.items():
        past, probe = parts(len(X), history)
        train[device] = X[past]
        half_day = readings_per_day(times[device]) // 2 if kind == "seasonal" and times is not None else 0
        test[device] = inject(kind, X[:probe.start], X[probe], rng, half_day)
    return train, test


def parts(n: int, history: int = 0) -> tuple[slice, slice]:
    """The history part and the probe part of a series of `n` readings (`history`: as in `split`)."""
    cut = int(PROBE_START * n)
    return slice(max(0, cut - history) if history else 0, cut), slice(cut, n)


def split_times(times: dict[str, np.ndarray], history: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each device's event times cut as `split` cuts its readings: (history part, probe part)."""
    return {device: tuple(ts[part] for part in parts(len(ts), history)) for device, ts in times.items()}


def run_kind(fleet: dict[str, np.ndarray], metrics: list[str], cfg, kind: str, models: tuple[str, ...],
             history: int = 0, seed: int = SEED, pooling: str = POOLING["stream"],
             times: dict[str, np.ndarray] | None = None) -> dict:
    """`evaluate_fleet`'s report of `models` on the fleet with `kind` injected (`times`: each device's event
    times, epoch ms, row for row; needed with ``model.features.time_of_day``)."""
    train, test = split(fleet, kind, history, seed, times)
    threshold_cfg = {k: cfg.threshold[k] for k in ("kind", "target_false_alarm_rate", "sigma_k")}
    return evaluate_fleet(train, test, lambda: DeviceDetector.create(metrics, cfg), strategy=make_strategy(cfg),
                          threshold_cfg=threshold_cfg, micro_batch=cfg.stream.micro_batch_size,
                          round_every=cfg.stream.snapshot_every, incident_gap=cfg.incidents.gap_readings,
                          models=models, times=None if times is None else split_times(times, history),
                          **pooling_options(pooling, cfg.threshold.history)).report


def main() -> int:
    parser = training_fleet_parser(__doc__, QUICK)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"kinds to inject, one at a time (default: all: "
                                                                  f"{','.join(KINDS)})")
    parser.add_argument("--history", type=int, default=0, metavar="READINGS",
                        help="young devices: only this many readings of history before the probe part (default: "
                             "all; the magnitudes still come from the whole history)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed of the injections (default {SEED}: the one "
                                                              "figures and decisions are quoted for)")
    parser.add_argument("--pooling", choices=POOLINGS, default=POOLING["stream"],
                        help=f"how devices are normalised before pooling, as in flead evaluate (default "
                             f"{POOLING['stream']}, flead evaluate's for a stream)")
    args = parser.parse_args()
    if args.history < 0:
        parser.error("--history: a number of readings >= 0 (0: all)")
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        parser.error(f"--kinds: unknown {', '.join(unknown) or 'none given'} (known: {', '.join(KINDS)})")
    stop_cleanly_on_sigterm()
    cfg = load_config()
    fleet, metrics, path, times = training_fleet(args.train, MIN_READINGS, "injected", QUICK if args.quick else None)
    print(f"{len(fleet)} devices, {len(metrics)} metrics, {sum(len(X) for X in fleet.values()):,} readings; "
          f"probe part: the last {1 - PROBE_START:.0%} of each"
          + (f", history: its last {args.history:,} readings before it" if args.history else "")
          + "; pooled ROC-AUC / PR-AUC per kind", flush=True)
    print(f"{'kind':<10} {'anomalous':>9}" + "".join(f"{m:>18}" for m in MODELS), flush=True)
    started = time.monotonic()
    rows = []
    for kind in kinds:
        report = run_kind(fleet, metrics, cfg, kind, MODELS, args.history, args.seed, args.pooling, times)
        figures = {m: {**{c: report["models"][m][c] for c in COLUMNS},
                       "roc_auc_per_device_mean": report["models"][m]["per_device_mean"]["roc_auc"],
                       **{f"{c}_{other}": v for other in ("fixed_calibration", "all_recent")
                          for c, v in report["models"][m].get(other, {}).items()}}
                   for m in MODELS}
        bound = report["models"]["federated"].get("rank_bound_devices", [])
        rows.append({"name": kind, "anomaly_rate": report["anomaly_rate"], "models": figures,
                     "rank_bound_devices": bound})
        print(f"{kind:<10} {report['anomaly_rate']:>9.3f}"
              + "".join(f"{figures[m]['roc_auc']:>11.3f} /{figures[m]['pr_auc']:.3f}" for m in MODELS), flush=True)
    mean = {m: {c: float(np.mean([r["models"][m][c] for r in rows])) for c in rows[0]["models"][m]} for m in MODELS}
    bound = sorted({d for r in rows for d in r["rank_bound_devices"]})
    if bound:
        print(f"model.subspace.rank {cfg.model.subspace.rank} caps k on {len(bound)} of {len(fleet)} devices of this "
              f"fleet's own data ({', '.join(bound[:5])}{' …' if len(bound) > 5 else ''}): rerun with a larger "
              "FLEAD_MODEL_SUBSPACE_RANK to see whether it detects better here")
    print(f"{'mean':<10} {'':>9}" + "".join(f"{mean[m]['roc_auc']:>11.3f} /{mean[m]['pr_auc']:.3f}" for m in MODELS))
    print("operating F1 (mean over kinds): " + ", ".join(f"{m} {mean[m]['f1']:.3f}" for m in MODELS)
          + f"; {time.monotonic() - started:.0f} s")
    write_json(args.json, {"headline": {"name": "federated detector's pooled ROC-AUC on injected anomalies, mean over "
                                                "the kinds (floor: Isolation Forest's)",
                                        "value": round(mean["federated"]["roc_auc"], 4), "unit": "ROC-AUC",
                                        "floor": round(mean["isolation_forest"]["roc_auc"], 4)},
                           "rows": rows, "mean": mean, "kinds": list(kinds), "seed": args.seed, "train": str(path),
                           "devices": len(fleet), "history": args.history, "pooling": args.pooling,
                           "quick": args.quick, "seconds": round(time.monotonic() - started, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
