"""The LightningModule that trains any registered adapter.

``UMMModule`` reads only the adapter seam: ``adapter.encode`` builds batches (used as the
DataLoader's ``collate_fn``), ``adapter.forward`` returns the task losses. Extra loss terms
(the contextual-prediction regularizer) plug in through ``loss_terms``: callables
``term(adapter, batch, output, step) -> (weighted_loss, logs)``.

Logged every step: ``loss/total``, ``loss/task``, ``loss/text``, ``loss/image``,
``tokens/text``, ``tokens/image``, ``lr``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from unifyreg.adapters.base import Adapter, ForwardOutput
from unifyreg.config import LoraSettings, OptimConfig

__all__ = [
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

    def on_fit_start(self) -> None:
        # from_pretrained leaves models in eval mode; training needs dropout & co. on.
        self.model.train()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        want_hidden = self.hidden_states_for_terms and bool(self.loss_terms)
        out = self.adapter.forward(batch, output_hidden_states=want_hidden)
        loss = out.task_loss
        batch_size = int(batch["input_ids"].shape[0])
        logs: dict[str, Any] = {
            "loss/task": loss.detach(),
            "loss/text": out.text_loss.detach(),
            "loss/image": out.image_loss.detach(),
            "tokens/text": out.text_tokens.float(),
            "tokens/image": out.image_tokens.float(),
        }
        for term in self.loss_terms:
            extra, term_logs = term(self.adapter, batch, out, self.global_step)
            loss = loss + extra
            logs.update(
                {k: v.detach() if isinstance(v, Tensor) else v for k, v in term_logs.items()}
            )
        logs["loss/total"] = loss.detach()
        self.log_dict(logs, prog_bar=False, batch_size=batch_size)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=batch_size)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.optim.lr,
            betas=tuple(self.optim.betas),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(
                step, self.optim.warmup_steps, self.total_steps, self.optim.min_lr_ratio
            ),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_before_optimizer_step(self, optimizer) -> None:
        self.log("lr", optimizer.param_groups[0]["lr"], prog_bar=False)


def example_loader(
    adapter: Adapter,
    examples: Sequence[Any],
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader over examples that batches with ``adapter.encode`` (seeded shuffle)."""
    if len(examples) == 0:
        raise ValueError("no training examples")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        list(examples),
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=adapter.encode,
        generator=generator if shuffle else None,
        drop_last=shuffle and len(examples) >= batch_size,
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
