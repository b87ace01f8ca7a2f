"""Benchmark: the regularizer's step overhead (``L_ctx``, ``L_div``) at the toy's size and at
real widths on 600-token sequences, the variants interleaved in one process.

One training step = forward + backward + AdamW step (LoRA off) of a toy-architecture
(Llama-style) model through ``ToyAdapter``. Sizes (``--sizes``):

- ``toy``: the default toy model (4 layers x 128) on batches of 32 of the toy
  ``finetune`` split (the setting of ``scripts/bench_training.py``);
- ``8x512`` and ``24x1024``: 8 layers x 512 (MLP 1408) and 24 layers x 1024 (MLP 2816),
  random weights, on batches of ``--batch`` examples with ~600-word prompts (the probe
  set of ``scripts/bench_probe.py``: text -> 8-word text, text -> 8 x 8 image, image +
  text -> word, in turn, so every batch of 3 holds both modalities on both sides).

Variants: ``baseline`` (task loss), ``+ L_ctx`` (``LossConfig(w_ctx=1)``: defaults, the
second pass after the main pass's shared prefix), ``+ L_ctx (full second pass)``
(``ctx_reuse_prefix=False``: the second pass over the whole sequence, as before),
``+ L_div`` (``LossConfig(w_div=1)``: defaults, alpha 2, all layers, float32). Every round
runs one step of each variant in turn (the order rotates), ``--rounds`` rounds after one
warm-up round; the overhead is ``median(variant) / median(baseline) - 1``, and the paired
overhead the median (and range) over rounds of ``variant / baseline - 1`` within a round
(the same batch; a shared machine's drift between rounds cancels). One thread (torch,
OpenMP, MKL, OpenBLAS), so a shared machine slows all variants alike.

Usage: ``python scripts/bench_regularizer.py [--sizes toy,8x512,24x1024] [--rounds N]
[--batch B]``.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from unifyreg.config import LossConfig  # noqa: E402
from unifyreg.losses import ContextualPredictionLoss, forward_with_terms  # noqa: E402

#: size -> (layers, hidden, heads, MLP width); None = the default toy model.
SIZES = {"toy": None, "8x512": (8, 512, 8, 1408), "24x1024": (24, 1024, 16, 2816)}
VARIANTS = {
    "baseline": None,
    "+ L_ctx (defaults)": LossConfig(w_ctx=1.0),
    "+ L_ctx (full second pass)": LossConfig(w_ctx=1.0, ctx_reuse_prefix=False),
    "+ L_div (defaults)": LossConfig(w_div=1.0),
}
PROMPT_WORDS = 600
GRID = 8


def build(size: str, batch: int, steps: int):
    """``(adapter, batches)`` for one size."""
    from unifyreg.adapters.toy import ToyAdapter
    from unifyreg.toy import WordTokenizer, WorldConfig, build_splits

    torch.manual_seed(0)
    if SIZES[size] is None:
        world = WorldConfig()
        adapter = ToyAdapter.create(WordTokenizer.for_world(world), world.grid_size)
        train = build_splits(world)["finetune"]
        batches = [adapter.encode(train[i * 32 : (i + 1) * 32]) for i in range(steps)]
        return adapter, batches
    layers, hidden, heads, mlp = SIZES[size]
    import bench_probe  # a sibling script: scripts/ is sys.path[0]

    spec = dict(
        grid=GRID,
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=mlp,
        prompt_words=PROMPT_WORDS,
    )
    adapter, tokenizer = bench_probe.build_adapter(spec)
    examples = bench_probe.build_examples(batch * steps, PROMPT_WORDS, tokenizer.words, GRID, 0)
    batches = [adapter.encode(examples[i * batch : (i + 1) * batch]) for i in range(steps)]
    return adapter, batches


def make_step(adapter, config: LossConfig | None, optimizer_for):
    """One training step of a variant; ``optimizer_for(params)`` gives the optimizer (one
    shared by every variant: AdamW's work per step is the same, and one set of moments
    keeps the 24 x 1024 model inside 24 GiB)."""
    term = ContextualPredictionLoss(config, adapter.hidden_size) if config else None
    optimizer = optimizer_for(list(term.parameters()) if term else [])
    hidden = bool(term and term.needs_hidden_states)

    def step(batch):
        terms = [term] if term is not None else []
        out, extra, _ = forward_with_terms(adapter, batch, terms, 10**6, hidden)
        loss = out.task_loss + extra
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def run_size(size: str, rounds: int, batch: int) -> dict:
    adapter, batches = build(size, batch, rounds + 1)
    adapter.model.train()
    optimizer = torch.optim.AdamW(list(adapter.model.parameters()), lr=1e-5)

    def optimizer_for(extra_params):
        if extra_params:
            optimizer.add_param_group({"params": extra_params})
        return optimizer

    steps = {name: make_step(adapter, cfg, optimizer_for) for name, cfg in VARIANTS.items()}
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(rounds + 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            steps[name](batches[r])
            if r > 0:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    # Per round, against the baseline on the same batch: drift of a shared machine
    # between rounds cancels.
    paired = {
        name: sorted(a / b - 1 for a, b in zip(t, times["baseline"], strict=True))
        for name, t in times.items()
    }
    tokens = int(batches[0]["input_ids"].numel())
    return dict(size=size, tokens_per_batch=tokens, seconds=med, paired=paired, rounds=rounds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="toy,8x512", help=f"comma-separated of {list(SIZES)}")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after a warm-up)")
    parser.add_argument("--batch", type=int, default=3, help="examples per batch (not toy)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or args.rounds < 1 or args.batch < 1:
        parser.error(f"unknown sizes {unknown}" if unknown else "--rounds/--batch must be >= 1")
    print(f"load average: {os.getloadavg()[0]:.2f}; 1 thread; medians of {args.rounds} rounds\n")
    print(
        "| size | positions per batch | variant | step (s) | overhead vs baseline "
        "| paired overhead: median (range) |"
    )
    print("|---|---|---|---|---|---|")
    for size in sizes:
        row = run_size(size, args.rounds, args.batch)
        base = row["seconds"]["baseline"]
        for name, seconds in row["seconds"].items():
            paired = row["paired"][name]
            print(
                f"| {size} | {row['tokens_per_batch']} | {name} | {seconds:.3f} "
                f"| {100 * (seconds / base - 1):+.1f}% "
                f"| {100 * statistics.median(paired):+.1f}% "
                f"({100 * paired[0]:+.1f} to {100 * paired[-1]:+.1f}) |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
