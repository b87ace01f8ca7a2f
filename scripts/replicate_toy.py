"""The paper's claim, controlled: ``ar`` against ``contextual`` toy bases.

Builds (or reuses) toy bases with the default config for each objective and each
pre-training seed, probes each on the toy probe set (unifyreg's default, scale-invariant
median regime), reads each base's exact accuracies (its ``eval.json``), and reports per
objective the mean and 95% interval over seeds of every score and accuracy, and of the
last layer's normalised conditional entropies (does a contextual base show the
final-layer convergence of text and image conditional entropies the paper reports for
Harmon?). It also probes each ``ar`` base with and without the long text responses
(caption and text-reasoning categories), to show what comparable lengths change in the
response split. Writes ``OUT/results.json``, ``OUT/tables.md`` and
``OUT/trajectories.png``.

Usage: ``python scripts/replicate_toy.py [--seeds 0 1 2] [--out docs/replication_toy]
[--cache-dir .cache/unifyreg]`` (building a base takes about 5 minutes on 2 CPU cores;
built bases are cached and reused).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from unifyreg.adapters.toy import ToyAdapter
from unifyreg.config import PretrainToyConfig, ProbeConfig
from unifyreg.probing import run_probe
from unifyreg.quantities import QUANTITIES
from unifyreg.recipes.ablate import interval
from unifyreg.sources import load_examples
from unifyreg.toy.base import EVAL_FILE, build_toy_base

OBJECTIVES = ("ar", "contextual")
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
    parser.add_argument("--out", default="docs/replication_toy")
    parser.add_argument("--cache-dir", default=".cache/unifyreg")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    examples, _ = load_examples("toy", "probe_set")
    short = [e for e in examples if e.category not in LONG_TEXT]
    runs = []
    start = time.perf_counter()
    for objective in OBJECTIVES:
        for seed in args.seeds:
            cfg = PretrainToyConfig(objective=objective, seed=seed, cache_dir=args.cache_dir)
            path = build_toy_base(cfg)
            evaluation = json.loads((Path(path) / EVAL_FILE).read_text())
            adapter = ToyAdapter.load(path)
            run = {
                "objective": objective,
                "seed": seed,
                "path": str(path),
                "train_seconds": evaluation.get("train_seconds"),
                "accuracies": evaluation["headline"],
                "probe": probe(adapter, examples),
            }
            if objective == "ar":
                run["probe_without_long_text"] = probe(adapter, short)
            runs.append(run)
            print(f"{objective} seed {seed}: {run['accuracies']} {run['probe']['scores']}")

    def summary(objective, pick):
        values = [pick(r) for r in runs if r["objective"] == objective]
        values = [v for v in values if v is not None]
        return interval(values) if values else None

    rows = {}
    for objective in OBJECTIVES:
        row = {}
        for name in HEADLINES:
            row[f"accuracy/{name}"] = summary(objective, lambda r, n=name: r["accuracies"].get(n))
        for name in ("encoding_gap", "response_split", "final_gap"):
            row[f"score/{name}"] = summary(objective, lambda r, n=name: r["probe"]["scores"].get(n))
        for q in ("response/text", "response/image"):
            row[f"last/{q}"] = summary(objective, lambda r, q=q: r["probe"]["last_layer"].get(q))
        rows[objective] = row
    diffs = {}
    paired = [
        (a, c)
        for a in runs
        for c in runs
        if a["objective"] == "ar" and c["objective"] == "contextual" and a["seed"] == c["seed"]
    ]
    for key in rows["ar"]:
        group, name = key.split("/", 1)

        def get(r, group=group, name=name):
            if group == "accuracy":
                return r["accuracies"].get(name)
            if group == "score":
                return r["probe"]["scores"].get(name)
            return r["probe"]["last_layer"].get(name)

        values = [get(c) - get(a) for a, c in paired if get(a) is not None and get(c) is not None]
        if values:
            diffs[key] = interval(values)
    lengths = [
        {
            "seed": r["seed"],
            "with": r["probe"]["scores"].get("response_split"),
            "without": r["probe_without_long_text"]["scores"].get("response_split"),
            "last_text_with": r["probe"]["last_layer"].get("response/text"),
            "last_text_without": r["probe_without_long_text"]["last_layer"].get("response/text"),
        }
        for r in runs
        if r["objective"] == "ar"
    ]

    def fmt(stats):
        if stats is None:
            return "—"
        return f"{stats['mean']:.3f} [{stats['low']:.3f}, {stats['high']:.3f}]"

    lines = [
        f"Seeds {args.seeds}; mean [95% interval] over seeds; command: "
        f"`python scripts/replicate_toy.py --seeds {' '.join(map(str, args.seeds))}`.",
        "",
        "| measure | ar | contextual | contextual - ar (paired by seed) |",
        "|---|---|---|---|",
    ]
    for key in rows["ar"]:
        lines.append(
            f"| {key} | {fmt(rows['ar'][key])} | {fmt(rows['contextual'][key])} "
            f"| {fmt(diffs.get(key))} |"
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
            {"runs": runs, "by_objective": rows, "contextual_minus_ar": diffs,
             "lengths": lengths, "seconds": time.perf_counter() - start},
            indent=2,
        )
        + "\n"
    )  # fmt: skip
    plot(runs, out / "trajectories.png")
    print("\n".join(lines))


def plot(runs, path: Path) -> None:
    """Normalised trajectories per objective (mean over seeds) of the four quantities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, q in zip(axes, QUANTITIES, strict=True):
        for objective, colour in (("ar", "tab:blue"), ("contextual", "tab:orange")):
            curves = [r["probe"]["trajectories"][q] for r in runs if r["objective"] == objective]
            if not curves:
                continue
            curves = np.asarray(curves)
            layers = runs[0]["probe"]["layers"]
            ax.plot(layers, curves.mean(0), marker="o", color=colour, label=objective)
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
