"""Benchmark: the two-level entropy probe on a 24-layer model of real width.

Model: a random-weight ``LlamaForCausalLM`` (hidden 1024, 24 layers, 16 heads, MLP 2816,
float32, about 0.3 B parameters) behind :class:`unifyreg.adapters.toy.ToyAdapter`.
Probe set: examples built from the toy world's vocabulary with ~600-word prompts (random
words, seeded), cycling through three kinds so every probe quantity is exercised: text
prompt -> 8-word text response, text prompt -> 8 x 8 image response (64 image tokens),
and 8 x 8 image + text prompt -> one-word answer.

Each path runs :func:`unifyreg.probing.run_probe` in a fresh subprocess (``--threads``
intra-op threads; default 1, see scripts/bench_estimators_approx.py for why) on
``--measure-prompts`` examples and is extrapolated linearly to ``--prompts``:

- ``exact``: ``probe.method=exact`` with no Gram limit (``max_gram_bytes`` = 2^62: each
  layer chunk's Grams at once; the exact bounded-memory functions
  ``matrix_entropy`` / ``conditional_entropy_proxy`` with ``max_gram_bytes``, float64);
- ``chunked``: the probe's defaults, ``probe.method=exact`` with ``probe.max_gram_bytes``
  = 256 MiB;
- ``slq``: ``probe.method=slq`` (the same entries with ``method="slq"``,
  default ``SLQSettings``, float32 Grams, 256 MiB of Gram at a time);
- ``forward`` (with ``--methods forward``): the model's forward passes alone, batch by
  batch as the probe runs them, to separate the model's memory from the probe's.

Time is split into the model's forward passes (timed around ``adapter.forward``) and
everything else (role gathering and estimators). Peak memory is the peak resident size
during the probe (``VmHWM``, reset just before it: ``ru_maxrss`` would also count the
model's construction, whose own peak hid the probe's in earlier tables) minus the
resident size just before it (model and probe set already built), i.e.
the probe's extra memory, compared with one batch's hidden states ``[L + 1, B, S, d]``
float32. The exact worker also reports the effect of layer subsampling on the scores and
of token subsampling on the text-prompt entropies of the model's hidden states.

Usage: ``python scripts/bench_probe.py [--measure-prompts 16] [--prompts 64]
[--threads 1] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch

GiB = 2**30


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_resident() -> bool:
    """Reset the process's peak resident size (Linux >= 4.0: ``5`` to ``clear_refs``), so
    the peak read afterwards is the probe's, not the model construction's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_resident_bytes() -> int:
    """``VmHWM``: the peak resident size since the last reset (or since start)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_examples(count: int, prompt_words: int, words: tuple[str, ...], grid: int, seed: int):
    """Probe examples with long prompts, cycling text->text, text->image, image->text."""
    from unifyreg.toy.tasks import Example
    from unifyreg.toy.world import PALETTE

    rng = np.random.default_rng(seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(words, size=k))

    def image():
        return rng.integers(0, len(PALETTE), size=(grid, grid), dtype=np.int64)

    examples = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            examples.append(Example("text", "knowledge", text(prompt_words), response_text=text(8)))
        elif kind == 1:
            examples.append(
                Example("t2i", "composition", text(prompt_words), response_image=image())
            )
        else:
            examples.append(
                Example(
                    "understanding",
                    "attribute",
                    text(prompt_words - grid * grid),
                    prompt_image=image(),
                    response_text=text(1),
                )
            )
    return examples


def build_adapter(spec: dict):
    from unifyreg.adapters.toy import ToyAdapter
    from unifyreg.toy import WordTokenizer, WorldConfig

    try:
        from unifyreg.toy.model import ToyModelConfig
    except ImportError:  # code before the seam change (run for before/after figures)
        from unifyreg.adapters.toy import ToyModelConfig

    tokenizer = WordTokenizer.for_world(WorldConfig(grid_size=spec["grid"]))
    config = ToyModelConfig(
        hidden_size=spec["hidden"],
        num_layers=spec["layers"],
        num_heads=spec["heads"],
        intermediate_size=spec["intermediate"],
        max_positions=spec["prompt_words"] + 2 * spec["grid"] ** 2 + 32,
    )
    adapter = ToyAdapter.create(tokenizer, grid_size=spec["grid"], model_config=config, seed=0)
    return adapter, tokenizer


#: ``ProbeConfig`` settings of each path (``forward`` runs no estimator).
PATHS = {
    "exact": dict(method="exact", max_gram_bytes=2**62),
    "chunked": dict(method="exact", max_gram_bytes=GiB // 4),
    "slq": dict(method="slq", max_gram_bytes=GiB // 4),
    "forward": {},
}


def layer_subsampling(result, steps: list[int]) -> list[dict]:
    """Scores on every k-th probed layer (and the last) vs all layers."""
    from unifyreg.probing import ProbeResult, QuantityRecords
    from unifyreg.quantities import QUANTITIES

    full = result.scores()
    rows = []
    n_layers = len(result.layers)
    for step in steps:
        idx = sorted(set(range(0, n_layers, step)) | {n_layers - 1})
        records = {
            q: QuantityRecords(r.values[:, idx], r.normalized[:, idx], list(r.categories), r.tokens)
            for q, r in result.records.items()
            if q in QUANTITIES
        }
        sub = ProbeResult(tuple(result.layers[i] for i in idx), records).scores()
        rows.append(
            dict(
                step=step,
                layers=len(idx),
                **{f"{k}_full": full[k] for k in full},
                **{f"{k}_sub": sub[k] for k in sub},
            )
        )
    return rows


def token_subsampling(adapter, examples, batch_size: int, keeps: list[int]) -> list[dict]:
    """Text-prompt entropies of the model's own hidden states: all tokens vs a subsample."""
    from unifyreg.estimators import matrix_entropy, subsample_tokens
    from unifyreg.roles import Role, role_segments

    texts = [e for e in examples if e.prompt_image is None][:batch_size]
    with torch.no_grad():
        out = adapter.forward(adapter.encode(texts))
    Z, mask = role_segments(out.hidden_states, out.roles, Role.TEXT_PROMPT)
    mask = mask.expand(Z.shape[0], *mask.shape)
    full = matrix_entropy(Z, mask=mask)  # [layers, B]
    counts = mask[0].sum(-1).double()
    rows = []
    for keep in keeps:
        Z_sub, mask_sub = subsample_tokens(Z, mask[0], keep, generator=0)
        sub = matrix_entropy(Z_sub, mask=mask_sub.expand(Z.shape[0], *mask_sub.shape))
        kept = mask_sub.sum(-1).double()
        norm_full, norm_sub = full / torch.log2(counts), sub / torch.log2(kept)
        layer_full, layer_sub = full.mean(1).numpy(), sub.mean(1).numpy()
        ra, rb = np.argsort(np.argsort(layer_full)), np.argsort(np.argsort(layer_sub))
        rows.append(
            dict(
                keep=keep,
                tokens=float(counts.mean()),
                mean_change_bits=float((sub - full).mean()),
                mean_norm_change=float((norm_sub - norm_full).mean()),
                max_norm_change=float((norm_sub - norm_full).abs().max()),
                layer_spearman=float(np.corrcoef(ra, rb)[0, 1]),
            )
        )
    return rows


