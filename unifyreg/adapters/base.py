"""The one seam between model families and everything else.

An adapter turns examples into model inputs, runs the model and returns a
:class:`ForwardOutput`: hidden states of the layers asked for (index 0 = input
embeddings), a role label per position, and the task losses with their token counts.
Probes, metrics, callbacks and losses read only this object.

Hidden states are captured by forward hooks on the family's layer list (:class:`LayerStack`,
:func:`capture_hidden_states`), the same mechanism for every family: only the layers asked
for are kept, and the model is never asked for all of its hidden states. Layer 0 is the
input of the first layer (the input embeddings, after any embedding hook); layer ``l``
is the output of block ``l``. The last layer is taken before the final norm unless
``final_norm=True`` (``probe.final_norm``), which takes the final norm's output for it
(what ``transformers``' ``output_hidden_states`` returns as its last entry).

Batches are dicts of tensors with at least ``input_ids``, ``attention_mask`` (``[B, S]``,
1 = a real token), ``roles`` and ``target_kind``. Two optional keys are part of the seam:

- ``attention_mask_4d`` ``[B, 1, S, S]``: an additive float mask (0 = attend, the dtype's
  minimum = blocked) that replaces the causal mask, for families whose image tokens see
  each other (:func:`omni_attention_mask`: text causal, every token of an image sees the
  whole image; Show-o's omni-attention, Harmon's masked autoregression);
- ``masked_positions`` ``[B, S]`` bool: *masked prediction*. These positions' inputs are
  replaced by the family's mask embedding (unless an embedding hook replaces them first),
  and the image loss is the cross-entropy of the image head at each masked position
  against the token that was there (``input_ids`` keep the original tokens), over the
  masked positions only (``image_tokens`` counts them); without ``attention_mask_4d``
  the adapter takes :func:`omni_attention_mask`. A family whose images are generated in
  another sequence than ``roles`` labels (a two-stage model's denoiser) indexes that
  sequence instead: :meth:`Adapter.generation_roles` gives its roles;
- ``timesteps`` ``[B]`` float and ``noise_seeds`` ``[B]`` int64, for continuous families
  (``image_objective = "flow"``): the noise level ``t`` of each row's image response
  (unifyreg's convention, :mod:`unifyreg.adapters.continuous`: ``x_t = (1 - t) x_0 + t
  eps``) and the seed of its noise ``eps``. ``encode`` seeds each row from a stable hash of
  its example; the probe sets ``timesteps`` to ``probe.timestep``; ``training_batch`` draws
  both from the family's schedule.

A family with more than one stack of layers (a two-stage model: an LLM and a denoiser)
returns the others as :class:`HiddenStack` entries of ``ForwardOutput.extra_stacks``, each
with its own layers, roles, depth and the probe quantities it serves.

:meth:`Adapter.training_batch` is where a family's own training objective changes a
batch (the toy's ``contextual`` objective and Show-o draw ``masked_positions`` there);
the probe and evaluation never call it.

Examples are duck-typed: any object with the attributes ``prompt_text``,
``prompt_image``, ``response_text``, ``response_image`` (``None`` where absent),
``task`` and ``category`` (e.g. :class:`unifyreg.toy.Example`).
"""

from __future__ import annotations

import abc
import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: ``hook(input_embeddings [B, S, d], batch) -> input_embeddings``.
EmbeddingHook = Callable[[Tensor, dict], Tensor]

#: What a position's token is to the task loss: not a target, a text target, an image
#: target (stored at the target token's own position: ``target_kind[t]`` describes
#: ``input_ids[t]``, predicted from position ``t - 1`` by next-token families).
TARGET_NONE, TARGET_TEXT, TARGET_IMAGE = 0, 1, 2

#: Default of ``final_norm``: the last layer is taken before the final norm, like every
#: other layer (the residual stream); README, "Which hidden states".
FINAL_NORM_DEFAULT = False

