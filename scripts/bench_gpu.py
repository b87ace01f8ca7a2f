"""Benchmark: the entropy estimators on a CUDA GPU (float64 vs float32, exact vs SLQ).

The GPU half of issue 8's tables. For every (n tokens, d width) of the grid, the
alpha = 1.01 entropy (median bandwidth, bits) of all 24 layers of synthetic hidden states
(the same generator as ``scripts/bench_estimators_approx.py``: isotropic at the bottom,
strongly anisotropic at the top, shared massive activations) is computed by

- ``exact64``: :func:`unifyreg.estimators.matrix_entropy` in float64 (one batched Gram
  and one batched ``eigvalsh`` over the 24 layers);
- ``exact32``: the same in float32 (the accuracy column compares it with ``exact64``);
- ``chunked64``: :func:`unifyreg.estimators.matrix_entropy` with ``max_gram_bytes``, float64, with a
  1 GiB Gram budget (bounded memory; equal to ``exact64`` to round-off);
- ``slq``: :func:`unifyreg.estimators.matrix_entropy` with ``method="slq"``, default ``SLQSettings``
  (float32 Gram).

Time: CUDA-synchronised wall time, best of ``--repeats`` after one warm-up call. Peak
memory: ``torch.cuda.max_memory_allocated`` during the call minus the allocation before
it (the input stays resident), i.e. the call's extra device memory. Relative error:
``max_l |H - H_exact64| / H_exact64``.

With ``--probe``, also the whole-model probe of ``scripts/bench_probe.py`` on the GPU: a
24-layer, d = 1024 random Llama on ``--prompts`` examples of ~600 words, the model in
float32 and in bfloat16 (the probe casts hidden states to its estimator dtype), seconds
per probe and peak extra device memory against one batch's hidden states.

With ``--epoch-share``, the probe's cost in training steps at Janus-Pro 1B's sizes (24
layers, d 2048, 576-token images; :func:`epoch_share_table`): the epoch length from which
the probe with its defaults on ``--prompts`` examples costs at most 5 % of it.

Usage: ``python scripts/bench_gpu.py [--quick] [--repeats 3] [--probe] [--epoch-share]
[--json FILE]``; ``python scripts/bench_gpu.py --all --json gpu.json`` runs everything in
one command (the grid at float32 and float64, the probe of the 24-layer d = 1024 model on
64 prompts of 600 words, then the epoch share; about 6-8 minutes on an H200, most of it
building the models). Needs a CUDA device; exits with a message otherwise
(``--cpu-smoke`` runs the epoch share's code path on the CPU at tiny sizes).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from unifyreg.estimators import matrix_entropy

ALPHA = 1.01
GiB = 2**30
GRID = [(n, d) for n in (576, 1152, 2304, 4096) for d in (1024, 2048)]
QUICK_GRID = [(576, 1024), (2304, 1024)]
METHODS = ("exact64", "exact32", "chunked64", "slq")


def call(method: str, Z: torch.Tensor) -> torch.Tensor:
    """One estimator call on ``Z`` ``[L, n, d]`` (float32 on the device)."""
    if method == "exact64":
        return matrix_entropy(Z, alpha=ALPHA, dtype=torch.float64)
    if method == "exact32":
        return matrix_entropy(Z, alpha=ALPHA, dtype=torch.float32)
    if method == "chunked64":
        return matrix_entropy(Z, alpha=ALPHA, max_gram_bytes=GiB)
    if method == "slq":
        return matrix_entropy(Z, alpha=ALPHA, max_gram_bytes=GiB, method="slq")
    raise ValueError(method)


def timed(fn, repeats: int) -> tuple[float, float, torch.Tensor]:
    """(best seconds, peak extra bytes, output) of ``fn`` on the current CUDA device."""
    out = fn()  # warm-up: cuSOLVER/cuBLAS handles and workspaces
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    best = math.inf
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() - base
    return best, peak, out


def estimator_table(grid, repeats: int) -> list[dict]:
    import bench_estimators_approx as approx  # a sibling script: scripts/ is sys.path[0]

    layers = list(range(approx.TOTAL_LAYERS))
    print(
        "| n | d | exact f64 (s, 24 layers) | exact f64 peak (MB) | exact f32 (s) "
        "| exact f32 max rel. err. | chunked f64 (s) | chunked peak (MB) | SLQ (s) "
        "| SLQ peak (MB) | SLQ max rel. err. | SLQ speedup vs f64 | SLQ speedup vs f32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for n, d in grid:
        Z = approx.hidden_like(n, d, layers).cuda()
        with torch.no_grad():
            result = {m: timed(functools.partial(call, m, Z), repeats) for m in METHODS}
        exact = result["exact64"][2].double().cpu().numpy()
        rel = {
            m: float(np.max(np.abs(result[m][2].double().cpu().numpy() - exact) / np.abs(exact)))
            for m in METHODS
        }
        row = dict(
            n=n,
            d=d,
            **{f"{m}_s": result[m][0] for m in METHODS},
            **{f"{m}_peak_mb": result[m][1] / 2**20 for m in METHODS},
            **{f"{m}_max_rel_error": rel[m] for m in METHODS},
        )
        rows.append(row)
        print(
            f"| {n} | {d} | {row['exact64_s']:.3f} | {row['exact64_peak_mb']:.0f} "
            f"| {row['exact32_s']:.3f} | {100 * rel['exact32']:.2g} % "
            f"| {row['chunked64_s']:.3f} | {row['chunked64_peak_mb']:.0f} "
            f"| {row['slq_s']:.3f} | {row['slq_peak_mb']:.0f} | {100 * rel['slq']:.3f} % "
            f"| {row['exact64_s'] / row['slq_s']:.1f} | {row['exact32_s'] / row['slq_s']:.1f} |",
            flush=True,
        )
        del Z
        torch.cuda.empty_cache()
    return rows


def probe_table(prompts: int, batch_size: int, prompt_words: int) -> list[dict]:
    """The whole-model probe on the GPU, model in float32 and bfloat16."""
    import bench_probe as bench  # a sibling script

    from unifyreg.config import ProbeConfig
    from unifyreg.probing import run_probe

    rows = []
    print(
        "\n| model dtype | prompts | batch | seconds per probe | forward share "
        "| peak extra (MB) | one batch's hidden states (MB) | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        spec = dict(grid=8, hidden=1024, layers=24, heads=16, intermediate=2816,
                    prompt_words=prompt_words)  # fmt: skip
        adapter, tokenizer = bench.build_adapter(spec)
        adapter.model.to(device="cuda", dtype=dtype)
        examples = bench.build_examples(prompts, prompt_words, tokenizer.words, 8, seed=0)
        cfg = ProbeConfig(batch_size=batch_size)
        forward_time = [0.0]
        original = adapter.forward

        def forward(*args, original=original, forward_time=forward_time, **kwargs):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = original(*args, **kwargs)
            torch.cuda.synchronize()
            forward_time[0] += time.perf_counter() - start
            return out

        adapter.forward = forward
        run_probe(adapter, examples[:batch_size], cfg)  # warm-up
        torch.cuda.synchronize()
        forward_time[0] = 0.0
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        run_probe(adapter, examples, cfg)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - base
        batch = adapter.encode(examples[:batch_size])
        seq = batch["input_ids"].shape[1]
        layers = adapter.num_layers + 1
        hidden_bytes = (
            layers * batch_size * seq * adapter.hidden_size * (torch.finfo(dtype).bits // 8)
        )
        row = dict(
            dtype=str(dtype).removeprefix("torch."),
            prompts=prompts,
            batch_size=batch_size,
            seconds=seconds,
            forward_seconds=forward_time[0],
            peak_extra_mb=peak / 2**20,
            hidden_states_mb=hidden_bytes / 2**20,
        )
        rows.append(row)
        print(
            f"| {row['dtype']} | {prompts} | {batch_size} | {seconds:.2f} "
            f"| {100 * forward_time[0] / seconds:.0f} % | {row['peak_extra_mb']:.0f} "
            f"| {row['hidden_states_mb']:.0f} | {peak / hidden_bytes:.2f} |",
            flush=True,
        )
        del adapter
        torch.cuda.empty_cache()
    return rows


#: Janus-Pro 1B's language model (DeepSeek-LLM 1.5B): 24 layers, d 2048, 16 heads, MLP
#: 5632; its images are 24 x 24 = 576 tokens.
JANUS_1B = dict(grid=24, hidden=2048, layers=24, heads=16, intermediate=5632)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def epoch_share_table(
    device: str, prompts: int, train_batch: int, prompt_words: int, spec: dict | None = None
) -> dict:
    """The probe's cost in training steps at Janus-Pro 1B's sizes (``JANUS_1B``).

    One random-weight model of those sizes (float32, TF32 matmuls allowed on CUDA) times
    (a) one full fine-tuning step (forward + backward + AdamW, LoRA off) on ``train_batch``
    examples of ``scripts/bench_probe.py``'s kinds with 576-token images, median of 3
    after a warm-up, and (b) the probe with its defaults (``ProbeConfig()``) on ``prompts``
    such examples. ``probe_steps`` = probe seconds / step seconds: the probe costs at most
    5 % of an epoch of ``20 * probe_steps`` steps or more (``break_even_steps``)."""
    import bench_probe as bench  # a sibling script

    from unifyreg.config import ProbeConfig
    from unifyreg.probing import run_probe

    spec = dict(JANUS_1B if spec is None else spec, prompt_words=prompt_words)
    if prompt_words <= spec["grid"] ** 2:
        raise ValueError("prompt_words must exceed the image's token count (grid**2)")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    adapter, tokenizer = bench.build_adapter(spec)
    adapter.model.to(device=device)
    examples = bench.build_examples(
        max(prompts, 4 * train_batch), prompt_words, tokenizer.words, spec["grid"], seed=0
    )
    optimizer = torch.optim.AdamW(adapter.model.parameters(), lr=1e-5)
    batches = [adapter.encode(examples[i * train_batch : (i + 1) * train_batch]) for i in range(4)]
    adapter.model.train()
    step_times = []
    for i, batch in enumerate(batches):
        _sync(device)
        start = time.perf_counter()
        loss = adapter.forward(batch).task_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        if i > 0:  # the first step warms up
            step_times.append(time.perf_counter() - start)
    del optimizer
    step = sorted(step_times)[len(step_times) // 2]
    adapter.model.eval()
    cfg = ProbeConfig()
    run_probe(adapter, examples[: cfg.batch_size], cfg)  # warm-up
    _sync(device)
    start = time.perf_counter()
    run_probe(adapter, examples[:prompts], cfg)
    _sync(device)
    probe = time.perf_counter() - start
    row = dict(
        sizes={k: spec[k] for k in ("layers", "hidden", "heads", "intermediate", "grid")},
        train_batch=train_batch,
        tokens_per_batch=int(batches[0]["input_ids"].numel()),
        step_seconds=step,
        prompts=prompts,
        probe_seconds=probe,
        probe_steps=probe / step,
        break_even_steps=math.ceil(20 * probe / step),
    )
    print(
        "\n| sizes | train batch (positions) | step (s) | probe prompts | probe (s) "
        "| probe in steps | epoch (steps) at which the probe is 5 % |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {spec['layers']} x {spec['hidden']}, {spec['grid'] ** 2} image tokens "
        f"| {train_batch} ({row['tokens_per_batch']}) | {step:.3f} | {prompts} | {probe:.2f} "
        f"| {row['probe_steps']:.1f} | {row['break_even_steps']} |",
        flush=True,
    )
    del adapter
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two sizes only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probe", action="store_true", help="also the whole-model probe")
    parser.add_argument(
        "--all",
        action="store_true",
        help="the estimator grid, the whole-model probe and the epoch share (one command)",
    )
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--prompt-words", type=int, default=600)
    parser.add_argument("--skip-estimators", action="store_true")
    parser.add_argument(
        "--epoch-share",
        action="store_true",
        help="the probe's cost in training steps, Janus-Pro 1B sizes",
    )
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--epoch-prompt-words", type=int, default=640)
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run --epoch-share on the CPU at tiny sizes (checks the code path; no figures)",
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        tiny = dict(grid=4, hidden=32, layers=2, heads=2, intermediate=64)
        epoch_share_table("cpu", 6, 2, 24, tiny)
        return 0
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA device; none is visible.", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    print(
        f"Device: {props.name}, {props.total_memory / GiB:.0f} GiB, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}\n"
    )
    out: dict = {"device": props.name, "torch": torch.__version__}
    if not args.skip_estimators:
        out["estimators"] = estimator_table(QUICK_GRID if args.quick else GRID, args.repeats)
    if args.probe or args.all:
        out["probe"] = probe_table(args.prompts, args.batch_size, args.prompt_words)
    if args.epoch_share or args.all:
        out["epoch_share"] = epoch_share_table(
            "cuda", args.prompts, args.train_batch, args.epoch_prompt_words
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