def worker(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    from unifyreg.config import ProbeConfig
    from unifyreg.probing import run_probe

    adapter, tokenizer = build_adapter(spec)
    examples = build_examples(
        spec["measure_prompts"], spec["prompt_words"], tokenizer.words, spec["grid"], seed=0
    )
    forward_time = [0.0]
    shapes = []
    original_forward = adapter.forward

    def timed_forward(*args, **kwargs):
        start = time.perf_counter()
        out = original_forward(*args, **kwargs)
        forward_time[0] += time.perf_counter() - start
        layers = out.hidden_layers  # per-layer tensors: do not stack a copy here
        shapes.append((len(layers), *layers[0].shape))
        return out

    adapter.forward = timed_forward
    chunking = (
        {} if spec["layers_per_chunk"] is None else {"layers_per_chunk": spec["layers_per_chunk"]}
    )
    layers = {} if spec.get("probe_layers") is None else {"layers": spec["probe_layers"]}
    cfg = ProbeConfig(batch_size=spec["batch_size"], **chunking, **layers, **PATHS[spec["method"]])
    before = resident_bytes()
    reset_peak_resident()
    start = time.perf_counter()
    if spec["method"] == "forward":  # the model's forward passes alone, as the probe runs them
        adapter.model.eval()
        with torch.no_grad():
            for i in range(0, len(examples), cfg.batch_size):
                output = adapter.forward(adapter.encode(examples[i : i + cfg.batch_size]))
                del output
        result = None
    else:
        result = run_probe(adapter, examples, cfg)
    total = time.perf_counter() - start
    peak = peak_resident_bytes() - before
    adapter.forward = original_forward
    hidden_bytes = max(math.prod(s) * 4 for s in shapes)
    out = dict(
        spec=spec,
        total_s=total,
        forward_s=forward_time[0],
        peak_extra_bytes=peak,
        batch_hidden_bytes=hidden_bytes,
        batch_hidden_shape=list(max(shapes, key=math.prod)),
        params=sum(p.numel() for p in adapter.model.parameters()),
        result=None if result is None else result.to_dict(),
        scores={} if result is None else result.scores(),
    )
    if spec["method"] == "exact" and spec.get("probe_layers") is None:
        out["layer_subsampling"] = layer_subsampling(result, [2, 4, 8])
        out["token_subsampling"] = token_subsampling(
            adapter, examples, spec["batch_size"], [300, 150]
        )
    return out


def run_worker(spec: dict) -> dict:
    threads = str(spec["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    env["OPENBLAS_NUM_THREADS"] = threads
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['method']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_description(threads: int) -> str:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} threads), "
        f"transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def compare(exact: dict, other: dict) -> tuple[float, float]:
    """Max |difference| (bits) and max relative difference of per-sample raw values."""
    worst_abs, worst_rel = 0.0, 0.0
    if other["result"] is None:
        return math.nan, math.nan
    for q, rec in exact["result"]["records"].items():
        a = np.asarray(rec["values"], dtype=float)
        b = np.asarray(other["result"]["records"][q]["values"], dtype=float)
        if a.size == 0:
            continue
        diff = np.abs(a - b)
        worst_abs = max(worst_abs, float(diff.max()))
        if q.startswith("encoding"):
            worst_rel = max(worst_rel, float((diff / np.abs(a)).max()))
    return worst_abs, worst_rel


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64, help="probe set size to report")
    parser.add_argument("--measure-prompts", type=int, default=16, help="prompts actually run")
    parser.add_argument("--prompt-words", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers-per-chunk", type=int, default=None, help="default: ProbeConfig's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--probe-layers",
        default="",
        help="probe only these layers, e.g. 0,6,12,18,24 (default: all)",
    )
    parser.add_argument("--methods", default="exact,chunked,slq")
    parser.add_argument(
        "--epoch-examples", type=int, nargs="+", default=[1000, 10000], help="epoch sizes"
    )
    parser.add_argument("--json", help="also write all results to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    base = dict(
        hidden=1024,
        layers=24,
        heads=16,
        intermediate=2816,
        grid=8,
        prompt_words=args.prompt_words,
        measure_prompts=args.measure_prompts,
        batch_size=args.batch_size,
        layers_per_chunk=args.layers_per_chunk,
        threads=args.threads,
        probe_layers=[int(x) for x in args.probe_layers.split(",")] if args.probe_layers else None,
    )
    print(f"Machine: {machine_description(args.threads)}")
    print(f"Command: python {' '.join(sys.argv)}")
    results = {}
    for method in args.methods.split(","):
        if method not in PATHS:
            parser.error(f"unknown method {method!r}; valid: {', '.join(PATHS)}")
        results[method] = run_worker(dict(base, method=method))
        print(f"  ran {method}: {results[method]['total_s']:.1f} s", flush=True)
    scale = args.prompts / args.measure_prompts
    first = next(iter(results.values()))
    shape = first["batch_hidden_shape"]
    print(
        f"\nModel: {first['params'] / 1e6:.0f} M parameters; {args.measure_prompts} prompts "
        f"measured, times scaled x{scale:g} to {args.prompts}; one batch's hidden states "
        f"{shape} float32 = {first['batch_hidden_bytes'] / 2**20:.0f} MB\n"
    )
    forward_per_example = first["forward_s"] / args.measure_prompts
    epoch_header = " | ".join(f"share of a {e}-example epoch" for e in args.epoch_examples)
    print(
        f"| path | probe s ({args.prompts} prompts) | forward s | estimators s | {epoch_header} "
        "| peak extra (MB) | peak / batch hidden states | max abs diff vs exact (bits) "
        "| max rel diff (encodings) |\n" + "|---" * (8 + len(args.epoch_examples)) + "|"
    )
    table = []
    for method, r in results.items():
        total, forward = r["total_s"] * scale, r["forward_s"] * scale
        epochs = [3 * forward_per_example * e for e in args.epoch_examples]
        shares = [total / epoch for epoch in epochs]
        diff_abs, diff_rel = compare(results["exact"], r) if "exact" in results else (0, 0)
        row = dict(
            method=method,
            probe_s=total,
            forward_s=forward,
            estimators_s=total - forward,
            epoch_shares=shares,
            peak_mb=r["peak_extra_bytes"] / 2**20,
            peak_over_hidden=r["peak_extra_bytes"] / r["batch_hidden_bytes"],
            max_abs_diff_bits=diff_abs,
            max_rel_diff_encodings=diff_rel,
            scores=r["scores"],
        )
        table.append(row)
        share_cells = " | ".join(f"{100 * s:.1f} %" for s in shares)
        print(
            f"| {method} | {total:.0f} | {forward:.0f} | {total - forward:.0f} | {share_cells} "
            f"| {row['peak_mb']:.0f} | {row['peak_over_hidden']:.2f} | {diff_abs:.4f} "
            f"| {100 * diff_rel:.3f} % |"
        )
    print(
        "\nEpoch assumption: E training examples of the same length, one forward + backward "
        "pass each at ~3x the cost of the probe's forward pass per example."
    )
    print("\nScores per path:")
    for row in table:
        if row["scores"]:
            scores = ", ".join(f"{k}={v:.4f}" for k, v in row["scores"].items())
            print(f"  {row['method']}: {scores}")
    if "exact" in results and "layer_subsampling" in results["exact"]:
        print("\n| probed layers | " + " | ".join(results["exact"]["scores"]) + " |")
        print("|---" * (1 + len(results["exact"]["scores"])) + "|")
        full = results["exact"]["scores"]
        print(f"| all {shape[0]} | " + " | ".join(f"{v:.4f}" for v in full.values()) + " |")
        for row in results["exact"]["layer_subsampling"]:
            cells = " | ".join(
                f"{row[k + '_sub']:.4f} ({row[k + '_sub'] - row[k + '_full']:+.4f})" for k in full
            )
            print(f"| every {row['step']} ({row['layers']}) | {cells} |")
        print(
            "\n| text-prompt tokens kept | of (mean) | mean H change (bits) "
            "| mean normalised change | max normalised change | layer-order Spearman rho |\n"
            "|---|---|---|---|---|---|"
        )
        for row in results["exact"]["token_subsampling"]:
            print(
                f"| {row['keep']} | {row['tokens']:.0f} | {row['mean_change_bits']:+.3f} "
                f"| {row['mean_norm_change']:+.4f} | {row['max_norm_change']:.4f} "
                f"| {row['layer_spearman']:.3f} |"
            )
    if args.json:
        for r in results.values():
            r.pop("result", None)
        with open(args.json, "w") as f:
            json.dump({"table": table, "workers": results, "argv": sys.argv}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
