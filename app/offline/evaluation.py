"""Detection metrics and plots for ID-vs-OOD comparisons (the ``evaluate`` command)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


@dataclass
class PairResult:
    method: str
    id: str
    ood: str
    auroc: float
    aupr: float
    fpr95: float
    n_id: int
    n_ood: int

    def to_dict(self) -> dict:
        return asdict(self)


def detection_metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[float, float, float]:
    """(AUROC, AUPR with OOD as the positive class, FPR on ID at the first threshold reaching 95% TPR).

    Non-finite scores count as maximally anomalous, as the service treats them.
    """
    y = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    s = np.nan_to_num(np.r_[id_scores, ood_scores], nan=np.inf)
    s = np.where(np.isposinf(s), np.finfo(float).max, s)
    auroc = float(roc_auc_score(y, s))
    aupr = float(average_precision_score(y, s))
    fpr, tpr, _ = roc_curve(y, s)
    fpr95 = float(fpr[np.searchsorted(tpr, 0.95, side="left")])
    return auroc, aupr, fpr95


def format_table(results: list[PairResult]) -> str:
    cols = ("method", "id", "ood", "AUROC", "AUPR", "FPR95", "n_id", "n_ood")
    head = "{:<15} {:<14} {:<14} {:>7} {:>7} {:>7} {:>6} {:>6}".format(*cols)
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.method:<15} {r.id:<14} {r.ood:<14} {r.auroc:7.3f} {r.aupr:7.3f} {r.fpr95:7.3f} "
            f"{r.n_id:6d} {r.n_ood:6d}"
        )
    methods = sorted({r.method for r in results}, key=[r.method for r in results].index)
    for m in methods:
        mean = np.mean([r.auroc for r in results if r.method == m])
        lines.append(f"{m:<15} {'(mean AUROC)':<29} {mean:7.3f}")
    return "\n".join(lines)


def plot_roc_and_histograms(
    scores: dict[str, dict[str, np.ndarray]],
    id_name: str,
    out_prefix: Path,
    thresholds: dict[str, tuple[float, float]] | None = None,
) -> list[Path]:
    """ROC curves (one panel per method) and score histograms; ``scores[method][set_name]``;
    ``thresholds[method]`` = (false-positive rate, threshold) marks the deciding threshold on both."""
    thresholds = thresholds or {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(scores)
    paths = []
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 4), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        id_scores = scores[method][id_name]
        for name, ood in scores[method].items():
            if name == id_name:
                continue
            y = np.r_[np.zeros(len(id_scores)), np.ones(len(ood))]
            s = np.nan_to_num(np.r_[id_scores, ood], nan=1e300, posinf=1e300)
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, label=f"{name} ({roc_auc_score(y, s):.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        if method in thresholds:
            rate = thresholds[method][0]
            ax.axvline(rate, color="k", ls="--", lw=0.8, label=f"profile threshold ({rate:g} FPR)")
        ax.set(title=method, xlabel="FPR (ID flagged)", ylabel="TPR (OOD flagged)")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    roc_path = out_prefix.with_name(out_prefix.name + "_roc.png")
    fig.savefig(roc_path, dpi=110)
    plt.close(fig)
    paths.append(roc_path)

    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        finite = np.concatenate([v[np.isfinite(v)] for v in scores[method].values()])
        lo, hi = np.percentile(finite, [0.5, 99.5]) if len(finite) else (0.0, 1.0)
        bins = np.linspace(lo, hi, 50)
        for name, vals in scores[method].items():
            ax.hist(
                np.clip(vals[np.isfinite(vals)], lo, hi), bins=bins, histtype="step", density=True, label=name
            )
        if method in thresholds:
            rate, value = thresholds[method]
            ax.axvline(value, color="k", ls="--", lw=1, label=f"threshold {value:.1f} ({rate:g} FPR)")
        ax.set(title=method, xlabel="anomaly score (clipped to the 0.5-99.5 % range)", ylabel="density")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    hist_path = out_prefix.with_name(out_prefix.name + "_hist.png")
    fig.savefig(hist_path, dpi=110)
    plt.close(fig)
    paths.append(hist_path)
    return paths