__all__ = [
    "FINAL_NORM_DEFAULT",
    "IMAGE_LOSS_KINDS",
    "IMAGE_ROLES",
    "TARGET_IMAGE",
    "TARGET_NONE",
    "TARGET_TEXT",
    "Adapter",
    "EmbeddingHook",
    "ForwardOutput",
    "HiddenStack",
    "LayerStack",
    "PrefixRequest",
    "PrefixStates",
    "allowed_attention",
    "capture_hidden_states",
    "fraction_layers",
    "cosine_masked_positions",
    "model_attention_mask",
    "omni_attention_mask",
    "select_rows",
    "shared_prefix_length",
]

#: Roles of image positions (prompt or response).
IMAGE_ROLES = (3, 5)  # Role.IMAGE_PROMPT, Role.IMAGE_RESPONSE (roles.py is below this file)


#: What ``ForwardOutput.image_loss`` is: ``ce`` (a cross-entropy over image tokens, counted
#: in tokens) or ``mse`` (a flow-matching / noise-prediction mean squared error, the mean
#: over the scored latent elements, counted in latent tokens: ``image_tokens``).
IMAGE_LOSS_KINDS = ("ce", "mse")


@dataclass(init=False)
class HiddenStack:
    """A stack of hidden states beside a :class:`ForwardOutput`'s primary one (a two-stage
    model's denoiser; the generation stream of a mixture-of-transformers).

    - ``name``: what the stack is (``"denoiser"``); the primary stack is named by
      ``ForwardOutput.stack_name``;
    - ``layers``: its layer indices (0 = the input of its first block, ``l`` = the output of
      block ``l``), one per entry of ``hidden_layers``;
    - ``hidden_layers``: per-layer ``[B_k, S_k, d_k]`` tensors (None when not asked for);
    - ``roles``: ``[B_k, S_k]`` Role labels of its own sequence;
    - ``depth``: ``L_k``, its number of blocks (layer ``l`` sits at depth fraction ``l / L_k``);
    - ``quantities``: the probe quantities (:data:`unifyreg.quantities.QUANTITIES`) computed on
      this stack instead of the primary one (a denoiser: ``("response/image",)``, its
      conditioning tokens as the prompt P and its latent tokens as the response R);
    - ``rows``: ``[B_k]`` indices of the batch rows it holds, in order (None = all ``B``).
    """

    name: str
    layers: tuple[int, ...]
    hidden_layers: tuple[Tensor, ...] | None
    roles: Tensor
    depth: int
    quantities: tuple[str, ...]
    rows: Tensor | None = None

    def __init__(
        self,
        name: str,
        layers: Sequence[int],
        hidden_states: Sequence[Tensor] | None,
        roles: Tensor,
        depth: int,
        quantities: Sequence[str],
        rows: Tensor | None = None,
    ) -> None:
        self.name = name
        self.layers = tuple(int(layer) for layer in layers)
        self.hidden_layers = None if hidden_states is None else tuple(hidden_states)
        if self.hidden_layers is not None and len(self.hidden_layers) != len(self.layers):
            raise ValueError(
                f"stack {name!r}: {len(self.hidden_layers)} hidden-state tensors for "
                f"{len(self.layers)} layer indices"
            )
        if roles.dim() != 2:
            raise ValueError(f"stack {name!r}: roles must be [B, S], got {tuple(roles.shape)}")
        if rows is not None and rows.numel() != roles.shape[0]:
            raise ValueError(
                f"stack {name!r}: {rows.numel()} row indices for {roles.shape[0]} rows of roles"
            )
        self.roles = roles
        self.depth = int(depth)
        if self.depth < 1:
            raise ValueError(f"stack {name!r}: depth must be >= 1, got {depth}")
        self.quantities = tuple(quantities)
        self.rows = rows

    def fractions(self) -> tuple[float, ...]:
        """Depth fraction ``l / L_k`` of each layer."""
        return tuple(layer / self.depth for layer in self.layers)


