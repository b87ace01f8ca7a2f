"""The one seam between model families and everything else.

An adapter turns examples into model inputs, runs the model and returns a
:class:`ForwardOutput`: hidden states of every layer (index 0 = input embeddings), a role
label per position, and the task losses with their token counts. Probes, metrics,
callbacks and losses read only this object.

Examples are duck-typed: any object with the attributes ``prompt_text``,
``prompt_image``, ``response_text``, ``response_image`` (``None`` where absent),
``task`` and ``category`` (e.g. :class:`unifyreg.toy.Example`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: ``hook(input_embeddings [B, S, d], batch) -> input_embeddings``.
EmbeddingHook = Callable[[Tensor, dict], Tensor]

__all__ = [
    "ADAPTERS",
    "Adapter",
    "EmbeddingHook",
    "ForwardOutput",
    "available_adapters",
    "get_adapter_class",
    "register_adapter",
]


@dataclass(init=False)
class ForwardOutput:
    """What every adapter's forward pass returns.

    - ``hidden_layers``: the hidden states as a tuple of ``len(layers)`` tensors
      ``[B, S, d]`` (all ``L + 1`` by default; index 0 of the full stack is the input
      embeddings), or ``None`` when not asked for. Adapters pass the model's own per-layer
      tensors, so no second copy of the batch's hidden states is made;
    - ``hidden_states``: the same stacked as ``[len(layers), B, S, d]`` (a new tensor at
      every access; readers that can work layer by layer use ``hidden_layers``);
    - ``layers``: the layer index of each entry of ``hidden_layers``;
    - ``roles``: ``[B, S]`` int64 :class:`unifyreg.roles.Role` labels;
    - ``text_loss`` / ``image_loss``: mean token cross-entropy over text / image response
      targets (0 when there are none), with ``text_tokens`` / ``image_tokens`` counts;
    - ``logits``: ``[B, S, V]`` or ``None``.

    ``task_loss`` is the token-weighted mean over both: ``(text_loss * text_tokens +
    image_loss * image_tokens) / (text_tokens + image_tokens)``.

    The constructor's ``hidden_states`` takes either a stacked ``[n, B, S, d]`` tensor
    (kept as views of it) or a sequence of ``n`` per-layer ``[B, S, d]`` tensors.
    """

    hidden_layers: tuple[Tensor, ...] | None
    layers: tuple[int, ...]
    roles: Tensor
    text_loss: Tensor
    text_tokens: Tensor
    image_loss: Tensor
    image_tokens: Tensor
    logits: Tensor | None = None

    def __init__(
        self,
        hidden_states: Tensor | Sequence[Tensor] | None,
        layers: Sequence[int],
        roles: Tensor,
        text_loss: Tensor,
        text_tokens: Tensor,
        image_loss: Tensor,
        image_tokens: Tensor,
        logits: Tensor | None = None,
    ) -> None:
        if hidden_states is None:
            self.hidden_layers = None
        elif isinstance(hidden_states, Tensor):
            self.hidden_layers = tuple(hidden_states.unbind(0))
        else:
            self.hidden_layers = tuple(hidden_states)
        self.layers = tuple(layers)
        if self.hidden_layers is not None and len(self.hidden_layers) != len(self.layers):
            raise ValueError(
                f"{len(self.hidden_layers)} hidden-state tensors for "
                f"{len(self.layers)} layer indices"
            )
        self.roles = roles
        self.text_loss = text_loss
        self.text_tokens = text_tokens
        self.image_loss = image_loss
        self.image_tokens = image_tokens
        self.logits = logits

    @property
    def hidden_states(self) -> Tensor | None:
        """``[len(layers), B, S, d]``: ``hidden_layers`` stacked (a copy, made per access)."""
        return None if self.hidden_layers is None else torch.stack(self.hidden_layers)

    @property
    def task_loss(self) -> Tensor:
        total = (self.text_tokens + self.image_tokens).clamp_min(1)
        return (self.text_loss * self.text_tokens + self.image_loss * self.image_tokens) / total


class Adapter(abc.ABC):
    """Protocol every model family implements (see DESIGN.md, "One seam").

    Subclasses set ``name`` and implement the abstract methods. ``model`` is the wrapped
    ``nn.Module`` (possibly wrapped again by peft); ``num_layers`` is L, the number of
    transformer blocks (hidden states have L + 1 entries).
    """

    name: str = ""
    #: Module-name suffixes LoRA targets by default (language model only).
    default_lora_targets: tuple[str, ...] = ()

    model: nn.Module

    @property
    @abc.abstractmethod
    def num_layers(self) -> int:
        """L: the number of transformer blocks of the language model."""

    @abc.abstractmethod
    def encode(self, examples: Sequence[Any]) -> dict[str, Tensor]:
        """Examples -> a padded batch (tensors only, including ``roles`` ``[B, S]``)."""

    @abc.abstractmethod
    def input_embeddings(self, batch: dict[str, Tensor]) -> Tensor:
        """``[B, S, d]`` inputs of the language model (hidden state 0) for an encoded batch."""

    @abc.abstractmethod
    def forward(
        self,
        batch: dict[str, Tensor],
        output_hidden_states: bool = True,
        layers: Sequence[int] | None = None,
        keep_logits: bool = False,
        embedding_hook: EmbeddingHook | None = None,
    ) -> ForwardOutput:
        """Run the model on an encoded batch (teacher-forced) -> :class:`ForwardOutput`.

        ``embedding_hook(embeds, batch) -> embeds`` may replace the language model's input
        embeddings ``[B, S, d]`` before the layers run (the contextual-prediction loss
        swaps masked image positions for a learned mask embedding this way).
        """

    @abc.abstractmethod
    def generate_text(self, examples: Sequence[Any], max_new_tokens: int = 8) -> list[str]:
        """Greedy text responses to the examples' prompts."""

    @abc.abstractmethod
    def generate_images(self, examples: Sequence[Any]) -> list[Any]:
        """Greedy image responses to the examples' (text) prompts."""

    @abc.abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write everything :meth:`load` needs to ``directory`` (``save_pretrained`` style)."""

    @classmethod
    @abc.abstractmethod
    def load(cls, directory: str | Path, **kwargs: Any) -> Adapter:
        """Load from a local directory (never from a hub)."""

    # ------------------------------------------------------------------ shared helpers

    @property
    def hidden_size(self) -> int:
        """Width d of the language model's hidden states (of its input embeddings)."""
        return int(self.model.get_input_embeddings().embedding_dim)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def resolve_layers(self, layers: Sequence[int] | None) -> tuple[int, ...]:
        """Validate layer indices in ``[0, L]`` (negative ones count from L); None = all."""
        total = self.num_layers + 1
        if layers is None:
            return tuple(range(total))
        resolved = []
        for layer in layers:
            index = layer + total if layer < 0 else layer
            if not 0 <= index < total:
                raise ValueError(
                    f"layer {layer} out of range: this model has layers 0..{total - 1}"
                )
            resolved.append(index)
        return tuple(resolved)


ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(name: str) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator: make an adapter available to configs under ``name``."""

    def decorate(cls: type[Adapter]) -> type[Adapter]:
        if name in ADAPTERS and ADAPTERS[name] is not cls:
            raise ValueError(f"adapter name {name!r} is already registered")
        cls.name = name
        ADAPTERS[name] = cls
        return cls

    return decorate


def available_adapters() -> tuple[str, ...]:
    """Names of the registered adapters, sorted."""
    return tuple(sorted(ADAPTERS))


def get_adapter_class(name: str) -> type[Adapter]:
    """The adapter registered as ``name``; ValueError lists the valid names."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ValueError(
            f"unknown adapter {name!r}; registered: {', '.join(available_adapters())}"
        ) from None
