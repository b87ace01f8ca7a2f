"""Recipe ``ablate``: does the regularizer reduce the divergences, and does transfer move?

For every arm (baseline, ``ctx``, ``div``, ``ctx+div``, and any sweep of a weight) and
every seed, fine-tune from the same toy base with the same data and steps (the
``finetune`` section), with the entropy probe every epoch (``EntropyProbe``); at the end
record the probe's scalar scores and normalised trajectories, and on the toy the exact
accuracies (direct text-to-image, understanding, text facts, t2i reasoning, held-out
reasoning transfer). Then aggregate:

- per arm: mean and sample std over seeds of every score and accuracy;
- per arm vs baseline: the paired difference per seed (arm - baseline, same seed), its
  mean and std; a change counts as clear when ``|mean| > 2 * std / sqrt(seeds)`` with at
  least two seeds (one seed gives no spread, so no verdict);

and write ``results.json``, ``report.md`` (tables + plain statements, whatever they
say) and figures (``trajectories.png``, ``scores.png``) to ``output_dir``.

Runs live in ``output_dir/runs/<arm>/seed_<s>/``. A finished run writes ``done.json``
(atomically) and is skipped when the ablation is re-run; an interrupted run resumes from
its ``last.ckpt``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from unifyreg.config import AblateConfig, ArmConfig, FinetuneConfig, to_yaml
from unifyreg.fileio import atomic_write_json, atomic_write_text
from unifyreg.probing import SCORE_NAMES
from unifyreg.quantities import QUANTITIES
from unifyreg.recipes.finetune import build_trainer_parts, close_loggers, resolve_resume
from unifyreg.sources import example_source, resolve_source
from unifyreg.trainer import fit

__all__ = ["aggregate", "render_report", "run", "run_arm"]

ACCURACY_NAMES = ("t2i_direct", "understanding", "text_facts", "t2i_reasoning", "transfer")
DONE_FILE = "done.json"


def arm_config(cfg: AblateConfig, arm: ArmConfig, seed: int) -> FinetuneConfig:
    """The fine-tune config of one (arm, seed): the shared ``finetune`` section with the
    arm's weights, the seed, its own run directory and ``resume=last``."""
    ft = copy.deepcopy(cfg.finetune)
    ft.seed = seed
    ft.loss.w_ctx, ft.loss.w_div = arm.w_ctx, arm.w_div
    ft.run_dir = str(Path(cfg.output_dir) / "runs" / arm.name / f"seed_{seed}")
    ft.resume = "last"
    return ft


def run_arm(cfg: AblateConfig, arm: ArmConfig, seed: int) -> dict[str, Any]:
    """Fine-tune one (arm, seed), probe and score it; returns (and writes) its record."""
    ft = arm_config(cfg, arm, seed)
    start = time.perf_counter()
    ckpt = resolve_resume(ft)
    parts = build_trainer_parts(ft)
    probe = parts.probe
    atomic_write_text(Path(ft.run_dir) / "config.yaml", to_yaml(ft))
    try:
        fit(parts.trainer, parts.module, parts.loader, ckpt)  # weights_only=True
    finally:
        close_loggers(parts.trainer)
    final = probe.history[-1]
    record: dict[str, Any] = {
        "arm": arm.name,
        "seed": seed,
        "w_ctx": arm.w_ctx,
        "w_div": arm.w_div,
        "scores": {
            k.split("/", 1)[1]: v for k, v in final["metrics"].items() if k.startswith("unify/")
        },
        "trajectories": {
            q: final["summary"]["stats"][q]["normalized"]["all"]["mean"]
            for q in QUANTITIES
            if q in final["summary"]["stats"]
        },
        "layers": final["summary"]["layers"],
        "history": [
            {
                "epoch": e["epoch"],
                **{k: v for k, v in e["metrics"].items() if k.startswith("unify/")},
            }
            for e in probe.history
        ],
        "accuracies": {},
    }
    # Exact accuracies where the training data's source can score (the toy world).
    source = example_source(resolve_source(ft.data, ft.model.adapter, "data"))
    if source is not None and hasattr(source, "evaluate"):
        record["accuracies"] = source.evaluate(parts.adapter, cfg.eval_splits, ft.pretrain)
    record["seconds"] = time.perf_counter() - start
    atomic_write_json(Path(ft.run_dir) / DONE_FILE, record)
    return record


def _mean_std(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "n": int(len(array))}


