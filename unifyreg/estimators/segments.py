"""Segments: token subsets of a batch of padded sequences, estimated without copying first.

A probe estimates several quantities on the same sequences (a prompt's entropy, and the
proxy of a response given that prompt), layer by layer. :class:`TokenBatch` holds the
sequences of a batch (one ``[B, S, d]`` tensor per layer) and cuts :class:`Segments` out
of them; the estimators take segments wherever they take token tensors. On the exact
path without gradient, short sequences (fewer than
:data:`~unifyreg.estimators.kernel.SYMMETRIC_GRAM_MIN_TOKENS` positions) whose distances
fit the memory budget get one distance matrix per sequence and layer, computed once per
:class:`TokenBatch` and shared by every segment cut from it: each segment's distances
are that matrix at its positions (the cost at small n is passes over the token vectors,
not products). Everywhere else a segment is gathered into a padded ``[L, b, k, d]``
tensor (differentiably when the layers require gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from unifyreg.estimators._checks import finite_tokens
from unifyreg.estimators.kernel import SYMMETRIC_GRAM_MIN_TOKENS, pairwise_sq_distances

__all__ = ["Segments", "TokenBatch"]


class TokenBatch:
    """The padded sequences of one batch, one ``[B, S, d]`` tensor per layer, and their
    valid (non-padding) positions ``valid`` ``[B, S]``.

    Example::

        tokens = TokenBatch(out.hidden_layers, valid=out.roles != 0)
        prompt = tokens.segments(rows, prompt_index, prompt_mask)
        H = matrix_entropy(prompt)                      # [n_layers, len(rows)]
    """

    def __init__(self, layers: Sequence[Tensor], valid: Tensor) -> None:
        self.layers = tuple(layers)
        if not self.layers:
            raise ValueError("TokenBatch needs at least one layer")
        if valid.dim() != 2:
            raise ValueError(f"valid must have shape [B, S], got {tuple(valid.shape)}")
        for h in self.layers:
            if h.dim() != 3 or tuple(h.shape[:2]) != tuple(valid.shape):
                raise ValueError(
                    f"each layer must be [B, S, d] matching valid [B, S] {tuple(valid.shape)}, "
                    f"got {tuple(h.shape)}"
                )
        self.valid = valid.to(torch.bool)
        self._distances: dict[torch.dtype, tuple[Tensor, Tensor]] = {}

    @property
    def requires_grad(self) -> bool:
        """Whether a gradient is to be computed through these layers."""
        return torch.is_grad_enabled() and any(h.requires_grad for h in self.layers)

    def segments(self, rows: Tensor, index: Tensor, mask: Tensor) -> Segments:
        """The segment of each sequence ``rows[i]`` at positions ``index[i]`` (``[b, k]``,
        in order; entries where ``mask`` ``[b, k]`` is False are ignored)."""
        return Segments(self, rows, index, mask)

    def distance_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one ``[B, S, S]`` distance matrix per layer in ``dtype``."""
        batch, length = self.valid.shape
        itemsize = torch.empty((), dtype=dtype).element_size()
        return len(self.layers) * batch * length * length * itemsize

    def shares_distances(self, dtype: torch.dtype, max_gram_bytes: int | None) -> bool:
        """Whether segments of this batch take the shared-distance route (module
        docstring): no gradient, fewer than ``SYMMETRIC_GRAM_MIN_TOKENS`` positions, and
        the distances of every layer fit ``max_gram_bytes`` (None: no route)."""
        return (
            max_gram_bytes is not None
            and not self.requires_grad
            and self.valid.shape[1] < SYMMETRIC_GRAM_MIN_TOKENS
            and self.distance_bytes(dtype) <= max_gram_bytes
        )

    def sq_distances(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(D, finite)``: ``D`` ``[L, B, S, S]`` the squared distances between every two
        positions of each sequence in each layer (in ``dtype``, centred on the mean of the
        sequence's finite valid tokens; non-finite tokens count as zero vectors) and
        ``finite`` ``[L, B, S]``; computed once per dtype, without gradient."""
        if dtype not in self._distances:
            batch, length = self.valid.shape
            D = torch.empty(
                (len(self.layers), batch, length, length), dtype=dtype, device=self.valid.device
            )
            finite = torch.empty(
                (len(self.layers), batch, length), dtype=torch.bool, device=self.valid.device
            )
            with torch.no_grad():
                for j, h in enumerate(self.layers):
                    Z = h.to(dtype)
                    finite[j] = finite_tokens(Z)
                    D[j] = pairwise_sq_distances(Z, self.valid & finite[j])
            self._distances[dtype] = (D, finite)
        return self._distances[dtype]


@dataclass(frozen=True)
class Segments:
    """Token subsets of the sequences of a :class:`TokenBatch`: sequence ``rows[i]`` at
    positions ``index[i]`` (``[b, k]``), real where ``mask`` ``[b, k]`` is True. Estimating
    a segment gives one value per layer of the batch and segment: ``[L, b]``."""

    batch: TokenBatch
    rows: Tensor
    index: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        if self.index.dim() != 2 or self.mask.shape != self.index.shape:
            raise ValueError(
                f"index and mask must both be [b, k], got {tuple(self.index.shape)} and "
                f"{tuple(self.mask.shape)}"
            )
        if self.rows.dim() != 1 or self.rows.shape[0] != self.index.shape[0]:
            raise ValueError(
                f"rows must be [b] = [{self.index.shape[0]}], got {tuple(self.rows.shape)}"
            )

    @property
    def counts(self) -> Tensor:
        """Real tokens per segment ``[b]``."""
        return self.mask.sum(dim=1)

    @property
    def layer_mask(self) -> Tensor:
        """``mask`` expanded over the layers: ``[L, b, k]``."""
        return self.mask.expand(len(self.batch.layers), *self.mask.shape)

    def _flat_positions(self) -> Tensor:
        length = self.batch.valid.shape[1]
        return (self.rows[:, None] * length + self.index).flatten()

    def gather(self, dtype: torch.dtype | None = None) -> Tensor:
        """``[L, b, k, d]``: the segment's tokens in each layer.

        ``dtype=None``: differentiable, one ``index_select`` per layer (its backward is a
        single ``index_add``; two-dimensional advanced indexing would backpropagate
        through a slow ``index_put``). Otherwise one buffer in ``dtype``, filled a layer at
        a time (no stacked or full-precision copy)."""
        layers = self.batch.layers
        flat = self._flat_positions()
        shape = (*self.index.shape, layers[0].shape[-1])
        if dtype is None:
            return torch.stack([h.flatten(0, 1).index_select(0, flat).view(shape) for h in layers])
        out = torch.empty((len(layers), *shape), dtype=dtype, device=layers[0].device)
        for j, h in enumerate(layers):
            out[j] = h.flatten(0, 1).index_select(0, flat).view(shape)
        return out


def joint_sq_distances(parts: Sequence[Segments], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(D, ok)`` for segments of one :class:`TokenBatch` and the same rows, concatenated
    in order (a proxy's prompt, then its response): ``D`` ``[L * b, k, k]`` their pair
    distances cut out of the batch's shared distances, ``ok`` ``[L, b]`` False where a
    real token of the concatenation is not finite."""
    batch = parts[0].batch
    D_all, finite = batch.sq_distances(dtype)
    n_layers, _, length, _ = D_all.shape
    rows = parts[0].rows
    index = torch.cat([p.index for p in parts], dim=1)
    mask = torch.cat([p.mask for p in parts], dim=1)
    b, k = index.shape
    positions = rows[:, None] * length + index  # [b, k] into [B * S]
    pairs = positions[:, :, None] * length + index[:, None, :]  # [b, k, k] into [B * S * S]
    D = D_all.view(n_layers, -1).index_select(1, pairs.flatten()).view(n_layers * b, k, k)
    usable = finite.view(n_layers, -1).index_select(1, positions.flatten()).view(n_layers, b, k)
    ok = (usable | ~mask).all(dim=-1)
    return D, ok
