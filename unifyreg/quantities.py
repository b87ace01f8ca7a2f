"""The probe's four quantities, defined once, and their values on one batch.

Each :class:`Quantity` says which tokens it measures, which samples take part and how it
is normalised; the probe (:mod:`unifyreg.probing`), the metrics, the divergence loss
(:mod:`unifyreg.losses`) and the report read this table and nothing else:

| name | level | tokens | samples | value | normaliser |
| --- | --- | --- | --- | --- | --- |
| ``encoding/text`` | prompt | text-prompt tokens | without an image prompt | ``H(P)`` | ``log2 |P|`` |
| ``encoding/image`` | prompt | image-prompt tokens | with an image prompt | ``H(P)`` | ``log2 |P|`` |
| ``response/text`` | response | text-response tokens R given all prompt tokens P | with both | ``H(R|P)`` proxy | ``log2 (|P| + |R|)`` |
| ``response/image`` | response | image-response tokens R given all prompt tokens P | with both | ``H(R|P)`` proxy | ``log2 (|P| + |R|)`` |

``H`` is :func:`unifyreg.estimators.matrix_entropy`, the proxy
:func:`unifyreg.estimators.conditional_entropy_proxy`, both at the same layer. The two
quantities of a level form a text/image pair (:data:`PAIRS`), which unifyreg's scores and
the divergence loss compare.
"""  # noqa: E501

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from unifyreg.estimators import (
    SLQSettings,
    TokenBatch,
    conditional_entropy_proxy,
    matrix_entropy,
    normalize_by_count,
    proxy_with_prompt_entropy,
    shares_prompt_distances,
    subsample_tokens,
)
from unifyreg.roles import Role, role_counts, role_mask

__all__ = [
    "AUTO_CHUNK_FLOOR_BYTES",
    "PAIRS",
    "QUANTITIES",
    "QUANTITY_TABLE",
    "BatchQuantity",
    "Quantity",
    "align_by_depth",
    "auto_layers_per_chunk",
    "batch_quantities",
]

PROMPT_ROLES = (Role.TEXT_PROMPT, Role.IMAGE_PROMPT)


@dataclass(frozen=True)
class Quantity:
    """One probe quantity: ``name`` (``"<level>/<modality>"``), the ``roles`` of the tokens
    it measures (the response R of a proxy), the ``given`` roles of a proxy's prompt P
    (empty for an entropy), which samples take part (every role set in ``requires`` has a
    token in the sample, no role of ``excludes`` has), and a one-line description."""

    name: str
    roles: tuple[Role, ...]
    given: tuple[Role, ...] = ()
    requires: tuple[tuple[Role, ...], ...] = ()
    excludes: tuple[Role, ...] = ()
    description: str = ""

    @property
    def level(self) -> str:
        """``encoding`` (prompt entropy) or ``response`` (conditional-entropy proxy)."""
        return self.name.split("/")[0]

    @property
    def modality(self) -> str:
        """``text`` or ``image``."""
        return self.name.split("/")[1]

    @property
    def is_proxy(self) -> bool:
        """True for ``H(R | P)`` (normalised by ``log2 (|P| + |R|)``), False for ``H(P)``
        (normalised by ``log2 |P|``)."""
        return bool(self.given)

    def samples(self, roles: Tensor) -> Tensor:
        """``[B]`` bool: which samples of a batch (``roles`` ``[B, S]``) take part."""
        take = torch.ones(roles.shape[0], dtype=torch.bool, device=roles.device)
        for role_set in self.requires:
            take &= role_counts(roles, role_set) > 0
        if self.excludes:
            take &= role_counts(roles, self.excludes) == 0
        return take


