"""Benchmark: what the regularizer and the per-epoch probe cost in toy fine-tuning.

1. Step time (forward + backward + AdamW step, batch of the toy ``finetune`` split, LoRA
   off, the default toy model): baseline, + ``L_ctx``, + ``L_div`` (alpha 2 and 1.01),
   + both; overhead over baseline in %. Target (issue 6): <= 25% for the defaults.
2. The probe's share of an epoch in the toy fine-tune recipe with the default probe set
   (160 examples, all layers, alpha 1.01): one probe vs one epoch of training steps.
   Target (issue 5): <= 5%.

Usage: ``python scripts/bench_training.py [--steps N] [--batch-size B]``; prints tables.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from unifyreg.adapters.toy import ToyAdapter, ToyModelConfig
from unifyreg.config import LossConfig, ProbeConfig
from unifyreg.losses import ContextualPredictionLoss
from unifyreg.probing import run_probe
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    world = WorldConfig()
    splits = build_splits(world)
    adapter = ToyAdapter.create(WordTokenizer.for_world(world), world.grid_size, ToyModelConfig())
    adapter.model.train()
    train = splits["finetune"]
    batches = [
        adapter.encode(train[i * args.batch_size : (i + 1) * args.batch_size])
        for i in range(args.steps)
    ]
    print(f"load average before: {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}")
    print(f"toy model {ToyModelConfig()}, batch {args.batch_size}, best of {args.repeats}\n")
    print("| variant | step (ms) | overhead vs baseline |\n|---|---|---|")
    variants = [
        ("baseline", None),
        ("+ L_ctx (mask 0.5)", LossConfig(w_ctx=1.0)),
        ("+ L_div (alpha 2, all layers)", LossConfig(w_div=1.0)),
        ("+ L_div (alpha 1.01, all layers)", LossConfig(w_div=1.0, div_alpha=1.01)),
        ("+ L_ctx + L_div (alpha 2)", LossConfig(w_ctx=1.0, w_div=1.0)),
    ]
    base = None
    for name, cfg in variants:
        seconds = _step_seconds(adapter, batches, cfg, args.repeats)
        base = base or seconds
        print(f"| {name} | {1000 * seconds:.1f} | {100 * (seconds / base - 1):+.0f}% |", flush=True)

    probe_set = [e for name, split in splits.items() if name.startswith("probe/") for e in split]
    run_probe(adapter, probe_set[:8], ProbeConfig())  # warm-up
    start = time.perf_counter()
    run_probe(adapter, probe_set, ProbeConfig())
    probe_seconds = time.perf_counter() - start
    steps_per_epoch = len(train) // args.batch_size
    epoch_seconds = steps_per_epoch * base
    print(
        f"\nprobe of {len(probe_set)} examples: {probe_seconds:.2f} s; one epoch "
        f"({steps_per_epoch} baseline steps): {epoch_seconds:.2f} s; probe share "
        f"{100 * probe_seconds / (epoch_seconds + probe_seconds):.0f}% of epoch wall time"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
