"""Detection quality on ASD converted to other units, another table shape and gappy data, beside ASD itself.

No test label is used to build the variants; they only check that the detector does not depend on the shape.

ASD's metrics come scaled to [0, 1] by its publishers; another server fleet may report bytes, percentages,
counters. This writes two variants of ASD (fixed seed) and runs `flead evaluate` on each, beside ASD itself:

- ``units``: each metric multiplied by 10^u (u uniform in [-3, 9]) and offset by up to ±1,000;
- ``shape``: the same, plus 16 noisy linear mixes of the metrics and 3 constant or nearly constant columns
  (41 metrics), as an exported metrics table often has;
- ``gaps``: ASD's own units with 2 % of the values missing (empty cells), three servers with only their first
  1,000 training rows, and 300 test rows missing from two servers (an outage of the exporter), as a fleet's
  export often is.

Headline: the federated model's pooled ROC-AUC on ``units`` beside its floor, the same on ASD itself (a detector
that assumes no unit scores both the same).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_output import stop_cleanly_on_sigterm, write_json  # noqa: E402  (beside this script)
from config import PROJECT_ROOT, load_config  # noqa: E402

SEED = 7
MIXES = 16  # noisy linear mixes of the metrics added in the "shape" variant
MIX_NOISE = 0.01
LOG10_SCALES = (-3.0, 9.0)
MAX_OFFSET = 1e3
MISSING_SHARE = 0.02  # gaps: values missing at random
SHORT_TRAINING_ROWS = 1_000  # gaps: training rows of the servers with a short history
SHORT_DEVICES = 3
OUTAGE = (2_000, 2_300)  # gaps: test rows missing from two servers


def variants(train: pd.DataFrame, test: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """``units``, ``shape`` and ``gaps`` (module docstring) of the train and test tables, the same transform for
    both."""
    rng = np.random.default_rng(SEED)
    metrics = [c for c in train.columns if c not in ("device_id", "timestamp", "label")]
    scale = 10.0 ** rng.uniform(*LOG10_SCALES, len(metrics))
    offset = rng.uniform(-MAX_OFFSET, MAX_OFFSET, len(metrics))
    mix = rng.normal(size=(len(metrics), MIXES))

    def units(df: pd.DataFrame) -> pd.DataFrame:
        out = df.copy()
        out[metrics] = df[metrics].to_numpy() * scale + offset
        return out

    def shape(df: pd.DataFrame) -> pd.DataFrame:
        out = units(df).drop(columns="label")
        X = df[metrics].to_numpy()
        mixed = X @ mix + rng.normal(0.0, MIX_NOISE, (len(X), MIXES))
        for j in range(MIXES):
            out[f"mix_{j}"] = mixed[:, j] * 1e4
        out["const_zero"], out["const_big"] = 0.0, 123456.0
        out["flat_mostly"] = np.where(rng.random(len(X)) < 0.999, 1.0, 2.0)
        out["label"] = df["label"]
        return out

    gaps_rng = np.random.default_rng(SEED + 1)  # its own draws: the other variants stay as they were

    def holes(df: pd.DataFrame) -> pd.DataFrame:
        out = df.copy()
        X = df[metrics].to_numpy(copy=True)
        X[gaps_rng.random(X.shape) < MISSING_SHARE] = np.nan
        out[metrics] = X
        return out

    devices = list(dict.fromkeys(train["device_id"]))
    short = set(gaps_rng.choice(devices, SHORT_DEVICES, replace=False).tolist())
    outage = set(gaps_rng.choice(devices, 2, replace=False).tolist())
    gappy_train = pd.concat([rows.head(SHORT_TRAINING_ROWS) if device in short else rows
                             for device, rows in holes(train).groupby("device_id", sort=False)])
    gappy_test = pd.concat([pd.concat([rows.iloc[:OUTAGE[0]], rows.iloc[OUTAGE[1]:]]) if device in outage else rows
                            for device, rows in holes(test).groupby("device_id", sort=False)])
    return {"units": (units(train), units(test)), "shape": (shape(train), shape(test)),
            "gaps": (gappy_train, gappy_test)}


def evaluate(train: Path, test: Path, models: str, out: Path) -> dict:
    """`flead evaluate` on a pair of CSVs: its models' pooled figures."""
    subprocess.run([sys.executable, "-m", "orchestration.cli", "evaluate", "--train", str(train), "--test", str(test),
                    "--models", models, "--json", str(out)], check=True, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["models"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="federated and Isolation Forest only (the default adds "
                                                             "local and PCA)")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    args = parser.parse_args()
    stop_cleanly_on_sigterm()
    models = "federated,isolation_forest" if args.quick else "federated,local,isolation_forest,pca"
    asd = Path(load_config().paths.data_dir) / "asd"
    train, test = pd.read_csv(asd / "train.csv.gz"), pd.read_csv(asd / "test.csv.gz")
    rows, figures = [], {}
    with tempfile.TemporaryDirectory(prefix="flead-units-") as tmp:
        tmp = Path(tmp)
        pairs = {"asd": (asd / "train.csv.gz", asd / "test.csv.gz")}
        for name, (tr, te) in variants(train, test).items():
            pairs[name] = (tmp / f"{name}-train.csv.gz", tmp / f"{name}-test.csv.gz")
            tr.to_csv(pairs[name][0], index=False)
            te.to_csv(pairs[name][1], index=False)
        for name, (tr, te) in pairs.items():
            figures[name] = evaluate(tr, te, models, tmp / f"{name}.json")
            for model, m in figures[name].items():
                rows.append({"name": f"{name}: {model} pooled ROC-AUC / PR-AUC / F1",
                             "value": round(m["roc_auc"], 3), "unit": "ROC-AUC",
                             "pr_auc": round(m["pr_auc"], 3), "f1": round(m["f1"], 3)})
                print(f"{rows[-1]['name']:<60} {m['roc_auc']:.3f} / {m['pr_auc']:.3f} / {m['f1']:.3f}", flush=True)
    write_json(args.json, {"headline": {"name": "federated pooled ROC-AUC, ASD in other units (floor: ASD itself)",
                                        "value": round(figures["units"]["federated"]["roc_auc"], 3),
                                        "unit": "ROC-AUC", "floor": round(figures["asd"]["federated"]["roc_auc"], 3)},
                           "rows": rows, "seed": SEED})
    return 0


if __name__ == "__main__":
    sys.exit(main())