def aggregate(records: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """Per-arm mean/std and paired differences to ``baseline`` (see the module docstring)."""
    metrics = [*(f"score/{n}" for n in SCORE_NAMES), *(f"accuracy/{n}" for n in ACCURACY_NAMES)]

    metrics.insert(2, "score/response_split_distance")

    def value(record, metric):
        group, name = metric.split("/")
        if name == "response_split_distance":  # |split|: how far from the unified state
            split = record["scores"].get("response_split")
            return None if split is None else abs(split)
        return (record["scores"] if group == "score" else record["accuracies"]).get(name)

    by_arm: dict[str, Any] = {}
    baseline = {r["seed"]: r for r in records if r["arm"] == "baseline"}
    for arm in arms:
        runs = [r for r in records if r["arm"] == arm]
        entry: dict[str, Any] = {
            "seeds": sorted(r["seed"] for r in runs),
            "metrics": {},
            "vs_baseline": {},
        }
        for metric in metrics:
            values = [value(r, m) for r in runs for m in [metric] if value(r, m) is not None]
            if values:
                entry["metrics"][metric] = _mean_std(values)
            if arm != "baseline" and baseline:
                diffs = [
                    value(r, metric) - value(baseline[r["seed"]], metric)
                    for r in runs
                    if r["seed"] in baseline
                    and value(r, metric) is not None
                    and value(baseline[r["seed"]], metric) is not None
                ]
                if diffs:
                    stats = _mean_std(diffs)
                    stats["clear"] = bool(
                        stats["n"] >= 2
                        and abs(stats["mean"]) > 2 * stats["std"] / math.sqrt(stats["n"])
                    )
                    entry["vs_baseline"][metric] = stats
        trajectories = {}
        for q in QUANTITIES:
            curves = [r["trajectories"][q] for r in runs if q in r["trajectories"]]
            if curves:
                trajectories[q] = np.mean(np.asarray(curves), axis=0).tolist()
        entry["trajectories"] = trajectories
        entry["layers"] = runs[0]["layers"] if runs else []
        by_arm[arm] = entry
    return by_arm


def _verdict(diff: dict[str, float] | None, lower_is_better: bool, what: str) -> str:
    if diff is None:
        return f"{what}: not measured"
    if diff["n"] < 2:
        return f"{what}: {diff['mean']:+.4f} vs baseline (one seed: no spread, no verdict)"
    direction = "lower" if diff["mean"] < 0 else "higher"
    spread = f"{diff['mean']:+.4f} ± {diff['std']:.4f} over {diff['n']} seeds"
    if not diff["clear"]:
        return f"{what}: no clear change ({spread})"
    good = (diff["mean"] < 0) == lower_is_better
    return f"{what}: clearly {direction} ({spread})" + ("" if good else " — the wrong way")


def render_report(by_arm: dict[str, Any], cfg: AblateConfig) -> str:
    """Markdown: setup, a mean ± std table, a difference table, and plain statements."""
    ft = cfg.finetune
    lines = [
        "# unifyreg ablation report",
        "",
        f"Arms: {', '.join(by_arm)}; seeds: {cfg.seeds}; model: {ft.model.adapter}; "
        f"{ft.max_epochs} epoch(s), batch {ft.batch_size}, "
        f"LoRA {'on' if ft.lora.enabled else 'off'}; "
        f"mask ratio {ft.loss.mask_ratio}, L_div alpha {ft.loss.div_alpha}.",
        "Scores are unifyreg's own definitions (not the paper's): lower `encoding_gap` and "
        "`final_gap`, and `response_split` nearer 0, mean less divergence. Accuracies are "
        "exact-match on the toy (`transfer` = held-out reasoning transfer).",
        "",
    ]
    metrics = [m for m in next(iter(by_arm.values()))["metrics"]]
    header = "| arm | " + " | ".join(m.split("/")[1] for m in metrics) + " |"
    lines += ["## Mean ± std over seeds", "", header, "|---" * (len(metrics) + 1) + "|"]
    for arm, entry in by_arm.items():
        cells = [
            f"{entry['metrics'][m]['mean']:.4f} ± {entry['metrics'][m]['std']:.4f}"
            if m in entry["metrics"]
            else "—"
            for m in metrics
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Difference to baseline (paired by seed, mean ± std)",
        "",
        header,
        "|---" * (len(metrics) + 1) + "|",
    ]
    for arm, entry in by_arm.items():
        if arm == "baseline":
            continue
        cells = []
        for m in metrics:
            d = entry["vs_baseline"].get(m)
            cells.append(
                "—"
                if d is None
                else f"{d['mean']:+.4f} ± {d['std']:.4f}{' *' if d['clear'] else ''}"
            )
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "`*`: clear change, |mean| > 2 std / sqrt(seeds).", "", "## What it says", ""]
    if "baseline" not in by_arm:
        lines.append("No baseline arm: no comparison possible.")
    for arm, entry in by_arm.items():
        if arm == "baseline":
            continue
        vs = entry["vs_baseline"]
        lines.append(f"- **{arm}**:")
        lines.append("  - " + _verdict(vs.get("score/encoding_gap"), True, "encoding gap"))
        # |arm| - |baseline| paired by seed: towards 0 is better whichever the sign.
        split = vs.get("score/response_split_distance")
        lines.append("  - " + _verdict(split, True, "|response split| (distance from 0)"))
        lines.append("  - " + _verdict(vs.get("score/final_gap"), True, "final-layer gap"))
        lines.append(
            "  - " + _verdict(vs.get("accuracy/transfer"), False, "held-out transfer accuracy")
        )
        lines.append(
            "  - " + _verdict(vs.get("accuracy/t2i_direct"), False, "direct text-to-image accuracy")
        )
    lines += [
        "",
        "Figures: `trajectories.png` (final normalised trajectories per arm, mean over "
        "seeds), `scores.png` (scores and accuracies per arm, ± std).",
        "",
    ]
    return "\n".join(lines)


