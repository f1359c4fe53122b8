"""A young device's false drifts and lone-flag incidents, on ASD and on a synthetic fleet of another shape.

No label is used. The synthetic fleet has the shape of a public 1-minute server fleet (none of its data): devices of
38 metrics reporting every minute, daily seasonal signals in a few correlated groups with noise, 4 constant metrics,
and anomaly ranges of 5–150 readings injected into each device's test part (fixed seed). For each fleet and for
`threshold.warmup_per_input` 0 (a fixed warm-up of `threshold.warmup` readings) and the configured value, every
device's detector (`DeviceDetector.process_many` in micro-batches of `stream.micro_batch_size`, one per device, no
federation) runs over its training part, then its test part, and the bench counts:

- drift events declared on the training parts (presumed normal: each one is a false drift), and the share of
  training readings flagged from reading `threshold.warmup` on (the target is `threshold.target_false_alarm_rate`);
- incidents the detector opened on the test part, and those with one flagged reading (what the threshold's
  false-alarm rate produces by design; `router.notify_min_flagged` holds them back from paging).

Headline: false drifts on the synthetic fleet's training parts with the configured warm-up, beside the fixed one
as its floor (docs/evaluation.md, item 9).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_output import stop_cleanly_on_sigterm, write_json  # noqa: E402  (beside this script)
from config import load_config  # noqa: E402
from models.detector import DeviceDetector  # noqa: E402

SEED = 7
METRICS = 38
GROUPS = 5                # correlated groups of metrics, each a daily sine of its own phase
PERIOD = 1440             # readings per day at one a minute
STEP_MS = 60_000          # one reading a minute (the CSV's timestamps; the detector's event times)
NOISE = 0.03
CONSTANT_METRICS = 4
RANGES_PER_DEVICE = 12    # injected into the test part
RANGE_LENGTH = (5, 150)
RANGE_SHIFT_SD = 0.3


def synthetic_fleet(devices: int, train_n: int, test_n: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """device → (training readings, test readings, test labels), seeded."""
    rng = np.random.default_rng(SEED)
    fleet = {}
    for d in range(devices):
        n = train_n + test_n
        t = np.arange(n)
        groups = rng.integers(0, GROUPS, METRICS)
        base = np.stack([np.sin(2 * np.pi * t / PERIOD + g) for g in range(GROUPS)], 1)
        X = 0.5 + 0.2 * base[:, groups] * rng.uniform(0.3, 1, METRICS) + rng.normal(0, NOISE, (n, METRICS))
        X[:, rng.choice(METRICS, CONSTANT_METRICS, replace=False)] = 0.0
        y = np.zeros(n, dtype=np.int64)
        for _ in range(RANGES_PER_DEVICE):
            start, length = rng.integers(train_n, n - RANGE_LENGTH[1]), rng.integers(*RANGE_LENGTH)
            cols = rng.choice(METRICS, rng.integers(2, 8), replace=False)
            X[start:start + length, cols] += rng.normal(0, RANGE_SHIFT_SD, len(cols))
            y[start:start + length] = 1
        fleet[f"machine-{d + 1}"] = (X[:train_n], X[train_n:], y[train_n:])
    return fleet


def write_csv(fleet: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], folder: Path) -> None:
    """The fleet as `flead evaluate --train --test` reads one (ASD's format: device_id, timestamp, m00..., label),
    one reading a minute."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = [f"m{i:02d}" for i in range(METRICS)]
    for part in ("train", "test"):
        frames = []
        for device, (X_train, X_test, y_test) in fleet.items():
            X, first = (X_train, 0) if part == "train" else (X_test, len(X_train))
            frame = pd.DataFrame(X, columns=columns)
            frame.insert(0, "timestamp", (first + np.arange(len(X))) * (STEP_MS // 1000))
            frame.insert(0, "device_id", device)
            if part == "test":
                frame["label"] = y_test
            frames.append(frame)
        pd.concat(frames).to_csv(folder / f"{part}.csv.gz", index=False)


def asd_step_ms(cfg) -> int:
    """The interval of ASD's readings (its CSV's first two timestamps), for the detector's event times."""
    first = pd.read_csv(Path(cfg.paths.data_dir) / "asd" / "train.csv.gz", nrows=2)["timestamp"]
    return int((pd.Timestamp(first[1]) - pd.Timestamp(first[0])) / pd.Timedelta(milliseconds=1))


def asd_fleet(cfg, devices: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    asd = Path(cfg.paths.data_dir) / "asd"
    train, test = pd.read_csv(asd / "train.csv.gz"), pd.read_csv(asd / "test.csv.gz")
    metrics = [c for c in train.columns if c not in ("device_id", "timestamp", "label")]
    names = list(dict.fromkeys(train["device_id"]))[:devices]
    return {d: (train[train.device_id == d][metrics].to_numpy(float), test[test.device_id == d][metrics].to_numpy(float),
                test[test.device_id == d]["label"].to_numpy()) for d in names}


def run(fleet: dict, metrics: list[str], cfg, warmup_per_input: float, step_ms: int = STEP_MS) -> dict:
    """Drifts and flag rate on the training parts, incidents on the test parts (module docstring); the readings
    are `step_ms` apart, the first at midnight UTC."""
    batch, warmup = cfg.stream.micro_batch_size, cfg.threshold.warmup
    drifts = flagged = counted = incidents = lone = lone_true = 0
    started = time.process_time()
    for X_train, X_test, y_test in fleet.values():
        det = DeviceDetector.create(metrics, cfg, warmup_per_input=warmup_per_input)
        ts = np.arange(len(X_train) + len(X_test), dtype=np.int64) * step_ms
        for i in range(0, len(X_train), batch):
            r = det.process_many(X_train[i:i + batch], ts=ts[i:min(i + batch, len(X_train))])
            drifts += r.drift is not None
            keep = np.arange(i, i + len(r.is_anomaly)) >= warmup
            flagged += int(r.is_anomaly[keep].sum())
            counted += int(keep.sum())
        for i in range(0, len(X_test), batch):
            r = det.process_many(X_test[i:i + batch], ts=ts[len(X_train) + i:len(X_train) + i + batch])
            for change in r.incidents:
                if change.status == "resolved":
                    incidents += 1
                    if change.n_flagged == 1:
                        lone += 1
                        lone_true += int(y_test[change.start_seq - len(X_train)])
    readings = sum(len(a) + len(b) for a, b, _ in fleet.values())
    return {"false_drifts": drifts, "train_flag_rate": flagged / max(counted, 1), "incidents": incidents,
            "lone_flag_incidents": lone, "lone_flag_incidents_on_a_range": lone_true,
            "readings_per_cpu_s": readings / max(time.process_time() - started, 1e-9)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 synthetic devices of 5,000 + 5,000 readings and 3 ASD "
                                                             "servers (the default: 28 of 20,000 + 20,000, all 12)")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    parser.add_argument("--write-csv", metavar="DIR", type=Path,
                        help="only write the synthetic fleet (28 devices of --readings + --readings) as "
                             "DIR/train.csv.gz and DIR/test.csv.gz, for flead evaluate --train --test and "
                             "bench/injected.py --train")
    parser.add_argument("--readings", type=int, default=25_000, help="with --write-csv: readings per part and device")
    args = parser.parse_args()
    stop_cleanly_on_sigterm()
    if args.write_csv:
        if args.readings < 2 * RANGE_LENGTH[1]:
            parser.error(f"--readings: at least {2 * RANGE_LENGTH[1]} (the test part holds ranges of up to "
                         f"{RANGE_LENGTH[1]})")
        write_csv(synthetic_fleet(28, args.readings, args.readings), args.write_csv)
        print(f"wrote {args.write_csv}/train.csv.gz and test.csv.gz: 28 devices, {METRICS} metrics")
        return 0
    cfg = load_config()
    devices, train_n, test_n, asd_devices = (6, 5_000, 5_000, 3) if args.quick else (28, 20_000, 20_000, 12)
    fleets = {"asd": (asd_fleet(cfg, asd_devices), None, asd_step_ms(cfg)),
              "synthetic": (synthetic_fleet(devices, train_n, test_n), [f"m{i:02d}" for i in range(METRICS)], STEP_MS)}
    rows, figures = [], {}
    print(f"{'fleet, warm-up':<46} {'false drifts':>12} {'train flag rate':>16} {'incidents':>10} {'lone flag':>10}")
    for name, (fleet, metrics, step_ms) in fleets.items():
        metrics = metrics or [c for c in pd.read_csv(Path(cfg.paths.data_dir) / "asd" / "test.csv.gz", nrows=1).columns
                              if c not in ("device_id", "timestamp", "label")]
        for per_input in (0.0, float(cfg.threshold.warmup_per_input)):
            label = (f"{name}, warmup {cfg.threshold.warmup}" if per_input == 0 else
                     f"{name}, warmup {cfg.threshold.warmup} and {per_input:g} per input")
            figures[(name, per_input)] = fig = run(fleet, metrics, cfg, per_input, step_ms)
            rows.append({"name": label, "fleet": name, "warmup_per_input": per_input, "devices": len(fleet), **fig})
            print(f"{label:<46} {fig['false_drifts']:>12} {fig['train_flag_rate']:>16.4f} {fig['incidents']:>10} "
                  f"{fig['lone_flag_incidents']:>10} ({fig['lone_flag_incidents_on_a_range']} on a range)", flush=True)
    configured = float(cfg.threshold.warmup_per_input)
    write_json(args.json, {"headline": {"name": "false drifts on the synthetic fleet's training parts, warm-up per "
                                                "input (floor: the fixed warm-up)",
                                        "value": figures[("synthetic", configured)]["false_drifts"], "unit": "drifts",
                                        "floor": figures[("synthetic", 0.0)]["false_drifts"]},
                           "rows": rows, "seed": SEED, "quick": args.quick})
    return 0


if __name__ == "__main__":
    sys.exit(main())
