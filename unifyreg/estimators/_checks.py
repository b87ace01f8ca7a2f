"""Argument checks, casting and NaN handling shared by every estimator path."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

NanPolicy = Literal["raise", "propagate"]


def check_alpha(alpha: float) -> float:
    """``alpha`` as a float; ValueError unless finite and > 0."""
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    return alpha


def check_base(base: float) -> float:
    """``base`` as a float; ValueError unless finite, > 0 and != 1."""
    base = float(base)
    if not math.isfinite(base) or base <= 0 or base == 1:
        raise ValueError(f"base must be a finite number > 0 and != 1, got {base!r}")
    return base


def check_sequences(Z: Tensor, name: str = "Z") -> None:
    """TypeError/ValueError unless ``Z`` is a floating-point tensor ``[..., n, d]``."""
    if not isinstance(Z, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(Z).__name__}")
    if Z.dim() < 2:
        raise ValueError(f"{name} must have shape [..., n, d], got {tuple(Z.shape)}")
    if not (Z.is_floating_point() or Z.is_complex()):
        raise TypeError(f"{name} must be a floating-point tensor, got {Z.dtype}")


def as_mask(mask: Tensor | None, Z: Tensor, name: str = "mask") -> Tensor | None:
    """``mask`` as a bool tensor on Z's device; ValueError unless shaped ``Z.shape[:-1]``."""
    if mask is None:
        return None
    if mask.shape != Z.shape[:-1]:
        raise ValueError(
            f"{name} must have shape {tuple(Z.shape[:-1])} (Z without its last dim), "
            f"got {tuple(mask.shape)}"
        )
    return mask.to(device=Z.device, dtype=torch.bool)


def finite_tokens(Z: Tensor) -> Tensor:
    """``[..., n]`` bool: True where every entry of the token vector ``Z[..., i, :]`` is
    finite. A token's sum is finite only if all its entries are (one pass instead of
    ``isfinite``'s several); only when some sum is not (a non-finite entry, or an overflow
    of finite ones) are the entries checked one by one."""
    finite = torch.isfinite(Z.detach().sum(dim=-1))
    if not bool(finite.all()):
        finite = torch.isfinite(Z.detach()).all(dim=-1)
    return finite


