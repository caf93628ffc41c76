"""The report's figures (matplotlib, Agg: no display needed).

Every figure built from the synthetic stand-in says "SYNTHETIC data" in its title, so a
plot copied out of its report cannot pass for DermaMNIST results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"tf": "#ff7f0e", "torch": "#d62728", "flax": "#1f77b4"}
SYNTHETIC_TAG = "SYNTHETIC data"


def title(text: str, synthetic: bool) -> str:
    return f"{text} [{SYNTHETIC_TAG}]" if synthetic else text


def _color(name: str, i: int) -> str:
    return COLORS.get(name, f"C{i}")


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def training_curves(curves: dict[str, list[list[dict]]], path: Path, synthetic: bool) -> Path:
    """curves: {framework: [per-seed list of epoch rows (epoch, train_loss, val_loss,
    val_acc, lr)]}. Mean over seeds with a band of +-1 std; seeds of unequal length are
    averaged over the epochs they share."""
    panels = (("train_loss", "training loss"), ("val_loss", "validation loss"), ("val_acc", "validation accuracy"), ("lr", "learning rate"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for i, (fw, runs) in enumerate(curves.items()):
        runs = [r for r in runs if r]
        if not runs:
            continue
        length = min(len(r) for r in runs)
        epochs = np.arange(1, length + 1)
        for ax, (key, label) in zip(axes, panels):
            values = np.array([[row[key] for row in r[:length]] for r in runs], np.float64)
            mean, sd = values.mean(axis=0), values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(length)
            ax.plot(epochs, mean, color=_color(fw, i), label=f"{fw} (n={len(runs)})")
            ax.fill_between(epochs, mean - sd, mean + sd, color=_color(fw, i), alpha=0.2, linewidth=0)
            ax.set_xlabel("epoch")
            ax.set_title(label)
            if key == "lr":
                ax.set_yscale("log")
                lo, hi = ax.get_ylim() if i else (np.inf, 0)
                ax.set_ylim(min(lo, np.nanmin(mean) / 3), max(hi, np.nanmax(mean) * 3))
    axes[0].legend()
    fig.suptitle(title("Training curves: mean and +-1 std over seeds", synthetic))
    return _save(fig, path)


def accuracy_distribution(groups: dict[str, Sequence[float]], path: Path, synthetic: bool,
                          ci: dict[str, tuple[float, float]] | None = None, majority: float | None = None) -> Path:
    """Test accuracy (points) per framework: every seed as a dot, the mean as a bar, the
    bootstrap 95% CI as an error bar; the majority-class rate as a dashed line."""
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(groups), 4))
    rng = np.random.default_rng(0)  # jitter only
    for i, (fw, values) in enumerate(groups.items()):
        v = 100 * np.asarray(values, np.float64)
        if v.size == 0:
            continue
        ax.scatter(i + rng.uniform(-0.08, 0.08, v.size), v, color=_color(fw, i), zorder=3, s=24)
        m = v.mean()
        ax.hlines(m, i - 0.25, i + 0.25, color="black", zorder=4)
        if ci and fw in ci:
            lo, hi = 100 * np.asarray(ci[fw])
            ax.errorbar(i + 0.3, m, yerr=[[m - lo], [hi - m]], fmt="none", ecolor="black", capsize=4)
    if majority is not None:
        ax.axhline(100 * majority, ls="--", color="gray", label=f"majority class {100 * majority:.1f}%")
        ax.legend(loc="best", framealpha=0.6)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title("Test accuracy per framework (dots: seeds; bar: mean; whisker: 95% CI)", synthetic), fontsize=9)
    return _save(fig, path)


def ablation_bars(rows: list[dict], path: Path, synthetic: bool, gap: float | None = None) -> Path:
    """rows: [{'knob', 'single' (points), 'single_sd', 'cumulative' (points) or None}];
    horizontal bars for the one-at-a-time effect, dots for the cumulative effect."""
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.45 * max(len(rows), 1)))
    y = np.arange(len(rows))
    single = np.array([r["single"] if r["single"] is not None else np.nan for r in rows], np.float64)
    err = np.array([r.get("single_sd") or 0.0 for r in rows], np.float64)
    ax.barh(y, single, xerr=err, color="#8da0cb", label="moved alone", capsize=3)
    cumulative = [r.get("cumulative") for r in rows]
    if any(c is not None for c in cumulative):
        ax.plot([np.nan if c is None else c for c in cumulative], y, "o-", color="black", label="moved cumulatively")
    if gap is not None:
        ax.axvline(gap, ls="--", color="#d62728", label=f"gap to target {gap:+.2f}")
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_yticks(y, [r["knob"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("change in test accuracy (points)")
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title("Knob ablation", synthetic))
    return _save(fig, path)


def short_labels(labels: Sequence[str], n: int, width: int = 14) -> list[str]:
    """Tick labels: the words every label shares ('synthetic ...') dropped, then cut."""
    if not labels or len(labels) != n:
        return [str(i) for i in range(n)]
    words = [str(l).split() for l in labels]
    common = 0
    while all(len(w) > common + 1 and w[common] == words[0][common] for w in words):
        common += 1
    return [f"{i}:" + " ".join(w[common:])[:width] for i, w in enumerate(words)]


def confusion_matrices(matrices: dict[str, np.ndarray], labels: Sequence[str], path: Path, synthetic: bool) -> Path:
    """Row-normalised confusion matrices (true class per row), summed over seeds."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.4 * len(matrices), 4.6), squeeze=False, layout="constrained")
    short = short_labels(labels, len(next(iter(matrices.values()))))
    for ax, (fw, m) in zip(axes[0], matrices.items()):
        m = np.asarray(m, np.float64)
        rows = m.sum(axis=1, keepdims=True)
        norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        for (i, j), v in np.ndenumerate(norm):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v > 0.5 else "black")
        ticks = range(len(m))
        ax.set_xticks(ticks, short, rotation=60, fontsize=7)
        ax.set_yticks(ticks, short, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(fw)
    fig.suptitle(title("Confusion matrices on test (row-normalised, summed over seeds)", synthetic))
    return _save(fig, path)
