"""Benchmark: ``L_div``'s forward + backward alone, with the prompt entropies taken from
their proxies' joint distances (the loss's route) against one estimator call per
quantity (the route before issue 20's change: each prompt's distances built twice),
interleaved in one process.

Hidden states: ``--layers`` random ``[3, 669, --width]`` float32 tensors, the roles of
``scripts/bench_regularizer.py``'s batches of 3 (text -> 8-word text, text -> 8 x 8
image, image + text -> word, ~600-token prompts); ``L_div`` with its defaults (order 2,
``median_differentiable``, float32). Medians of ``--rounds`` interleaved rounds after a
warm-up, one thread.

Usage: ``python scripts/bench_div_loss.py [--layers 8] [--width 512] [--rounds 5]``.
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
from unifyreg.quantities import PAIRS, batch_quantities  # noqa: E402
from unifyreg.roles import Role  # noqa: E402

LENGTH = 669
SAMPLES = (
    ((Role.SPECIAL, 1), (Role.TEXT_PROMPT, 600), (Role.TEXT_RESPONSE, 8)),
    ((Role.SPECIAL, 1), (Role.TEXT_PROMPT, 600), (Role.IMAGE_RESPONSE, 64)),
    ((Role.SPECIAL, 1), (Role.IMAGE_PROMPT, 64), (Role.TEXT_PROMPT, 600), (Role.TEXT_RESPONSE, 1)),
)


def roles() -> torch.Tensor:
    """``[3, 669]`` roles of the three kinds of sample, right-padded."""
    rows = []
    for sample in SAMPLES:
        row = [int(role) for role, count in sample for _ in range(count)]
        rows.append(row + [int(Role.PAD)] * (LENGTH - len(row)))
    return torch.tensor(rows)


def per_quantity_loss(hidden, labels, dtype) -> torch.Tensor:
    """``L_div`` from one ``batch_quantities`` call per quantity (no sharing)."""
    values = {}
    for name in [q for pair in PAIRS.values() for q in pair]:
        values.update(
            batch_quantities(
                hidden, labels, alpha=2.0, sigma="median_differentiable", dtype=dtype,
                quantities=[name],
            )
        )  # fmt: skip
    total = torch.zeros((), dtype=torch.float64)
    for text, image in PAIRS.values():
        gap = values[text].normalized.mean(dim=1) - values[image].normalized.mean(dim=1)
        total = total + (gap.double() ** 2).mean()
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    labels = roles()
    hidden = [torch.randn(3, LENGTH, args.width, requires_grad=True) for _ in range(args.layers)]
    variants = {
        "shared (loss route)": lambda: divergence_loss(hidden, labels, 2.0, dtype=torch.float32)[0],
        "per quantity (before)": lambda: per_quantity_loss(hidden, labels, torch.float32),
    }
    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds + 1):
        for name in names[r % 2 :] + names[: r % 2]:
            start = time.perf_counter()
            variants[name]().backward()
            if r > 0:
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"load average {os.getloadavg()[0]:.2f}; 1 thread; {args.layers} x {args.width}")
    for name, seconds in med.items():
        print(f"{name}: {seconds:.3f} s")
    ratio = med["shared (loss route)"] / med["per quantity (before)"]
    print(f"shared / per quantity: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