def prepare(
    Z: Tensor, mask: Tensor | None, dtype: torch.dtype, nan_policy: NanPolicy, name: str
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(Z in dtype, mask, bad)``: cast to the compute dtype and find the sequences with a
    non-finite valid token (``bad`` ``[...]``, None when there is none). With
    ``nan_policy="raise"`` such a sequence raises ValueError; with ``"propagate"`` its
    non-finite entries are replaced by 0 (the caller sets its result to NaN)."""
    check_sequences(Z, name)
    if nan_policy not in ("raise", "propagate"):
        raise ValueError(f"nan_policy must be 'raise' or 'propagate', got {nan_policy!r}")
    Zc = Z.to(dtype)
    mask = as_mask(mask, Zc, f"mask of {name}")
    finite = finite_tokens(Zc)
    if mask is not None:
        finite = finite | ~mask
    bad = ~finite.all(dim=-1)
    if not torch.any(bad):
        return Zc, mask, None
    if nan_policy == "raise":
        raise ValueError(
            f"{name} holds NaN or Inf in {int(bad.sum())} of {bad.numel()} sequence(s); "
            "pass nan_policy='propagate' to get NaN for those sequences instead"
        )
    Zc = torch.where(torch.isfinite(Zc), Zc, torch.zeros((), dtype=Zc.dtype))
    return Zc, mask, bad


def valid_counts(Z: Tensor, mask: Tensor | None) -> Tensor:
    """Valid tokens per sequence ``[...]`` in Z's dtype (n when there is no mask)."""
    if mask is None:
        return torch.full(Z.shape[:-2], Z.shape[-2], dtype=Z.dtype, device=Z.device)
    return mask.sum(-1).to(Z.dtype)


def normalize_by_count(entropy: Tensor, counts: Tensor, base: float = 2.0) -> Tensor:
    """Length-normalised value: ``entropy / log_base(count)``; a count of 1 gives 0.

    ``log_base(count)`` is the largest entropy ``count`` tokens can have, so normalised
    entropies lie in [0, 1]. ``counts`` broadcasts against ``entropy``.
    """
    base = check_base(base)
    counts = torch.as_tensor(counts, dtype=entropy.dtype, device=entropy.device)
    log_count = torch.log(counts.clamp_min(1.0)) / math.log(base)
    safe = torch.where(log_count > 0, log_count, torch.ones((), dtype=log_count.dtype))
    return torch.where(log_count > 0, entropy / safe, torch.zeros((), dtype=entropy.dtype))


def merge_bad(*flags: Tensor | None) -> Tensor | None:
    """The union of non-finite flags (None entries are "none bad")."""
    bad = None
    for flag in flags:
        if flag is not None:
            bad = flag if bad is None else bad | flag
    return bad


def finish(values: Tensor, counts: Tensor | None, base: float, bad: Tensor | None) -> Tensor:
    """Optional length normalisation (``counts`` given), then NaN where ``bad``; a -0.0
    (from a rank-one spectrum) becomes +0.0."""
    if counts is not None:
        values = normalize_by_count(values, counts.to(values.dtype), base)
    values = values + 0.0  # -0.0 + 0.0 == +0.0: "zero entropy" prints as 0, not -0
    if bad is not None:
        values = torch.where(bad, torch.full((), math.nan, dtype=values.dtype), values)
    return values


def prepare_joint(
    Zp: Tensor,
    Zr: Tensor,
    mask_p: Tensor | None,
    mask_r: Tensor | None,
    dtype: torch.dtype,
    nan_policy: NanPolicy,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor | None]:
    """``(Z_joint, mask_joint, prompt, counts, bad)`` for a proxy: the concatenation
    ``[P; R]`` ``[..., n + m, d]`` in ``dtype``, its mask ``[..., n + m]`` (None when
    neither side has one), ``prompt`` ``[..., n + m]`` (True at the prompt's valid
    tokens), the joint valid counts ``[...]`` and the non-finite flags ``[...]``.
    ValueError for mismatched shapes or a side without a valid token."""
    Zp_c, mp, bad_p = prepare(Zp, mask_p, dtype, nan_policy, "Zp")
    Zr_c, mr, bad_r = prepare(Zr, mask_r, dtype, nan_policy, "Zr")
    if Zp_c.shape[:-2] != Zr_c.shape[:-2] or Zp_c.shape[-1] != Zr_c.shape[-1]:
        raise ValueError(
            f"Zp {tuple(Zp.shape)} and Zr {tuple(Zr.shape)} must share batch dims and width"
        )
    count_p, count_r = valid_counts(Zp_c, mp), valid_counts(Zr_c, mr)
    if torch.any(count_p < 1) or torch.any(count_r < 1):
        raise ValueError("a prompt or response has no valid token: proxy undefined")
    n = Zp_c.shape[-2]
    mask_joint = None
    if mp is not None or mr is not None:
        if mp is None:
            mp = torch.ones(Zp_c.shape[:-1], dtype=torch.bool, device=Zp_c.device)
        if mr is None:
            mr = torch.ones(Zr_c.shape[:-1], dtype=torch.bool, device=Zr_c.device)
        mask_joint = torch.cat([mp, mr], dim=-1)
    Z_joint = torch.cat([Zp_c, Zr_c], dim=-2)
    prompt = torch.zeros(Z_joint.shape[:-1], dtype=torch.bool, device=Z_joint.device)
    prompt[..., :n] = True if mp is None else mp
    return Z_joint, mask_joint, prompt, count_p + count_r, merge_bad(bad_p, bad_r)


def as_generator(generator: torch.Generator | int | None) -> torch.Generator:
    """A ``torch.Generator`` from a generator or an int seed (None: seed 0)."""
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        generator = 0
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"generator must be a torch.Generator or an int seed, got {generator!r}")
    return torch.Generator().manual_seed(generator)
