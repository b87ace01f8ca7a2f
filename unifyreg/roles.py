"""Role labels of token positions, and cutting role segments out of a forward pass.

Every adapter labels each position of its batch with a :class:`Role`; probes, metrics and
losses select tokens by role only, never by model family.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum

import torch
from torch import Tensor

__all__ = ["Role", "RoleSet", "role_counts", "role_mask", "role_segments", "sample_segment"]


class Role(IntEnum):
    """What a token position is: padding, a special token, or part of a prompt/response."""

    PAD = 0
    SPECIAL = 1
    TEXT_PROMPT = 2
    IMAGE_PROMPT = 3
    TEXT_RESPONSE = 4
    IMAGE_RESPONSE = 5

    @classmethod
    def parse(cls, value: str | int | Role) -> Role:
        """``Role.parse("text_prompt")`` -> ``Role.TEXT_PROMPT``; ValueError names valid ones."""
        if isinstance(value, Role):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).upper()]
        except KeyError:
            valid = ", ".join(r.name.lower() for r in cls)
            raise ValueError(f"unknown role {value!r}; valid: {valid}") from None


def _check_roles(roles: Tensor, hidden_states: Tensor | None = None) -> None:
    if roles.dim() != 2:
        raise ValueError(f"roles must have shape [B, S], got {tuple(roles.shape)}")
    if hidden_states is not None and tuple(hidden_states.shape[-3:-1]) != tuple(roles.shape):
        raise ValueError(
            f"hidden_states [..., B, S, d] {tuple(hidden_states.shape)} does not match "
            f"roles [B, S] {tuple(roles.shape)}"
        )


RoleSet = Role | Iterable[Role]


def role_mask(roles: Tensor, role: RoleSet) -> Tensor:
    """``[B, S]`` bool: True where the position's role is ``role`` (or one of a set of roles)."""
    _check_roles(roles)
    wanted = [role] if isinstance(role, (Role, int)) else list(role)
    mask = torch.zeros_like(roles, dtype=torch.bool)
    for r in wanted:
        mask |= roles == int(r)
    return mask


def role_counts(roles: Tensor, role: RoleSet) -> Tensor:
    """Number of positions with ``role`` (or any of a set of roles) per sample: ``[B]``."""
    return role_mask(roles, role).sum(dim=1)


def role_segments(hidden_states: Tensor, roles: Tensor, role: RoleSet) -> tuple[Tensor, Tensor]:
    """Gather the tokens of one role (or a set of roles) from every sample into a padded batch.

    ``hidden_states``: ``[..., B, S, d]`` (e.g. ``[L+1, B, S, d]``); ``roles``: ``[B, S]``.
    Returns ``(Z, mask)`` with ``Z`` ``[..., B, k, d]`` (``k`` = the largest count of that
    role in a sample, order of positions kept) and ``mask`` ``[B, k]`` (True = real token),
    ready for the batched estimators (``mask`` broadcasts over the leading dims once
    expanded). A role absent from the whole batch gives ``k = 0``.
    """
    _check_roles(roles, hidden_states)
    is_role = role_mask(roles, role)
    counts = is_role.sum(dim=1)
    k = int(counts.max()) if counts.numel() else 0
    # A stable sort on "not this role" brings this role's positions first, in order.
    order = torch.argsort((~is_role).to(torch.int8), dim=1, stable=True)[:, :k]
    mask = torch.arange(k, device=roles.device)[None, :] < counts[:, None]
    lead = hidden_states.shape[:-3]
    index = order.view(*([1] * len(lead)), *order.shape, 1)
    index = index.expand(*lead, *order.shape, hidden_states.shape[-1])
    return torch.gather(hidden_states, dim=-2, index=index), mask


def sample_segment(hidden_states: Tensor, roles: Tensor, role: RoleSet, sample: int) -> Tensor:
    """The tokens of ``role`` in sample ``sample``: ``[..., k_b, d]`` (all leading dims kept)."""
    _check_roles(roles, hidden_states)
    if not 0 <= sample < roles.shape[0]:
        raise IndexError(f"sample {sample} out of range for a batch of {roles.shape[0]}")
    positions = torch.nonzero(role_mask(roles, role)[sample], as_tuple=True)[0]
    return hidden_states[..., sample, positions, :]
