"""The memory of the subspace model and residual scales, chosen from training data alone (docs/evaluation.md, items
2 and 10): the rule that set `model.subspace.half_life` and `model.scoring.half_life`, re-runnable on any fleet.

For each device of a multi-entity training CSV (ASD's `train.csv.gz` by default; `--train` for another fleet in the
same format) and each candidate half-life, a fresh detector (`DeviceDetector.process_many` in micro-batches of
`stream.micro_batch_size`, no federation), with that half-life for both, runs over the device's training series.
Each batch of the series' last 20 % is scored before it is learned (prequential, out of sample): the figure is the
mean plain squared residual of those readings, in the scaler's units (which no half-life changes). The rule: the
half-life whose figure is lowest in mean change against 2000, over the devices. No label is read.

Headline: the configured half-life's mean change against 2000 (%), beside the rule's choice's as its floor (equal
when the configuration is what the rule picks on this fleet).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_output import (stop_cleanly_on_sigterm, training_fleet, training_fleet_parser,  # noqa: E402
                          write_json)  # beside this script
from config import load_config  # noqa: E402
from models.detector import DeviceDetector  # noqa: E402

CANDIDATES = (1000, 2000, 5000, 10000, 0)  # readings; 0: never forget
REFERENCE = 2000                           # the changes are measured against this candidate
HELD_OUT = 0.2                             # the share of each training series whose prequential error counts
MIN_READINGS = 1000                        # a shorter series says nothing about memories of thousands of readings
QUICK = (3, 4000)                          # --quick: devices, readings of each


def prequential_error(X: np.ndarray, ts: np.ndarray, metrics: list[str], cfg, half_life: float) -> float:
    """Mean plain squared residual of the last `HELD_OUT` of `X` (event times `ts`, epoch ms), each micro-batch
    scored before it is learned (NaN for a series too short to hold out a micro-batch)."""
    det = DeviceDetector.create(metrics, cfg, subspace_half_life=half_life, residual_half_life=half_life)
    batch, start = cfg.stream.micro_batch_size, int((1 - HELD_OUT) * len(X))
    errors = []
    for i in range(0, len(X), batch):
        rows, times = X[i:i + batch], ts[i:i + batch]
        if i >= start:
            scaled = det.scaler.transform_batch(det.features.transform_many(det.model_inputs(rows, times)))
            errors.append(det.model.score_many(scaled))
        det.learn_many(rows, ts=times)
    return float(np.concatenate(errors).mean()) if errors else float("nan")


def main() -> int:
    parser = training_fleet_parser(__doc__, QUICK)
    args = parser.parse_args()
    stop_cleanly_on_sigterm()
    cfg = load_config()
    fleet, metrics, path, times = training_fleet(args.train, MIN_READINGS, "half_life", QUICK if args.quick else None)
    print(f"{'device':<12}" + "".join(f"{'never' if h == 0 else h:>10}" for h in CANDIDATES), flush=True)
    rows, table = [], []
    for device, X in fleet.items():
        figures = [prequential_error(X, times[device], metrics, cfg, h) for h in CANDIDATES]
        table.append(figures)
        rows.append({"name": device, "readings": len(X), "errors": dict(zip(map(str, CANDIDATES), figures))})
        print(f"{device:<12}" + "".join(f"{e:>10.4f}" for e in figures), flush=True)
    errors = np.array(table)
    change = 100 * (errors / errors[:, [CANDIDATES.index(REFERENCE)]] - 1).mean(axis=0)
    best = int(np.argmin(change))
    print(f"{'change (%)':<12}" + "".join(f"{c:>+10.1f}" for c in change))
    print(f"{'lowest on':<12}" + "".join(f"{n:>10}" for n in np.bincount(errors.argmin(axis=1),
                                                                         minlength=len(CANDIDATES))))
    configured = float(cfg.model.subspace.half_life)
    print(f"rule's choice: {CANDIDATES[best] or 'never'}; configured: {configured:g} (model.subspace.half_life)")
    at = CANDIDATES.index(configured) if configured in CANDIDATES else None
    write_json(args.json, {"headline": {"name": f"mean change of the prequential error against half-life {REFERENCE}, "
                                                "configured half-life (floor: the rule's choice)",
                                        "value": None if at is None else round(float(change[at]), 2), "unit": "%",
                                        "floor": round(float(change[best]), 2)},
                           "rows": rows, "candidates": list(CANDIDATES), "change_percent": change.round(2).tolist(),
                           "choice": CANDIDATES[best], "configured": configured, "train": str(path),
                           "quick": args.quick})
    return 0


if __name__ == "__main__":
    sys.exit(main())
