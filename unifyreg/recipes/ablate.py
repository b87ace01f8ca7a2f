"""Recipe ``ablate``: does the regularizer reduce the divergences, and does transfer move?

For every arm (baseline, ``ctx``, ``div``, ``ctx+div``, sweeps of a weight, and comparison
arms such as a RecA-style or a reason-then-draw training-data variant), every base (toy
bases with an image objective and a pre-training seed; one base by default) and every
seed, fine-tune with the same data and steps (the ``finetune`` section), with the entropy
probe every epoch (``EntropyProbe``); at the end record the probe's scalar scores and
normalised trajectories, and where the data source can score exactly (the toy) the
headline accuracies. Then aggregate:

- per arm: mean, sample std and the 95% interval of the mean over its runs;
- per arm vs baseline: the paired difference per (base, seed) (arm - baseline, same base
  and seed), its mean and 95% interval by the paired t-test
  (``mean +- t_{0.975, n-1} * std / sqrt(n)``); a change counts as **clear** only when
  the interval excludes 0 (at least two pairs; one pair gives no spread, no verdict). The
  response split's verdict pairs ``|arm| - |baseline|`` (the distance from 0);

and write ``results.json``, ``report.md`` (tables + plain statements, whatever they
say) and figures (``trajectories.png``, ``scores.png``) to ``output_dir``.

Runs live in ``output_dir/runs/<arm>[/<base>]/seed_<s>/``. A finished run writes
``done.json`` (atomically) and is skipped when the ablation is re-run; an interrupted run
resumes from its ``last.ckpt``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from unifyreg.config import AblateConfig, ArmConfig, BaseSpec, FinetuneConfig, to_yaml
from unifyreg.fileio import atomic_write_json, atomic_write_text
from unifyreg.quantities import QUANTITIES
from unifyreg.recipes.finetune import build_trainer_parts, close_loggers, resolve_resume
from unifyreg.sources import example_source, resolve_source
from unifyreg.trainer import fit

__all__ = ["aggregate", "arm_config", "interval", "render_report", "run", "run_arm"]

ACCURACY_NAMES = (
    "t2i_direct",
    "understanding",
    "text_facts",
    "t2i_reasoning",
    "caption",
    "text_reasoning",
    "transfer",
)
DONE_FILE = "done.json"

#: Two-sided 95% quantiles of Student's t by degrees of freedom (1..30); beyond, 1.96.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile(df: int) -> float:
    """``t_{0.975, df}``, the two-sided 95% quantile of Student's t (1.96 beyond 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def interval(values: list[float]) -> dict[str, float]:
    """``{"mean", "std", "n", "low", "high"}``: the mean and its 95% interval
    ``mean +- t_{0.975, n-1} * std / sqrt(n)`` (sample std; one value: no interval, low =
    high = mean)."""
    array = np.asarray(values, dtype=float)
    n = int(len(array))
    mean = float(array.mean())
    std = float(array.std(ddof=1)) if n > 1 else 0.0
    half = t_quantile(n - 1) * std / math.sqrt(n) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "low": mean - half, "high": mean + half}


def _bases(cfg: AblateConfig) -> list[BaseSpec | None]:
    return list(cfg.bases) or [None]


def _run_dir(cfg: AblateConfig, arm: ArmConfig, base: BaseSpec | None, seed: int) -> Path:
    parts = [arm.name] + ([base.name] if base is not None else []) + [f"seed_{seed}"]
    return Path(cfg.output_dir, "runs", *parts)


def arm_config(
    cfg: AblateConfig, arm: ArmConfig, seed: int, base: BaseSpec | None = None
) -> FinetuneConfig:
    """The fine-tune config of one (arm, base, seed): the shared ``finetune`` section with
    the arm's weights, ``L_ctx`` mode and data variant, the base's objective and
    pre-training seed, the seed, its own run directory and ``resume=last``."""
    ft = copy.deepcopy(cfg.finetune)
    ft.seed = seed
    ft.loss.w_ctx, ft.loss.w_div = arm.w_ctx, arm.w_div
    if arm.ctx_mode:
        ft.loss.ctx_mode = arm.ctx_mode
    if arm.data_variant:
        ft.data_variant = arm.data_variant
    if base is not None:
        ft.pretrain.objective, ft.pretrain.seed = base.objective, base.seed
    ft.run_dir = str(_run_dir(cfg, arm, base, seed))
    ft.resume = "last"
    return ft


