"""What each bandwidth rule gives: synthetic inputs, the toy base, a tiny Janus, and L_div.

The measurements behind the README section "Comparing with the paper's Table 1"; each
part prints markdown tables (alpha 1.01, bits, unless a table says otherwise):

- ``synthetic``: matrix entropy of inputs of known structure under every rule (the
  issue's inputs, extended), the proxy on a noisy copy, and the median rule's values as
  n grows;
- ``toy MODEL_DIR``: the Table-1-style table (layer 0) and the pooled normalised
  trajectories and scores of a toy model on the toy probe set, under each regime;
- ``janus``: the same on a tiny random Janus checkpoint (``save_tiny_janus``) on the toy
  probe set (random weights: it shows what the estimator does with a real family's token
  layout, nothing about a trained model);
- ``loss MODEL_DIR``: for each bandwidth rule, the gradient norm of ``L_div`` (order 2,
  as the loss) with respect to the hidden states on fixed batches of the toy's
  ``finetune`` split, and ``L_div`` over a few Adam steps on ``L_div`` alone.

Usage: ``python scripts/measure_bandwidth_regimes.py synthetic``,
``python scripts/measure_bandwidth_regimes.py toy /path/to/toy-base``,
``python scripts/measure_bandwidth_regimes.py janus``,
``python scripts/measure_bandwidth_regimes.py loss /path/to/toy-base [--steps 60]``.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile

import numpy as np
import torch

from unifyreg.config import PROBE_PRESETS, ProbeConfig
from unifyreg.estimators import conditional_entropy_proxy, matrix_entropy
from unifyreg.probing import run_probe
from unifyreg.quantities import QUANTITIES
from unifyreg.sources import load_examples

#: The rules of the synthetic tables, widest first.
RULES = ("median", "rms", "rms:0.5", "rms:0.3", "rms:0.1", "silverman")
#: The regimes of the model tables: the two presets and the width-free narrow rule.
REGIMES = {
    "default (median)": ProbeConfig(preset="default", batch_size=64),
    "paper (silverman)": ProbeConfig(preset="paper", batch_size=64),
    "rms:0.1": ProbeConfig(bandwidth="rms:0.1", batch_size=64),
}
#: The rules of the loss measurement.
LOSS_RULES = ("median_differentiable", "median", "silverman", "rms:0.3", "rms:0.1")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _plane(k: int, d: int, seed: int) -> torch.Tensor:
    """``[k, d]`` orthonormal rows: a random k-dimensional subspace of R^d."""
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=_generator(seed), dtype=torch.float64))
    return q.T


def synthetic_inputs(n: int = 576) -> dict[str, torch.Tensor]:
    """Inputs of known structure, ``name -> [n, d]`` (float64, seeded)."""
    g = _generator(0)
    side = int(round(math.sqrt(n)))
    grid = torch.stack(
        torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1
    ).reshape(-1, 2)
    k = 8
    centres = 10.0 * torch.randn(k, 64, generator=g, dtype=torch.float64)
    labels = torch.arange(n) % k
    return {
        "identical tokens, d = 64": torch.ones(n, 64, dtype=torch.float64),
        "i.i.d. Gaussian, d = 2048 (near-orthogonal)": torch.randn(
            n, 2048, generator=g, dtype=torch.float64
        ),
        "i.i.d. Gaussian, d = 64": torch.randn(n, 64, generator=g, dtype=torch.float64),
        "Student-t(1.5), d = 64": torch.distributions.StudentT(1.5)
        .sample((n, 64))
        .double()
        .div(1.0),
        "uniform on a line in R^64": torch.rand(n, 1, generator=g, dtype=torch.float64)
        @ _plane(1, 64, 1),
        f"{side} x {side} grid in a plane of R^64": grid.double() @ _plane(2, 64, 2),
        "8 tight clusters (spread 0.001 of their distance), d = 64": centres[labels]
        + 0.01 * torch.randn(n, 64, generator=g, dtype=torch.float64),
        "8 loose clusters (spread 0.3 of their distance), d = 64": centres[labels]
        + 3.0 * torch.randn(n, 64, generator=g, dtype=torch.float64),
    }


def part_synthetic() -> None:
    torch.manual_seed(0)  # the Student-t sample
    inputs = synthetic_inputs()
    n = 576
    print(f"### Matrix entropy (alpha 1.01, bits), n = {n} tokens; log2 n = {math.log2(n):.2f}\n")
    print("| input | " + " | ".join(f"`{r}`" for r in RULES) + " |")
    print("|---" * (len(RULES) + 1) + "|")
    for name, Z in inputs.items():
        values = [matrix_entropy(Z, sigma=rule).item() for rule in RULES]
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    print("\n### Order 2 (the loss's order), the same inputs\n")
    print("| input | " + " | ".join(f"`{r}`" for r in RULES) + " |")
    print("|---" * (len(RULES) + 1) + "|")
    for name, Z in inputs.items():
        values = [matrix_entropy(Z, alpha=2.0, sigma=rule).item() for rule in RULES]
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    print(f"\n(median rule, order 2: at most log2(2e) = {math.log2(2 * math.e):.2f} bits)\n")

    print("### Near-orthogonal tokens (i.i.d. Gaussian, d = 2048) as n grows\n")
    print("| n | log2 n | " + " | ".join(f"`{r}`" for r in RULES) + " |")
    print("|---" * (len(RULES) + 2) + "|")
    for count in (64, 576, 1024, 4096):
        Z = torch.randn(count, 2048, generator=_generator(count), dtype=torch.float64)
        values = [matrix_entropy(Z, sigma=rule).item() for rule in RULES]
        cells = " | ".join(f"{v:.2f}" for v in values)
        print(f"| {count} | {math.log2(count):.2f} | {cells} |")

    print(
        "\n### A padded prompt: k distinct tokens and 129 - k copies of one pad token, d = 2048\n"
    )
    print("(Show-o left-pads its text prompt to 129 positions)\n")
    print("| distinct tokens k | " + " | ".join(f"`{r}`" for r in RULES) + " |")
    print("|---" * (len(RULES) + 1) + "|")
    for k in (10, 20, 40, 129):
        distinct = torch.randn(k, 2048, generator=_generator(k), dtype=torch.float64)
        pads = torch.zeros(129 - k, 2048, dtype=torch.float64)
        Z = torch.cat([pads, distinct])
        values = [matrix_entropy(Z, sigma=rule).item() for rule in RULES]
        print(f"| {k} | " + " | ".join(f"{v:.2f}" for v in values) + " |")

    print("\n### Proxy H(R | P) (bits): P i.i.d. Gaussian, d = 64, n = m = 100\n")
    print("(log2((n + m) / n) = 1 bit: the proxy of any R whose tokens the kernel separates)\n")
    P = torch.randn(100, 64, generator=_generator(5), dtype=torch.float64)
    cases = {"R = P": P.clone()}
    for s in (0.01, 0.1, 0.5):
        noise = torch.randn(100, 64, generator=_generator(6), dtype=torch.float64)
        cases[f"R = P + {s} noise"] = P + s * noise
    cases["R independent"] = torch.randn(100, 64, generator=_generator(7), dtype=torch.float64)
    print("| response | " + " | ".join(f"`{r}`" for r in RULES) + " |")
    print("|---" * (len(RULES) + 1) + "|")
    for name, R in cases.items():
        values = [conditional_entropy_proxy(P, R, sigma=rule).item() for rule in RULES]
        # R = P is 0 up to round-off (+-1e-15): printed as 0.000, not -0.000
        print(
            f"| {name} | " + " | ".join(f"{v if abs(v) > 5e-4 else 0.0:.3f}" for v in values) + " |"
        )


# ---------------------------------------------------------------------- model tables


def _log2_counts(result, quantity: str) -> dict[str, float]:
    """Mean log2 of the token count per category: the largest value each could reach."""
    rec = result.records[quantity]
    out: dict[str, list[float]] = {}
    for category, tokens in zip(rec.categories, rec.tokens, strict=True):
        out.setdefault(category, []).append(math.log2(max(int(tokens), 1)))
    return {c: float(np.mean(v)) for c, v in out.items()}


def model_tables(adapter, examples, label: str) -> None:
    """Table-1-style table, trajectories and scores of ``adapter`` under each regime."""
    results = {name: run_probe(adapter, examples, cfg) for name, cfg in REGIMES.items()}
    first = next(iter(results.values()))
    layer = first.layers[0]
    columns = [
        (q, c) for q in ("encoding/text", "encoding/image") for c in first.stats(q) if c != "all"
    ]
    header = " | ".join(f"{q.split('/')[1]}:{c}" for q, c in columns)
    print(f"### {label}: mean prompt entropy at layer {layer} (bits, alpha 1.01)\n")
    print(f"| regime | {header} |")
    print("|---" * (len(columns) + 1) + "|")
    for name, result in results.items():
        cells = " | ".join(f"{result.stats(q)[c]['mean'][0]:.3f}" for q, c in columns)
        print(f"| {name} | {cells} |")
    bounds = {q: _log2_counts(first, q) for q in ("encoding/text", "encoding/image")}
    cells = " | ".join(f"{bounds[q][c]:.3f}" for q, c in columns)
    print(f"| log2 of the token count | {cells} |")

    print(f"\n### {label}: pooled normalised means per layer {list(first.layers)}\n")
    print("| regime | quantity | per layer | encoding_gap | response_split | final_gap |")
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        scores = result.scores()
        for i, q in enumerate(QUANTITIES):
            mean = result.pooled_mean(q)
            if mean is None:
                continue
            trajectory = ", ".join(f"{v:.3f}" for v in mean)
            extra = (
                " | ".join(f"{scores.get(k, float('nan')):+.3f}" for k in scores)
                if i == 0
                else " | | "
            )
            print(f"| {name if i == 0 else ''} | {q} | {trajectory} | {extra} |")
    counts = count_only_proxy(adapter, examples)
    print("\n(the proxy of a Gram that is the identity: log2((n + m) / n), normalised by")
    print("log2(n + m), a function of the token counts alone)\n")
    print("| quantity | count-only normalised proxy (mean over samples) |")
    print("|---|---|")
    for q, value in counts.items():
        print(f"| {q} | {value:.3f} |")
    print()


def count_only_proxy(adapter, examples) -> dict[str, float]:
    """Mean over samples of ``log2((n + m) / n) / log2(n + m)`` per response quantity, from
    the role counts alone (n prompt tokens, m response tokens)."""
    from unifyreg.quantities import quantity
    from unifyreg.roles import Role, role_counts

    prompt_roles = (Role.TEXT_PROMPT, Role.IMAGE_PROMPT)
    values: dict[str, list[float]] = {"response/text": [], "response/image": []}
    for start in range(0, len(examples), 64):
        roles = adapter.encode(examples[start : start + 64])["roles"]
        n = role_counts(roles, prompt_roles).double()
        for name in values:
            spec = quantity(name)
            take = spec.samples(roles)
            m = role_counts(roles, spec.roles).double()
            joint = n + m
            value = torch.log2(joint / n) / torch.log2(joint)
            values[name] += value[take].tolist()
    return {name: float(np.mean(v)) for name, v in values.items() if v}


def part_toy(path: str) -> None:
    from unifyreg.adapters.toy import ToyAdapter

    adapter = ToyAdapter.load(path)
    examples, _ = load_examples("toy", "probe_set")
    model_tables(adapter, examples, "Toy base")


def part_janus() -> None:
    from unifyreg.adapters.janus import JanusAdapter, save_tiny_janus

    with tempfile.TemporaryDirectory() as directory:
        adapter = JanusAdapter.load(save_tiny_janus(directory))
        examples, _ = load_examples("toy", "probe_set")
        model_tables(adapter, examples, "Tiny random Janus (d = 32, 2 layers)")


# ---------------------------------------------------------------------- the loss


def part_loss(path: str, steps: int, batches: int, batch_size: int) -> None:
    from unifyreg.adapters.toy import ToyAdapter
    from unifyreg.losses import divergence_loss

    adapter = ToyAdapter.load(path)
    data, _ = load_examples("toy", "data")
    fixed = [adapter.encode(data[i * batch_size : (i + 1) * batch_size]) for i in range(batches)]
    floor = count_only_proxy(adapter, data[: batches * batch_size])
    print(
        f"### L_div (order 2, float64) on {batches} fixed batches of {batch_size} `finetune` "
        f"examples; Adam lr 1e-3, {steps} steps on L_div alone, all weights\n"
    )
    print(
        "(count-only response gap of these batches: "
        f"({floor['response/text']:.3f} - {floor['response/image']:.3f})^2 = "
        f"{(floor['response/text'] - floor['response/image']) ** 2:.4f})\n"
    )
    print(
        "| bandwidth | L_div start (encoding + response) | grad norm, hidden states | "
        "grad norm, weights | L_div after (encoding + response) | grad norm after | change | "
        "task loss before -> after |"
    )
    print("|---|---|---|---|---|---|---|---|")
    initial = copy.deepcopy(adapter.model.state_dict())

    def measure(rule: str) -> tuple[float, ...]:
        """Means over the batches: L_div, its two parts, the gradient norms, the task loss."""
        rows = []
        for batch in fixed:
            out = adapter.forward(batch)
            parts = [
                divergence_loss(out.hidden_layers, out.roles, parts=(p,), bandwidth=rule)[0]
                for p in ("encoding", "response")
            ]
            value = parts[0] + parts[1]
            grads = torch.autograd.grad(
                value, [*out.hidden_layers, *adapter.model.parameters()], allow_unused=True
            )
            norms = [
                math.sqrt(sum(float(g.pow(2).sum()) for g in group if g is not None))
                for group in (grads[: len(out.hidden_layers)], grads[len(out.hidden_layers) :])
            ]
            task = out.task_loss.item()
            rows.append([value.item(), parts[0].item(), parts[1].item(), *norms, task])
        return tuple(np.mean(rows, axis=0).tolist())

    def train(rule: str | None, with_task: bool) -> None:
        optimizer = torch.optim.Adam(adapter.model.parameters(), lr=1e-3)
        for step in range(steps):
            out = adapter.forward(fixed[step % batches])
            value = out.task_loss if with_task else out.task_loss.new_zeros(())
            if rule is not None:
                div = divergence_loss(out.hidden_layers, out.roles, bandwidth=rule)[0]
                value = value + div.to(value.dtype)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()

    for with_task in (False, True):
        if with_task:
            print(f"\n### The same with L_task + L_div (w_div = 1), {steps} Adam steps\n")
            print(
                "| bandwidth | L_div start (encoding + response) | grad norm, hidden states | "
                "grad norm, weights | L_div after (encoding + response) | grad norm after "
                "| change | task loss before -> after |"
            )
            print("|---|---|---|---|---|---|---|---|")
        for rule in LOSS_RULES:
            adapter.model.load_state_dict(initial)
            adapter.model.train()
            start = measure(rule)
            train(rule, with_task)
            after = measure(rule)
            change = after[0] / start[0] if start[0] > 0 else float("nan")
            print(
                f"| `{rule}` | {start[0]:.4f} ({start[1]:.4f} + {start[2]:.4f}) | {start[3]:.3g} "
                f"| {start[4]:.3g} | {after[0]:.4f} ({after[1]:.4f} + {after[2]:.4f}) "
                f"| {after[3]:.3g} | {change:.2f}x | {start[5]:.3f} -> {after[5]:.3f} |"
            )
        if with_task:
            adapter.model.load_state_dict(initial)
            train(None, True)
            task = np.mean([adapter.forward(b).task_loss.item() for b in fixed])
            print(f"| (L_task alone) | | | | | | | 0.019 -> {task:.3f} |")
    adapter.model.load_state_dict(initial)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    sub.add_parser("synthetic")
    toy = sub.add_parser("toy")
    toy.add_argument("model_dir")
    sub.add_parser("janus")
    loss = sub.add_parser("loss")
    loss.add_argument("model_dir")
    loss.add_argument("--steps", type=int, default=60)
    loss.add_argument("--batches", type=int, default=5)
    loss.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"(presets: {PROBE_PRESETS})\n")
    if args.part == "synthetic":
        part_synthetic()
    elif args.part == "toy":
        part_toy(args.model_dir)
    elif args.part == "janus":
        part_janus()
    else:
        part_loss(args.model_dir, args.steps, args.batches, args.batch_size)


if __name__ == "__main__":
    main()