def fraction_layers(layers: Sequence[int], depth: int, other_depth: int) -> tuple[int, ...]:
    """The layers of a stack of ``other_depth`` blocks at the depth fractions of ``layers`` of
    a stack of ``depth`` blocks: ``round(l * other_depth / depth)`` for each, sorted, without
    duplicates (how ``probe.layers`` and ``loss.div_layers``, which name layers of the primary
    stack, pick the layers of the other stacks)."""
    if depth < 1 or other_depth < 1:
        raise ValueError(f"depths must be >= 1, got {depth} and {other_depth}")
    return tuple(sorted({int(round(layer * other_depth / depth)) for layer in layers}))


@dataclass(init=False)
class ForwardOutput:
    """What every adapter's forward pass returns.

    - ``hidden_layers``: the hidden states as a tuple of ``len(layers)`` tensors
      ``[B, S, d]`` (all ``L + 1`` by default; index 0 of the full stack is the input
      embeddings), or ``None`` when not asked for;
    - ``hidden_states``: the same stacked as ``[len(layers), B, S, d]`` (a new tensor at
      every access; readers that can work layer by layer use ``hidden_layers``);
    - ``layers``: the layer index of each entry of ``hidden_layers``;
    - ``roles``: ``[B, S]`` int64 :class:`unifyreg.roles.Role` labels;
    - ``text_loss`` / ``image_loss``: mean loss over text / image response targets (0 when
      there are none), with ``text_tokens`` / ``image_tokens`` counts (the scored targets);
      ``image_loss_kind`` says what the image loss is (:data:`IMAGE_LOSS_KINDS`: ``ce``, or
      ``mse`` for continuous families: the mean squared error over the scored latent
      elements, ``image_tokens`` counting the scored latent tokens);
    - ``logits``: ``[B, S, V]`` or ``None``;
    - ``depth``: L, the number of blocks of the primary stack (None: not given; layer ``l``
      sits at depth fraction ``l / L``); ``stack_name``: the primary stack's name;
    - ``extra_stacks``: further :class:`HiddenStack` entries (a two-stage model's denoiser),
      each serving the quantities it names; the primary stack serves the others;
    - ``prefix_states``: the keys and values a ``record_prefix`` request asked for
      (:class:`unifyreg.adapters.prefix.PrefixStates`), or ``None``.

    ``task_loss`` is :meth:`weighted_task_loss` with the family's default weights: for
    ``ce`` the token-weighted mean ``(text_loss * text_tokens + image_loss * image_tokens) /
    (text_tokens + image_tokens)``; for ``mse`` ``text_loss + image_loss`` (weights 1 and
    1, as BAGEL's trainer's ``ce_weight``/``mse_weight`` defaults: token counts of a
    cross-entropy and of a squared error are not commensurable).

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
    image_loss_kind: str = "ce"
    depth: int | None = None
    stack_name: str = "main"
    extra_stacks: tuple[HiddenStack, ...] = ()
    prefix_states: PrefixStates | None = None

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
        *,
        image_loss_kind: str = "ce",
        depth: int | None = None,
        stack_name: str = "main",
        extra_stacks: Sequence[HiddenStack] = (),
        prefix_states: PrefixStates | None = None,
    ) -> None:
        self.prefix_states = prefix_states
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
        if image_loss_kind not in IMAGE_LOSS_KINDS:
            raise ValueError(
                f"image_loss_kind must be one of {', '.join(IMAGE_LOSS_KINDS)}, "
                f"got {image_loss_kind!r}"
            )
        self.roles = roles
        self.text_loss = text_loss
        self.text_tokens = text_tokens
        self.image_loss = image_loss
        self.image_tokens = image_tokens
        self.logits = logits
        self.image_loss_kind = image_loss_kind
        self.depth = None if depth is None else int(depth)
        self.stack_name = stack_name
        self.extra_stacks = tuple(extra_stacks)
        served = [q for stack in self.extra_stacks for q in stack.quantities]
        if len(served) != len(set(served)):
            raise ValueError(f"a quantity is served by two extra stacks: {served}")
        names = [stack_name, *(stack.name for stack in self.extra_stacks)]
        if len(names) != len(set(names)):
            raise ValueError(f"stack names must differ, got {names}")

    @property
    def hidden_states(self) -> Tensor | None:
        """``[len(layers), B, S, d]``: ``hidden_layers`` stacked (a copy, made per access)."""
        return None if self.hidden_layers is None else torch.stack(self.hidden_layers)

    @property
    def task_loss(self) -> Tensor:
        """The task loss with the family's default weights (class docstring)."""
        return self.weighted_task_loss()

    def weighted_task_loss(
        self, text_weight: float | None = None, image_weight: float | None = None
    ) -> Tensor:
        """``text_weight * text_loss + image_weight * image_loss`` (``loss.text_weight``,
        ``loss.image_weight``; a weight left None is 1 when the other is given). Both None:
        the family's default (class docstring): for a cross-entropy image loss the
        token-weighted mean, exactly as before the weights existed."""
        if text_weight is None and image_weight is None:
            if self.image_loss_kind == "ce":
                total = (self.text_tokens + self.image_tokens).clamp_min(1)
                return (
                    self.text_loss * self.text_tokens + self.image_loss * self.image_tokens
                ) / total
            text_weight = image_weight = 1.0
        text_weight = 1.0 if text_weight is None else float(text_weight)
        image_weight = 1.0 if image_weight is None else float(image_weight)
        return text_weight * self.text_loss + image_weight * self.image_loss

    def primary_stack(self) -> HiddenStack:
        """The primary stack as a :class:`HiddenStack` (all rows), serving every quantity no
        extra stack serves. ValueError when ``depth`` is not set and there are extra stacks
        (depth fractions need it)."""
        from unifyreg.quantities import QUANTITIES

        served = {q for stack in self.extra_stacks for q in stack.quantities}
        depth = self.depth
        if depth is None:
            if self.extra_stacks:
                raise ValueError("a ForwardOutput with extra stacks must give its depth")
            depth = max(max(self.layers, default=1), 1)
        return HiddenStack(
            self.stack_name,
            self.layers,
            self.hidden_layers,
            self.roles,
            depth,
            tuple(q for q in QUANTITIES if q not in served),
        )

    def stacks(self) -> tuple[HiddenStack, ...]:
        """Every stack: the primary one (:meth:`primary_stack`) first, then ``extra_stacks``."""
        return (self.primary_stack(), *self.extra_stacks)

    def stack_for(self, quantity: str) -> HiddenStack:
        """The stack ``quantity`` is computed on."""
        for stack in self.extra_stacks:
            if quantity in stack.quantities:
                return stack
        return self.primary_stack()


