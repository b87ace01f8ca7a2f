"""unifyreg for the Hugging Face ``Trainer``: the per-epoch entropy probe as a
``TrainerCallback``, and the regularizer as a ``compute_loss`` helper.

**The probe.** :class:`EntropyProbeCallback` is :class:`unifyreg.callbacks.EntropyProbe`
for the HF ``Trainer``: the same probe (before training as epoch 0, then after every
``every_n_epochs``-th epoch), the same history, files (``probe_history.jsonl``,
``result_epoch_NNN.json``, ``*_by_epoch.png`` in ``output_dir``, by default
``<TrainingArguments.output_dir>/probe``) and metric names (``probe/...``,
``probe_norm/...``, ``unify/...``, ``probe/epoch``, ``probe/seconds``,
``probe/epoch_share``). Metrics go through the Trainer's own ``log``, so they land in
``state.log_history`` and reach every ``report_to`` integration (TensorBoard, wandb,
MLflow, ...) at the Trainer's global step. The callback needs the Trainer to log through:
``EntropyProbeCallback(...).attach(trainer)`` (which also adds it).

Resuming: the history is kept in ``TrainerState.stateful_callbacks`` under
``"unifyreg.EntropyProbeCallback"``, so every checkpoint's ``trainer_state.json`` holds
the history up to that checkpoint and ``trainer.train(resume_from_checkpoint=...)``
restores it: no epoch is probed twice, none is lost (an epoch interrupted before its probe
is probed when the resumed run finishes it). (With
``restore_callback_states_from_checkpoint=True`` the Trainer warns that it found no
callback of that name: harmless; the callback restores itself.)

Under DDP (``torchrun``/``accelerate launch``) every process probes its shard of the probe
set and the per-sample values are gathered, as in Lightning; FSDP and DeepSpeed under
the HF Trainer are refused with a clear error (use ``unifyreg finetune strategy=fsdp``).

**The regularizer.** :func:`compute_regularized_loss` is a ``compute_loss`` body for a
``Trainer`` subclass: the adapter's task loss plus unifyreg's loss terms
(:class:`unifyreg.losses.ContextualPredictionLoss`), the terms' values (``loss/task``,
``loss/ctx``, ``loss/div``, ...) buffered and merged, averaged, into the Trainer's next
training log by :func:`merge_loss_logs`. :class:`UnifyregTrainer` is that subclass, ready
to use: it also optimises the terms' own parameters (the learned mask embedding) and
saves and restores their state with every checkpoint (``unifyreg_loss_terms.pt``)::

    from transformers import TrainingArguments
    from unifyreg.integrations.hf import EntropyProbeCallback, UnifyregTrainer
    from unifyreg.losses import ContextualPredictionLoss

    term = ContextualPredictionLoss(LossConfig(w_ctx=1.0, w_div=0.5), adapter.hidden_size)
    trainer = UnifyregTrainer(
        model=adapter.model,
        args=TrainingArguments("runs/hf", num_train_epochs=3, save_strategy="epoch",
                               remove_unused_columns=False, report_to=["tensorboard"]),
        train_dataset=examples,              # any sequence of examples
        data_collator=adapter.encode,        # the adapter batches them
        adapter=adapter,
        loss_terms=[term],
    )
    EntropyProbeCallback(probe_examples, adapter=adapter).attach(trainer)
    trainer.train()                          # or resume_from_checkpoint=True

The task loss and the terms are per-batch means, so the Trainer divides them by the
gradient-accumulation steps itself (``loss_is_scaled_for_ga = False``; a subclass of your
own using :func:`compute_regularized_loss` should set the same).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from unifyreg.callbacks import ProbeRecorder
from unifyreg.config import ProbeConfig
from unifyreg.losses import forward_with_terms

__all__ = [
    "STATE_KEY",
    "TERMS_FILE",
    "EntropyProbeCallback",
    "UnifyregTrainer",
    "compute_regularized_loss",
    "merge_loss_logs",
]

#: Where the probe history lives in ``TrainerState.stateful_callbacks``.
STATE_KEY = "unifyreg.EntropyProbeCallback"
#: The loss terms' state in each checkpoint directory (tensors only).
TERMS_FILE = "unifyreg_loss_terms.pt"


class EntropyProbeCallback(ProbeRecorder, TrainerCallback):
    """The per-epoch entropy probe for the Hugging Face ``Trainer`` (module docstring).

    Args: as :class:`unifyreg.callbacks.EntropyProbe` (``examples``, ``probe``,
    ``every_n_epochs``, ``probe_at_start``, ``output_dir``, ``adapter`` (required here),
    ``figures``, ``skipped_examples``); ``output_dir=None`` writes to
    ``<TrainingArguments.output_dir>/probe``.
    """

    def __init__(
        self,
        examples: Sequence[Any],
        probe: ProbeConfig | None = None,
        every_n_epochs: int = 1,
        probe_at_start: bool = True,
        output_dir: str | Path | None = None,
        adapter: Any = None,
        figures: bool | str = "end",
        skipped_examples: int | None = None,
    ) -> None:
        if adapter is None:
            raise ValueError("EntropyProbeCallback needs adapter=... (the model's adapter)")
        super().__init__(
            examples,
            probe=probe,
            every_n_epochs=every_n_epochs,
            probe_at_start=probe_at_start,
            output_dir=output_dir,
            adapter=adapter,
            figures=figures,
            skipped_examples=skipped_examples,
        )
        self.trainer: Trainer | None = None
        self._epoch_started: float | None = None

    def attach(self, trainer: Trainer) -> EntropyProbeCallback:
        """Log through ``trainer.log`` and add this callback to ``trainer`` (if it is not
        among its callbacks yet); returns self."""
        if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
            raise NotImplementedError(
                "EntropyProbeCallback does not run under FSDP or DeepSpeed with the Hugging "
                "Face Trainer; use `unifyreg finetune strategy=fsdp` (Lightning) instead"
            )
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # ------------------------------------------------------------------ hooks

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise RuntimeError(
                "EntropyProbeCallback is not attached to its Trainer: call "
                "EntropyProbeCallback(...).attach(trainer) before trainer.train()"
            )
        if self.output_dir is None:
            self.output_dir = Path(args.output_dir) / "probe"
        saved = state.stateful_callbacks.get(STATE_KEY)
        if saved is not None:  # resumed: the checkpoint's trainer_state.json holds it
            self.load_state_dict(saved)
        self._keep_state(state)
        if self.wants_epoch(0):
            self._probe(args, state, epoch=0)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._epoch_started = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        epoch = int(round(state.epoch or 0))
        if epoch >= 1 and self.wants_epoch(epoch):
            started = self._epoch_started
            seconds = None if started is None else time.perf_counter() - started
            self._probe(args, state, epoch=epoch, train_seconds=seconds)

    def on_train_end(self, args, state, control, **kwargs):
        if self.figures == "end" and self.history and state.is_world_process_zero:
            self.draw_figures()

    # ------------------------------------------------------------------ work

    def _keep_state(self, state) -> None:
        """The history into ``state.stateful_callbacks`` (saved with every checkpoint)."""
        state.stateful_callbacks[STATE_KEY] = self.state_dict()

    def _probe(self, args, state, epoch: int, train_seconds: float | None = None) -> None:
        start = time.perf_counter()
        world = max(1, int(args.world_size))
        entry, result = self.run_probe(
            self.adapter, epoch, state.global_step, rank=int(args.process_index), world=world
        )
        if state.is_world_process_zero:
            self.write_result(entry, result)
            if self.figures == "every":
                self.draw_figures()
        entry["cost"] = self.cost(start, train_seconds)
        self.trainer.log({**entry["metrics"], **entry["cost"]})
        if state.is_world_process_zero:
            self.write_history()
        self._keep_state(state)


# ---------------------------------------------------------------------- the regularizer


def compute_regularized_loss(
    trainer: Trainer,
    inputs: dict[str, Any],
    adapter: Any,
    loss_terms: Sequence[Any] = (),
    return_outputs: bool = False,
    text_weight: float | None = None,
    image_weight: float | None = None,
) -> Any:
    """``compute_loss`` for a ``Trainer`` subclass: ``L = L_task + sum of terms``.

    ``adapter.forward(inputs)`` gives the task loss,
    :meth:`unifyreg.adapters.base.ForwardOutput.weighted_task_loss` ``(text_weight,
    image_weight)`` (``loss.text_weight`` / ``loss.image_weight``; both None: the family's
    own weighting, token-weighted text + image cross-entropy for the discrete families) and, when a
    term needs them (``L_div``), the hidden states; each term
    ``term(adapter, inputs, output, step) -> (weighted loss, logs)`` adds its part
    (:func:`unifyreg.losses.forward_with_terms`: ``L_ctx`` draws first and may reuse the
    main pass's prefix). The logs (``loss/task``, ``loss/text``, ``loss/image``,
    ``loss/total`` and the terms': ``loss/ctx``, ``loss/div``, ...) are buffered on the
    trainer until :func:`merge_loss_logs`. Hidden states are kept when a term's
    ``needs_hidden_states`` says so. Returns the loss, or ``(loss, output)``.
    """
    terms = list(loss_terms)
    wants_hidden = any(getattr(t, "needs_hidden_states", False) for t in terms)
    output, extra, term_logs = forward_with_terms(
        adapter, inputs, terms, int(trainer.state.global_step), wants_hidden
    )
    loss = output.weighted_task_loss(text_weight, image_weight)
    logs: dict[str, Any] = {
        "loss/task": loss.detach(),
        "loss/text": output.text_loss.detach(),
        "loss/image": output.image_loss.detach(),
    }
    loss = loss + extra
    logs.update(term_logs)
    logs["loss/total"] = loss.detach()
    buffer = trainer.__dict__.setdefault("_unifyreg_loss_logs", {})
    for key, value in logs.items():
        buffer.setdefault(key, []).append(float(value))
    return (loss, output) if return_outputs else loss


def merge_loss_logs(trainer: Trainer, logs: dict[str, float]) -> dict[str, float]:
    """Add the means of the buffered :func:`compute_regularized_loss` logs to a training
    log (one that has ``"loss"``) and empty the buffer; other logs pass unchanged. Call it
    from the subclass's ``log`` before ``super().log``."""
    buffer = trainer.__dict__.get("_unifyreg_loss_logs")
    if "loss" in logs and buffer:
        logs = {**logs, **{k: sum(v) / len(v) for k, v in buffer.items() if v}}
        buffer.clear()
    return logs


class UnifyregTrainer(Trainer):
    """A ``Trainer`` whose loss is :func:`compute_regularized_loss` (module docstring).

    Args:
        adapter: the adapter of ``model`` (``model`` defaults to ``adapter.model``).
        loss_terms: unifyreg loss terms; those that are modules are moved to the
            Trainer's device, their parameters optimised (an extra optimizer group,
            no weight decay; their gradients zeroed after every optimizer step, as the
            Trainer does the model's), and their state (``state_dict``, random state) saved in
            every checkpoint (:data:`TERMS_FILE`) and restored on resume.
        text_weight, image_weight: the task loss's weights (``loss.text_weight`` /
            ``loss.image_weight``; None: the family's own weighting).
        *args, **kwargs: ``transformers.Trainer``'s.
    """

    loss_is_scaled_for_ga = False  # per-batch means: the Trainer divides by the GA steps

    def __init__(
        self,
        *args: Any,
        adapter: Any,
        loss_terms: Sequence[Any] = (),
        text_weight: float | None = None,
        image_weight: float | None = None,
        **kwargs: Any,
    ):
        for name, weight in (("text_weight", text_weight), ("image_weight", image_weight)):
            if weight is not None and not weight >= 0:
                raise ValueError(f"{name} must be >= 0 or None, got {weight}")
        if not args and "model" not in kwargs:
            kwargs["model"] = adapter.model
        super().__init__(*args, **kwargs)
        self.adapter = adapter
        self.loss_terms = list(loss_terms)
        self.text_weight, self.image_weight = text_weight, image_weight
        for term in self._term_modules():
            term.to(self.args.device)
        self.add_callback(_LossTermsCallback(self))

    def _term_modules(self) -> list[torch.nn.Module]:
        return [t for t in self.loss_terms if isinstance(t, torch.nn.Module)]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return compute_regularized_loss(
            self,
            inputs,
            self.adapter,
            self.loss_terms,
            return_outputs,
            text_weight=self.text_weight,
            image_weight=self.image_weight,
        )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        super().log(merge_loss_logs(self, logs), *args, **kwargs)

    def create_optimizer(self, *args: Any, **kwargs: Any):
        optimizer = super().create_optimizer(*args, **kwargs)
        params = [p for t in self._term_modules() for p in t.parameters() if p.requires_grad]
        if params and not getattr(self, "_terms_in_optimizer", False):
            optimizer.add_param_group(
                {"params": params, "weight_decay": 0.0, "lr": self.args.learning_rate}
            )
            self._terms_in_optimizer = True
        return optimizer

    def terms_state(self) -> dict[str, Any]:
        """The loss terms' state: ``{"modules": [state_dict], "rng": [tensor or None]}``."""
        return {
            "modules": [t.state_dict() for t in self._term_modules()],
            "rng": [
                t.get_rng_state() if hasattr(t, "get_rng_state") else None for t in self.loss_terms
            ],
        }

    def load_terms_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`terms_state`."""
        for term, weights in zip(self._term_modules(), state["modules"], strict=True):
            term.load_state_dict(weights)
        for term, rng in zip(self.loss_terms, state["rng"], strict=True):
            if rng is not None:
                term.set_rng_state(rng)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """``Trainer.train``, restoring the loss terms' state from the checkpoint first
        (``weights_only=True``)."""
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)
        if path and (Path(path) / TERMS_FILE).is_file():
            from unifyreg.trainer import load_checkpoint

            self.load_terms_state(load_checkpoint(Path(path) / TERMS_FILE))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


class _LossTermsCallback(TrainerCallback):
    """Zeroes the loss terms' gradients after every optimizer step (the Trainer zeroes the
    model's only) and writes :data:`TERMS_FILE` into each checkpoint directory as it is
    saved."""

    def __init__(self, trainer: UnifyregTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        for term in self.trainer._term_modules():
            term.zero_grad(set_to_none=True)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.trainer.loss_terms:
            return
        directory = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if directory.is_dir():
            from unifyreg.fileio import atomic_file

            with atomic_file(directory / TERMS_FILE, "wb") as handle:
                torch.save(self.trainer.terms_state(), handle)
