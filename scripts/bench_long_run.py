"""Benchmark: a long toy fine-tune with a probe after every epoch keeps resident memory and
probe time flat (issue 21).

Runs ``unifyreg finetune`` in this process (the recipe's own Trainer, callbacks and
loggers: CSV + TensorBoard, figures drawn and logged after every probe unless
``--figures end``) on a small toy base, and after every epoch's probe records the
resident set size (``VmRSS`` of ``/proc/self/status``), the probe's own seconds
(``EntropyProbe``'s history: forward passes and estimators) and its full cost
(``probe/seconds``: files and figures included), the open file descriptors and the
open matplotlib figures. Prints one line per epoch and a summary (first, last, max, and
the slope of a least-squares line over the second half of the run).

Usage: ``python scripts/bench_long_run.py [--epochs 50] [--figures every|end]
[--work-dir DIR]``. The base (hidden 64, 2 layers, 1200 pre-training steps of batch 32:
about a minute) is built once in ``--work-dir`` (default ``.cache/bench_long_run``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import lightning as L

BASE = [
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.intermediate_size=128",
    "world.n_pretrain=4000",
    "world.n_finetune=256",
    "world.n_probe_per_category=4",
    "max_steps=600",
    "batch_size=32",
    "accelerator=cpu",
    "evaluate=false",
]


def rss_mb() -> float:
    """Resident set size of this process (MB), from ``/proc/self/status``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class Recorder(L.Callback):
    """After every epoch (so after ``EntropyProbe``'s probe of it): memory and probe cost."""

    def __init__(self, probe) -> None:
        self.probe = probe
        self.rows: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        import matplotlib.pyplot as plt

        entry = self.probe.history[-1]
        self.rows.append(
            {
                "epoch": entry["epoch"],
                "rss_mb": rss_mb(),
                "probe_s": entry["seconds"],
                "probe_total_s": entry["cost"]["probe/seconds"],
                "fds": len(os.listdir("/proc/self/fd")),
                "figures": len(plt.get_fignums()),
            }
        )
        row = self.rows[-1]
        print(
            f"epoch {row['epoch']:3d}  rss {row['rss_mb']:7.1f} MB  probe {row['probe_s']:.3f} s"
            f"  (with files/figures {row['probe_total_s']:.3f} s)  fds {row['fds']}"
            f"  open figures {row['figures']}",
            flush=True,
        )


def slope(values: list[float]) -> float:
    """Least-squares slope per epoch."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    den = sum((i - mean_x) ** 2 for i in range(n))
    return num / den if den else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--figures", choices=("every", "end"), default="every")
    parser.add_argument("--work-dir", default=".cache/bench_long_run")
    args = parser.parse_args()

    from unifyreg.config import FinetuneConfig, PretrainToyConfig, load_config
    from unifyreg.recipes import finetune
    from unifyreg.toy.base import build_toy_base

    work = Path(args.work_dir).resolve()
    base = [*BASE, f"cache_dir={work / 'cache'}"]
    build_toy_base(load_config(PretrainToyConfig, None, base), log=print)
    run_dir = work / f"run_{args.figures}_{int(time.time())}"
    cfg = load_config(
        FinetuneConfig,
        None,
        [
            *[f"pretrain.{item}" for item in base],
            f"max_epochs={args.epochs}",
            "batch_size=32",
            "accelerator=cpu",
            f"probe_figures={args.figures}",
            f"run_dir={run_dir}",
        ],
    )
    parts = finetune.build_trainer_parts(cfg)
    recorder = Recorder(parts.probe)
    parts.trainer.callbacks.append(recorder)
    print(
        f"{args.epochs} epochs of {len(parts.loader)} steps, probe set of "
        f"{len(parts.probe.examples)} examples, figures: {args.figures}, rss at start "
        f"{rss_mb():.1f} MB"
    )
    started = time.perf_counter()
    finetune.fit(parts.trainer, parts.module, parts.loader)
    wall = time.perf_counter() - started
    rows = recorder.rows
    half = rows[len(rows) // 2 :]
    print(f"\nwall time {wall:.0f} s; per-epoch figures (epochs 1-{len(rows)}):")
    print("| quantity | first | last | max | slope over the second half (per epoch) |")
    print("|---|---|---|---|---|")
    for key, unit in (("rss_mb", "MB"), ("probe_s", "s"), ("probe_total_s", "s"), ("fds", "")):
        values = [r[key] for r in rows]
        fmt = ".1f" if key == "rss_mb" else ".3f" if unit == "s" else ".0f"
        print(
            f"| {key} | {values[0]:{fmt}} | {values[-1]:{fmt}} | {max(values):{fmt}} | "
            f"{slope([r[key] for r in half]):+.4f} {unit} |"
        )
    print(f"open matplotlib figures after every probe: max {max(r['figures'] for r in rows)}")


if __name__ == "__main__":
    main()
