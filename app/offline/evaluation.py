"""Detection metrics and plots for ID-vs-OOD comparisons (the ``evaluate`` command)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thresholds = thresholds or {}
    paths = []
    for suffix, height, draw in (("_roc.png", 4.0, _roc_panel), ("_hist.png", 3.6, _histogram_panel)):
        fig, axes = plt.subplots(1, len(scores), figsize=(4.2 * len(scores), height), squeeze=False)
        for ax, method in zip(axes[0], scores, strict=True):
            draw(ax, method, scores[method], id_name, thresholds.get(method))
        fig.tight_layout()
        path = out_prefix.with_name(out_prefix.name + suffix)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _roc_panel(
    ax: Any, method: str, sets: dict[str, np.ndarray], id_name: str, threshold: tuple[float, float] | None
) -> None:
    id_scores = sets[id_name]
    for name, ood in sets.items():
        if name == id_name:
            continue
        y = np.r_[np.zeros(len(id_scores)), np.ones(len(ood))]
        s = np.nan_to_num(np.r_[id_scores, ood], nan=1e300, posinf=1e300)
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} ({roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    if threshold is not None:
        ax.axvline(
            threshold[0], color="k", ls="--", lw=0.8, label=f"profile threshold ({threshold[0]:g} FPR)"
        )
    ax.set(title=method, xlabel="FPR (ID flagged)", ylabel="TPR (OOD flagged)")
    ax.legend(fontsize=7, loc="lower right")


def _histogram_panel(
    ax: Any, method: str, sets: dict[str, np.ndarray], id_name: str, threshold: tuple[float, float] | None
) -> None:
    finite = np.concatenate([v[np.isfinite(v)] for v in sets.values()])
    lo, hi = np.percentile(finite, [0.5, 99.5]) if len(finite) else (0.0, 1.0)
    # linear across the normal scores and the threshold, logarithmic beyond: anomalies score up to ten
    # times further out, and one linear axis squeezed the normal images into a single bin
    ids = sets[id_name]
    linear_to = float(np.percentile(ids[np.isfinite(ids)], 95)) if np.isfinite(ids).any() else hi
    if threshold is not None:
        linear_to = max(linear_to, threshold[1])
    linear_to += 0.5 * (linear_to - lo)
    bins = np.linspace(lo, min(linear_to, hi), 30)
    if hi > linear_to:
        forward, inverse = _compressed_beyond(linear_to, (linear_to - lo) / 4)
        bins = np.r_[bins, inverse(np.linspace(forward(linear_to), forward(hi), 16))[1:]]
        ax.set_xscale("function", functions=(forward, inverse))
        ax.set_xticks(_spread_ticks(lo, hi, linear_to, forward))
    for name, vals in sets.items():
        kept = np.clip(vals[np.isfinite(vals)], lo, hi)
        ax.hist(
            kept, bins=bins, histtype="step", weights=np.full(len(kept), 1 / max(len(kept), 1)), label=name
        )
    if threshold is not None:
        rate, value = threshold
        ax.axvline(value, color="k", ls="--", lw=1, label=f"threshold {value:.1f} ({rate:g} FPR)")
    ax.set(title=method, xlabel="anomaly score (log scale past the normal ones)")
    ax.set_ylabel("share of the set's images")
    ax.legend(fontsize=7, loc="upper right")


def _compressed_beyond(edge: float, scale: float) -> tuple[Any, Any]:
    """An axis linear up to ``edge`` and logarithmic beyond it (x -> edge + scale * log1p((x - edge) /
    scale)), and its inverse: the normal scores keep their resolution, the far tail still fits."""

    def forward(x: Any) -> Any:
        x = np.asarray(x, dtype=float)
        return np.where(x <= edge, x, edge + scale * np.log1p(np.maximum(x - edge, 0) / scale))

    def inverse(y: Any) -> Any:
        y = np.asarray(y, dtype=float)
        return np.where(y <= edge, y, edge + scale * np.expm1(np.maximum(y - edge, 0) / scale))

    return forward, inverse


def _spread_ticks(lo: float, hi: float, edge: float, forward: Any) -> list[float]:
    """Ticks of the compressed axis: round tens across the linear part, 1-2-5 steps beyond ``edge``, at
    least a tenth of the axis apart."""
    step = 10.0 ** np.floor(np.log10(max(edge - lo, 1e-9)))
    linear = list(np.arange(np.ceil(lo / step) * step, edge + 1e-9, step))
    beyond = [v * 10.0**e for e in range(-2, 7) for v in (1, 2, 5) if edge < v * 10.0**e <= hi]
    width = float(forward(hi) - forward(lo)) or 1.0
    ticks: list[float] = []
    for c in [*linear, *beyond]:
        if not ticks or float(forward(c) - forward(ticks[-1])) >= 0.1 * width:
            ticks.append(float(c))
    return ticks


def plot_matrix(rows: dict[str, dict], path: Path) -> Path:
    """Heat map of the cross-domain AUROC table (``evaluate --matrix``): rows are the normal set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    table = np.full((len(names), len(names)), np.nan)
    for i, normal in enumerate(names):
        for j, other in enumerate(names):
            if other in rows[normal]["scored"]:
                table[i, j] = rows[normal]["scored"][other]["auroc"]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.4, 1.0 * len(names) + 1.6))
    image = ax.imshow(table, vmin=0.5, vmax=1.0, cmap="viridis")
    for i in range(len(names)):
        for j in range(len(names)):
            if np.isfinite(table[i, j]):
                ax.text(j, i, f"{table[i, j]:.3f}", ha="center", va="center",
                        color="white" if table[i, j] < 0.8 else "black", fontsize=9)  # fmt: skip
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(
        range(len(names)), [f"{n}\n({rows[n]['options']['aggregation']})" for n in names], fontsize=8
    )
    ax.set(xlabel="scored as anomalies", ylabel="normal domain (profile features)", title="AUROC")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    # the row labels name each profile's features and can be wider than tight_layout leaves room for
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
