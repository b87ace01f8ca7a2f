"""Figures and tables (matplotlib, Agg backend; files written atomically)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

if TYPE_CHECKING:
    from unifyreg.probing import ProbeResult

__all__ = ["plot_ablation", "plot_probe_history", "plot_probe_result", "save_figure"]


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically as PNG and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        plt.close(fig)
    return path


def plot_probe_result(result: ProbeResult, directory: str | Path) -> dict[str, Path]:
    """Two figures: prompt-entropy trajectories per modality and category
    (``encoding_trajectories.png``) and text vs image conditional-entropy trajectories
    (``response_trajectories.png``), both length-normalised, mean +- std over samples."""
    directory = Path(directory)
    layers = list(result.layers)
    paths: dict[str, Path] = {}

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, quantity in zip(axes, ("encoding/text", "encoding/image"), strict=True):
        stats = result.stats(quantity, normalized=True)
        for category, st in stats.items():
            style = {"color": "black", "linewidth": 2.5} if category == "all" else {}
            ax.plot(
                layers,
                st["mean"],
                marker="o",
                markersize=3,
                label=f"{category} (n={st['count']})",
                **style,
            )
        ax.set_title(f"{quantity.split('/')[1]} prompts")
        ax.set_xlabel("layer (0 = embeddings)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if stats:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("normalised matrix entropy  H / log2 n")
    fig.suptitle("Prompt encoding: entropy trajectories")
    paths["encoding_figure"] = save_figure(fig, directory / "encoding_trajectories.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for quantity, colour in (("response/text", "tab:blue"), ("response/image", "tab:orange")):
        stats = result.stats(quantity, normalized=True).get("all")
        if stats is None:
            continue
        mean = stats["mean"]
        low = [m - s for m, s in zip(mean, stats["std"], strict=True)]
        high = [m + s for m, s in zip(mean, stats["std"], strict=True)]
        label = f"{quantity.split('/')[1]} response (n={stats['count']})"
        ax.plot(layers, mean, marker="o", markersize=3, color=colour, label=label)
        ax.fill_between(layers, low, high, color=colour, alpha=0.15)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("normalised proxy  H(R|P) / log2(n+m)")
    ax.set_title("Response: conditional-entropy trajectories")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths["response_figure"] = save_figure(fig, directory / "response_trajectories.png")
    return paths


def plot_probe_history(history: list[dict[str, Any]], directory: str | Path) -> dict[str, Path]:
    """Trajectory figures across epochs, one curve per probe (epoch label in the legend):
    ``encoding_text_by_epoch.png``, ``encoding_image_by_epoch.png``,
    ``response_text_by_epoch.png``, ``response_image_by_epoch.png`` (normalised means)."""
    directory = Path(directory)
    paths: dict[str, Path] = {}
    for quantity in ("encoding/text", "encoding/image", "response/text", "response/image"):
        curves = []
        for entry in history:
            stats = entry["summary"]["stats"].get(quantity)
            if stats and "all" in stats["normalized"]:
                curves.append(
                    (entry["epoch"], entry["summary"]["layers"], stats["normalized"]["all"]["mean"])
                )
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        colours = plt.cm.viridis([i / max(1, len(curves) - 1) for i in range(len(curves))])
        for colour, (epoch, layers, mean) in zip(colours, curves, strict=True):
            ax.plot(layers, mean, marker="o", markersize=3, color=colour, label=f"epoch {epoch}")
        ax.set_xlabel("layer (0 = embeddings)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("normalised value")
        ax.set_title(f"{quantity} across epochs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        name = quantity.replace("/", "_") + "_by_epoch"
        paths[name] = save_figure(fig, directory / f"{name}.png")
    return paths


def plot_ablation(by_arm: dict[str, Any], directory: str | Path) -> dict[str, Path]:
    """Ablation figures: ``trajectories.png`` (final normalised trajectories of the four
    probe quantities, one curve per arm, mean over seeds) and ``scores.png`` (scalar scores
    and accuracies per arm, mean ± std over seeds)."""
    directory = Path(directory)
    paths: dict[str, Path] = {}
    quantities = ("encoding/text", "encoding/image", "response/text", "response/image")
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), sharey=False)
    for ax, quantity in zip(axes, quantities, strict=True):
        for arm, entry in by_arm.items():
            curve = entry["trajectories"].get(quantity)
            if curve is not None:
                ax.plot(entry["layers"], curve, marker="o", markersize=3, label=arm)
        ax.set_title(quantity)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("normalised value")
    axes[-1].legend(fontsize=7)
    fig.suptitle("Final probe per arm (mean over seeds)")
    paths["trajectories"] = save_figure(fig, directory / "trajectories.png")

    metrics = sorted({m for entry in by_arm.values() for m in entry["metrics"]})
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.4 * len(metrics), 3.6))
    axes = [axes] if len(metrics) == 1 else list(axes)
    arms = list(by_arm)
    for ax, metric in zip(axes, metrics, strict=True):
        means = [by_arm[a]["metrics"].get(metric, {}).get("mean", float("nan")) for a in arms]
        stds = [by_arm[a]["metrics"].get(metric, {}).get("std", 0.0) for a in arms]
        ax.bar(range(len(arms)), means, yerr=stds, capsize=3, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(arms)), arms, rotation=45, ha="right", fontsize=7)
        ax.set_title(metric.split("/")[1], fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths["scores"] = save_figure(fig, directory / "scores.png")
    return paths
