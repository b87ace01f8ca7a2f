"""unifyreg.integrations.hf: a tiny Hugging Face Trainer fine-tune with EntropyProbeCallback
and the regularizer (UnifyregTrainer / compute_regularized_loss), its logs reaching the
Trainer's `log` and a report_to integration (TensorBoard), and resuming from the
Trainer's own checkpoints without a lost or repeated epoch."""

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, TINY_WORLD
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import TrainerCallback, TrainingArguments

from unifyreg.adapters.toy import ToyAdapter
from unifyreg.callbacks import probe_metrics
from unifyreg.config import LossConfig, ProbeConfig
from unifyreg.integrations.hf import TERMS_FILE, EntropyProbeCallback, UnifyregTrainer
from unifyreg.losses import ContextualPredictionLoss
from unifyreg.probing import run_probe
from unifyreg.trainer import load_checkpoint

PROBE = ProbeConfig(layers=[0, 2])


class _Recorder(TrainerCallback):
    """What a report_to integration receives: every `on_log` call's logs."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def _probe_examples(splits):
    return [*splits["probe/text/deductive"][:3], *splits["probe/image/coarse"][:3]]


def _fine_tune(output_dir, adapter, splits, epochs, resume=None, report_to=("tensorboard",)):
    """A tiny full fine-tune: 32 examples, batch 16 (2 steps per epoch), one checkpoint per
    epoch, L_ctx and L_div on."""
    term = ContextualPredictionLoss(LossConfig(w_ctx=1.0, w_div=1.0), adapter.hidden_size)
    args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        save_strategy="epoch",
        logging_steps=1,
        report_to=list(report_to),
        use_cpu=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = UnifyregTrainer(
        args=args,
        train_dataset=splits["finetune"][:32],
        data_collator=adapter.encode,
        adapter=adapter,
        loss_terms=[term],
    )
    recorder = _Recorder()
    trainer.add_callback(recorder)
    probe = EntropyProbeCallback(_probe_examples(splits), PROBE, adapter=adapter).attach(trainer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, probe, recorder, term


def _fresh_adapter(tokenizer):
    return ToyAdapter.create(tokenizer, grid_size=TINY_WORLD.grid_size, model_config=TINY_MODEL)


def _probed_epochs(log_history):
    return [int(e["probe/epoch"]) for e in log_history if "probe/epoch" in e]


@pytest.fixture(scope="module")
def first_run(tokenizer, tiny_splits, tmp_path_factory):
    """Two epochs from a fresh tiny toy model; also the epoch-0 reference probe."""
    output_dir = tmp_path_factory.mktemp("hf") / "run"
    adapter = _fresh_adapter(tokenizer)
    reference = probe_metrics(
        run_probe(copy.deepcopy(adapter), _probe_examples(tiny_splits), PROBE)
    )
    trainer, probe, recorder, term = _fine_tune(output_dir, adapter, tiny_splits, epochs=2)
    return {
        "dir": output_dir,
        "trainer": trainer,
        "probe": probe,
        "recorder": recorder,
        "term": term,
        "reference": reference,
    }


def test_trainer_fine_tune_with_the_probe_and_the_regularizer(first_run):
    trainer, probe = first_run["trainer"], first_run["probe"]
    assert [e["epoch"] for e in probe.history] == [0, 1, 2]
    assert [e["global_step"] for e in probe.history] == [0, 2, 4]
    # Epoch 0 is the untrained model: equal to run_probe on a copy taken before training.
    for key, value in first_run["reference"].items():
        assert probe.history[0]["metrics"][key] == pytest.approx(value, rel=1e-12), key

    # Through the Trainer's own log: in state.log_history, at the probe's global step,
    # and handed to every callback's on_log (what report_to integrations receive).
    probes = [e for e in trainer.state.log_history if "unify/encoding_gap" in e]
    assert [(int(e["probe/epoch"]), e["step"]) for e in probes] == [(0, 0), (1, 2), (2, 4)]
    assert {"probe/seconds", "probe_norm/response/image/layer_02"} <= set(probes[-1])
    assert "probe/epoch_share" in probes[-1] and "probe/epoch_share" not in probes[0]
    received = [e for e in first_run["recorder"].logs if "unify/encoding_gap" in e]
    assert [int(e["probe/epoch"]) for e in received] == [0, 1, 2]
    # ... and TensorBoard (report_to=["tensorboard"]) wrote them (the HF integration adds
    # its "train/" prefix).
    event_files = list(Path(first_run["dir"]).rglob("events.out.tfevents.*"))
    assert event_files
    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    assert [e.step for e in events.Scalars("train/unify/encoding_gap")] == [0, 2, 4]

    # The regularizer ran and was logged; its mask embedding was trained.
    training = [e for e in trainer.state.log_history if "loss" in e]
    assert len(training) == 4
    for entry in training:
        assert entry["loss/ctx"] > 0 and entry["loss/div"] >= 0 and entry["loss/task"] > 0
    initial = ContextualPredictionLoss(LossConfig(w_ctx=1.0), TINY_MODEL.hidden_size)
    assert not torch.equal(first_run["term"].mask_embedding.detach(), initial.mask_embedding)

    files = Path(first_run["dir"]) / "probe"
    history = [json.loads(line) for line in (files / "probe_history.jsonl").open()]
    assert [e["epoch"] for e in history] == [0, 1, 2]
    for name in ("result_epoch_002.json", "encoding_text_by_epoch.png"):
        assert (files / name).is_file(), name
    # Every checkpoint carries the probe history so far and the loss terms' state.
    for step, epochs in ((2, [0, 1]), (4, [0, 1, 2])):
        checkpoint = Path(first_run["dir"]) / f"checkpoint-{step}"
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        saved = state["stateful_callbacks"]["unifyreg.EntropyProbeCallback"]["history"]
        assert [e["epoch"] for e in saved] == epochs
        assert (checkpoint / TERMS_FILE).is_file()


def test_resuming_from_the_trainers_checkpoints_neither_loses_nor_repeats_an_epoch(
    first_run, tokenizer, tiny_splits, tmp_path
):
    import shutil

    # Continue the finished 2-epoch run to 3 epochs from its last checkpoint.
    longer = tmp_path / "longer"
    shutil.copytree(first_run["dir"], longer)
    trainer, probe, _, term = _fine_tune(
        longer, _fresh_adapter(tokenizer), tiny_splits, epochs=3, resume=True
    )
    assert [e["epoch"] for e in probe.history] == [0, 1, 2, 3]
    for restored, original in zip(probe.history[:3], first_run["probe"].history, strict=True):
        assert restored == original  # restored from trainer_state.json, not probed again
    assert _probed_epochs(trainer.state.log_history) == [0, 1, 2, 3]
    saved = load_checkpoint(longer / "checkpoint-4" / TERMS_FILE)
    torch.testing.assert_close(
        saved["modules"][0]["mask_embedding"], first_run["term"].mask_embedding.detach()
    )

    # As if killed during epoch 2: resume from the epoch-1 checkpoint; epoch 2 is probed
    # once, by the resumed run, and equals the uninterrupted run's (measured: bit-for-bit;
    # before the loss terms' gradients were zeroed after each step, they accumulated over
    # the steps and the resumed run differed).
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(first_run["dir"] / "checkpoint-2", killed / "checkpoint-2")
    trainer, probe, _, _ = _fine_tune(
        killed, _fresh_adapter(tokenizer), tiny_splits, epochs=2, resume=True, report_to=()
    )
    assert [e["epoch"] for e in probe.history] == [0, 1, 2]
    assert _probed_epochs(trainer.state.log_history) == [0, 1, 2]
    assert [e["global_step"] for e in probe.history] == [0, 2, 4]
    for key, value in first_run["probe"].history[2]["metrics"].items():
        if not key.startswith(("probe/seconds", "probe/epoch_share")):
            assert probe.history[2]["metrics"][key] == pytest.approx(value, rel=1e-9), key


def test_the_callback_must_be_attached_and_needs_an_adapter(tiny_splits, tiny_adapter, tmp_path):
    from transformers import Trainer

    with pytest.raises(ValueError, match="needs adapter="):
        EntropyProbeCallback(_probe_examples(tiny_splits))
    probe = EntropyProbeCallback(_probe_examples(tiny_splits), adapter=tiny_adapter)
    with pytest.raises(RuntimeError, match=r"attach\(trainer\)"):
        probe.on_train_begin(TrainingArguments(str(tmp_path), use_cpu=True), None, None)
    args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[])
    trainer = Trainer(model=tiny_adapter.model, args=args)
    assert probe.attach(trainer) is probe and probe in trainer.callback_handler.callbacks
    probe.attach(trainer)  # twice: still once among the callbacks
    assert trainer.callback_handler.callbacks.count(probe) == 1


def test_the_task_loss_weights_reach_the_trainers_loss(tiny_splits, tiny_adapter, tmp_path):
    """`text_weight`/`image_weight` give `text_weight * L_text + image_weight * L_image`
    (as `loss.text_weight`/`loss.image_weight` in `unifyreg finetune`); unset, the family's
    token-weighted default; a negative weight is refused."""
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    batch = tiny_adapter.encode(tiny_splits["finetune"][:8])
    out = tiny_adapter.forward(batch)
    text, image = float(out.text_loss), float(out.image_loss)
    assert text > 0 and image > 0
    losses = {}
    for weights in [(None, None), (2.0, 0.0), (0.0, 3.0), (0.5, None)]:
        trainer = UnifyregTrainer(
            args=args, adapter=tiny_adapter, text_weight=weights[0], image_weight=weights[1]
        )
        losses[weights] = float(trainer.compute_loss(tiny_adapter.model, batch))
    assert losses[(None, None)] == pytest.approx(float(out.task_loss), rel=1e-6)
    assert losses[(2.0, 0.0)] == pytest.approx(2.0 * text, rel=1e-6)
    assert losses[(0.0, 3.0)] == pytest.approx(3.0 * image, rel=1e-6)
    assert losses[(0.5, None)] == pytest.approx(0.5 * text + image, rel=1e-6)
    with pytest.raises(ValueError, match="image_weight must be >= 0"):
        UnifyregTrainer(args=args, adapter=tiny_adapter, image_weight=-1.0)
