"""A long fine-tune with a probe after every epoch holds nothing per epoch: open files,
figures and live tensors stay constant, and the by-epoch figures draw a bounded number of
curves, so drawing them costs the same after 5 or 500 epochs. Resident memory and probe
time over 50 epochs: scripts/bench_long_run.py, figures in BENCHMARKS.md (resident memory
is not asserted here: it warms up over the first ~10 epochs, then stays flat)."""

import gc
import os

import lightning as L
import matplotlib.pyplot as plt
import torch

from unifyreg.config import FinetuneConfig, load_config
from unifyreg.recipes import finetune
from unifyreg.report import MAX_EPOCH_CURVES, close_figures, drawn_epochs, probe_history_figures


class _Recorder(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_epoch_end(self, trainer, pl_module):  # after EntropyProbe's probe
        gc.collect()
        tensors = sum(1 for o in gc.get_objects() if torch.is_tensor(o))
        self.rows.append(
            {
                "fds": len(os.listdir("/proc/self/fd")),
                "figures": len(plt.get_fignums()),
                "tensors": tensors,
            }
        )


def test_eight_epochs_with_a_probe_each_hold_nothing_per_epoch(tiny_base_overrides, tmp_path):
    cfg = load_config(
        FinetuneConfig,
        None,
        [
            *tiny_base_overrides,
            "max_epochs=8",
            "batch_size=48",  # 2 steps per epoch
            "probe.layers=[0,2]",
            "accelerator=cpu",
            "probe_figures=every",  # figures drawn, saved and sent to TensorBoard each epoch
            f"run_dir={tmp_path / 'run'}",
        ],
    )
    parts = finetune.build_trainer_parts(cfg)
    recorder = _Recorder()
    parts.trainer.callbacks.append(recorder)
    finetune.fit(parts.trainer, parts.module, parts.loader)
    rows = recorder.rows
    assert len(rows) == 8 and [e["epoch"] for e in parts.probe.history] == list(range(9))
    assert {r["figures"] for r in rows} == {0}  # every figure closed after being logged
    assert len({r["fds"] for r in rows[1:]}) == 1  # no file left open
    # No tensor outlives its epoch (hidden states, results, figures' data): the count of
    # live tensors is the same after every epoch once the optimizer state exists.
    assert len({r["tensors"] for r in rows[2:]}) == 1, [r["tensors"] for r in rows]


def test_by_epoch_figures_draw_at_most_max_epoch_curves():
    assert drawn_epochs(list(range(5))) == [0, 1, 2, 3, 4]
    picked = drawn_epochs(list(range(500)))
    assert len(picked) == MAX_EPOCH_CURVES and picked[0] == 0 and picked[-1] == 499
    entry = {
        "summary": {
            "layers": [0, 1],
            "stats": {"encoding/text": {"normalized": {"all": {"mean": [0.5, 0.6]}}}},
        }
    }
    history = [{**entry, "epoch": e} for e in range(500)]
    figures = probe_history_figures(history)
    try:
        (fig,) = figures.values()
        labels = [line.get_label() for line in fig.axes[0].get_lines()]
        assert len(labels) == MAX_EPOCH_CURVES
        assert labels[0] == "epoch 0" and labels[-1] == "epoch 499"
    finally:
        close_figures(figures)
