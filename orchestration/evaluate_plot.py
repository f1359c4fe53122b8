"""The picture of a `flead evaluate` run (`--plot FILE.png`): the pooled ROC and precision-recall curves of every
model with its operating point (its label-free flags), and its F1 figures as bars, so a reader sees at a glance
where the federated detector stands against the baselines on the same split."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from models.metrics import ranking_curves

MAX_POINTS = 2000  # points drawn per curve (the areas in the legend are the report's, from every point)
COLOURS = {"federated": "tab:blue", "local": "tab:green", "centralized": "tab:purple",
           "isolation_forest": "tab:orange", "pca": "tab:brown", "dbscan": "tab:pink", "random": "tab:gray"}
BARS = (("f1", "F1 at its own\nlabel-free flags"), ("best_f1", "best F1\n(upper bound, uses labels)"),
        ("incident_f1", "incident F1"))


def thinned(*curves: np.ndarray, points: int = MAX_POINTS) -> list[np.ndarray]:
    """Every curve sampled at the same at most `points` indices, first and last kept."""
    n = len(curves[0])
    if n <= points:
        return list(curves)
    keep = np.unique(np.r_[np.linspace(0, n - 1, points).astype(int), n - 1])
    return [c[keep] for c in curves]


def operating_point(y: np.ndarray, flags: np.ndarray) -> tuple[float, float, float]:
    """False-positive rate, recall and precision of `flags` against labels `y`."""
    y, flags = y.astype(bool), flags.astype(bool)
    tp, fp = float(np.sum(y & flags)), float(np.sum(~y & flags))
    fpr = fp / max(float(np.sum(~y)), 1.0)
    recall = tp / max(float(np.sum(y)), 1.0)
    precision = tp / (tp + fp) if tp + fp else 0.0
    return fpr, recall, precision


def plot_evaluation(evaluation: Any, labels: Mapping[str, np.ndarray], title: str, path: str | Path) -> Path:
    """Write the figure of `evaluation` (a `models.evaluation.FleetEvaluation`) to `path` (PNG). `labels`:
    device → its test labels; scores are pooled in the evaluation's device order, as in its report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = evaluation.report["models"]
    fig, (roc_ax, pr_ax, bar_ax) = plt.subplots(1, 3, figsize=(17, 5.2), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    y = None
    for name, figures in models.items():
        devices = list(evaluation.scores[name])
        y = np.concatenate([np.asarray(labels[d]).astype(int) for d in devices])
        scores = np.concatenate([evaluation.scores[name][d] for d in devices])
        flags = np.concatenate([evaluation.flags[name][d] for d in devices])
        curves = ranking_curves(y, scores)
        if not len(curves["fpr"]):
            continue
        colour = COLOURS.get(name, None)
        width = 2.2 if name == "federated" else 1.1
        fpr, tpr = thinned(curves["fpr"], curves["tpr"])
        recall, precision = thinned(curves["recall"], curves["precision"])
        roc_ax.plot(fpr, tpr, color=colour, lw=width, label=f"{name} {figures['roc_auc']:.3f}")
        pr_ax.plot(recall, precision, color=colour, lw=width, label=f"{name} {figures['pr_auc']:.3f}")
        op_fpr, op_recall, op_precision = operating_point(y, flags)
        roc_ax.plot([op_fpr], [op_recall], "o", color=colour, ms=6, mec="black", mew=0.6)
        pr_ax.plot([op_recall], [op_precision], "o", color=colour, ms=6, mec="black", mew=0.6)
    roc_ax.plot([0, 1], [0, 1], ":", color="gray", lw=0.8)
    roc_ax.set(xlabel="false-positive rate", ylabel="true-positive rate (recall)", xlim=(0, 1), ylim=(0, 1.01),
               title="ROC, pooled over devices (legend: ROC-AUC)")
    if y is not None:
        pr_ax.axhline(float(np.mean(y)), ls=":", color="gray", lw=0.8)
    pr_ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01),
              title="precision-recall, pooled (legend: PR-AUC)")
    for ax in (roc_ax, pr_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if ax is roc_ax else "upper right")
    names = list(models)
    step = 0.8 / len(BARS)
    for i, (key, label) in enumerate(BARS):
        values = [float(models[n].get(key, np.nan)) for n in names]
        bars = bar_ax.bar(np.arange(len(names)) + (i - 1) * step, values, step, label=label,
                          color=("tab:blue", "lightsteelblue", "tab:cyan")[i])
        bar_ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    bar_ax.set_xticks(np.arange(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
    bar_ax.set(ylim=(0, 1.05), title="F1 without point adjustment")
    bar_ax.legend(fontsize=8, loc="upper right")
    bar_ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title + "\nDots: each model's operating point (its label-free flags). Scores pooled after a "
                 "label-free robust z per device.", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
