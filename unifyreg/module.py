"""The LightningModule that trains any registered adapter.

``UMMModule`` reads only the adapter seam: ``adapter.encode`` builds batches (used as the
DataLoader's ``collate_fn``), ``adapter.training_batch`` applies the family's own objective
to each training batch (Show-o's masked image codes), ``adapter.forward`` returns the task
losses. Extra loss terms
(the contextual-prediction regularizer) plug in through ``loss_terms``: callables
``term(adapter, batch, output, step) -> (weighted_loss, logs)``, run with the main pass by
:func:`unifyreg.losses.forward_with_terms` (a term may draw before the pass and have it
keep a prefix for its own pass).

Logged every step: ``loss/total``, ``loss/task``, ``loss/text``, ``loss/image``,
``tokens/text``, ``tokens/image``, ``loss/skipped_steps``; once at the start of
training: ``data/skipped_examples``. The learning rate is Lightning's
``LearningRateMonitor``'s to log: the scheduler is named ``lr`` and the parameter groups
``decay`` and ``no_decay`` (``lr/decay``, ``lr/no_decay``; only groups with parameters).

Reliability (docs/reliability.md):

- a step whose gradients are not finite (NaN/Inf hidden states, an overflow) is skipped:
  the gradients are dropped before the optimizer runs, so no weight and no optimizer
  state changes; a ``RuntimeWarning`` names the step and ``loss/skipped_steps`` counts
  the skipped steps so far (with a ``16-mixed`` gradient scaler, the scaler does this);
- the shuffle order of an epoch depends only on ``(seed, epoch)``
  (:class:`EpochRandomSampler`), and the random state of the process and of the loss
  terms is saved in the checkpoint, so a run resumed from ``last.ckpt`` trains on the
  same batches, with the same masks, as an uninterrupted one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler

from unifyreg.adapters.base import Adapter, ForwardOutput
from unifyreg.config import LoraSettings, OptimConfig
from unifyreg.losses import forward_with_terms

__all__ = [
    "EpochRandomSampler",
    "LossTerm",
    "UMMModule",
    "apply_lora",
    "example_loader",
    "trainable_parameter_count",
    "warmup_cosine",
]

LossTerm = Callable[[Adapter, dict, ForwardOutput, int], tuple[Tensor, dict[str, Tensor]]]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear ``step / warmup`` up to 1, then cosine down to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class UMMModule(L.LightningModule):
    """Trains ``adapter.model`` on the adapter's task loss plus optional extra terms.

    The task loss is ``ForwardOutput.weighted_task_loss(text_weight, image_weight)``: with
    both None (the default) the family's own weighting (the token-weighted mean for
    cross-entropy image losses), else ``text_weight * L_text + image_weight * L_image``.

    Example (plain Lightning)::

        adapter = ToyAdapter.create(tokenizer, grid_size=4)
        module = UMMModule(adapter, OptimConfig(lr=3e-3), total_steps=1000)
        loader = example_loader(adapter, examples, batch_size=64, shuffle=True)
        lightning.Trainer(max_steps=1000).fit(module, loader)
    """

    def __init__(
        self,
        adapter: Adapter,
        optim: OptimConfig | None = None,
        total_steps: int = 1000,
        loss_terms: Sequence[LossTerm] = (),
        hidden_states_for_terms: bool = False,
        skipped_train_examples: int | None = None,
        text_weight: float | None = None,
        image_weight: float | None = None,
    ) -> None:
        super().__init__()
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.adapter = adapter
        # Registering the model as a submodule lets Lightning move, checkpoint and
        # restore it; the adapter itself is a plain object around it.
        self.model = adapter.model
        self.optim = optim or OptimConfig()
        self.total_steps = int(total_steps)
        self.loss_terms = list(loss_terms)
        # Terms that are modules (e.g. the learned mask embedding of the regularizer) are
        # registered so their parameters are optimised, moved and checkpointed.
        self.loss_modules = torch.nn.ModuleList(
            t for t in self.loss_terms if isinstance(t, torch.nn.Module)
        )
        self.hidden_states_for_terms = hidden_states_for_terms
        #: Task-loss weights (``loss.text_weight``/``loss.image_weight``; None: the family's
        #: default, ``ForwardOutput.weighted_task_loss``).
        self.text_weight, self.image_weight = text_weight, image_weight
        #: Bad manifest lines skipped when the training data was read (logged once as
        #: ``data/skipped_examples``; None: not known, nothing logged).
        self.skipped_train_examples = skipped_train_examples
        #: Optimizer steps skipped because their gradients were not finite.
        self.skipped_steps = 0
        # Weight decay goes to matrices, decided on the shapes before any wrapping (FSDP
        # turns every parameter into a flat 1-D shard view).
        self._param_dims = {n: p.dim() for n, p in self.named_parameters()}
        self._step_losses: dict[str, Tensor] = {}

    def on_fit_start(self) -> None:
        # from_pretrained leaves models in eval mode; training needs dropout & co. on.
        self.model.train()

    def on_train_start(self) -> None:
        if self.skipped_train_examples is None:
            return
        for logger in self.trainer.loggers:
            logger.log_metrics(
                {"data/skipped_examples": float(self.skipped_train_examples)},
                step=int(self.global_step),
            )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        # The family's own objective first (Show-o draws its masked image positions here),
        # with the global random state that checkpoints save; the loss terms see the result.
        batch = self.adapter.training_batch(batch)
        want_hidden = self.hidden_states_for_terms and bool(self.loss_terms)
        out, extra, term_logs = forward_with_terms(
            self.adapter, batch, self.loss_terms, int(self.global_step), want_hidden
        )
        loss = out.weighted_task_loss(self.text_weight, self.image_weight)
        batch_size = int(batch["roles"].shape[0])
        logs: dict[str, Any] = {
            "loss/task": loss.detach(),
            "loss/text": out.text_loss.detach(),
            "loss/image": out.image_loss.detach(),
            "tokens/text": out.text_tokens.float(),
            "tokens/image": out.image_tokens.float(),
        }
        loss = loss + extra
        logs.update({k: v.detach() if isinstance(v, Tensor) else v for k, v in term_logs.items()})
        logs["loss/total"] = loss.detach()
        self._step_losses = {k: v for k, v in logs.items() if k.startswith("loss/")}
        self.log_dict(logs, prog_bar=False, batch_size=batch_size)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=batch_size)
        return loss

    def configure_optimizers(self):
        named = [(_unwrapped_name(n), p) for n, p in self.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        matrices = [p for n, p in named if self._param_dims.get(n, p.dim()) >= 2]
        others = [p for n, p in named if self._param_dims.get(n, p.dim()) < 2]
        groups = [{"name": "decay", "params": matrices}, {"name": "no_decay", "params": others}]
        groups[0]["weight_decay"], groups[1]["weight_decay"] = self.optim.weight_decay, 0.0
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=self.optim.lr, betas=tuple(self.optim.betas)
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(
                step, self.optim.warmup_steps, self.total_steps, self.optim.min_lr_ratio
            ),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"},
        }

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Lightning's clipping, except under FSDP, whose gradients are sharded: there the
        norm is clipped by the root's own ``clip_grad_norm_`` (the norm over all shards, a
        collective; Lightning's FSDP precision plugin refuses ``norm`` clipping)."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self.trainer.strategy.model
        if gradient_clip_val and isinstance(root, FullyShardedDataParallel):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(f"FSDP clips by norm only, got {gradient_clip_algorithm!r}")
            root.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer) -> None:
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:
            # (A 16-mixed gradient scaler already skips steps with inf/NaN gradients.)
            self._skip_non_finite_step(optimizer)
        self.log("loss/skipped_steps", float(self.skipped_steps), prog_bar=False)

    def _skip_non_finite_step(self, optimizer) -> None:
        """Drop all gradients when any is NaN/Inf, so the optimizer leaves every weight and
        its own state unchanged (AdamW skips parameters without a gradient). Under DDP the
        gradients are already reduced across ranks here; under FSDP each rank holds a shard
        of them, so the decision is reduced across ranks (all finite or every rank skips)."""
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        finite = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        losses = ", ".join(f"{k}={float(v):.4g}" for k, v in self._step_losses.items())
        warnings.warn(
            f"step {self.global_step}: non-finite gradients ({losses}); optimizer step "
            f"skipped, weights unchanged ({self.skipped_steps} step(s) skipped so far)",
            RuntimeWarning,
            stacklevel=2,
        )

    # ------------------------------------------------------------------ resume state

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Random state, so a resumed run draws what an uninterrupted one would
        # (plain tensors and ints: loadable with weights_only=True).
        checkpoint["unifyreg"] = {
            "torch_rng": torch.get_rng_state(),
            "term_rng": [
                t.get_rng_state() if hasattr(t, "get_rng_state") else None for t in self.loss_terms
            ],
            "skipped_steps": self.skipped_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("unifyreg")
        if not state:
            return
        torch.set_rng_state(state["torch_rng"])
        for term, rng in zip(self.loss_terms, state.get("term_rng", []), strict=False):
            if rng is not None and hasattr(term, "set_rng_state"):
                term.set_rng_state(rng)
        self.skipped_steps = int(state.get("skipped_steps", 0))


def _unwrapped_name(name: str) -> str:
    """A parameter's name without the segments FSDP and activation checkpointing insert."""
    for segment in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(segment, "")
    return name


