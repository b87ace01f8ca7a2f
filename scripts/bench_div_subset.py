"""Benchmark: ``L_div`` on a token subset (``loss.div_max_tokens``) against every token:
its cost, its value's error and its gradient's direction, on one batch's hidden states.

The batch: ``scripts/bench_regularizer.py``'s first batch of ``--size`` (3 examples with
~600-word prompts: text -> 8-word text, text -> 8 x 8 image, image + text -> word; a
random-weight Llama-style model), its hidden states taken once without gradient and then
made leaves. For each cap ``k`` in ``--caps``: ``L_div`` (defaults: order 2,
``median_differentiable``, float32, every layer) on subsets drawn with ``--seeds`` token
seeds (the loss's step), against ``L_div`` on every token:

- ``time``: forward + backward, median over the seeds (1 thread), and its ratio to all tokens;
- ``value``: mean and spread (sd over seeds) of ``L_div(k) / L_div(all) - 1`` (the mean
  is the bias that averaging over steps leaves);
- ``cosine``: of the gradient with respect to the hidden states with the full one, per
  seed (mean) and of the mean gradient over seeds.

Usage: ``python scripts/bench_div_subset.py [--size 8x512] [--caps 128,256,384] [--seeds 8]``.
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from unifyreg.losses import divergence_loss  # noqa: E402


def loss_and_grad(hidden, roles, max_tokens: int, seed: int) -> tuple[float, torch.Tensor, float]:
    """``(L_div, d L_div / d hidden [flat], seconds)`` for one cap and token seed."""
    for h in hidden:
        h.grad = None
    start = time.perf_counter()
    value, _ = divergence_loss(
        hidden, roles, 2.0, dtype=torch.float32, max_tokens=max_tokens, token_seed=seed
    )
    value.backward()
    seconds = time.perf_counter() - start
    grad = torch.cat([h.grad.flatten() for h in hidden]).double()
    return float(value.detach()), grad, seconds


def main(argv=None) -> int:
    import bench_regularizer  # a sibling script: scripts/ is sys.path[0]

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="8x512", choices=["8x512", "24x1024"])
    parser.add_argument("--caps", default="128,256,384")
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args(argv)
    caps = [int(c) for c in args.caps.split(",") if c.strip()]
    if args.seeds < 2 or not caps or min(caps) < 1:
        parser.error("--seeds must be >= 2 and --caps positive integers")
    torch.set_num_threads(1)
    adapter, batches = bench_regularizer.build(args.size, 3, 1)
    with torch.no_grad():
        output = adapter.forward(batches[0], output_hidden_states=True)
    hidden = [h.detach().float().requires_grad_(True) for h in output.hidden_layers]
    roles = output.roles
    loss_and_grad(hidden, roles, 0, 0)  # warm-up
    full_times, full_value, full_grad = [], None, None
    for _ in range(3):
        full_value, full_grad, seconds = loss_and_grad(hidden, roles, 0, 0)
        full_times.append(seconds)
    full_time = statistics.median(full_times)
    print(f"load average {os.getloadavg()[0]:.2f}; 1 thread; {args.size}, {len(hidden)} layers, "
          f"{roles.shape[0]} x {roles.shape[1]} positions; L_div(all) = {full_value:.5f}, "
          f"{full_time:.3f} s")  # fmt: skip
    print(
        "| cap k | time (s) | / all tokens | value error (mean +- sd over seeds) "
        "| gradient cosine (per seed) | cosine of the mean gradient |"
    )
    print("|---|---|---|---|---|---|")
    cos = torch.nn.functional.cosine_similarity
    for cap in caps:
        values, grads, times = [], [], []
        for seed in range(1, args.seeds + 1):
            value, grad, seconds = loss_and_grad(hidden, roles, cap, seed)
            values.append(value / full_value - 1)
            grads.append(grad)
            times.append(seconds)
        per_seed = statistics.mean(float(cos(g, full_grad, dim=0)) for g in grads)
        of_mean = float(cos(torch.stack(grads).mean(0), full_grad, dim=0))
        t = statistics.median(times)
        print(f"| {cap} | {t:.3f} | {t / full_time:.2f} | {100 * statistics.mean(values):+.1f} % "
              f"+- {100 * statistics.stdev(values):.1f} % "
              f"| {per_seed:.3f} | {of_mean:.3f} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