# ---------------------------------------------------------------------- layer capture


@dataclass(frozen=True)
class LayerStack:
    """Where a family's hidden states live, as dotted module paths from the adapter's
    model (under any peft wrapper): ``blocks`` the ``nn.ModuleList`` whose block ``l - 1``
    outputs hidden state ``l``; ``final_norm`` the norm applied after the last block (""
    when there is none). ``output`` picks the hidden state out of a block's output (default:
    the tensor itself, or the first element of a tuple); a block whose input is not its
    first argument or ``hidden_states`` keyword sets ``input``."""

    blocks: str
    final_norm: str = ""
    output: Callable[[Any], Tensor] | None = None
    input: Callable[[tuple, dict], Tensor] | None = None

    def modules(self, model: nn.Module) -> tuple[nn.ModuleList, nn.Module | None]:
        """``(blocks, final norm or None)`` of ``model``; ValueError names a missing path."""
        try:
            blocks = operator.attrgetter(self.blocks)(model)
        except AttributeError:
            raise ValueError(f"the model has no layer list at {self.blocks!r}") from None
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            raise ValueError(f"{self.blocks!r} is not a non-empty list of modules")
        norm = None
        if self.final_norm:
            try:
                norm = operator.attrgetter(self.final_norm)(model)
            except AttributeError:
                raise ValueError(f"the model has no final norm at {self.final_norm!r}") from None
        return blocks, norm


def _first_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    for name in ("last_hidden_state", "hidden_states"):
        hidden = getattr(value, name, None)
        if isinstance(hidden, Tensor):
            return hidden
    raise TypeError(f"cannot find the hidden state in a block output of type {type(value)}")


