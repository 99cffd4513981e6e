"""Leaderboard plots: per-modality radar charts (raw and min-max normalized per modality, as Fig. 3 of the
class-prompt TinyViT paper) and latency against mean DSC."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from zoo.data.io import atomic_path  # noqa: E402
from zoo.modalities import MODALITIES  # noqa: E402


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def _score(row: dict, key: str) -> float:
    value = row.get(key, "")
    return float(value) if value not in ("", None) else np.nan


def radar_plot(rows: list[dict], path: Path) -> Path:
    """2×2 radar charts: DSC and NSD per modality, raw and min-max normalized across variants per modality.
    Only modalities that some variant was scored on are drawn."""
    modalities = [m for m in MODALITIES if any(np.isfinite(_score(r, f"dsc_{m}")) for r in rows)]
    angles = np.linspace(0, 2 * np.pi, len(modalities), endpoint=False).tolist()
    fig, axes = plt.subplots(2, 2, figsize=(12, 12), subplot_kw={"polar": True})
    for col, metric in enumerate(("dsc", "nsd")):
        table = np.array([[_score(r, f"{metric}_{m}") for m in modalities] for r in rows])
        low, high = np.nanmin(table, axis=0), np.nanmax(table, axis=0)
        span = np.where(high > low, high - low, 1.0)
        normalized = np.where(high > low, (table - low) / span, 1.0)  # one variant or a tie: all at the rim
        for row_index, (values, title) in enumerate(((table, metric.upper()), (normalized, f"{metric.upper()}, min-max normalized per modality"))):
            ax = axes[row_index, col]
            for r, v in zip(rows, values):
                closed = np.append(v, v[:1])
                ax.plot(angles + angles[:1], closed, marker="o", label=r["model"])
                ax.fill(angles + angles[:1], closed, alpha=0.08)
            ax.set_xticks(angles)
            ax.set_xticklabels(modalities)
            ax.set_ylim(0, 1)
            ax.set_title(title, pad=18)
    axes[0, 0].legend(loc="upper right", bbox_to_anchor=(1.35, 1.15), fontsize=8)
    _save(fig, path)
    return path


def latency_plot(rows: list[dict], path: Path, threads: int) -> Path:
    """End-to-end 2D latency (log scale) against DSC averaged over modalities, one point per variant."""
    fig, ax = plt.subplots(figsize=(7, 5))
    timed = [r for r in rows if np.isfinite(_score(r, "latency_2d_ms"))]  # a --no-latency row has no point
    for i, r in enumerate(sorted(timed, key=lambda r: _score(r, "latency_2d_ms"))):
        x, y = _score(r, "latency_2d_ms"), _score(r, "dsc_mean_modalities")
        ax.scatter([x], [y], s=60)
        # neighbours in latency often score alike (a model and its export): their labels go above and below
        ax.annotate(r["model"], (x, y), textcoords="offset points", xytext=(6, 5 if i % 2 == 0 else -13), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel(f"2D latency per 256² image with one box (ms, {threads} CPU threads)")
    ax.set_ylabel("mean DSC over modalities")
    ax.grid(True, which="both", alpha=0.3)
    _save(fig, path)
    return path


def confusion_plot(confusion: np.ndarray, path: Path, title: str) -> Path:
    """Row-normalized confusion matrix (true modality × predicted modality) with the counts written in."""
    counts = np.asarray(confusion)
    shown = [i for i in range(len(MODALITIES)) if counts[i].sum() or counts[:, i].sum()]
    counts = counts[np.ix_(shown, shown)]
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    names = [MODALITIES[i] for i in shown]
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(shown), 0.8 + 0.55 * len(shown)))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (r, c), n in np.ndenumerate(counts):
        if n:
            ax.text(c, r, str(n), ha="center", va="center", fontsize=8, color="white" if rates[r, c] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted modality")
    ax.set_ylabel("true modality")
    ax.set_title(title, fontsize=9)
    _save(fig, path)
    return path


def click_curves_plot(curves: list[dict], path: Path, rows: dict[str, dict] | None = None) -> Path:
    """The interactive protocol's curves (benchmarks.clicks): DSC and NSD against the step (0: the box, then each
    click), one panel per modality and one for the mean over modalities, one line per model; the legend gives each
    model's DSC_AUC / NSD_AUC means over modalities where `rows` (leaderboard rows by model) has them."""
    groups = [m for m in MODALITIES if any(c["modality"] == m for c in curves)] + ["mean over modalities"]
    models = list(dict.fromkeys(c["model"] for c in curves))
    columns = 4
    lines = -(-len(groups) // columns)
    fig, axes = plt.subplots(2 * lines, columns, figsize=(4 * columns, 3.2 * 2 * lines), squeeze=False)
    for metric_index, metric in enumerate(("dsc", "nsd")):
        for g, group in enumerate(groups):
            ax = axes[metric_index * lines + g // columns, g % columns]
            for model in models:
                points = sorted((c["step"], c[metric]) for c in curves if c["model"] == model and c["modality"] == group)
                if not points:
                    continue
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=model)
            ax.set_title(f"{metric.upper()}: {group}", fontsize=10)
            ax.set_xticks(range(max(c["step"] for c in curves) + 1))
            ax.set_ylim(0, 1)
            ax.grid(True, alpha=0.3)
            if g // columns == lines - 1:
                ax.set_xlabel("step (0: box, then clicks)")
        for g in range(len(groups), lines * columns):
            axes[metric_index * lines + g // columns, g % columns].axis("off")
    handles, labels = axes[lines - 1, (len(groups) - 1) % columns].get_legend_handles_labels()  # the mean's panel

    def described(model: str) -> str:
        row = (rows or {}).get(model, {})
        aucs = [_score(row, f"{metric}_auc_mean_modalities") for metric in ("dsc", "nsd")]
        return model + (f" (DSC_AUC {aucs[0]:.3f}, NSD_AUC {aucs[1]:.3f})" if all(np.isfinite(aucs)) else "")

    fig.legend(handles, [described(label) for label in labels], loc="lower center", ncol=min(3, len(labels)), fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save(fig, path)
    return path
