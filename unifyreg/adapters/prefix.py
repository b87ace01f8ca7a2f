"""Prefix reuse, the ``transformers`` side: the caches an adapter passes its model.

``L_ctx`` runs the model a second time on a few rows of the batch with their image
inputs masked. Every position before the first masked input sees the same inputs under
the same attention in both passes, so its keys and values are those of the main pass. An
adapter that declares ``supports_prefix_reuse`` records them in the main pass
(``forward(..., record_prefix=PrefixRequest(rows, length))`` fills
``ForwardOutput.prefix_states``, through :func:`recording_cache`) and runs only positions
``[length, S)`` in the second (``forward(sub_batch, ..., prefix=states)``, through
:func:`replay_cache`), attending to the recorded keys and values. Gradients reach the
prefix through the main pass's graph, so the second pass's logits, loss and gradients
equal those of the full pass up to floating-point reassociation (tests/test_prefix_reuse.py).
The seam's part (:class:`unifyreg.adapters.base.PrefixRequest`, ``PrefixStates``,
``shared_prefix_length``: how long the shared prefix is) lives in :mod:`.base`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from unifyreg.adapters.base import PrefixRequest, PrefixStates, cache_argument

__all__ = [
    "PrefixPass",
    "check_prefix_forward",
    "check_prefix_replayed",
    "recorded_states",
    "recording_cache",
    "replay_cache",
]


def recording_cache(request: PrefixRequest):
    """``(cache, layers)``: a ``transformers`` cache to pass to the main pass, and the list
    it fills with ``(keys, values)`` of ``request``'s rows and prefix, one entry per
    attention layer. The cache stores nothing else and hands every layer its own keys and
    values back, so the main pass computes exactly what it computes without a cache."""
    from transformers.cache_utils import Cache, DynamicLayer

    recorded: list[tuple[Tensor, Tensor]] = []
    rows, length = request.rows, request.length

    class _RecordingLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            index = rows.to(key_states.device)
            recorded.append((key_states[index, :, :length], value_states[index, :, :length]))
            return key_states, value_states

        def get_seq_length(self) -> int:
            return 0

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return query_length, 0

    return Cache(layer_class_to_replicate=_RecordingLayer), recorded


def recorded_states(
    request: PrefixRequest | None, recorded: list | None, expected_layers: int
) -> PrefixStates | None:
    """The :class:`PrefixStates` of a pass that ran with :func:`recording_cache`, or None
    without a request, or when the model did not hand every one of its
    ``expected_layers`` attention layers to the cache (e.g. it dropped the cache under
    gradient checkpointing): the second pass then runs in full."""
    if request is None or recorded is None or len(recorded) != expected_layers:
        return None
    return PrefixStates(request.rows, request.length, tuple(recorded))


def replay_cache(states: PrefixStates):
    """A ``transformers`` ``DynamicCache`` holding ``states`` (the second pass appends its
    own keys and values to it)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    for index, (keys, values) in enumerate(states.layers):
        cache.update(keys, values, index)
    return cache


def check_prefix_forward(
    model: nn.Module, output_hidden_states: bool, layers: Sequence[int] | None
) -> None:
    """Before a pass that starts after a prefix: it has no hidden states for the prefix
    (ValueError when asked for them), and a model whose layers drop their cache in training
    (gradient checkpointing) would attend to the suffix alone (RuntimeError)."""
    if output_hidden_states or layers is not None:
        raise ValueError(
            "a forward pass with a prefix computes positions after it only: "
            "call it with output_hidden_states=False and no layers"
        )
    if model.training and torch.is_grad_enabled():
        if any(getattr(module, "gradient_checkpointing", False) for module in model.modules()):
            raise RuntimeError(_DROPPED)


_DROPPED = (
    "the model does not attend to a recorded prefix (its layers drop the cache under "
    "gradient checkpointing): run L_ctx with loss.ctx_reuse_prefix=false"
)


def check_prefix_replayed(cache, expected_length: int) -> None:
    """After a pass with :func:`replay_cache`: RuntimeError unless every layer saw the
    prefix (a model that drops its cache, e.g. under gradient checkpointing, would have
    attended to the suffix alone)."""
    lengths = {layer.get_seq_length() for layer in cache.layers}
    if lengths != {expected_length}:
        raise RuntimeError(_DROPPED)


class PrefixPass:
    """An adapter's forward pass with ``record_prefix`` or ``prefix`` (either may be None):
    what to cut from its inputs, what to pass its model, what to check and return.

    Example (inside ``forward``)::

        run = PrefixPass(model, record_prefix, prefix, output_hidden_states, layers)
        embeds, attention, positions = run.cut(embeds, attention, positions)
        out = model(inputs_embeds=embeds, attention_mask=attention, **run.model_kwargs(),
                    **positions)
        run.check(embeds.shape[1])
        ...  # position t of the outputs is position run.start + t of the batch
        ForwardOutput(..., prefix_states=run.states(num_layers))
    """

    def __init__(
        self,
        model: nn.Module,
        record_prefix: PrefixRequest | None,
        prefix: PrefixStates | None,
        output_hidden_states: bool,
        layers: Sequence[int] | None,
    ) -> None:
        if prefix is not None and record_prefix is not None:
            raise ValueError("a pass either records a prefix or starts after one, not both")
        self.model, self.request, self.prefix = model, record_prefix, prefix
        self.start = 0 if prefix is None else prefix.length
        self.cache: Any = None
        self._recorded: list | None = None
        if prefix is not None:
            check_prefix_forward(model, output_hidden_states, layers)
            self.cache = replay_cache(prefix)
        elif record_prefix is not None:
            self.cache, self._recorded = recording_cache(record_prefix)

    def cut(
        self, embeds: Tensor, attention: Tensor, positions: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Inputs ``[B, S, d]``, the attention mask (2-D: kept whole, it spans the prefix's
        keys too; 4-D: its query rows after the prefix) and position keywords (their last
        dim cut) of the positions this pass runs."""
        positions = dict(positions or {})
        if self.prefix is None:
            return embeds, attention, positions
        start = self.start
        if attention.dim() == 4:
            attention = attention[:, :, start:]
        return embeds[:, start:], attention, {k: v[..., start:] for k, v in positions.items()}

    def model_kwargs(self) -> dict[str, Any]:
        """``use_cache`` and the cache keyword for the model call."""
        if self.cache is None:
            return {"use_cache": False}
        return {"use_cache": True, **cache_argument(self.model, self.cache)}

    def check(self, query_length: int) -> None:
        """After the model call: :func:`check_prefix_replayed` when starting after a prefix."""
        if self.prefix is not None:
            check_prefix_replayed(self.cache, self.start + query_length)

    def states(self, expected_layers: int) -> PrefixStates | None:
        """What a recording pass kept (:func:`recorded_states`), else None."""
        return recorded_states(self.request, self._recorded, expected_layers)
