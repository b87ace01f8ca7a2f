"""Tables, files and figures of probe results and ablations.

Figure builders return matplotlib figures (Agg backend); callers save them
(:func:`save_figure`, atomically) and log them (TensorBoard's ``add_figure``, ...), then
close them. Tables are plain strings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from unifyreg.fileio import atomic_file, atomic_write_json, atomic_write_text  # noqa: E402
from unifyreg.probing import ProbeResult  # noqa: E402
from unifyreg.quantities import QUANTITIES  # noqa: E402

__all__ = [
    "ablation_figures",
    "MAX_EPOCH_CURVES",
    "close_figures",
    "drawn_epochs",
    "probe_caption",
    "probe_history_figures",
    "probe_result_figures",
    "probe_stats_csv",
    "probe_table",
    "save_figure",
    "save_figures",
    "write_probe_result",
]


# ---------------------------------------------------------------------- tables


def _column(result: ProbeResult, layer: int | None) -> int:
    if layer is None:
        return 0
    if layer not in result.layers:
        raise ValueError(f"layer {layer} was not probed; probed: {list(result.layers)}")
    return result.layers.index(layer)


def _units(base: Any) -> str:
    if base is None:
        return "unknown units"
    if float(base) == 2.0:
        return "bits"
    return "nats" if abs(float(base) - math.e) < 1e-12 else f"log base {float(base):g}"


def probe_caption(result: ProbeResult, layer: int | None = None) -> str:
    """One line that says what a probe table holds and which regime produced it: layer,
    units, alpha, the bandwidth rule and the regime (``default``, ``paper``, ``custom``)."""
    info = result.regime()
    column = _column(result, layer)
    alpha = "?" if info["alpha"] is None else f"{info['alpha']:g}"
    return (
        f"Mean prompt entropy at layer {result.layers[column]} ({_units(info['base'])}, "
        f"alpha {alpha}); regime: {info['regime']}, bandwidth: {info['bandwidth']}"
    )


def probe_table(result: ProbeResult, layer: int | None = None, fmt: str = "markdown") -> str:
    """Table-1-style table: mean entropy per prompt category at one layer (default: the
    first probed, i.e. the embedding entropy when layer 0 is probed), text categories
    then image categories; ``fmt`` is ``"markdown"`` or ``"csv"``. Each says which regime
    produced it: markdown with a caption line above the table (:func:`probe_caption`),
    CSV with the columns ``regime`` and ``bandwidth`` after ``layer``."""
    if fmt not in ("markdown", "csv"):
        raise ValueError(f"fmt must be 'markdown' or 'csv', got {fmt!r}")
    column = _column(result, layer)
    info = result.regime()
    if fmt == "csv":
        header = ["layer", "regime", "bandwidth"]
        cells = [str(result.layers[column]), info["regime"], str(info["bandwidth"])]
    else:
        header, cells = ["layer"], [str(result.layers[column])]
    for q in ("encoding/text", "encoding/image"):
        for category, st in result.stats(q).items():
            if category == "all":
                continue
            header.append(f"{q.split('/')[1]}:{category}")
            cells.append(f"{st['mean'][column]:.3f}")
    if fmt == "csv":
        return ",".join(header) + "\n" + ",".join(cells) + "\n"
    return (
        probe_caption(result, layer)
        + "\n\n| "
        + " | ".join(header)
        + " |\n|"
        + "---|" * len(header)
        + "\n| "
        + " | ".join(cells)
        + " |\n"
    )


def probe_stats_csv(result: ProbeResult) -> str:
    """Every statistic in long form, one CSV row per (quantity, category, layer); ``layer``
    is the quantity's own (``ProbeResult.axis``) and the last column, ``stack``, names the
    stack it was computed on."""
    lines = ["quantity,category,layer,mean,std,count,normalized_mean,normalized_std,stack"]
    for q in QUANTITIES:
        raw, norm = result.stats(q), result.stats(q, normalized=True)
        axis = result.axis(q)
        for category in raw:
            for i, layer in enumerate(axis.layers):
                r, n = raw[category], norm[category]
                lines.append(
                    f"{q},{category},{layer},{r['mean'][i]:.6f},{r['std'][i]:.6f},"
                    f"{r['count']},{n['mean'][i]:.6f},{n['std'][i]:.6f},{axis.stack}"
                )
    return "\n".join(lines) + "\n"


def write_probe_result(
    result: ProbeResult, directory: str | Path, figures: bool = True
) -> dict[str, Path]:
    """Write ``result.json`` (per-sample values), ``summary.json``, ``table.md``,
    ``table.csv``, ``stats.csv`` and, with ``figures``, ``encoding_trajectories.png`` and
    ``response_trajectories.png`` to ``directory``; returns ``name -> path``."""
    directory = Path(directory)
    paths = {
        "result": result.save(directory / "result.json"),
        "summary": atomic_write_json(directory / "summary.json", result.summary()),
        "table_md": atomic_write_text(directory / "table.md", probe_table(result)),
        "table_csv": atomic_write_text(directory / "table.csv", probe_table(result, fmt="csv")),
        "stats_csv": atomic_write_text(directory / "stats.csv", probe_stats_csv(result)),
    }
    if figures:
        built = probe_result_figures(result)
        names = {
            "encoding_figure": "encoding_trajectories",
            "response_figure": "response_trajectories",
        }
        for key, name in names.items():
            paths[key] = save_figure(built[name], directory / f"{name}.png")
    return paths


# ---------------------------------------------------------------------- figures


def save_figure(fig: Figure, path: str | Path, dpi: int = 120, close: bool = True) -> Path:
    """Save a figure atomically as PNG (closed afterwards unless ``close=False``)."""
    try:
        with atomic_file(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        if close:
            plt.close(fig)
    return Path(path)


def save_figures(
    figures: Mapping[str, Figure], directory: str | Path, close: bool = True
) -> dict[str, Path]:
    """:func:`save_figure` of each ``name -> figure`` as ``directory/<name>.png``."""
    return {
        name: save_figure(fig, Path(directory) / f"{name}.png", close=close)
        for name, fig in figures.items()
    }


def close_figures(figures: Mapping[str, Figure]) -> None:
    """Release the figures' memory (pyplot keeps every open figure alive)."""
    for fig in figures.values():
        plt.close(fig)


