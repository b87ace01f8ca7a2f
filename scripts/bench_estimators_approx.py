"""Benchmark: exact vs bounded-memory exact vs SLQ entropy estimators at real model sizes.

For every (n tokens, d width) of the grid, on synthetic "hidden states" of a 24-layer
stack (layer ``l`` has feature scales ``j^(-1.5 l / 23)``, i.e. isotropic at the bottom
and strongly anisotropic at the top, plus four shared massive-activation features and a
rank-16 component; float32, seeded), three paths compute the alpha = 1.01 entropy of
every layer's sequence (median bandwidth, bits):

- ``exact``: :func:`unifyreg.estimators.matrix_entropy` (float64, all layers at once);
- ``chunked``: :func:`unifyreg.estimators.matrix_entropy` with ``max_gram_bytes`` (float64, the same
  values to round-off, ``max_gram_bytes`` = 1 GiB, fast no-gradient Gram);
- ``slq``: :func:`unifyreg.estimators.matrix_entropy` with ``method="slq"`` (default
  ``SLQSettings``, float32 Gram, 1 GiB chunks).

Each (path, n, d) runs in a fresh subprocess with ``--threads`` intra-op threads (torch,
OpenMP, MKL and OpenBLAS; default 1: on a shared machine two OpenMP threads stall for
seconds whenever another process holds a core): time = best of ``--repeats`` calls on
``layers_timed`` layers (spread over the 24; all 24 where affordable), reported per layer
and extrapolated linearly to 24 layers where fewer were timed (marked ``*``). Peak memory
= ``ru_maxrss`` (resource.getrusage, the process's resident high-water mark) after the
first call minus the resident size just before it, i.e. the extra memory of the call over
its float32 input. The relative error is ``max_l |H_slq - H_exact| / H_exact`` over the
timed layers. A second table compares with the per-layer NumPy loops of
``scripts/bench_estimators.py`` at one size, and a third measures token subsampling.

Usage: ``python scripts/bench_estimators_approx.py [--quick] [--repeats N] [--threads T]
[--json FILE]``; ``--profile N D`` prints where the time of each path goes instead,
``--sweep N D`` the cost and error of SLQ settings around the defaults,
``--median-sample N D`` the sampled median bandwidth's error and its effect on H, and
``--ratio N D`` exact against SLQ timed in one process in interleaved rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from unifyreg.estimators import (
    matrix_entropy,
    subsample_tokens,
)

ALPHA = 1.01
TOTAL_LAYERS = 24
GiB = 2**30
#: (n, d) -> layers timed per call (the exact path at n = 4096 takes seconds per layer).
FULL_GRID = {
    (576, 1024): 24,
    (576, 2048): 24,
    (1152, 1024): 24,
    (1152, 2048): 24,
    (2304, 1024): 6,
    (2304, 2048): 6,
    (4096, 1024): 3,
    (4096, 2048): 3,
}
QUICK_GRID = {(576, 1024): 4, (1152, 1024): 2}
METHODS = ("exact", "chunked", "slq")


def hidden_like(n: int, d: int, layers: list[int], seed: int = 0) -> torch.Tensor:
    """Synthetic float32 hidden states ``[len(layers), n, d]`` of the given layer indices
    (each layer from its own seed, so a subset of layers is the same data)."""
    out = torch.empty(len(layers), n, d)
    for i, layer in enumerate(layers):
        g = torch.Generator().manual_seed(seed * 1000 + layer)
        power = 1.5 * layer / (TOTAL_LAYERS - 1)
        scales = torch.arange(1, d + 1, dtype=torch.float32) ** -power
        z = torch.randn(n, d, generator=g) * scales
        z[:, :4] += 10.0 * torch.randn(4, generator=g)  # shared massive activations
        z += 0.3 * (torch.randn(n, 16, generator=g) @ torch.randn(16, d, generator=g)) * scales
        out[i] = z
    return out


def spread_layers(count: int) -> list[int]:
    """``count`` layer indices spread over the 24 (all of them when count >= 24)."""
    if count >= TOTAL_LAYERS:
        return list(range(TOTAL_LAYERS))
    return sorted({round(x) for x in np.linspace(0, TOTAL_LAYERS - 1, count)})


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def call(method: str, Z: torch.Tensor) -> torch.Tensor:
    if method == "exact":
        return matrix_entropy(Z, alpha=ALPHA)
    if method == "chunked":
        return matrix_entropy(Z, alpha=ALPHA, max_gram_bytes=GiB)
    if method == "slq":
        return matrix_entropy(Z, alpha=ALPHA, max_gram_bytes=GiB, method="slq")
    raise ValueError(method)


def worker(spec: dict) -> dict:
    """One measurement in this (fresh) process: a (method, n, d) row, or a whole table."""
    torch.set_num_threads(spec["threads"])
    if spec["method"] == "numpy":
        return numpy_table(spec["n"], spec["d"], spec["layers"], spec["repeats"])
    if spec["method"] == "subsampling":
        return {"rows": subsampling_table(spec["n"], spec["d"], spec["layers"], spec["keeps"])}
    if spec["method"] == "profile":
        return profile_phases(spec["n"], spec["d"], spec["layers"])
    if spec["method"] == "median_sample":
        return median_sample_table(
            spec["n"], spec["d"], spec["layers"], spec["pairs"], spec["seeds"]
        )
    if spec["method"] == "ratio":
        return ratio_table(spec["n"], spec["d"], spec["layers"], spec["repeats"])
    if spec["method"] == "sweep":
        return {"rows": sweep_table(spec["n"], spec["d"], spec["layers"], spec["repeats"])}
    layers = spread_layers(spec["layers"])
    Z = hidden_like(spec["n"], spec["d"], layers)
    with torch.no_grad():
        before = resident_bytes()
        start = time.perf_counter()
        values = call(spec["method"], Z)
        times = [time.perf_counter() - start]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        for _ in range(spec["repeats"] - 1):
            start = time.perf_counter()
            call(spec["method"], Z)
            times.append(time.perf_counter() - start)
    return {
        **spec,
        "layers_timed": len(layers),
        "times": times,
        "best_s": min(times),
        "peak_extra_bytes": peak,
        "input_bytes": Z.numel() * Z.element_size(),
        "values": values.tolist(),
    }


def run_worker(spec: dict) -> dict:
    """Run :func:`worker` in a fresh interpreter (clean memory high-water mark)."""
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
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.strip().splitlines()
    for line in lines[:-1]:  # tables printed by the worker
        print(line, flush=True)
    return json.loads(lines[-1])


def load_numpy_loops():
    path = Path(__file__).with_name("bench_estimators.py")
    spec = importlib.util.spec_from_file_location("bench_estimators", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine_description(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} threads), "
        f"numpy {np.__version__}, Python {platform.python_version()}"
    )


def best_time(fn, repeats: int):
    best, out = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


# ---------------------------------------------------------------------- tables

MAIN_HEADER = (
    "| n | d | layers timed | exact s/layer | exact 24 layers (s) | exact peak extra (MB) "
    "| chunked s/layer | chunked peak extra (MB) | SLQ s/layer | SLQ 24 layers (s) "
    "| SLQ peak extra (MB) | SLQ speedup vs exact | SLQ max rel. error | SLQ mean rel. error |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main_table(grid: dict, repeats: int, threads: int) -> list[dict]:
    rows = []
    print(MAIN_HEADER, flush=True)
    for (n, d), layers in grid.items():
        result = {}
        for method in METHODS:
            spec = dict(method=method, n=n, d=d, layers=layers, repeats=repeats, threads=threads)
            result[method] = run_worker(spec)
        exact = np.asarray(result["exact"]["values"])
        slq = np.asarray(result["slq"]["values"])
        chunked = np.asarray(result["chunked"]["values"])
        rel = np.abs(slq - exact) / np.abs(exact)
        timed = result["exact"]["layers_timed"]
        per_layer = {m: result[m]["best_s"] / timed for m in METHODS}
        row = dict(
            n=n,
            d=d,
            layers_timed=timed,
            extrapolated=timed < TOTAL_LAYERS,
            **{f"{m}_s_per_layer": per_layer[m] for m in METHODS},
            **{f"{m}_times": result[m]["times"] for m in METHODS},
            **{f"{m}_peak_mb": result[m]["peak_extra_bytes"] / 2**20 for m in METHODS},
            speedup=per_layer["exact"] / per_layer["slq"],
            max_rel_error=float(rel.max()),
            mean_rel_error=float(rel.mean()),
            chunked_max_abs_diff=float(np.abs(chunked - exact).max()),
            entropy_range=[float(exact.min()), float(exact.max())],
        )
        rows.append(row)
        star = "*" if row["extrapolated"] else ""
        print(
            f"| {n} | {d} | {timed} | {per_layer['exact']:.3f} "
            f"| {per_layer['exact'] * TOTAL_LAYERS:.1f}{star} | {row['exact_peak_mb']:.0f} "
            f"| {per_layer['chunked']:.3f} | {row['chunked_peak_mb']:.0f} "
            f"| {per_layer['slq']:.3f} | {per_layer['slq'] * TOTAL_LAYERS:.1f}{star} "
            f"| {row['slq_peak_mb']:.0f} | {row['speedup']:.1f} "
            f"| {100 * row['max_rel_error']:.3f} % | {100 * row['mean_rel_error']:.3f} % |",
            flush=True,
        )
    return rows


def numpy_table(n: int, d: int, layers: int, repeats: int) -> dict:
    """Per-layer NumPy loops of bench_estimators.py vs the batched paths, one size."""
    loops = load_numpy_loops()
    Z = hidden_like(n, d, spread_layers(layers))
    X = Z.double().numpy()
    t_research, h_research = best_time(lambda: np.array([loops.research_entropy(x) for x in X]), 1)
    t_tuned, _ = best_time(lambda: np.array([loops.tuned_entropy(x) for x in X]), 1)
    t_exact, h_exact = best_time(lambda: matrix_entropy(Z, alpha=ALPHA).numpy(), repeats)
    t_chunked, _ = best_time(lambda: matrix_entropy(Z, alpha=ALPHA), repeats)
    t_slq, h_slq = best_time(lambda: matrix_entropy(Z, alpha=ALPHA, method="slq").numpy(), repeats)
    row = dict(
        n=n,
        d=d,
        layers=layers,
        research_s=t_research / layers,
        tuned_s=t_tuned / layers,
        exact_s=t_exact / layers,
        chunked_s=t_chunked / layers,
        slq_s=t_slq / layers,
        exact_vs_research_max_abs_diff=float(np.abs(h_exact - h_research).max()),
        slq_max_rel_error=float((np.abs(h_slq - h_exact) / h_exact).max()),
    )
    print(
        "| n | d | layers | research loop s/layer | tuned loop s/layer | exact s/layer "
        "| chunked s/layer | SLQ s/layer | SLQ vs tuned loop | SLQ vs research loop |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {n} | {d} | {layers} | {row['research_s']:.3f} | {row['tuned_s']:.3f} "
        f"| {row['exact_s']:.3f} | {row['chunked_s']:.3f} | {row['slq_s']:.3f} "
        f"| {row['tuned_s'] / row['slq_s']:.1f}x | {row['research_s'] / row['slq_s']:.1f}x |",
        flush=True,
    )
    return row


def subsampling_table(n: int, d: int, layers: int, keeps: list[int]) -> list[dict]:
    """Entropy of a token subsample vs all tokens, per layer (exact, float64)."""
    Z = hidden_like(n, d, spread_layers(layers))
    full = matrix_entropy(Z, alpha=ALPHA)
    full_norm = full / math.log2(n)
    rows = []
    print(
        "| tokens kept | of n | time vs all tokens | mean H change (bits) "
        "| mean normalised H change | max normalised H change | layer-order Spearman rho |\n"
        "|---|---|---|---|---|---|---|",
        flush=True,
    )
    t_full, _ = best_time(lambda: matrix_entropy(Z, alpha=ALPHA), 1)
    for keep in keeps:
        Z_sub, _ = subsample_tokens(Z, None, keep, generator=0)
        t_sub, sub = best_time(lambda Z_sub=Z_sub: matrix_entropy(Z_sub, alpha=ALPHA), 1)
        sub_norm = sub / math.log2(keep)
        rho = spearman(full.numpy(), sub.numpy())
        row = dict(
            keep=keep,
            n=n,
            time_ratio=t_sub / t_full,
            mean_change_bits=float((sub - full).mean()),
            mean_norm_change=float((sub_norm - full_norm).mean()),
            max_norm_change=float((sub_norm - full_norm).abs().max()),
            spearman=rho,
        )
        rows.append(row)
        print(
            f"| {keep} | {n} | {row['time_ratio']:.3f} | {row['mean_change_bits']:+.3f} "
            f"| {row['mean_norm_change']:+.4f} | {row['max_norm_change']:.4f} | {rho:.3f} |",
            flush=True,
        )
    return rows


def profile_phases(n: int, d: int, layers: int) -> dict:
    """Seconds per layer of each phase of the exact and the SLQ path (private helpers of
    unifyreg.estimators, replaying what the public functions do)."""
    from unifyreg import estimators as E
    from unifyreg.estimators import slq
    from unifyreg.estimators.kernel import median_bandwidth_by_selection, sq_distances_no_grad

    Z = hidden_like(n, d, spread_layers(layers))
    phases: dict[str, float] = {}

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        phases[name] = (time.perf_counter() - start) / layers
        return out

    with torch.no_grad():
        Z64 = Z.double()
        D = timed("exact: distances (float64)", lambda: E.pairwise_sq_distances(Z64))
        bw = timed("exact: median bandwidth", lambda: E.median_bandwidth(Z64, sq_distances=D))
        K = timed("exact: exp", lambda: D.mul_((-0.5 / bw**2)[:, None, None]).exp_())
        A = timed("exact: normalise + symmetrise", lambda: 0.5 * (K + K.mT) / n)
        timed("exact: eigvalsh (float64)", lambda: torch.linalg.eigvalsh(A))
        settings = E.SLQSettings()
        D = timed("SLQ: distances (float32)", lambda: sq_distances_no_grad(Z, None))
        bw = timed("SLQ: median by selection", lambda: median_bandwidth_by_selection(D, None))
        A = timed(
            "SLQ: exp + normalise",
            lambda: D.mul_((-0.5 / bw**2)[:, None, None]).exp_().div_(n),
        )
        omega, probes = slq._slq_draws(n, settings, None, A.dtype, A.device)
        k, batch = settings.deflation_rank, A.shape[0]

        def deflate():
            Q = slq._orthonormal_rows(omega.expand(batch, k, n) @ A)
            for _ in range(settings.power_iterations - 1):
                Q = slq._orthonormal_rows(Q.to(A.dtype) @ A)
            return Q

        Q = timed("SLQ: subspace iteration (deflation)", deflate)
        Qc = Q.to(A.dtype)
        QA = timed("SLQ: Q A + Ritz vectors", lambda: Qc @ A)
        H = QA.double() @ Q.mT
        ritz = (torch.linalg.eigh(0.5 * (H + H.mT))[1].mT @ Q).to(A.dtype)
        timed("SLQ: exact moments of the residual", lambda: slq._projected_moments(A, Qc, QA))
        timed(
            "SLQ: Lanczos on Ritz vectors",
            lambda: slq._lanczos_quadrature(A, ritz, E.RITZ_LANCZOS_STEPS),
        )
        V = probes.expand(batch, settings.num_probes, n) - 0
        for _ in range(2):
            V = V - (V @ Qc.mT) @ Qc
        timed(
            "SLQ: Lanczos on probes", lambda: slq._lanczos_quadrature(A, V, settings.lanczos_steps)
        )
    exact = sum(v for key, v in phases.items() if key.startswith("exact"))
    slq = sum(v for key, v in phases.items() if key.startswith("SLQ"))
    print(f"| phase (n = {n}, d = {d}, {layers} layers) | s/layer | share of its path |")
    print("|---|---|---|")
    for key, value in phases.items():
        total = exact if key.startswith("exact") else slq
        print(f"| {key} | {value:.3f} | {100 * value / total:.0f} % |")
    print(f"| **exact total** | {exact:.3f} | |")
    print(f"| **SLQ total** | {slq:.3f} | |", flush=True)
    return {"n": n, "d": d, "layers": layers, "phases": phases}


def median_sample_table(n: int, d: int, layers: int, pair_counts: list[int], seeds: int) -> dict:
    """The sampled median bandwidth (``SLQSettings.median_pairs``) against the exact one on
    ``layers`` synthetic layers: sigma's relative error, and its effect on the exact
    entropy (``eigvalsh`` with either bandwidth), over ``seeds`` draws per pair count;
    both medians from the same float32 distances (the SLQ path's)."""
    from unifyreg.estimators import SLQSettings
    from unifyreg.estimators.kernel import (
        median_bandwidth_by_selection,
        sampled_median_bandwidth,
        sq_distances_no_grad,
    )

    Z = hidden_like(n, d, spread_layers(layers))
    with torch.no_grad():
        D = sq_distances_no_grad(Z, None)  # float32, as the SLQ path builds it
        start = time.perf_counter()
        exact = median_bandwidth_by_selection(D, None).double()
        select_s = time.perf_counter() - start
        H_exact = matrix_entropy(Z, alpha=ALPHA, sigma=exact)
        rows = []
        for pairs in pair_counts:
            sigma_err, H_err, seconds = [], [], []
            for seed in range(seeds):
                start = time.perf_counter()
                sigma = sampled_median_bandwidth(D, None, pairs, seed).double()
                seconds.append(time.perf_counter() - start)
                sigma_err.append(((sigma - exact) / exact).abs())
                H = matrix_entropy(Z, alpha=ALPHA, sigma=sigma)
                H_err.append(((H - H_exact) / H_exact).abs())
            sigma_err, H_err = torch.stack(sigma_err), torch.stack(H_err)
            rows.append(
                dict(
                    pairs=pairs,
                    sigma_max_rel=float(sigma_err.max()),
                    sigma_mean_rel=float(sigma_err.mean()),
                    H_max_rel=float(H_err.max()),
                    H_mean_rel=float(H_err.mean()),
                    seconds_per_layer=float(np.median(seconds)) / layers,
                )
            )
    default = SLQSettings().median_pairs
    print(
        f"Sampled vs exact median bandwidth (n = {n}, d = {d}, {layers} layers x {seeds} "
        f"seeds; float32 distances; exact median by selection: {select_s / layers:.4f} "
        f"s/layer; default median_pairs = {default})\n"
    )
    print(
        "| pairs | sampling s/layer | sigma max rel. error | sigma mean rel. error "
        "| H max rel. change | H mean rel. change |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['pairs']} | {r['seconds_per_layer']:.4f} | {100 * r['sigma_max_rel']:.3f} % "
            f"| {100 * r['sigma_mean_rel']:.3f} % | {100 * r['H_max_rel']:.4f} % "
            f"| {100 * r['H_mean_rel']:.4f} % |",
            flush=True,
        )
    return {"n": n, "d": d, "layers": layers, "select_s_per_layer": select_s / layers, "rows": rows}


def ratio_table(n: int, d: int, layers: int, rounds: int) -> dict:
    """Exact vs SLQ in this one process, interleaved rounds (medians): the exact path
    (and as it was before issue 20), SLQ with the sampled median (the default) and with
    the exact median (``median_pairs=0``); relative errors against the exact values."""
    from unifyreg.estimators import SLQSettings
    from unifyreg.estimators.blocked import torch_kernels_only

    Z = hidden_like(n, d, spread_layers(layers))
    exact_median = SLQSettings(median_pairs=0)

    def before():
        with torch_kernels_only():
            return matrix_entropy(Z, alpha=ALPHA)

    fns = {
        "exact": lambda: matrix_entropy(Z, alpha=ALPHA),
        "exact (before)": before,
        "slq": lambda: matrix_entropy(Z, alpha=ALPHA, max_gram_bytes=GiB, method="slq"),
        "slq, exact median": lambda: matrix_entropy(
            Z, alpha=ALPHA, max_gram_bytes=GiB, method="slq", settings=exact_median
        ),
    }
    names = list(fns)
    times = {name: [] for name in names}
    values = {}
    with torch.no_grad():
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                values[name] = fns[name]()
                times[name].append(time.perf_counter() - start)
    med = {name: float(np.median(t)) / layers for name, t in times.items()}
    ref = values["exact"]
    print(
        f"Exact vs SLQ, n = {n}, d = {d}, {layers} layers, medians of {rounds} interleaved "
        "rounds, one process\n"
    )
    print("| path | s/layer | exact / path | max rel. error vs exact |")
    print("|---|---|---|---|")
    for name in names:
        err = float(((values[name] - ref) / ref).abs().max())
        print(
            f"| {name} | {med[name]:.3f} | {med['exact'] / med[name]:.2f} | {100 * err:.3f} % |",
            flush=True,
        )
    return {
        "n": n,
        "d": d,
        "layers": layers,
        "rounds": rounds,
        "s_per_layer": med,
        "max_rel_error": {k: float(((v - ref) / ref).abs().max()) for k, v in values.items()},
    }


#: SLQ settings compared by ``--sweep`` (name -> SLQSettings keyword arguments).
SWEEP = {
    "default": {},
    "num_probes=16": {"num_probes": 16},
    "num_probes=4": {"num_probes": 4},
    "lanczos_steps=8": {"lanczos_steps": 8},
    "deflation_rank=8": {"deflation_rank": 8},
    "power_iterations=1": {"power_iterations": 1},
    "no deflation": {"deflation_rank": 0, "num_probes": 24},
}


def sweep_table(n: int, d: int, layers: int, repeats: int, seeds: int = 3) -> list[dict]:
    """Cost and error of SLQ settings around the defaults (errors over layers and seeds)."""
    from unifyreg.estimators import SLQSettings

    Z = hidden_like(n, d, spread_layers(layers))
    exact = matrix_entropy(Z, alpha=ALPHA)
    print(
        f"| SLQ settings (n = {n}, d = {d}, {layers} layers x {seeds} seeds) | s/layer "
        "| max rel. error | mean rel. error |\n|---|---|---|---|",
        flush=True,
    )
    rows = []
    for name, kwargs in SWEEP.items():
        settings = SLQSettings(**kwargs)
        t, _ = best_time(
            lambda s=settings: matrix_entropy(Z, alpha=ALPHA, settings=s, method="slq"), repeats
        )
        errors = torch.stack(
            [
                (
                    matrix_entropy(Z, alpha=ALPHA, settings=settings, generator=seed, method="slq")
                    - exact
                ).abs()
                / exact
                for seed in range(seeds)
            ]
        )
        row = dict(
            name=name,
            s_per_layer=t / len(Z),
            max_rel_error=float(errors.max()),
            mean_rel_error=float(errors.mean()),
        )
        rows.append(row)
        print(
            f"| {name} | {row['s_per_layer']:.3f} | {100 * row['max_rel_error']:.3f} % "
            f"| {100 * row['mean_rel_error']:.3f} % |",
            flush=True,
        )
    return rows


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small sizes only")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (best is kept)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads of every measurement (torch, OpenMP, MKL, OpenBLAS)",
    )
    parser.add_argument("--skip-numpy", action="store_true", help="skip the NumPy-loop table")
    parser.add_argument("--skip-subsampling", action="store_true")
    parser.add_argument("--only", help="comma-separated n values of the main grid to run")
    parser.add_argument(
        "--profile",
        nargs=2,
        type=int,
        metavar=("N", "D"),
        help="only print the per-phase profile of both paths at this size (2 layers)",
    )
    parser.add_argument(
        "--sweep",
        nargs=2,
        type=int,
        metavar=("N", "D"),
        help="only compare SLQ settings around the defaults at this size (12 layers)",
    )
    parser.add_argument(
        "--median-sample",
        nargs=2,
        type=int,
        metavar=("N", "D"),
        help="only compare the sampled median bandwidth with the exact one (8 layers)",
    )
    parser.add_argument(
        "--ratio",
        nargs=2,
        type=int,
        metavar=("N", "D"),
        help="only time exact vs SLQ interleaved in one process (2 layers, --repeats rounds)",
    )
    parser.add_argument("--json", help="also write all rows to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    grid = QUICK_GRID if args.quick else FULL_GRID
    if args.only:
        wanted = {int(x) for x in args.only.split(",")}
        grid = {key: value for key, value in grid.items() if key[0] in wanted}

    print(f"Machine: {machine_description(args.threads)}")
    print(f"Command: python {' '.join(sys.argv)}")
    if args.profile:
        n, d = args.profile
        print()
        run_worker(dict(method="profile", n=n, d=d, layers=2, threads=args.threads))
        return 0
    if args.median_sample:
        n, d = args.median_sample
        print()
        spec = dict(method="median_sample", n=n, d=d, layers=8, pairs=[2**16, 2**18, 2**20])
        run_worker(dict(spec, seeds=3, threads=args.threads))
        return 0
    if args.ratio:
        n, d = args.ratio
        print()
        run_worker(
            dict(method="ratio", n=n, d=d, layers=2, repeats=args.repeats, threads=args.threads)
        )
        return 0
    if args.sweep:
        n, d = args.sweep
        print()
        spec = dict(method="sweep", n=n, d=d, layers=12, repeats=args.repeats)
        run_worker(dict(spec, threads=args.threads))
        return 0
    print(f"alpha = {ALPHA}, median bandwidth, base 2, best of {args.repeats}; peak = ru_maxrss\n")
    out: dict = {"machine": machine_description(args.threads), "argv": sys.argv}
    out["main"] = main_table(grid, args.repeats, args.threads)
    common = dict(repeats=args.repeats, threads=args.threads)
    if not args.skip_numpy:
        print()
        n, d, layers = (576, 1024, 2) if args.quick else (1152, 1024, 4)
        out["numpy"] = run_worker(dict(method="numpy", n=n, d=d, layers=layers, **common))
    if not args.skip_subsampling:
        print()
        if args.quick:
            spec = dict(method="subsampling", n=1152, d=1024, layers=6, keeps=[576], **common)
        else:
            spec = dict(method="subsampling", n=4096, d=1024, layers=8, keeps=[2048, 1024, 512])
            spec.update(common)
        out["subsampling"] = run_worker(spec)["rows"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