def run_arm(
    cfg: AblateConfig, arm: ArmConfig, seed: int, base: BaseSpec | None = None
) -> dict[str, Any]:
    """Fine-tune one (arm, base, seed), probe and score it; returns (and writes) its record."""
    ft = arm_config(cfg, arm, seed, base)
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
        "base": base.name if base is not None else "",
        "seed": seed,
        "w_ctx": arm.w_ctx,
        "w_div": arm.w_div,
        "steps": int(parts.trainer.global_step),
        "scores": {
            k.split("/", 1)[1]: v for k, v in final["metrics"].items() if k.startswith("unify/")
        },
        "trajectories": {
            q: final["summary"]["stats"][q]["normalized"]["all"]["mean"]
            for q in QUANTITIES
            if q in final["summary"]["stats"]
        },
        "layers": final["summary"]["layers"],
        # Each quantity's own layers (a two-stage model's response/image: the denoiser's).
        "quantity_layers": {
            q: axis["layers"] for q, axis in final["summary"].get("axes", {}).items()
        },
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


def _value(record: dict[str, Any], metric: str) -> float | None:
    group, name = metric.split("/")
    if name == "response_split_distance":  # |split|: how far from the unified state
        split = record["scores"].get("response_split")
        return None if split is None else abs(split)
    return (record["scores"] if group == "score" else record["accuracies"]).get(name)


#: What each run is scored on: unifyreg's scores (``unifyreg.probing.SCORE_NAMES``, and the
#: response split's distance from 0) and the toy's headline accuracies.
METRICS = (
    "score/encoding_gap",
    "score/response_split",
    "score/response_split_distance",
    "score/final_gap",
    *(f"accuracy/{name}" for name in ACCURACY_NAMES),
)


