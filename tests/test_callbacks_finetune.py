"""Tests of EntropyProbe and the finetune recipe: per-epoch logs, files, resume (DDP and
FSDP: test_distributed.py)."""

import csv
import json

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from unifyreg.adapters.toy import ToyAdapter
from unifyreg.callbacks import EntropyProbe
from unifyreg.cli import main
from unifyreg.config import ProbeConfig


def _csv_probe_epochs(run_dir):
    epochs = []
    for path in sorted((run_dir / "logs").glob("version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("unify/encoding_gap"):
                assert row["unify/response_split"] and row["unify/final_gap"]
                epochs.append(int(float(row["probe/epoch"])))
    return epochs


def _history_epochs(run_dir):
    lines = (run_dir / "probe" / "probe_history.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines]


FAST = ["probe.layers=[0,1,2]", "batch_size=16", "accelerator=cpu"]


def test_finetune_logs_unification_metrics_every_epoch(tmp_path, tiny_base_overrides, capsys):
    run_dir = tmp_path / "run"
    assert (
        main(["finetune", *tiny_base_overrides, *FAST, "max_epochs=3", f"run_dir={run_dir}"]) == 0
    )
    assert _csv_probe_epochs(run_dir) == [0, 1, 2, 3]
    assert _history_epochs(run_dir) == [0, 1, 2, 3]

    events = EventAccumulator(str(run_dir / "tensorboard" / "version_0"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for name in (
        "unify/encoding_gap",
        "unify/response_split",
        "unify/final_gap",
        "probe/encoding/text/layer_00",
        "probe_norm/response/image/layer_02",
        "loss/task",
        "lr/decay",  # Lightning's LearningRateMonitor (LoRA A/B matrices: one group)
    ):
        assert name in scalars, name
    rates = [e.value for e in events.Scalars("lr/decay")]
    # 18 steps inside the 20-step warm-up: rising, below the configured 1e-3
    assert len(rates) >= 2 and rates == sorted(set(rates)) and rates[-1] < 1e-3
    assert [e.step for e in events.Scalars("unify/encoding_gap")] == [0, 6, 12, 18]
    # What each probe cost; its share of the epoch it follows (none before training).
    assert [e.step for e in events.Scalars("probe/seconds")] == [0, 6, 12, 18]
    shares = [e.value for e in events.Scalars("probe/epoch_share")]
    assert len(shares) == 3 and all(0 < share < 1 for share in shares)
    history = [json.loads(x) for x in (run_dir / "probe/probe_history.jsonl").open()]
    assert "probe/epoch_share" not in history[0]["cost"]
    # every probe says which regime produced it
    regime = {"regime": "default", "bandwidth": "median", "alpha": 1.01, "base": 2.0}
    assert all(entry["regime"] == regime for entry in history)
    assert history[-1]["cost"]["probe/seconds"] >= history[-1]["seconds"] > 0
    assert "figures/encoding_text_by_epoch" in events.Tags()["images"]

    probe_dir = run_dir / "probe"
    for name in (
        "encoding_text_by_epoch.png",
        "response_image_by_epoch.png",
        "result_epoch_003.json",
    ):
        assert (probe_dir / name).is_file(), name
    assert (run_dir / "lora" / "adapter_model.safetensors").is_file()
    merged = ToyAdapter.load(run_dir / "merged")
    assert merged.generate_images([]) == []
    assert "epoch 3:" in capsys.readouterr().out


def test_resume_last_continues_the_probe_history(tmp_path, tiny_base_overrides):
    run_dir = tmp_path / "run"
    args = ["finetune", *tiny_base_overrides, *FAST, f"run_dir={run_dir}"]
    assert main([*args, "max_epochs=2"]) == 0
    assert main([*args, "max_epochs=3", "resume=last"]) == 0
    assert _history_epochs(run_dir) == [0, 1, 2, 3]
    # Nothing logged before the resume is lost, nothing is logged twice.
    assert sorted(_csv_probe_epochs(run_dir)) == [0, 1, 2, 3]


def test_resume_from_a_missing_checkpoint_is_a_config_error(tmp_path, capsys):
    assert main(["finetune", f"resume={tmp_path / 'nope.ckpt'}"]) == 2
    assert "resume: checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"every_n_epochs": 0}, "every_n_epochs must be >= 1"),
        ({"every_n_epochs": 1.5}, "every_n_epochs must be an integer"),
        ({"probe": {"alpha": 1.01}}, "probe must be a ProbeConfig"),
        ({"figures": "sometimes"}, "figures must be one of end, every, never"),
    ],
)
def test_entropy_probe_validates_its_arguments(kwargs, message, tiny_splits):
    with pytest.raises((ValueError, TypeError), match=message):
        EntropyProbe(tiny_splits["probe/text/composition"], **kwargs)
    with pytest.raises(ValueError, match="non-empty probe set"):
        EntropyProbe([])


class _PlainModule(L.LightningModule):
    """A user's own module that knows nothing of unifyreg."""

    def __init__(self, adapter):
        super().__init__()
        self.adapter_model = adapter.model
        self._adapter = adapter

    def training_step(self, batch, batch_idx):
        return self._adapter.forward(batch, output_hidden_states=False).task_loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_plain_lightning_use_and_state_dict_round_trip(tiny_adapter, tiny_splits, tmp_path):
    from unifyreg.module import example_loader

    examples = [e for k, v in tiny_splits.items() if k.startswith("probe/") for e in v]
    probe = EntropyProbe(
        examples,
        ProbeConfig(layers=[0, -1]),
        adapter=tiny_adapter,
        output_dir=tmp_path,
        figures=False,
    )
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        callbacks=[probe],
        enable_progress_bar=False,
        accelerator="cpu",
        enable_model_summary=False,
    )
    loader = example_loader(tiny_adapter, tiny_splits["finetune"][:32], batch_size=16, shuffle=True)
    trainer.fit(_PlainModule(tiny_adapter), loader)
    assert [e["epoch"] for e in probe.history] == [0, 1, 2]
    assert set(probe.history[-1]["metrics"]) >= {
        "unify/encoding_gap",
        "probe/encoding/text/layer_02",
    }

    restored = EntropyProbe(examples, adapter=tiny_adapter)
    restored.load_state_dict(probe.state_dict())
    assert restored.history == probe.history


def _probe_manifest(directory, examples):
    """A JSONL probe set of the given toy examples, images saved as PNG grids."""
    from unifyreg.toy import save_grid_png

    lines = []
    for index, e in enumerate(examples):
        row = {"text": e.prompt_text, "category": e.category}
        if e.prompt_image is not None:
            save_grid_png(e.prompt_image, directory / f"prompt_{index}.png")
            row["image"] = f"prompt_{index}.png"
        if e.response_image is not None:
            save_grid_png(e.response_image, directory / f"response_{index}.png")
            row["response_image"] = f"response_{index}.png"
        else:
            row["response"] = e.response_text
        lines.append(json.dumps(row))
    path = directory / "probe.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "family, config", [("emu3", "emu3"), ("janus", "janus_pro"), ("chameleon", "chameleon")]
)
def test_real_family_lora_configs_run_one_short_epoch(family, config, tmp_path, tiny_splits):
    import importlib
    from pathlib import Path

    module = importlib.import_module(f"unifyreg.adapters.{family}")
    checkpoint = getattr(module, f"save_tiny_{family}")(tmp_path / "ckpt")
    examples = [*tiny_splits["probe/text/composition"][:2], *tiny_splits["probe/image/coarse"][:2]]
    manifest = _probe_manifest(tmp_path, examples)
    config_file = Path(__file__).resolve().parent.parent / "configs" / config / "finetune_lora.yaml"
    run_dir = tmp_path / "run"
    args = [
        "finetune",
        "--config",
        str(config_file),
        f"model.path={checkpoint}",
        f"data={manifest}",
        f"probe_set={manifest}",
        "model.dtype=float32",
        "precision=32-true",
        "accelerator=cpu",
        "max_epochs=1",
        "batch_size=2",
        "probe.batch_size=2",
        "loss.w_ctx=1.0",
        "loss.w_div=1.0",
        "loggers=[csv]",
        f"run_dir={run_dir}",
    ]
    assert main(args) == 0
    assert _history_epochs(run_dir) == [0, 1]
    assert (run_dir / "lora" / "adapter_config.json").is_file()
    header = next((run_dir / "logs").glob("version_*/metrics.csv")).read_text().splitlines()[0]
    assert "loss/ctx" in header and "loss/div" in header and "unify/encoding_gap" in header


def test_a_shuffled_loader_keeps_a_short_last_batch_only_when_a_rank_would_get_none(
    tiny_adapter, tiny_splits
):
    """7 examples in batches of 7 on 2 ranks give each rank 4 (DistributedSampler): dropping
    the short batch would leave both ranks with nothing to train on (Lightning then stops
    with "No training batches" and the run saves an untrained model)."""
    from unifyreg.module import example_loader

    examples = tiny_splits["finetune"][:7]
    assert example_loader(tiny_adapter, examples, 7, shuffle=True).drop_last
    assert not example_loader(tiny_adapter, examples, 7, shuffle=True, world_size=2).drop_last
    assert example_loader(tiny_adapter, examples, 3, shuffle=True, world_size=2).drop_last
    assert len(example_loader(tiny_adapter, examples[:5], 7, shuffle=True)) == 1