def _layer_axis(ax, by_fraction: bool = False) -> None:
    if by_fraction:
        ax.set_xlabel("depth fraction (layer / L of its stack)")
    else:
        ax.set_xlabel("layer (0 = embeddings)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _axes_differ(axes: Mapping[str, Any], quantities) -> bool:
    """Whether the quantities lie on different stacks or layers (then plotted against
    depth fraction); ``axes``: quantity -> ``{"stack", "layers", "depth"}``."""
    seen = {(axes[q]["stack"], tuple(axes[q]["layers"])) for q in quantities if q in axes}
    return len(seen) > 1


def _x_values(axis: Mapping[str, Any], by_fraction: bool) -> list[float]:
    if by_fraction and axis.get("depth"):
        return [layer / axis["depth"] for layer in axis["layers"]]
    return list(axis["layers"])


def probe_result_figures(result: ProbeResult) -> dict[str, Figure]:
    """``encoding_trajectories``: prompt-entropy trajectories per modality and category;
    ``response_trajectories``: text vs image conditional-entropy trajectories; both
    length-normalised, mean (+- std for responses) over samples, each against its own
    layers, or against depth fraction when the two modalities of a figure lie on stacks of
    different depth (a two-stage model's responses)."""
    axes_of = {q: result.axis(q).to_dict() for q in QUANTITIES}
    figures: dict[str, Figure] = {}

    pair = ("encoding/text", "encoding/image")
    by_fraction = _axes_differ(axes_of, pair)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, quantity in zip(axes, pair, strict=True):
        stats = result.stats(quantity, normalized=True)
        xs = _x_values(axes_of[quantity], by_fraction)
        for category, st in stats.items():
            style = {"color": "black", "linewidth": 2.5} if category == "all" else {}
            ax.plot(
                xs,
                st["mean"],
                marker="o",
                markersize=3,
                label=f"{category} (n={st['count']})",
                **style,
            )
        ax.set_title(f"{quantity.split('/')[1]} prompts")
        _layer_axis(ax, by_fraction)
        if stats:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("normalised matrix entropy  H / log2 n")
    fig.suptitle("Prompt encoding: entropy trajectories")
    figures["encoding_trajectories"] = fig

    by_fraction = _axes_differ(axes_of, ("response/text", "response/image"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for quantity, colour in (("response/text", "tab:blue"), ("response/image", "tab:orange")):
        stats = result.stats(quantity, normalized=True).get("all")
        if stats is None:
            continue
        layers = _x_values(axes_of[quantity], by_fraction)
        mean = stats["mean"]
        low = [m - s for m, s in zip(mean, stats["std"], strict=True)]
        high = [m + s for m, s in zip(mean, stats["std"], strict=True)]
        label = f"{quantity.split('/')[1]} response (n={stats['count']})"
        ax.plot(layers, mean, marker="o", markersize=3, color=colour, label=label)
        ax.fill_between(layers, low, high, color=colour, alpha=0.15)
    _layer_axis(ax, by_fraction)
    ax.set_ylabel("normalised proxy  H(R|P) / log2(n+m)")
    ax.set_title("Response: conditional-entropy trajectories")
    ax.legend(fontsize=8)
    figures["response_trajectories"] = fig
    return figures


#: At most this many epochs are drawn in a by-epoch figure (evenly spaced, the first and
#: the last always among them), so drawing it costs the same after 5 or 500 epochs.
MAX_EPOCH_CURVES = 10


def drawn_epochs(history: list[dict[str, Any]], limit: int = MAX_EPOCH_CURVES) -> list[int]:
    """Indices of the history entries a by-epoch figure draws: all when there are at most
    ``limit``, else ``limit`` evenly spaced ones, the first and the last included."""
    n = len(history)
    if n <= limit:
        return list(range(n))
    return sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})


def probe_history_figures(history: list[dict[str, Any]]) -> dict[str, Figure]:
    """Trajectories across epochs, one curve per probe (epoch label in the legend; at most
    :data:`MAX_EPOCH_CURVES` probes, evenly spaced, first and last included), one figure
    per quantity with samples: ``<quantity with _ for />_by_epoch`` (normalised means,
    against the quantity's own layers)."""
    figures: dict[str, Figure] = {}
    history = [history[i] for i in drawn_epochs(history)]
    for quantity in QUANTITIES:
        curves = []
        for entry in history:
            summary = entry["summary"]
            stats = summary["stats"].get(quantity)
            axis = summary.get("axes", {}).get(quantity)
            layers = axis["layers"] if axis else summary["layers"]
            if stats and "all" in stats["normalized"]:
                curves.append((entry["epoch"], layers, stats["normalized"]["all"]["mean"]))
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        colours = plt.cm.viridis([i / max(1, len(curves) - 1) for i in range(len(curves))])
        for colour, (epoch, layers, mean) in zip(colours, curves, strict=True):
            ax.plot(layers, mean, marker="o", markersize=3, color=colour, label=f"epoch {epoch}")
        _layer_axis(ax)
        ax.set_ylabel("normalised value")
        ax.set_title(f"{quantity} across epochs")
        ax.legend(fontsize=7)
        figures[quantity.replace("/", "_") + "_by_epoch"] = fig
    return figures


def ablation_figures(by_arm: dict[str, Any]) -> dict[str, Figure]:
    """``trajectories``: the final normalised trajectories of the probe quantities, one
    curve per arm (mean over runs), each against the quantity's own layers
    (``quantity_layers``, else ``layers``); ``scores``: scalar scores and accuracies per
    arm, mean with error bars (``std`` of the arm's entry)."""
    figures: dict[str, Figure] = {}
    fig, axes = plt.subplots(1, len(QUANTITIES), figsize=(4 * len(QUANTITIES), 3.8))
    for ax, quantity in zip(axes, QUANTITIES, strict=True):
        for arm, entry in by_arm.items():
            curve = entry["trajectories"].get(quantity)
            layers = entry.get("quantity_layers", {}).get(quantity, entry["layers"])
            if curve is not None:
                ax.plot(layers, curve, marker="o", markersize=3, label=arm)
        ax.set_title(quantity)
        _layer_axis(ax)
    axes[0].set_ylabel("normalised value")
    axes[-1].legend(fontsize=7)
    fig.suptitle("Final probe per arm (mean over runs)")
    figures["trajectories"] = fig

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
    figures["scores"] = fig
    return figures
