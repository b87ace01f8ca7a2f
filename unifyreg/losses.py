"""The contextual-prediction regularizer (DESIGN.md, "The loss").

``L = L_task + w_ctx(t) * L_ctx + w_div(t) * L_div``, each term optional and logged apart
(``loss/task``, ``loss/ctx``, ``loss/div``), with weights ramped linearly over
``warmup_steps``: ``w(t) = w * min(1, t / warmup_steps)``.

**Contextual prediction** ``L_ctx`` — the image-side twin of next-token prediction, in
one of two modes (``ctx_mode``):

- ``bidirectional`` (the default; Harmon's mechanism, Show-o's discrete form): per image, a
  cosine-schedule share ``cos(pi/2 * u)`` of the response-image inputs (``u ~ U(0, 1)``, at
  least one) is replaced by one learned mask embedding ``m``; image tokens attend to every
  token of their image (the seam's masked prediction: ``masked_positions``, omni
  attention) and the masked tokens are predicted at their own positions from the prompt
  and the visible image tokens:

      L_ctx = mean_{t masked} CE(head(h_t(x~)), x_t);

  needs an adapter that takes masked prediction (``supports_masked_prediction``: the toy,
  Show-o, the ``transformers`` families through an embedding hook). On a continuous family
  (``image_objective = "flow"``: a two-stage model's denoiser) the masked inputs are latent
  tokens of the sequence the family generates images in (``Adapter.generation_roles``),
  replaced by one learned mask latent ``m`` (width ``Adapter.mask_width``, the latents'
  embedding width), and predicted through the family's own head with its flow-matching
  loss at those positions, Harmon's masked autoregression in a flow model's terms:

      L_ctx = mean_{t masked} || v_theta(x~_t)_t - (eps - x_0)_t ||^2  (the family's target);

- ``causal`` (a stand-in for models that cannot take a 4-D mask): each image-response
  input position is replaced by ``m`` with probability ``mask_ratio`` and every image
  token is still predicted next-token:

      L_ctx = mean_{t in image targets} CE(head(h_{t-1}(x~)), x_t),

  so a causal model cannot copy its previous image tokens where they are masked and must
  lean on the prompt and the visible context.

``L_ctx`` costs a second forward and backward pass, so it runs on a sub-batch: only rows
that hold image-response tokens (the others would contribute nothing), at most
``ceil(ctx_row_fraction * B)`` of them drawn at random each step, with the padding
columns no kept row needs trimmed. The mean over image targets stays an unbiased
estimate; ``ctx_row_fraction = 1`` scores every image row of the batch.
With ``ctx_reuse_prefix`` (the default) and an adapter that ``supports_prefix_reuse``, the
rows and masks are drawn before the main pass (:meth:`ContextualPredictionLoss.plan`), the
main pass records the keys and values of the kept rows' shared prefix (the positions before
their first image response, cut where the two passes' attention masks part:
:func:`unifyreg.adapters.base.shared_prefix_length`), and the second pass runs only after
it (:mod:`unifyreg.adapters.prefix`): the same loss and gradients, without recomputing the
prompt. :func:`forward_with_terms` runs the main pass and the terms this way.

**Cross-modal divergence** ``L_div`` — on the batch's own hidden states, at the layers
``div_layers``, with the probe's quantities (:func:`unifyreg.quantities.batch_quantities`,
Renyi order ``div_alpha``, 2 by default: no eigendecomposition, smooth gradients;
median bandwidth *with* its gradient by default (``div_bandwidth``); in ``div_dtype``,
float32 by default), length-normalised and averaged over the batch's samples:

    L_div = mean_l (Ht(l) - Hi(l))^2  [encoding part]  +  mean_l (Ct(l) - Ci(l))^2  [response part]

``Ht, Hi``: text / image prompt entropy; ``Ct, Ci``: text / image response proxy. A part
whose two sides are not both in the batch contributes 0 without error; a non-finite
value contributes 0 too. With two stacks (``ForwardOutput.extra_stacks``: a two-stage
model, whose ``response/image`` lies on the denoiser) each quantity is computed on the
stack that serves it, at the ``div_layers`` of the primary stack and the same depth
fractions of the other (:func:`unifyreg.adapters.base.fraction_layers`), and a pair on two
stacks is compared at the depth fractions of the coarser trajectory, the finer one
interpolated linearly (:func:`unifyreg.quantities.align_by_depth`, as the probe's scores):
:func:`stack_divergence_loss`. On one stack it equals :func:`divergence_loss` exactly.
``loss/div_parts`` logs how many parts contributed, and ``loss/ctx_tokens`` how many
image tokens ``L_ctx`` scored (0 when the batch has none or ``L_ctx`` is not finite: the
term added 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from unifyreg.adapters.base import (
    Adapter,
    ForwardOutput,
    PrefixRequest,
    allowed_attention,
    cosine_masked_positions,
    fraction_layers,
    select_rows,
    shared_prefix_length,
)
from unifyreg.config import LossConfig
from unifyreg.quantities import PAIRS, align_by_depth, batch_quantities
from unifyreg.roles import Role

__all__ = [
    "ContextPlan",
    "ContextualPredictionLoss",
    "forward_with_terms",
    "divergence_loss",
    "stack_divergence_loss",
]


def divergence_loss(
    hidden_states: Tensor | Sequence[Tensor],
    roles: Tensor,
    alpha: float = 2.0,
    parts: tuple[str, ...] = ("encoding", "response"),
    dtype: torch.dtype = torch.float64,
    bandwidth: str = "median_differentiable",
    max_tokens: int = 0,
    token_seed: int = 0,
) -> tuple[Tensor, int]:
    """``(L_div, number of parts that contributed)`` on ``hidden_states`` ``[n, B, S, d]``
    (or a sequence of ``n`` tensors ``[B, S, d]``, e.g. some of
    :attr:`ForwardOutput.hidden_layers`, without a stacked copy).

    See the module docstring for the formula. Differentiable in ``hidden_states``; the
    estimator runs in ``dtype`` and the value is returned in float64. ``bandwidth``:
    ``"median_differentiable"`` (the median with its gradient: the default) or
    ``"median"`` (detached); the estimators' narrow rules (``"silverman"``, ``"rms:0.1"``)
    run too, but their gradient vanishes and most of their value is pinned by token
    counts (measured: README, "Can the loss use the paper's regime?"). ``max_tokens`` > 0
    computes each quantity on a uniform subset of at most that many tokens per role
    segment, drawn anew for each ``token_seed`` (:func:`~unifyreg.quantities.batch_quantities`):
    ~k^2 instead of n^2, but a *different* value, not an estimate of the full one
    (measured at 8 x 512, k = 256: -88 % of the value, gradient cosine 0.65 with the full
    one: BENCHMARKS.md, "L_div on a token subset"), so the loss does not use it.
    """
    wanted = [q for part in parts for q in PAIRS[part]]
    # Under autocast a float32 Gram would silently run in bf16/fp16: keep the estimator
    # in the precision asked for.
    with torch.autocast(device_type=roles.device.type, enabled=False):
        values = batch_quantities(
            hidden_states, roles, alpha=alpha, sigma=bandwidth, dtype=dtype, quantities=wanted,
            max_tokens=max_tokens, token_seed=token_seed,
        )  # fmt: skip
    total = roles.new_zeros((), dtype=torch.float64)
    used = 0
    for part in parts:
        text, image = PAIRS[part]
        if text not in values or image not in values:
            continue
        gap = values[text].normalized.mean(dim=1) - values[image].normalized.mean(dim=1)
        term = (gap.double() ** 2).mean()
        if torch.isfinite(term):
            total = total + term
            used += 1
    return total, used


def stack_divergence_loss(
    output: ForwardOutput,
    layers: Sequence[int] = (),
    alpha: float = 2.0,
    parts: tuple[str, ...] = ("encoding", "response"),
    dtype: torch.dtype = torch.float64,
    bandwidth: str = "median_differentiable",
    max_tokens: int = 0,
    token_seed: int = 0,
) -> tuple[Tensor, int]:
    """``(L_div, parts that contributed)`` on every stack of ``output`` (module docstring).

    ``layers``: layers of the primary stack (empty = all captured; negative ones count from
    the end of the captured list); each other stack takes its captured layers at the same
    depth fractions. Each quantity is computed on the stack that serves it; a pair on one
    stack and layers is compared layer by layer (as :func:`divergence_loss`), a pair on two
    stacks at the depth fractions of the coarser trajectory. ``max_tokens``, ``token_seed``:
    as :func:`divergence_loss`.
    """
    wanted = [q for part in parts for q in PAIRS[part]]
    primary = output.primary_stack()
    if primary.hidden_layers is None:
        raise ValueError(
            "L_div needs hidden states: build UMMModule with hidden_states_for_terms=True"
        )
    chosen = list(layers) or list(primary.layers)
    chosen = [primary.layers[c] if c < 0 else c for c in chosen]
    trajectories: dict[str, tuple[Tensor, tuple[str, tuple[int, ...]], tuple[float, ...]]] = {}
    with torch.autocast(device_type=output.roles.device.type, enabled=False):
        for index, stack in enumerate(output.stacks()):
            names = [q for q in wanted if q in stack.quantities]
            if not names or stack.hidden_layers is None or stack.roles.shape[0] == 0:
                continue
            if index == 0:
                picked = chosen
            else:
                picked = [
                    layer
                    for layer in fraction_layers(chosen, primary.depth, stack.depth)
                    if layer in stack.layers
                ] or list(stack.layers)
            hidden = [stack.hidden_layers[stack.layers.index(layer)] for layer in picked]
            values = batch_quantities(
                hidden, stack.roles, alpha=alpha, sigma=bandwidth, dtype=dtype, quantities=names,
                max_tokens=max_tokens, token_seed=token_seed,
            )  # fmt: skip
            for name, value in values.items():
                trajectories[name] = (
                    value.normalized.mean(dim=1),
                    (stack.name, tuple(picked)),
                    tuple(layer / stack.depth for layer in picked),
                )
    total = output.roles.new_zeros((), dtype=torch.float64)
    used = 0
    for part in parts:
        text, image = PAIRS[part]
        if text not in trajectories or image not in trajectories:
            continue
        (a, where_a, fa), (b, where_b, fb) = trajectories[text], trajectories[image]
        if where_a != where_b:
            a, b, _ = align_by_depth(a, fa, b, fb)
        term = ((a - b).double() ** 2).mean()
        if torch.isfinite(term):
            total = total + term
            used += 1
    return total, used


@dataclass(frozen=True)
class ContextPlan:
    """One step's draw for ``L_ctx``: the sub-batch it runs on (with ``masked_positions`` in
    the bidirectional mode), the masked inputs ``[b, S]`` bool, the batch rows it took
    (ascending), and the prefix the main pass should record for it (None: the second pass
    runs in full)."""

    sub_batch: dict
    masked: Tensor
    rows: Tensor
    prefix: PrefixRequest | None


def _cut_rows(adapter: Adapter | None, batch: dict, rows: Tensor) -> dict:
    cut = getattr(adapter, "select_rows", None)
    return cut(batch, rows) if callable(cut) else select_rows(batch, rows)


def _shared_prefix(batch: dict, rows: Tensor, sub_batch: dict) -> int:
    """How many leading positions of ``sub_batch`` the main pass over ``batch`` computes
    exactly as the second pass would (:func:`unifyreg.adapters.base.shared_prefix_length`)."""
    length = sub_batch["roles"].shape[1]
    main_rows = {
        key: batch[key][rows]
        for key in ("roles", "attention_mask", "attention_mask_4d")
        if key in batch
    }
    main = allowed_attention(main_rows, length, masked_prediction="masked_positions" in batch)
    second = allowed_attention(sub_batch, masked_prediction="masked_positions" in sub_batch)
    return shared_prefix_length(main, second, sub_batch["roles"])


def _generation_roles(adapter: Adapter | None, batch: dict) -> Tensor:
    """``adapter.generation_roles(batch)``, or the batch's ``roles`` for an adapter (or a
    duck-typed stand-in) without one."""
    read = getattr(adapter, "generation_roles", None)
    return read(batch) if callable(read) else batch["roles"]


class ContextualPredictionLoss(nn.Module):
    """The regularizer as a loss term for :class:`unifyreg.module.UMMModule`.

    ``term(adapter, batch, output, step) -> (w_ctx(t) L_ctx + w_div(t) L_div, logs)``;
    the mask embedding ``m`` is a parameter of this module (trained, checkpointed).

    Example::

        loss = ContextualPredictionLoss(LossConfig(w_ctx=1.0, w_div=0.5), hidden_size=128)
        module = UMMModule(adapter, optim, total_steps=1000, loss_terms=[loss],
                           hidden_states_for_terms=loss.needs_hidden_states)
    """

    def __init__(self, config: LossConfig, hidden_size: int, seed: int = 0) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        self.config = config
        generator = torch.Generator().manual_seed(seed)
        self.mask_embedding = nn.Parameter(0.02 * torch.randn(hidden_size, generator=generator))
        self._generator = torch.Generator().manual_seed(seed + 1)

    def get_rng_state(self) -> Tensor:
        """State of the mask generator (saved in checkpoints, so a resumed run draws the
        same masks as an uninterrupted one)."""
        return self._generator.get_state()

    def set_rng_state(self, state: Tensor) -> None:
        """Restore a state from :meth:`get_rng_state` (on resume)."""
        self._generator.set_state(state)

    @property
    def needs_hidden_states(self) -> bool:
        """Whether the forward pass must keep hidden states: ``L_div`` is on (``w_div > 0``)."""
        return self.config.w_div > 0

    def weight(self, base: float, step: int) -> float:
        """``base * min(1, step / warmup_steps)`` (no ramp when ``warmup_steps == 0``)."""
        if self.config.warmup_steps == 0:
            return base
        return base * min(1.0, step / self.config.warmup_steps)

    def _context_row_indices(self, roles: Tensor) -> Tensor | None:
        size = roles.shape[0]
        has_image = torch.nonzero((roles == int(Role.IMAGE_RESPONSE)).any(dim=1)).flatten()
        if has_image.numel() == 0:
            return None
        keep = max(1, math.ceil(self.config.ctx_row_fraction * size))
        if has_image.numel() > keep:
            order = torch.randperm(has_image.numel(), generator=self._generator)
            has_image = has_image[order[:keep]].sort().values
        return has_image

    def context_rows(self, batch: dict, adapter: Adapter | None = None) -> dict | None:
        """The sub-batch ``L_ctx`` runs on (see the module docstring), or None when the
        batch has no image-response token. Rows keep their batch order. With an
        ``adapter``, image rows are found in its ``generation_roles`` and cut by its
        ``select_rows`` (a two-stage model's denoiser sequence); without, in ``roles``,
        right-padded columns trimmed (:func:`unifyreg.adapters.base.select_rows`)."""
        rows = self._context_row_indices(_generation_roles(adapter, batch))
        if rows is None:
            return None
        return _cut_rows(adapter, batch, rows.to(batch["roles"].device))

    def plan(self, adapter: Adapter, batch: dict) -> ContextPlan | None:
        """This step's draw for ``L_ctx`` on ``batch`` (rows, then masks, from the term's
        own generator), made before the main forward pass so that it can record the shared
        prefix (``plan.prefix``: pass it as the main pass's ``record_prefix``); None when
        ``L_ctx`` is off or the batch has no image-response token. ValueError when
        ``ctx_mode`` does not suit the adapter."""
        if self.config.w_ctx <= 0:
            return None
        rows = self._context_row_indices(_generation_roles(adapter, batch))
        if rows is None:
            return None
        rows = rows.to(batch["roles"].device)
        sub_batch = dict(_cut_rows(adapter, batch, rows))
        roles = _generation_roles(adapter, sub_batch)
        if self.config.ctx_mode == "bidirectional":
            if not getattr(adapter, "supports_masked_prediction", False):
                raise ValueError(
                    f"loss.ctx_mode=bidirectional needs an adapter that takes masked "
                    f"prediction (a 4-D attention mask); {adapter.name!r} does not: use "
                    "loss.ctx_mode=causal"
                )
            masked = cosine_masked_positions(roles.cpu(), generator=self._generator)
            sub_batch["masked_positions"] = masked.to(roles.device)
        else:
            objective = getattr(adapter, "image_objective", "next_token")
            if objective != "next_token":
                what = "masked image tokens" if objective == "masked" else "continuous latents"
                raise ValueError(
                    "loss.ctx_mode=causal scores next-token image targets; adapter "
                    f"{adapter.name!r} predicts {what}: use loss.ctx_mode=bidirectional"
                )
            # Next-token targets: a family objective's own masking does not apply here.
            sub_batch.pop("masked_positions", None)
            draw = torch.rand(roles.shape, generator=self._generator)
            masked = (roles.cpu() == int(Role.IMAGE_RESPONSE)) & (draw < self.config.mask_ratio)
        prefix = None
        if self.config.ctx_reuse_prefix and getattr(adapter, "supports_prefix_reuse", False):
            length = _shared_prefix(batch, rows, sub_batch)
            prefix = PrefixRequest(rows, length) if length > 0 else None
        return ContextPlan(sub_batch, masked, rows, prefix)

    def contextual_prediction(
        self,
        adapter: Adapter,
        batch: dict,
        output: ForwardOutput | None = None,
        plan: ContextPlan | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(L_ctx, image tokens scored)`` with a fresh random mask of image inputs, on
        :meth:`context_rows` of the batch, or on ``plan`` (:meth:`plan`) when given. When
        ``output`` (the main pass) holds the plan's recorded prefix, the second pass runs
        after it only (:mod:`unifyreg.adapters.prefix`)."""
        if plan is None:
            plan = self.plan(adapter, batch)
        if plan is None:
            zero = self.mask_embedding.new_zeros(())
            return zero, torch.zeros((), dtype=torch.long)
        masked = plan.masked

        def hook(embeds: Tensor, _batch: dict) -> Tensor:
            where = masked.to(embeds.device).unsqueeze(-1)
            return torch.where(where, self.mask_embedding.to(embeds.dtype), embeds)

        extra = {}
        states = getattr(output, "prefix_states", None)
        if plan.prefix is not None and states is not None and states.matches(plan.prefix):
            extra["prefix"] = states
        out = adapter.forward(
            plan.sub_batch, output_hidden_states=False, embedding_hook=hook, **extra
        )
        return out.image_loss, out.image_tokens

    def forward(
        self,
        adapter: Adapter,
        batch: dict,
        output: ForwardOutput,
        step: int,
        plan: ContextPlan | None = None,
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """``(w_ctx(step) * L_ctx + w_div(step) * L_div, logs)``: the weighted terms to add to
        the task loss of ``output`` (a term that is off, or has nothing to score, adds 0),
        and ``loss/ctx``, ``loss/ctx_tokens``, ``loss/div``, ``loss/div_parts`` (unweighted).
        ``plan``: this step's :meth:`plan`, drawn before the main pass (None: drawn here)."""
        cfg = self.config
        total = output.task_loss.new_zeros(())
        logs: dict[str, Tensor | float] = {}
        if cfg.w_ctx > 0:
            ctx, tokens = self.contextual_prediction(adapter, batch, output, plan)
            if tokens > 0 and torch.isfinite(ctx):
                total = total + self.weight(cfg.w_ctx, step) * ctx
            else:  # no image token, or a non-finite value: the term adds 0 and says so
                tokens = torch.zeros_like(tokens)
            logs["loss/ctx"] = ctx.detach()
            logs["loss/ctx_tokens"] = tokens.float()
        if cfg.w_div > 0:
            if output.hidden_layers is None:  # (hidden_states would stack a copy)
                raise ValueError(
                    "L_div needs hidden states: build UMMModule with hidden_states_for_terms=True"
                )
            if output.extra_stacks:
                div, used = stack_divergence_loss(
                    output,
                    list(cfg.div_layers),
                    cfg.div_alpha,
                    tuple(cfg.div_parts),
                    getattr(torch, cfg.div_dtype),
                    cfg.div_bandwidth,
                )
            else:
                layers = list(cfg.div_layers) or list(range(len(output.layers)))
                index = [output.layers.index(layer) if layer >= 0 else layer for layer in layers]
                div, used = divergence_loss(
                    [output.hidden_layers[i] for i in index],
                    output.roles,
                    cfg.div_alpha,
                    tuple(cfg.div_parts),
                    getattr(torch, cfg.div_dtype),
                    cfg.div_bandwidth,
                )
            total = total + self.weight(cfg.w_div, step) * div.to(total.dtype)
            logs["loss/div"] = div.detach()
            logs["loss/div_parts"] = float(used)
        return total, logs


def forward_with_terms(
    adapter: Adapter,
    batch: dict,
    terms: Sequence,
    step: int,
    output_hidden_states: bool = False,
) -> tuple[ForwardOutput, Tensor, dict]:
    """The main forward pass and the loss terms on it -> ``(output, sum of the terms'
    weighted losses, their logs)``; the caller adds the task loss.

    Each term is ``term(adapter, batch, output, step) -> (loss, logs)``. A term with a
    ``plan(adapter, batch)`` method (:class:`ContextualPredictionLoss`) draws before the
    main pass and is called with ``plan=``; the first plan with a ``prefix`` becomes the
    main pass's ``record_prefix`` when the adapter ``supports_prefix_reuse``, so that the
    term's own pass starts after the shared prefix (:mod:`unifyreg.adapters.prefix`)."""
    plans = [term.plan(adapter, batch) if hasattr(term, "plan") else None for term in terms]
    record = None
    if getattr(adapter, "supports_prefix_reuse", False):
        record = next((p.prefix for p in plans if p is not None and p.prefix is not None), None)
    extra = {"record_prefix": record} if record is not None else {}
    output = adapter.forward(batch, output_hidden_states=output_hidden_states, **extra)
    total: Tensor = output.text_loss.new_zeros(())
    logs: dict = {}
    for term, plan in zip(terms, plans, strict=True):
        planned = {"plan": plan} if hasattr(term, "plan") else {}
        loss, term_logs = term(adapter, batch, output, step, **planned)
        total = total + loss
        logs.update(term_logs)
    return output, total, logs
