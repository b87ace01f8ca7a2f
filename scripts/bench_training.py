"""Benchmark: what the regularizer and the per-epoch probe cost in toy fine-tuning.

1. Step time (forward + backward + AdamW step, batches of the toy ``finetune`` split,
   LoRA off; the default toy model, or ``--hidden`` / ``--layers``): baseline, + ``L_ctx``,
   + ``L_div`` (several settings), + both; overhead over baseline in %. Target (issue 6):
   <= 25% for the defaults.
2. The probe's share of epoch wall time in the real toy fine-tune recipe
   (``configs/toy/finetune.yaml``: LoRA, the default 160-example probe set, all layers,
   alpha 1.01), as ``EntropyProbe`` records it in ``probe/epoch_share``. Target (issue 5):
   <= 5%.

Usage: ``python scripts/bench_training.py [--steps N] [--batch-size B] [--hidden H]
[--layers L] [--skip-recipe | --recipe-only]``; prints tables. The recipe run uses (and builds, if
absent) the cached toy base."""

from __future__ import annotations

import argparse
import os
import time

import torch

from unifyreg.adapters.toy import ToyAdapter, ToyModelConfig
from unifyreg.config import LossConfig
from unifyreg.losses import ContextualPredictionLoss
from unifyreg.toy import WordTokenizer, WorldConfig, build_splits


def _step_seconds(adapter, batches, loss_config: LossConfig | None, repeats: int) -> float:
    term = ContextualPredictionLoss(loss_config, adapter.hidden_size) if loss_config else None
    params = list(adapter.model.parameters()) + (list(term.parameters()) if term else [])
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    need_hidden = bool(term and term.needs_hidden_states)

    def step(batch):
        out = adapter.forward(batch, output_hidden_states=need_hidden)
        loss = out.task_loss
        if term is not None:
            extra, _ = term(adapter, batch, out, step=10**6)
            loss = loss + extra
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step(batches[0])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            step(batch)
        best = min(best, (time.perf_counter() - start) / len(batches))
    return best


def recipe_probe_share() -> None:
    """The probe's share of epoch wall time in the real toy recipe: run
    ``unifyreg finetune --config configs/toy/finetune.yaml`` (defaults: LoRA, 3 epochs,
    the 160-example probe set) and read the ``probe/epoch_share`` that ``EntropyProbe``
    records: probe seconds (figures and files included) / (training epoch + probe)."""
    import json
    import tempfile
    from pathlib import Path

    from unifyreg.cli import main as cli

    config = Path(__file__).resolve().parents[1] / "configs" / "toy" / "finetune.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        code = cli(["finetune", "--config", str(config), f"run_dir={tmp}", "loggers=[csv]"])
        if code != 0:
            raise SystemExit(f"finetune failed with exit code {code}")
        history = [json.loads(line) for line in open(Path(tmp) / "probe" / "probe_history.jsonl")]
    print("\n| probe after epoch | probe compute (s) | probe incl. files (s) | share of epoch |")
    print("|---|---|---|---|")
    for entry in history:
        share = entry["cost"].get("probe/epoch_share")
        print(
            f"| {entry['epoch']} | {entry['seconds']:.3f} | {entry['cost']['probe/seconds']:.3f} "
            f"| {'-' if share is None else f'{100 * share:.1f}%'} |"
        )
    # The whole run: every probe after an epoch against every epoch plus those probes
    # (each epoch's training seconds recovered from its share).
    probe_total = train_total = 0.0
    for entry in history:
        share = entry["cost"].get("probe/epoch_share")
        if share:
            seconds = entry["cost"]["probe/seconds"]
            probe_total += seconds
            train_total += seconds / share - seconds
    if probe_total:
        share = probe_total / (train_total + probe_total)
        print(f"| all epochs | | {probe_total:.3f} | {100 * share:.1f}% |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128, help="toy model width")
    parser.add_argument("--layers", type=int, default=4, help="toy model depth")
    parser.add_argument("--skip-recipe", action="store_true", help="skip the probe-share run")
    parser.add_argument(
        "--recipe-only", action="store_true", help="only the probe-share run (table 2)"
    )
    args = parser.parse_args(argv)
    if args.recipe_only:
        recipe_probe_share()
        return 0
    torch.manual_seed(0)
    world = WorldConfig()
    splits = build_splits(world)
    model_config = ToyModelConfig(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=max(1, args.hidden // 32),
        intermediate_size=2 * args.hidden,
    )
    adapter = ToyAdapter.create(WordTokenizer.for_world(world), world.grid_size, model_config)
    adapter.model.train()
    train = splits["finetune"]
    batches = [
        adapter.encode(train[i * args.batch_size : (i + 1) * args.batch_size])
        for i in range(args.steps)
    ]
    print(f"load average before: {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}")
    print(f"toy model {model_config}, batch {args.batch_size}, best of {args.repeats}\n")
    print("| variant | step (ms) | overhead vs baseline |\n|---|---|---|")
    variants = [
        ("baseline", None),
        ("+ L_ctx (defaults: mask 0.5, 1/8 of the rows)", LossConfig(w_ctx=1.0)),
        ("+ L_ctx (1/4 of the rows)", LossConfig(w_ctx=1.0, ctx_row_fraction=0.25)),
        ("+ L_ctx (every image row)", LossConfig(w_ctx=1.0, ctx_row_fraction=1.0)),
        ("+ L_div (defaults: alpha 2, all layers, float32)", LossConfig(w_div=1.0)),
        ("+ L_div (alpha 2, float64)", LossConfig(w_div=1.0, div_dtype="float64")),
        ("+ L_div (alpha 1.01, float32)", LossConfig(w_div=1.0, div_alpha=1.01)),
        ("+ L_div (alpha 2, last layer only)", LossConfig(w_div=1.0, div_layers=[-1])),
        ("+ L_ctx + L_div (defaults)", LossConfig(w_ctx=1.0, w_div=1.0)),
    ]
    base = None
    for name, cfg in variants:
        seconds = _step_seconds(adapter, batches, cfg, args.repeats)
        base = base or seconds
        print(f"| {name} | {1000 * seconds:.1f} | {100 * (seconds / base - 1):+.0f}% |", flush=True)

    if not args.skip_recipe:
        recipe_probe_share()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