#: The table of the four quantities (module docstring).
QUANTITY_TABLE: tuple[Quantity, ...] = (
    Quantity(
        "encoding/text",
        roles=(Role.TEXT_PROMPT,),
        requires=((Role.TEXT_PROMPT,),),
        excludes=(Role.IMAGE_PROMPT,),
        description="entropy of the text-prompt tokens of samples without an image prompt",
    ),
    Quantity(
        "encoding/image",
        roles=(Role.IMAGE_PROMPT,),
        requires=((Role.IMAGE_PROMPT,),),
        description="entropy of the image-prompt tokens",
    ),
    Quantity(
        "response/text",
        roles=(Role.TEXT_RESPONSE,),
        given=PROMPT_ROLES,
        requires=((Role.TEXT_RESPONSE,), PROMPT_ROLES),
        description="proxy H(R|P) of the text-response tokens given all prompt tokens",
    ),
    Quantity(
        "response/image",
        roles=(Role.IMAGE_RESPONSE,),
        given=PROMPT_ROLES,
        requires=((Role.IMAGE_RESPONSE,), PROMPT_ROLES),
        description="proxy H(R|P) of the image-response tokens given all prompt tokens",
    ),
)

#: The quantity names, in table order.
QUANTITIES: tuple[str, ...] = tuple(q.name for q in QUANTITY_TABLE)
_BY_NAME = {q.name: q for q in QUANTITY_TABLE}

#: ``level -> (text quantity, image quantity)``: the pairs the scores and ``L_div`` compare.
PAIRS: dict[str, tuple[str, str]] = {
    level: tuple(
        q.name for modality in ("text", "image") for q in QUANTITY_TABLE
        if q.level == level and q.modality == modality
    )
    for level in dict.fromkeys(q.level for q in QUANTITY_TABLE)
}  # fmt: skip


