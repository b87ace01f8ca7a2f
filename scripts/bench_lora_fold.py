"""Does folding LoRA updates into their weights speed up the probe's forward passes?

For a 24-layer Llama-style decoder of width ``d`` (1024 and 2048 by default) wrapped by
peft LoRA (r = 8 on the attention and MLP projections), times one no-gradient forward of
a probe batch three ways, interleaved, median of ``--repeats``:

- ``peft``: plain peft (``x W^T + s (x A^T) B^T`` per projection);
Seconds are per forward of a probe of ``--batches`` forwards (one block around all):

- ``folded``: inside :func:`unifyreg.module.merged_lora_inference` with its default
  256 MiB budget (a folded weight is built per call, kept while it fits the budget);
- ``folded, cached``: the same with a budget large enough to keep every folded weight
  (the best case: repeated batches, weights unchanged).

Prints a table of seconds per forward and the ratio to plain peft. Usage:
``PYTHONPATH=<a worktree of c8d7ef0> python scripts/bench_lora_fold.py [--widths 1024 2048]
[--tokens 512] [--repeats 5]``. Run with nothing else on the machine. The measurement
(BENCHMARKS.md) showed folding slower at real width, so ``merged_lora_inference`` was
removed after commit c8d7ef0; the script needs that commit's package on the path.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

try:
    from unifyreg.module import merged_lora_inference
except ImportError:  # removed after c8d7ef0 (BENCHMARKS.md): point PYTHONPATH at that commit
    raise SystemExit(
        "merged_lora_inference is not in this version (removed after c8d7ef0); run with "
        "PYTHONPATH=<a worktree of c8d7ef0>"
    ) from None


def build(width: int, layers: int) -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=width,
        intermediate_size=int(width * 2.75) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=width // 64,
        num_key_value_heads=width // 64,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    for name, parameter in model.named_parameters():  # a trained-looking B (not zeros)
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.01)
    return model


def time_probe(model, ids, mode: str, batches: int) -> float:
    """Seconds per forward over ``batches`` forwards, as the probe runs them (one
    ``merged_lora_inference`` block around all of them)."""
    start = time.perf_counter()
    with torch.no_grad():
        if mode == "peft":
            for _ in range(batches):
                model(input_ids=ids).logits.sum()
        else:
            budget = 256 * 2**20 if mode == "folded" else 2**40
            with merged_lora_inference(model, cache_bytes=budget):
                for _ in range(batches):
                    model(input_ids=ids).logits.sum()
    return (time.perf_counter() - start) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per forward (batch x S)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4, help="forwards per probe")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = ("peft", "folded", "folded, cached")
    print(
        f"{args.layers} layers, batch {args.batch} x {args.tokens // args.batch} tokens, "
        f"{args.batches} forwards per probe, float32, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    print("| width | peft (s) | folded (s) | folded, cached (s) | folded / peft | cached / peft |")
    print("|---|---|---|---|---|---|")
    for width in args.widths:
        model = build(width, args.layers)
        ids = torch.randint(0, 256, (args.batch, args.tokens // args.batch))
        for mode in modes:  # warm-up
            time_probe(model, ids, mode, 1)
        times = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode in modes:
                times[mode].append(time_probe(model, ids, mode, args.batches))
        med = {mode: statistics.median(values) for mode, values in times.items()}
        print(
            f"| {width} | {med['peft']:.3f} | {med['folded']:.3f} | {med['folded, cached']:.3f} "
            f"| {med['folded'] / med['peft']:.3f} | {med['folded, cached'] / med['peft']:.3f} |",
            flush=True,
        )
        del model


if __name__ == "__main__":
    main()