class EpochRandomSampler(RandomSampler):
    """A shuffling sampler whose order depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` before every epoch (also after a resume), so
    epoch e of a resumed run sees the same order as epoch e of an uninterrupted one; a
    plain ``RandomSampler`` would restart its generator from the seed. It stays a
    ``RandomSampler``, so under DDP Lightning swaps it for its ``DistributedSampler``
    (seeded, per-epoch) as before.
    """

    def __init__(self, data_source: Sequence[Any], seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration gives."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        words = np.random.SeedSequence([self.seed % (1 << 63), self.epoch]).generate_state(2)
        generator = torch.Generator().manual_seed((int(words[0]) << 32) | int(words[1]))
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


def example_loader(
    adapter: Adapter,
    examples: Sequence[Any],
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A DataLoader over examples that batches with ``adapter.encode``; with ``shuffle``,
    the order of epoch e depends only on ``(seed, e)`` (:class:`EpochRandomSampler`).
    A shuffled loader drops the last short batch unless one rank's share of the examples
    (``ceil(n / world_size)``: Lightning's ``DistributedSampler`` under DDP) is shorter than
    a batch, so every rank trains on at least one batch."""
    if len(examples) == 0:
        raise ValueError("no training examples")
    data = list(examples)
    per_rank = -(-len(data) // max(1, int(world_size)))
    return DataLoader(
        data,
        batch_size=batch_size,
        sampler=EpochRandomSampler(data, seed) if shuffle else None,
        collate_fn=adapter.encode,
        # Only seeds worker processes; keeps the global random state untouched.
        generator=torch.Generator().manual_seed(seed),
        drop_last=shuffle and per_rank >= batch_size,
    )


def apply_lora(adapter: Adapter, lora: LoraSettings) -> Adapter:
    """Wrap ``adapter.model`` with peft LoRA layers (the model's code is not edited).

    Targets are ``lora.target_modules`` or else the adapter's ``default_lora_targets``
    (language-model projections). Only the LoRA weights stay trainable. Returns the same
    adapter, whose ``model`` is now the ``PeftModel``.
    """
    from peft import LoraConfig, get_peft_model

    targets = list(lora.target_modules) or list(adapter.default_lora_targets)
    if not targets:
        raise ValueError(
            f"adapter {adapter.name!r} has no default LoRA targets; set lora.target_modules"
        )
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
    )
    try:
        adapter.model = get_peft_model(adapter.model, config)
    except ValueError as error:  # peft: no module matched the targets
        raise ValueError(f"LoRA targets {targets} do not match the model: {error}") from None
    return adapter


def trainable_parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