def quantity(name: str) -> Quantity:
    """The :class:`Quantity` called ``name``; ValueError lists the valid names."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown quantity {name!r}; valid: {', '.join(QUANTITIES)}") from None


@dataclass
class BatchQuantity:
    """One quantity on one batch: ``values`` ``[n_layers, b]`` (raw), ``normalized``,
    ``counts`` ``[b]`` (tokens the normaliser uses) and ``select`` ``[B]`` (which samples)."""

    values: Tensor
    normalized: Tensor
    counts: Tensor
    select: Tensor


@dataclass
class _Positions:
    """Where one role segment of the selected samples lies: ``rows`` ``[b]``, ``index``
    ``[b, k]`` (per row the segment's kept positions in order, then arbitrary padding),
    ``mask`` ``[b, k]`` (True = kept token), ``counts`` ``[b]``."""

    rows: Tensor
    index: Tensor
    mask: Tensor
    counts: Tensor


def _positions(
    roles: Tensor, rows: Tensor, role_set, max_tokens: int, token_seed: int = 0
) -> _Positions:
    """The positions of ``role_set`` in each of ``rows`` (in order), optionally
    subsampled to at most ``max_tokens`` per row (seeded by the segment's length and
    ``token_seed``)."""
    is_role = role_mask(roles[rows], role_set)
    counts = is_role.sum(dim=1)
    k = int(counts.max())
    index = torch.argsort((~is_role).to(torch.int8), dim=1, stable=True)[:, :k]
    if max_tokens and k > max_tokens:
        kept = []
        for positions, count in zip(index, counts.tolist(), strict=True):
            if count > max_tokens:
                # Seeded by the segment's length: the same subset whatever the batch, the
                # rank or the layer (every layer of a sample sees the same tokens); a
                # token_seed (the loss's step) draws another subset for each value.
                seed = count if not token_seed else count + token_seed * 1_000_003
                sub, _ = subsample_tokens(
                    positions[:count, None].to(torch.float64), None, max_tokens, generator=seed
                )
                positions = sub[:, 0].to(index.dtype)
            kept.append(positions[:max_tokens])
        index, counts, k = torch.stack(kept), counts.clamp_max(max_tokens), max_tokens
    mask = torch.arange(k, device=roles.device)[None, :] < counts[:, None]
    return _Positions(rows, index, mask, counts)


def _plan(
    roles: Tensor, names: Sequence[str], max_tokens: int, token_seed: int = 0
) -> dict[str, tuple[Quantity, Tensor, tuple[_Positions, ...]]]:
    """``name -> (quantity, select [B], positions)`` for the wanted quantities with at
    least one sample: one segment for an entropy, (prompt, response) for a proxy."""
    plan = {}
    for name in names:
        spec = quantity(name)
        select = spec.samples(roles)
        if not bool(select.any()):
            continue
        rows = torch.nonzero(select).flatten()
        parts = (spec.given, spec.roles) if spec.is_proxy else (spec.roles,)
        plan[name] = (
            spec,
            select,
            tuple(_positions(roles, rows, p, max_tokens, token_seed) for p in parts),
        )
    return plan


def _shared_prompts(
    roles: Tensor, plan: dict[str, tuple[Quantity, Tensor, tuple[_Positions, ...]]]
) -> dict[str, dict[str, Tensor]]:
    """``proxy -> {entropy: own [b_proxy, k_prompt]}``: for each row of each prompt
    entropy of ``plan``, the first proxy (table order) whose kept prompt tokens in that
    sample hold all the entropy's kept tokens, and where they lie among them (``own``:
    True at those prompt slots; rows assigned elsewhere all False). Such an entropy is
    computed with its proxy, from the same distances
    (:func:`~unifyreg.estimators.proxy_with_prompt_entropy`)."""
    shared: dict[str, dict[str, Tensor]] = {}
    batch, length = roles.shape
    for name, (_, _, (positions,)) in ((n, v) for n, v in plan.items() if not v[0].is_proxy):
        member = torch.zeros(batch * length, dtype=torch.bool, device=roles.device)
        flat = (positions.rows[:, None] * length + positions.index)[positions.mask]
        member[flat] = True
        member = member.view(batch, length)
        wanted = torch.zeros(batch, dtype=torch.long, device=roles.device)
        wanted[positions.rows] = positions.counts
        done = torch.zeros(batch, dtype=torch.bool, device=roles.device)
        for proxy, (proxy_spec, _, proxy_positions) in plan.items():
            if not proxy_spec.is_proxy:
                continue
            prompt = proxy_positions[0]
            own = member[prompt.rows[:, None], prompt.index] & prompt.mask
            covers = (own.sum(dim=1) == wanted[prompt.rows]) & (wanted[prompt.rows] > 0)
            covers &= ~done[prompt.rows]
            if bool(covers.any()):
                shared.setdefault(proxy, {})[name] = own & covers[:, None]
                done[prompt.rows[covers]] = True
    return shared


#: Extra memory the probe may always use per chunk of layers, however small the batch.
AUTO_CHUNK_FLOOR_BYTES = 64 * 2**20


def auto_layers_per_chunk(layer: Tensor, dtype: torch.dtype = torch.float64) -> int:
    """Layers per chunk for ``layers_per_chunk = 0``: as many as keep one chunk's
    gathered segments (at most every token, in ``dtype``, plus the estimators' centred
    copy: ``2 * B * S * d * itemsize``) within ``max(bytes of one layer,
    AUTO_CHUNK_FLOOR_BYTES)``; at least 1. Large batches get 1 layer at a time (extra
    memory within the forward pass's), small ones all layers at once (fewer, larger
    estimator calls: faster)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_layer = 2 * layer.numel() * itemsize
    budget = max(layer.numel() * layer.element_size(), AUTO_CHUNK_FLOOR_BYTES)
    return max(1, budget // max(per_layer, 1))


def _as_layers(hidden_states: Tensor | Sequence[Tensor], roles: Tensor) -> list[Tensor]:
    """Per-layer ``[B, S, d]`` tensors from a stacked ``[n, B, S, d]`` tensor (views) or a
    sequence of per-layer tensors."""
    if isinstance(hidden_states, Tensor):
        if hidden_states.dim() != 4:
            raise ValueError(
                f"hidden_states must be [n_layers, B, S, d], got {tuple(hidden_states.shape)}"
            )
        layers = list(hidden_states.unbind(0))
    else:
        layers = list(hidden_states)
    if not layers:
        raise ValueError("hidden_states holds no layer")
    for h in layers:
        if h.dim() != 3 or tuple(h.shape[:2]) != tuple(roles.shape):
            raise ValueError(
                f"each layer's hidden states must be [B, S, d] matching roles [B, S] "
                f"{tuple(roles.shape)}, got {tuple(h.shape)}"
            )
    return layers


def batch_quantities(
    hidden_states: Tensor | Sequence[Tensor],
    roles: Tensor,
    alpha: float = 1.01,
    sigma: float | str = "median",
    base: float = 2.0,
    dtype: torch.dtype | None = None,
    layers_per_chunk: int = 8,
    quantities: Sequence[str] = QUANTITIES,
    *,
    method: str = "exact",
    max_gram_bytes: int | None = None,
    slq: SLQSettings | None = None,
    max_tokens: int = 0,
    token_seed: int = 0,
) -> dict[str, BatchQuantity]:
    """The quantities on one batch, from its role-labelled hidden states.

    ``hidden_states``: ``[n_layers, B, S, d]`` or a sequence of ``n_layers`` tensors
    ``[B, S, d]`` (e.g. :attr:`ForwardOutput.hidden_layers`, without a stacked copy);
    ``roles`` ``[B, S]``. Returns only the quantities that have at least one sample in the
    batch. Non-finite inputs give NaN for exactly the affected samples. Used by the probe
    (without gradient) and by the divergence loss (with gradient).

    Layers are processed ``layers_per_chunk`` at a time (0: :func:`auto_layers_per_chunk`);
    each chunk's segments are handed to the estimators as :class:`~unifyreg.estimators.Segments`
    of one :class:`~unifyreg.estimators.TokenBatch`, which pick their implementation
    (``method``, ``max_gram_bytes``, ``slq`` settings; see :mod:`unifyreg.estimators`).
    ``max_tokens`` > 0 keeps at most that many tokens of each role segment (prompt and
    response separately), a uniform subset seeded by the segment's length (the same for
    every layer and whatever the batch), and normalises by the kept count; a non-zero
    ``token_seed`` (an int: the divergence loss passes its step) draws another subset for
    each value, the same for every layer.

    With a gradient at order 2 and a median bandwidth (the divergence loss), a prompt
    entropy whose tokens lie among a proxy's prompt tokens in the same sample is
    computed in that proxy's call from the joint distances
    (:func:`~unifyreg.estimators.proxy_with_prompt_entropy`; the same values and
    gradients to round-off, one distance product instead of two).
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens must be an integer >= 0 (0 = no limit), got {max_tokens!r}")
    if isinstance(token_seed, bool) or not isinstance(token_seed, int) or token_seed < 0:
        raise ValueError(f"token_seed must be an integer >= 0, got {token_seed!r}")
    if layers_per_chunk < 0:
        raise ValueError(f"layers_per_chunk must be >= 0 (0 = auto), got {layers_per_chunk}")
    layers = _as_layers(hidden_states, roles)
    if layers_per_chunk == 0:
        layers_per_chunk = auto_layers_per_chunk(layers[0], dtype or torch.float64)
    estimator = dict(
        alpha=alpha,
        sigma=sigma,
        base=base,
        method=method,
        dtype=dtype,
        nan_policy="propagate",
        max_gram_bytes=max_gram_bytes,
        settings=slq,
    )
    plan = _plan(roles, quantities, max_tokens, token_seed)
    pieces: dict[str, list[Tensor]] = {name: [] for name in plan}
    valid = roles != int(Role.PAD)
    shared = None
    for start in range(0, len(layers), layers_per_chunk):
        tokens = TokenBatch(layers[start : start + layers_per_chunk], valid)
        if shared is None:
            share = shares_prompt_distances(tokens, alpha, sigma, method)
            shared = _shared_prompts(roles, plan) if share else {}
        with_proxy: dict[str, list[tuple[Tensor, Tensor]]] = {}  # entropy -> (rows, values)
        for name, (spec, _, positions) in plan.items():
            if not spec.is_proxy:
                continue
            segments = [tokens.segments(p.rows, p.index, p.mask) for p in positions]
            if name in shared:
                # One distance matrix per joint sequence for the proxy and the prompt
                # entropies it covers (their tokens are among its prompt tokens).
                own = torch.zeros_like(positions[0].mask)
                for entropy_own in shared[name].values():
                    own |= entropy_own
                values, entropy = proxy_with_prompt_entropy(
                    *segments, own, alpha, sigma, base, dtype=dtype,
                    nan_policy="propagate", max_gram_bytes=max_gram_bytes,
                )  # fmt: skip
                for entropy_name, entropy_own in shared[name].items():
                    rows = torch.nonzero(entropy_own.any(dim=1)).flatten()
                    with_proxy.setdefault(entropy_name, []).append(
                        (positions[0].rows[rows], entropy[:, rows])
                    )
            else:
                values = conditional_entropy_proxy(*segments, **estimator)
            pieces[name].append(values)
        for name, (spec, _, positions) in plan.items():
            if not spec.is_proxy:
                computed = with_proxy.get(name, [])
                pieces[name].append(_entropy_rows(tokens, positions[0], computed, estimator))
        del tokens
    out: dict[str, BatchQuantity] = {}
    for name, (_, select, positions) in plan.items():
        values = torch.cat(pieces[name])
        counts = sum(p.counts for p in positions)
        normalized = normalize_by_count(values, counts.to(values.dtype)[None, :], base)
        out[name] = BatchQuantity(values, normalized, counts, select)
    return out


def _entropy_rows(
    tokens: TokenBatch, p: _Positions, computed: list[tuple[Tensor, Tensor]], estimator: dict
) -> Tensor:
    """``[L, b]``: an entropy over the rows ``p.rows``, taken from ``computed`` (``(rows,
    values [L, len(rows)])`` found with a proxy) where given, by
    :func:`~unifyreg.estimators.matrix_entropy` for the other rows."""
    if not computed:
        return matrix_entropy(tokens.segments(p.rows, p.index, p.mask), **estimator)
    rows = torch.cat([r for r, _ in computed])
    values = [v for _, v in computed]
    rest = ~torch.isin(p.rows, rows)
    if bool(rest.any()):
        left = torch.nonzero(rest).flatten()
        segment = tokens.segments(p.rows[left], p.index[left], p.mask[left])
        rows = torch.cat([rows, p.rows[left]])
        values.append(matrix_entropy(segment, **estimator))
    # Back to the order of p.rows (every row of p appears once in rows).
    order = torch.argsort(rows)
    where = torch.searchsorted(rows[order], p.rows)
    return torch.cat(values, dim=1).index_select(1, order[where])


def _interpolate(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of ``(xp, fp)`` (``xp`` ascending) at ``x``, holding
    the end values outside ``[xp[0], xp[-1]]`` (``numpy.interp``'s rule); differentiable in
    ``fp``."""
    if xp.numel() == 1:
        return fp.expand(x.shape[0]).clone()
    right = torch.searchsorted(xp, x).clamp(1, xp.numel() - 1)
    left = right - 1
    span = (xp[right] - xp[left]).clamp_min(torch.finfo(xp.dtype).tiny)
    weight = ((x - xp[left]) / span).clamp(0, 1).to(fp.dtype)
    return fp[left] + weight * (fp[right] - fp[left])


def align_by_depth(
    a: Tensor, fractions_a: Sequence[float], b: Tensor, fractions_b: Sequence[float]
) -> tuple[Tensor, Tensor, Tensor]:
    """Two per-layer trajectories of stacks of different depth on one axis: ``(a', b',
    fractions)`` at the depth fractions (``layer / L``) of the coarser trajectory (fewer
    points; ``a``'s on a tie), the finer one interpolated linearly onto them (ends held).
    ``a`` ``[n_a]`` and ``b`` ``[n_b]``, in the order of their fractions (sorted here)."""
    fa = torch.as_tensor(list(fractions_a), dtype=torch.float64, device=a.device)
    fb = torch.as_tensor(list(fractions_b), dtype=torch.float64, device=b.device)
    if fa.numel() != a.numel() or fb.numel() != b.numel() or not a.numel() or not b.numel():
        raise ValueError("each trajectory needs one depth fraction per value, and a value")
    order_a, order_b = torch.argsort(fa), torch.argsort(fb)
    a, fa, b, fb = a[order_a], fa[order_a], b[order_b], fb[order_b]
    if fb.numel() < fa.numel():
        return _interpolate(fb, fa, a), b, fb
    return a, _interpolate(fa, fb, b), fa
