"""The paper's claim, controlled: ``ar`` against ``contextual`` toy bases.

Builds (or reuses) toy bases with the default config for each pre-training variant
(:data:`VARIANTS`: the two objectives, and the ``ar`` objective with the regularizer on
during pre-training) and each pre-training seed, probes each on the toy probe set
(unifyreg's default, scale-invariant median regime), reads each base's exact accuracies
(its ``eval.json``), and reports per variant the mean and 95% interval over seeds of
every score and accuracy and of the last layer's normalised quantities (does a
contextual base show the final-layer convergence of text and image conditional
entropies the paper reports for Harmon?), and each variant minus ``ar``, paired by
seed. It also probes each ``ar`` base with and without the long text responses (caption
and text-reasoning categories), to show what comparable lengths change in the response
split. Writes ``OUT/results.json``, ``OUT/tables.md`` and ``OUT/trajectories.png``.

Usage: ``python scripts/replicate_toy.py [--seeds 0 1 2] [--variants ar contextual ...]
[--out docs/replication_toy] [--cache-dir .cache/unifyreg]`` (a base takes 5 to 15
minutes on 2 CPU cores, more with the regularizer on; built bases are cached and
reused).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from unifyreg.adapters.toy import ToyAdapter
from unifyreg.config import LossConfig, PretrainToyConfig, ProbeConfig
from unifyreg.probing import run_probe
from unifyreg.quantities import QUANTITIES
from unifyreg.recipes.ablate import interval
from unifyreg.sources import load_examples
from unifyreg.toy.base import EVAL_FILE, build_toy_base

#: Pre-training variants: name -> (objective, the regularizer during pre-training).
VARIANTS = {
    "ar": ("ar", LossConfig()),
    "contextual": ("contextual", LossConfig()),
    "ar+div": ("ar", LossConfig(w_div=1.0)),
    "ar+ctx": ("ar", LossConfig(w_ctx=1.0, ctx_mode="bidirectional")),
}
COLOURS = {"ar": "tab:blue", "contextual": "tab:orange", "ar+div": "tab:green",
           "ar+ctx": "tab:red"}  # fmt: skip
HEADLINES = (
    "transfer",
    "t2i_direct",
    "t2i_reasoning",
    "understanding",
    "caption",
    "text_facts",
    "text_reasoning",
)
#: Probe categories with long text responses (comparable to an image's token count).
LONG_TEXT = ("caption", "text_deductive", "text_abductive")


def probe(adapter, examples) -> dict:
    result = run_probe(adapter, examples, ProbeConfig(batch_size=64))
    last = {q: float(result.pooled_mean(q)[-1]) for q in QUANTITIES if len(result.records[q])}
    return {
        "scores": result.scores(),
        "last_layer": last,
        "trajectories": {
            q: result.pooled_mean(q).tolist() for q in QUANTITIES if len(result.records[q])
        },
        "layers": list(result.layers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="docs/replication_toy")
    parser.add_argument("--cache-dir", default=".cache/unifyreg")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    examples, _ = load_examples("toy", "probe_set")
    short = [e for e in examples if e.category not in LONG_TEXT]
    runs = []
    start = time.perf_counter()
    variants = ["ar", *[v for v in args.variants if v != "ar"]]
    for variant in variants:
        objective, loss = VARIANTS[variant]
        for seed in args.seeds:
            cfg = PretrainToyConfig(
                objective=objective, loss=loss, seed=seed, cache_dir=args.cache_dir
            )
            path = build_toy_base(cfg)
            evaluation = json.loads((Path(path) / EVAL_FILE).read_text())
            adapter = ToyAdapter.load(path)
            run = {
                "variant": variant,
                "objective": objective,
                "seed": seed,
                "path": str(path),
                "train_seconds": evaluation.get("train_seconds"),
                "accuracies": evaluation["headline"],
                "probe": probe(adapter, examples),
            }
            if variant == "ar":
                run["probe_without_long_text"] = probe(adapter, short)
            runs.append(run)
            print(f"{variant} seed {seed}: {run['accuracies']} {run['probe']['scores']}")

    def summary(variant, pick):
        values = [pick(r) for r in runs if r["variant"] == variant]
        values = [v for v in values if v is not None]
        return interval(values) if values else None

    rows = {}
    for variant in variants:
        row = {}
        for name in HEADLINES:
            row[f"accuracy/{name}"] = summary(variant, lambda r, n=name: r["accuracies"].get(n))
        for name in ("encoding_gap", "response_split", "final_gap"):
            row[f"score/{name}"] = summary(variant, lambda r, n=name: r["probe"]["scores"].get(n))
        for q in QUANTITIES:
            row[f"last/{q}"] = summary(variant, lambda r, q=q: r["probe"]["last_layer"].get(q))
        row["last/response text - image"] = summary(variant, last_response_gap)
        rows[variant] = row
    diffs = {}
    for variant in variants[1:]:
        paired = [
            (a, c)
            for a in runs
            for c in runs
            if a["variant"] == "ar" and c["variant"] == variant and a["seed"] == c["seed"]
        ]
        diffs[variant] = {}
        for key in rows["ar"]:
            values = [
                measure(c, key) - measure(a, key)
                for a, c in paired
                if measure(a, key) is not None and measure(c, key) is not None
            ]
            if values:
                diffs[variant][key] = interval(values)
    lengths = [
        {
            "seed": r["seed"],
            "with": r["probe"]["scores"].get("response_split"),
            "without": r["probe_without_long_text"]["scores"].get("response_split"),
            "last_text_with": r["probe"]["last_layer"].get("response/text"),
            "last_text_without": r["probe_without_long_text"]["last_layer"].get("response/text"),
        }
        for r in runs
        if r["variant"] == "ar"
    ]

    def fmt(stats):
        if stats is None:
            return "—"
        return f"{stats['mean']:.3f} [{stats['low']:.3f}, {stats['high']:.3f}]"

    command = (
        f"`python scripts/replicate_toy.py --seeds {' '.join(map(str, args.seeds))} "
        f"--variants {' '.join(variants)}`"
    )
    lines = [
        f"Seeds {args.seeds}; mean [95% interval] over seeds; command: {command}.",
        "",
        "| measure | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for key in rows["ar"]:
        lines.append(f"| {key} | " + " | ".join(fmt(rows[v][key]) for v in variants) + " |")
    for variant in variants[1:]:
        lines += [
            "",
            f"{variant} - ar, paired by seed (mean [95% interval]; **clear** when the "
            "interval excludes 0):",
            "",
            "| measure | difference | verdict |",
            "|---|---|---|",
        ]
        for key, stats in diffs[variant].items():
            clear = stats["n"] > 1 and (stats["low"] > 0 or stats["high"] < 0)
            lines.append(
                f"| {key} | {fmt(stats)} | {'**clear**' if clear else 'no clear change'} |"
            )
    lines += [
        "",
        "Response split of the ar bases with and without the long text responses "
        "(caption, text reasoning):",
        "",
        "| seed | with | without | last-layer text proxy with | without |",
        "|---|---|---|---|---|",
    ]
    for row in lengths:
        lines.append(
            f"| {row['seed']} | {row['with']:+.4f} | {row['without']:+.4f} "
            f"| {row['last_text_with']:.4f} | {row['last_text_without']:.4f} |"
        )
    (out / "tables.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {"runs": runs, "by_variant": rows, "minus_ar": diffs,
             "lengths": lengths, "seconds": time.perf_counter() - start},
            indent=2,
        )
        + "\n"
    )  # fmt: skip
    plot(runs, out / "trajectories.png")
    print("\n".join(lines))


def measure(run: dict, key: str) -> float | None:
    """One row of the tables for one base: ``accuracy/<task>``, ``score/<name>``,
    ``last/<quantity>`` or ``last/response text - image``."""
    group, name = key.split("/", 1)
    if group == "accuracy":
        return run["accuracies"].get(name)
    if group == "score":
        return run["probe"]["scores"].get(name)
    if name == "response text - image":
        return last_response_gap(run)
    return run["probe"]["last_layer"].get(name)


def last_response_gap(run: dict) -> float | None:
    """Last layer's normalised response proxy, text minus image: the paper's Harmon shows
    the two conditional entropies converging there (a gap near 0)."""
    last = run["probe"]["last_layer"]
    if "response/text" not in last or "response/image" not in last:
        return None
    return last["response/text"] - last["response/image"]


def plot(runs, path: Path) -> None:
    """Normalised trajectories per variant (mean over seeds) of the four quantities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, q in zip(axes, QUANTITIES, strict=True):
        for variant, colour in COLOURS.items():
            curves = [r["probe"]["trajectories"][q] for r in runs if r["variant"] == variant]
            if not curves:
                continue
            curves = np.asarray(curves)
            layers = runs[0]["probe"]["layers"]
            ax.plot(layers, curves.mean(0), marker="o", color=colour, label=variant)
            ax.fill_between(layers, curves.min(0), curves.max(0), color=colour, alpha=0.15)
        ax.set_title(q)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("normalised value (mean; band: range over seeds)")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
