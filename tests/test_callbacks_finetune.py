"""Tests of EntropyProbe and the finetune recipe: per-epoch logs, files, resume, DDP."""

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
    ):
        assert name in scalars, name
    assert [e.step for e in events.Scalars("unify/encoding_gap")] == [0, 6, 12, 18]
    # What each probe cost; its share of the epoch it follows (none before training).
    assert [e.step for e in events.Scalars("probe/seconds")] == [0, 6, 12, 18]
    shares = [e.value for e in events.Scalars("probe/epoch_share")]
    assert len(shares) == 3 and all(0 < share < 1 for share in shares)
    history = [json.loads(x) for x in (run_dir / "probe/probe_history.jsonl").open()]
    assert "probe/epoch_share" not in history[0]["cost"]
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


def test_ddp_probe_equals_single_process(tmp_path, tiny_base_overrides, tiny_splits):
    """Two CPU ranks (gloo, `strategy=ddp`, relaunched as real processes) shard a probe set
    of 7 examples unevenly (4 and 3); the gathered values equal a single process."""
    import subprocess
    import sys
    from pathlib import Path

    examples = [*tiny_splits["probe/text/deductive"][:3], *tiny_splits["probe/image/relation"][:4]]
    manifest = _probe_manifest(tmp_path, examples)
    unifyreg = str(Path(sys.executable).parent / "unifyreg")
    common = [
        unifyreg,
        "finetune",
        *tiny_base_overrides,
        f"probe_set={manifest}",
        "probe.layers=[0,2]",
        "probe.batch_size=2",
        "batch_size=16",
        "accelerator=cpu",
        "max_epochs=1",
        "loggers=[csv]",
    ]
    for name, extra in (("single", []), ("ddp", ["devices=2", "strategy=ddp"])):
        done = subprocess.run(
            [*common, f"run_dir={tmp_path / name}", *extra],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    single, ddp = (
        [
            json.loads(x)
            for x in (tmp_path / name / "probe/probe_history.jsonl").read_text().splitlines()
        ]
        for name in ("single", "ddp")
    )
    assert [e["epoch"] for e in single] == [e["epoch"] for e in ddp] == [0, 1]
    # Epoch 0 probes the same base weights in both runs: equal up to summation order.
    assert single[0]["metrics"].keys() == ddp[0]["metrics"].keys()
    assert "unify/encoding_gap" in single[0]["metrics"]
    for key, value in single[0]["metrics"].items():
        assert ddp[0]["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


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


def test_merged_lora_inference_folds_exactly_and_restores_the_model(tiny_adapter, tiny_splits):
    from unifyreg.config import LoraSettings
    from unifyreg.module import apply_lora, merged_lora_inference

    adapter = apply_lora(tiny_adapter, LoraSettings(r=4, alpha=8))
    with torch.no_grad():  # a non-zero update, so folding has something to fold
        for name, param in adapter.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    before = {n: p.detach().clone() for n, p in adapter.model.state_dict().items()}
    batch = adapter.encode(tiny_splits["eval"][:6])
    adapter.model.eval()
    with torch.no_grad():
        plain = adapter.forward(batch, keep_logits=True)
        with merged_lora_inference(adapter.model) as folded_layers:
            folded = adapter.forward(batch, keep_logits=True)
            # The folded weights are reused by later calls, but rebuilt when a weight
            # they came from changes in place (here: a LoRA update zeroed and restored).
            lora_b = [p for n, p in adapter.model.named_parameters() if "lora_B" in n]
            saved = [p.clone() for p in lora_b]
            for p in lora_b:
                p.zero_()
            unfolded = adapter.forward(batch, keep_logits=True)
            for p, value in zip(lora_b, saved, strict=True):
                p.copy_(value)
            folded_again = adapter.forward(batch, keep_logits=True)
        again = adapter.forward(batch, keep_logits=True)
        with adapter.model.disable_adapter():
            base = adapter.forward(batch, keep_logits=True)
    torch.testing.assert_close(unfolded.logits, base.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(folded_again.logits, folded.logits)
    assert folded_layers == 7 * adapter.num_layers  # every targeted projection
    torch.testing.assert_close(folded.logits, plain.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(folded.hidden_layers, plain.hidden_layers, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(again.logits, plain.logits)  # the LoRA branch is back
    after = adapter.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)  # nothing stored changed
    # The LoRA update matters: without it the logits differ by far more than round-off.
    assert (base.logits - plain.logits).abs().max() > 1e-3


def test_merged_lora_inference_reuses_folded_weights_within_its_budget(
    tiny_adapter, tiny_splits, monkeypatch
):
    from peft.tuners.lora.layer import Linear as LoraLinear

    from unifyreg.config import LoraSettings
    from unifyreg.module import apply_lora, merged_lora_inference

    adapter = apply_lora(tiny_adapter, LoraSettings(r=4, alpha=8))
    adapter.model.eval()
    lora_layers = [m for m in adapter.model.modules() if isinstance(m, LoraLinear)]

    def set_lora_b(fill):  # new tensors (version 0), not an in-place change
        for layer in lora_layers:
            old = layer.lora_B["default"].weight
            layer.lora_B["default"].weight = torch.nn.Parameter(fill(old))

    set_lora_b(lambda w: torch.randn_like(w) * 0.05)
    builds = []
    original = LoraLinear.get_delta_weight
    monkeypatch.setattr(
        LoraLinear, "get_delta_weight", lambda self, name: builds.append(1) or original(self, name)
    )
    batch = adapter.encode(tiny_splits["eval"][:4])
    n = len(lora_layers)
    for cache_bytes, expected in ((2**30, n), (0, 3 * n)):
        builds.clear()
        with torch.no_grad(), merged_lora_inference(adapter.model, cache_bytes):
            for _ in range(3):
                adapter.forward(batch)
        assert len(builds) == expected, cache_bytes
    builds.clear()
    with merged_lora_inference(adapter.model):
        for _ in range(2):
            adapter.forward(batch)  # with gradient: built per call, never kept
    assert len(builds) == 2 * n
    with torch.no_grad():
        with adapter.model.disable_adapter():
            base = adapter.forward(batch, keep_logits=True)
        with merged_lora_inference(adapter.model):
            folded = adapter.forward(batch, keep_logits=True)
            with adapter.model.disable_adapter():  # honoured inside the block too
                disabled = adapter.forward(batch, keep_logits=True)
            set_lora_b(torch.zeros_like)  # replaced: the kept folds must not be reused
            replaced = adapter.forward(batch, keep_logits=True)
    assert (folded.logits - base.logits).abs().max() > 1e-3
    torch.testing.assert_close(disabled.logits, base.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(replaced.logits, base.logits, rtol=1e-5, atol=1e-5)
    # Inference tensors have no version counter: folded per call, never kept.
    with torch.inference_mode():
        set_lora_b(lambda w: torch.randn_like(w) * 0.05)
        unfolded = adapter.forward(batch, keep_logits=True)
        builds.clear()
        with merged_lora_inference(adapter.model):
            for _ in range(2):
                folded = adapter.forward(batch, keep_logits=True)
    assert len(builds) == 2 * n
    torch.testing.assert_close(folded.logits, unfolded.logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cache_bytes"), merged_lora_inference(adapter.model, -1):
        pass