def aggregate(records: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """Per-arm statistics and paired differences to ``baseline`` by (base, seed) (module
    docstring): ``{arm: {"runs", "metrics", "vs_baseline", "trajectories", "layers",
    "quantity_layers"}}`` (``quantity_layers``: each quantity's own layers, when it lies on
    another stack than the primary one)."""

    def key(record):
        return (record.get("base", ""), record["seed"])

    by_arm: dict[str, Any] = {}
    baseline = {key(r): r for r in records if r["arm"] == "baseline"}
    for arm in arms:
        runs = [r for r in records if r["arm"] == arm]
        entry: dict[str, Any] = {
            "runs": sorted(key(r) for r in runs),
            "seeds": sorted({r["seed"] for r in runs}),
            "bases": sorted({r.get("base", "") for r in runs}),
            "metrics": {},
            "vs_baseline": {},
        }
        for metric in METRICS:
            values = [v for r in runs if (v := _value(r, metric)) is not None]
            if values:
                entry["metrics"][metric] = interval(values)
            if arm != "baseline" and baseline:
                diffs = [
                    v - b
                    for r in runs
                    if key(r) in baseline
                    and (v := _value(r, metric)) is not None
                    and (b := _value(baseline[key(r)], metric)) is not None
                ]
                if diffs:
                    stats = interval(diffs)
                    stats["clear"] = bool(
                        stats["n"] >= 2 and (stats["low"] > 0 or stats["high"] < 0)
                    )
                    entry["vs_baseline"][metric] = stats
        trajectories = {}
        for q in QUANTITIES:
            curves = [r["trajectories"][q] for r in runs if q in r["trajectories"]]
            if curves:
                trajectories[q] = np.mean(np.asarray(curves), axis=0).tolist()
        entry["trajectories"] = trajectories
        entry["layers"] = runs[0]["layers"] if runs else []
        entry["quantity_layers"] = runs[0].get("quantity_layers", {}) if runs else {}
        by_arm[arm] = entry
    return by_arm


def _verdict(diff: dict[str, float] | None, lower_is_better: bool, what: str) -> str:
    if diff is None:
        return f"{what}: not measured"
    if diff["n"] < 2:
        return f"{what}: {diff['mean']:+.4f} vs baseline (one pair: no spread, no verdict)"
    direction = "lower" if diff["mean"] < 0 else "higher"
    spread = (
        f"{diff['mean']:+.4f}, 95% interval [{diff['low']:+.4f}, {diff['high']:+.4f}] "
        f"over {diff['n']} pairs"
    )
    if not diff["clear"]:
        return f"{what}: no clear change ({spread})"
    good = (diff["mean"] < 0) == lower_is_better
    return f"{what}: clearly {direction} ({spread})" + ("" if good else " — the wrong way")


def _cell(stats: dict[str, float], signed: bool = False) -> str:
    half = (stats["high"] - stats["low"]) / 2
    return f"{stats['mean']:+.4f} ± {half:.4f}" if signed else f"{stats['mean']:.4f} ± {half:.4f}"


def render_report(by_arm: dict[str, Any], cfg: AblateConfig) -> str:
    """Markdown: setup, a mean ± 95%-interval table, a paired-difference table, and plain
    statements."""
    ft = cfg.finetune
    bases = ", ".join(f"{b.name} ({b.objective}, seed {b.seed})" for b in cfg.bases) or "one"
    lines = [
        "# unifyreg ablation report",
        "",
        f"Arms: {', '.join(by_arm)}; bases: {bases}; seeds: {cfg.seeds}; model: "
        f"{ft.model.adapter}; {ft.max_epochs} epoch(s), batch {ft.batch_size}, "
        f"LoRA {'on' if ft.lora.enabled else 'off'}; L_ctx mode {ft.loss.ctx_mode} (unless "
        f"an arm says otherwise), mask ratio {ft.loss.mask_ratio}, L_div alpha "
        f"{ft.loss.div_alpha}; probe regime {ft.probe.regime} (bandwidth "
        f"{ft.probe.sigma}, alpha {ft.probe.alpha:g}).",
        "Scores are unifyreg's own definitions (not the paper's): lower `encoding_gap` and "
        "`final_gap`, and `response_split` nearer 0, mean less divergence. Accuracies are "
        "exact-match on the toy (`transfer` = held-out reasoning transfer). ± is the half "
        "width of the 95% interval (Student's t over runs; over (base, seed) pairs for "
        "differences).",
        "",
    ]
    metrics = list(next(iter(by_arm.values()))["metrics"])
    header = "| arm | " + " | ".join(m.split("/")[1] for m in metrics) + " |"
    lines += ["## Mean ± 95% interval over runs", "", header, "|---" * (len(metrics) + 1) + "|"]
    for arm, entry in by_arm.items():
        cells = [_cell(entry["metrics"][m]) if m in entry["metrics"] else "—" for m in metrics]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Difference to baseline (paired by base and seed, mean ± 95% interval)",
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
            cells.append("—" if d is None else _cell(d, signed=True) + (" *" if d["clear"] else ""))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "`*`: clear change, the 95% interval of the paired difference excludes 0.",
        "",
        "## What it says",
        "",
    ]
    if "baseline" not in by_arm:
        lines.append("No baseline arm: no comparison possible.")
    for arm, entry in by_arm.items():
        if arm == "baseline":
            continue
        vs = entry["vs_baseline"]
        lines.append(f"- **{arm}**:")
        lines.append("  - " + _verdict(vs.get("score/encoding_gap"), True, "encoding gap"))
        # |arm| - |baseline| paired by (base, seed): towards 0 is better whichever the sign.
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
        "runs), `scores.png` (scores and accuracies per arm, ± std).",
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
        cells = [_cell(entry["metrics"][n]) if n in entry["metrics"] else "—" for n in names]
        print(f"| {arm} | " + " | ".join(cells) + " |")


def run(cfg: AblateConfig, dry_run: bool = False) -> int:
    """Command ``unifyreg ablate`` (``dry_run``: check the first run's fine-tune only)."""
    out = Path(cfg.output_dir)
    arms = cfg.all_arms()
    bases = _bases(cfg)
    plan = [(arm, base, seed) for arm in arms for base in bases for seed in cfg.seeds]
    if dry_run:
        from unifyreg.recipes.finetune import run as finetune

        print(
            f"dry run: {len(plan)} runs ({len(arms)} arms x {len(bases)} bases x "
            f"{len(cfg.seeds)} seeds) -> {out}"
        )
        return finetune(arm_config(cfg, arms[0], cfg.seeds[0], bases[0]), dry_run=True)
    atomic_write_text(out / "config.yaml", to_yaml(cfg))
    records = []
    start = time.perf_counter()
    for index, (arm, base, seed) in enumerate(plan, start=1):
        done = _run_dir(cfg, arm, base, seed) / DONE_FILE
        weights = f"w_ctx={arm.w_ctx:g}, w_div={arm.w_div:g}"
        where = f" base {base.name}" if base is not None else ""
        tag = f"[{index}/{len(plan)}] arm {arm.name} ({weights}){where} seed {seed}"
        if done.is_file():
            print(f"{tag}: finished earlier, skipping", flush=True)
            records.append(json.loads(done.read_text()))
            continue
        print(f"{tag}: fine-tuning ...", flush=True)
        record = run_arm(cfg, arm, seed, base)
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