def _print_table(by_arm: dict[str, Any]) -> None:
    names = [
        "score/encoding_gap",
        "score/response_split",
        "score/final_gap",
        "accuracy/t2i_direct",
        "accuracy/transfer",
    ]
    print("\n| arm | " + " | ".join(n.split("/")[1] for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for arm, entry in by_arm.items():
        cells = [
            f"{entry['metrics'][n]['mean']:.3f} ± {entry['metrics'][n]['std']:.3f}"
            if n in entry["metrics"]
            else "—"
            for n in names
        ]
        print(f"| {arm} | " + " | ".join(cells) + " |")


def run(cfg: AblateConfig, dry_run: bool = False) -> int:
    """Command ``unifyreg ablate`` (``dry_run``: check the first run's fine-tune only)."""
    out = Path(cfg.output_dir)
    arms = cfg.all_arms()
    if dry_run:
        from unifyreg.recipes.finetune import run as finetune

        print(f"dry run: {len(arms)} arm(s) x {len(cfg.seeds)} seed(s) -> {out}")
        return finetune(arm_config(cfg, arms[0], cfg.seeds[0]), dry_run=True)
    plan = [(arm, seed) for arm in arms for seed in cfg.seeds]
    atomic_write_text(out / "config.yaml", to_yaml(cfg))
    records = []
    start = time.perf_counter()
    for index, (arm, seed) in enumerate(plan, start=1):
        done = out / "runs" / arm.name / f"seed_{seed}" / DONE_FILE
        weights = f"w_ctx={arm.w_ctx:g}, w_div={arm.w_div:g}"
        tag = f"[{index}/{len(plan)}] arm {arm.name} ({weights}) seed {seed}"
        if done.is_file():
            print(f"{tag}: finished earlier, skipping", flush=True)
            records.append(json.loads(done.read_text()))
            continue
        print(f"{tag}: fine-tuning ...", flush=True)
        record = run_arm(cfg, arm, seed)
        records.append(record)
        summary = ", ".join(
            f"{k} {v:.3f}" for k, v in {**record["scores"], **record["accuracies"]}.items()
        )
        print(f"{tag}: done in {record['seconds']:.0f} s: {summary}", flush=True)
    by_arm = aggregate(records, [a.name for a in arms])
    atomic_write_json(
        out / "results.json",
        {"runs": records, "arms": by_arm, "seconds": time.perf_counter() - start},
    )
    report = render_report(by_arm, cfg)
    atomic_write_text(out / "report.md", report)
    if cfg.figures:
        from unifyreg.report import ablation_figures, save_figures

        save_figures(ablation_figures(by_arm), out)
    _print_table(by_arm)
    print("\n" + report.split("## What it says", 1)[1].strip())
    print(f"\nreport: {out / 'report.md'} (results.json, trajectories.png, scores.png beside it)")
    return 0