def _block_input(args: tuple, kwargs: dict) -> Tensor:
    if args and isinstance(args[0], Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return kwargs["hidden_states"]
    raise TypeError("cannot find the hidden state among the first block's inputs")


class CapturedStates:
    """Hidden states caught by :func:`capture_hidden_states`, one slot per asked layer."""

    def __init__(self, layers: Sequence[int]) -> None:
        self.layers = tuple(layers)
        self._states: dict[int, Tensor] = {}

    def put(self, layer: int, value: Tensor) -> None:
        """Store ``value`` as layer ``layer``'s hidden state (a later put replaces it)."""
        self._states[layer] = value

    def states(self) -> tuple[Tensor, ...]:
        """The captured tensors in the order of ``layers``; RuntimeError if one is missing
        (the model did not run through that layer)."""
        missing = [layer for layer in self.layers if layer not in self._states]
        if missing:
            raise RuntimeError(f"no hidden state was captured for layer(s) {missing}")
        return tuple(self._states[layer] for layer in self.layers)


@contextmanager
def capture_hidden_states(
    model: nn.Module, stack: LayerStack, layers: Sequence[int], final_norm: bool = False
) -> Iterator[CapturedStates]:
    """Inside the block, forward hooks on ``stack``'s modules of ``model`` keep the hidden
    states of ``layers`` (``0..L``; module docstring for which tensor each is). Only the
    hooks the asked layers need are installed, and all are removed on leaving."""
    blocks, norm = stack.modules(model)
    total = len(blocks)
    captured = CapturedStates(layers)
    pick = stack.output or _first_tensor
    read_input = stack.input or _block_input
    handles = []
    try:
        wanted = set(captured.layers)
        if 0 in wanted:

            def before_first(_module, args, kwargs):
                captured.put(0, read_input(args, kwargs))

            handles.append(blocks[0].register_forward_pre_hook(before_first, with_kwargs=True))
        for layer in sorted(wanted - {0}):
            if not 1 <= layer <= total:
                raise ValueError(f"layer {layer} out of range: this model has layers 0..{total}")
            if layer == total and final_norm:
                if norm is None:
                    raise ValueError("final_norm=True, but this model has no final norm")

                def after_norm(_module, _args, output, _layer=layer):
                    captured.put(_layer, _first_tensor(output))

                handles.append(norm.register_forward_hook(after_norm))
            else:

                def after_block(_module, _args, output, _layer=layer):
                    captured.put(_layer, pick(output))

                handles.append(blocks[layer - 1].register_forward_hook(after_block))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------- attention masks


def omni_attention_mask(
    roles: Tensor, attention_mask: Tensor, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``[B, 1, S, S]`` additive mask: causal over the sequence, padding keys blocked, and
    every position of an image (a contiguous run of one image role, prompt or response)
    attends to every position of that image. 0 = attend, ``finfo(dtype).min`` = blocked
    (finite, so a padding row that sees nothing stays NaN-free)."""
    if roles.dim() != 2 or attention_mask.shape != roles.shape:
        raise ValueError(
            f"roles and attention_mask must both be [B, S], got {tuple(roles.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    batch, length = roles.shape
    device = roles.device
    is_image = torch.zeros_like(roles, dtype=torch.bool)
    for role in IMAGE_ROLES:
        is_image |= roles == role
    # Number the runs: a new run starts where the role changes.
    change = torch.ones_like(roles, dtype=torch.bool)
    change[:, 1:] = roles[:, 1:] != roles[:, :-1]
    run = torch.cumsum(change.long(), dim=1)
    same_image = (run[:, :, None] == run[:, None, :]) & is_image[:, :, None] & is_image[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed = (causal[None] | same_image) & attention_mask.bool()[:, None, :]
    mask = torch.zeros((batch, 1, length, length), dtype=dtype, device=device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def cosine_masked_positions(
    roles: Tensor, role: int = 5, generator: torch.Generator | None = None
) -> Tensor:
    """``[B, S]`` bool: for each row, a random subset of its ``role`` positions (default
    IMAGE_RESPONSE) of size ``max(1, ceil(r * n))`` with ``r = cos(pi/2 * u)``,
    ``u ~ U(0, 1)`` drawn per row (MaskGIT's cosine schedule; rows without such a position
    get none). Draws from ``generator`` (None: the global torch generator)."""
    candidates = roles == role
    counts = candidates.sum(dim=1)
    u = torch.rand(roles.shape[0], generator=generator)
    ratio = torch.cos(0.5 * torch.pi * u).to(roles.device)
    wanted = torch.ceil(ratio * counts).clamp_min(1).minimum(counts)
    # Random keys for candidates (others last): the `wanted` smallest per row are masked.
    keys = torch.rand(roles.shape, generator=generator).to(roles.device)
    keys = torch.where(candidates, keys, torch.full_like(keys, 2.0))
    rank = keys.argsort(dim=1).argsort(dim=1)
    return candidates & (rank < wanted[:, None])


def model_attention_mask(
    batch: dict[str, Tensor], device: torch.device, dtype: torch.dtype
) -> Tensor:
    """What to pass a model as ``attention_mask``: the batch's ``attention_mask_4d`` (in
    ``dtype``), an :func:`omni_attention_mask` when it asks for masked prediction
    (``masked_positions``) without one, else the 2-D padding mask."""
    if "attention_mask_4d" in batch:
        return batch["attention_mask_4d"].to(device=device, dtype=dtype)
    if "masked_positions" in batch:
        return omni_attention_mask(
            batch["roles"].to(device), batch["attention_mask"].to(device), dtype
        )
    return batch["attention_mask"].to(device)


# ---------------------------------------------------------------------- prefix reuse


@dataclass(frozen=True)
class PrefixRequest:
    """Ask a forward pass to keep the keys and values of positions ``[0, length)`` of the
    batch rows ``rows`` (int64 indices, ascending)."""

    rows: Tensor
    length: int

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"a prefix needs at least one position, got length {self.length}")


@dataclass(frozen=True)
class PrefixStates:
    """What a pass with a :class:`PrefixRequest` recorded: per attention layer, ``(keys,
    values)`` of shape ``[len(rows), heads, length, head_dim]`` (parts of the main pass's
    graph, so gradients flow into it)."""

    rows: Tensor
    length: int
    layers: tuple[tuple[Tensor, Tensor], ...]

    def matches(self, request: PrefixRequest) -> bool:
        """Whether these states answer ``request`` (same rows, same length)."""
        return (
            self.length == request.length
            and self.rows.shape == request.rows.shape
            and bool(torch.equal(self.rows.cpu(), request.rows.cpu()))
        )


def allowed_attention(
    batch: dict[str, Tensor], length: int | None = None, *, masked_prediction: bool
) -> Tensor:
    """``[B, S, S]`` bool: which key each query may attend to, as
    :func:`unifyreg.adapters.base.model_attention_mask` builds it for ``batch`` (its
    ``attention_mask_4d``; else the omni mask when ``masked_prediction``; else causal
    with padding keys blocked), cut to the first ``length`` positions when given."""
    roles = batch["roles"]
    size = roles.shape[1] if length is None else length
    if "attention_mask_4d" in batch:
        mask = batch["attention_mask_4d"][:, 0, :size, :size]
        return mask == 0
    padding = batch["attention_mask"][:, :size].bool()
    if masked_prediction:
        return omni_attention_mask(roles[:, :size], padding.long(), torch.float32)[:, 0] == 0
    causal = torch.ones(size, size, dtype=torch.bool, device=roles.device).tril()
    return causal[None] & padding[:, None, :]


def shared_prefix_length(main_allowed: Tensor, second_allowed: Tensor, second_roles: Tensor) -> int:
    """The longest prefix ``s`` the second pass can take from the main pass: ``s <= p - 1``
    for ``p`` the first image-response position of any row of ``second_roles`` ``[b, S]``,
    and every query ``q < s`` has the same allowed keys in ``main_allowed`` and
    ``second_allowed`` (``[b, S, S]`` bool over the second pass's rows and length) and
    attends to no key at or after ``s``. 0 when there is none."""
    is_image = second_roles == IMAGE_ROLES[1]
    has = is_image.any(dim=1)
    if not bool(has.all()):
        return 0
    first = int(is_image.int().argmax(dim=1).min())
    limit = first - 1
    if limit < 1:
        return 0
    main, second = main_allowed[:, :limit], second_allowed[:, :limit]
    agree = (main == second).all(dim=-1).all(dim=0)  # [limit]: per query
    if not bool(agree.all()):
        limit = int((~agree).int().argmax())
        if limit < 1:
            return 0
    keys = torch.arange(main.shape[-1], device=main.device)
    reach = torch.where(main[:, :limit], keys, -1).amax(dim=(0, 2))  # [limit]
    furthest = torch.cummax(reach, dim=0).values
    fits = furthest < torch.arange(1, limit + 1, device=furthest.device)
    valid = torch.nonzero(fits).flatten()
    return int(valid.max()) + 1 if valid.numel() else 0


# ---------------------------------------------------------------------- the protocol


class Adapter(abc.ABC):
    """Protocol every model family implements (see DESIGN.md, "One seam").

    Subclasses set ``name`` (the registry sets it) and :attr:`layer_stack`, and implement
    the abstract methods. ``model`` is the wrapped ``nn.Module`` (possibly wrapped again by
    peft); ``num_layers`` is L, the number of blocks of its layer stack (hidden states have
    L + 1 entries). ``save_merged_after_finetune``: whether ``finetune`` also saves a model
    with LoRA merged in (small models; loadable by :meth:`load`).
    """

    name: str = ""
    #: Module-name suffixes LoRA targets by default (language model only).
    default_lora_targets: tuple[str, ...] = ()
    #: How the family's own image loss scores images: ``next_token`` (position t - 1
    #: predicts image token t), ``masked`` (masked tokens predicted at their positions) or
    #: ``flow`` (continuous latents: a flow-matching mean squared error at the latent
    #: positions, :mod:`unifyreg.adapters.continuous`; ``masked_positions`` restrict it to
    #: the masked latents, whose inputs an embedding hook replaces).
    image_objective: str = "next_token"
    #: Whether ``forward`` honours ``masked_positions`` (masked prediction, omni attention):
    #: what the bidirectional ``L_ctx`` needs.
    supports_masked_prediction: bool = False
    #: Whether ``forward`` takes ``record_prefix`` and ``prefix`` (:mod:`.prefix`): keep a
    #: prefix's keys and values in one pass and start a second pass after it.
    supports_prefix_reuse: bool = False
    #: The family's layer list and final norm, as paths from :attr:`base_model`.
    layer_stack: LayerStack
    save_merged_after_finetune: bool = False

    model: nn.Module

    @property
    def base_model(self) -> nn.Module:
        """The wrapped model itself, under any peft wrapper."""
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if callable(get_base) else self.model

    @property
    def num_layers(self) -> int:
        """L: the number of blocks of :attr:`layer_stack`."""
        return len(self.layer_stack.modules(self.base_model)[0])

    @abc.abstractmethod
    def encode(self, examples: Sequence[Any]) -> dict[str, Tensor]:
        """Examples -> a padded batch (tensors only, including ``roles`` ``[B, S]``)."""

    def training_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """What the family's own training objective does to a batch before a training
        step (default: nothing); module docstring. Random draws use the global torch
        generator, whose state checkpoints save."""
        return batch

    @abc.abstractmethod
    def input_embeddings(self, batch: dict[str, Tensor]) -> Tensor:
        """``[B, S, d]`` inputs of the layer stack (hidden state 0) for an encoded batch."""

    @abc.abstractmethod
    def forward(
        self,
        batch: dict[str, Tensor],
        output_hidden_states: bool = True,
        layers: Sequence[int] | None = None,
        keep_logits: bool = False,
        embedding_hook: EmbeddingHook | None = None,
        final_norm: bool = FINAL_NORM_DEFAULT,
    ) -> ForwardOutput:
        """Run the model on an encoded batch (teacher-forced) -> :class:`ForwardOutput`.

        ``embedding_hook(embeds, batch) -> embeds`` may replace the input embeddings
        ``[B, S, d]`` before the layers run (the contextual-prediction loss swaps masked
        image positions for a learned mask embedding this way). ``final_norm``: take the
        last layer after the final norm (module docstring).
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
        """Width d of the hidden states (of the input embeddings)."""
        return int(self.base_model.get_input_embeddings().embedding_dim)

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter."""
        return next(self.model.parameters()).device

    @property
    def mask_width(self) -> int:
        """Width of the inputs an embedding hook sees (the mask embedding of ``L_ctx``): the
        hidden size, unless the family generates images in another sequence (a two-stage
        model: its denoiser's width)."""
        return self.hidden_size

    def generation_roles(self, batch: dict[str, Tensor]) -> Tensor:
        """``[B, S_g]`` roles of the sequence in which the family generates images: the one
        ``masked_positions`` indexes and ``embedding_hook`` acts on. Default: the batch's own
        ``roles`` (one-sequence families); a two-stage model returns its denoiser's."""
        return batch["roles"]

    def select_rows(self, batch: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
        """The sub-batch of ``rows`` (:func:`select_rows`); a family whose batches hold
        tensors of another sequence than ``roles`` (whose lengths must not be trimmed by
        it) overrides this."""
        return select_rows(batch, rows)

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

    @contextmanager
    def capture(
        self, layers: Sequence[int] | None, enabled: bool = True, final_norm: bool = False
    ) -> Iterator[CapturedStates | None]:
        """:func:`capture_hidden_states` of :attr:`layer_stack` for ``layers`` (resolved;
        None = all), or nothing when not ``enabled``."""
        if not enabled:
            yield None
            return
        chosen = self.resolve_layers(layers)
        with capture_hidden_states(self.base_model, self.layer_stack, chosen, final_norm) as c:
            yield c


def select_rows(batch: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    """The sub-batch of ``rows`` (sorted indices, at least one) of a right-padded batch:
    every tensor whose first dim is the batch's size is indexed, and every further dim as
    long as the sequence is trimmed to the longest kept row (columns past it are padding for
    all of them; ``[B, S]`` fields and the ``[B, 1, S, S]`` ``attention_mask_4d`` alike).
    All rows: the batch itself."""
    roles = batch["roles"]
    size, length = roles.shape
    if rows.numel() == size:
        return batch
    width = int((roles[rows] != 0).sum(dim=1).max())  # Role.PAD == 0
    out = {}
    for name, value in batch.items():
        if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == size:
            value = value[rows]
            for dim in range(1, value.ndim):
                if value.shape[dim] == length:
                    value = value.narrow(dim, 0, width)
        out[name] = value
    return out


def cache_argument(model: nn.Module, cache: Any) -> dict[str, Any]:
    """The key/value-cache keyword of ``model.forward``: ``cache`` in recent
    ``transformers`` 5.x, ``past_key_values`` before (passing the old name to a new
    version warns that it will be removed)."""
    import inspect

    target: Any = model
    for _ in range(4):  # through wrappers whose forward takes **kwargs (peft, DDP)
        parameters = inspect.signature(target.forward).parameters
        if "cache" in parameters:
            return {"cache": cache}
        if "past_key_values" in parameters:
            break
        inner = target.get_base_model() if hasattr(target, "get_base_model") else None
        inner = inner if inner is not None else getattr(target, "module", None)
        if not isinstance(inner, nn.Module) or inner is target:
            break
        target = inner
    return {"past_key_values": cache}


def output_cache(output: Any) -> Any:
    """The key/value cache of a ``transformers`` model output (either field name)."""
    keys = output.keys() if hasattr(output, "keys") else ()
    if "cache" in keys:
        return output["cache"]
    return output["past_key_values"] if "past_key_values" in keys else None
