"""Continuous image generation in the seam: flow matching, in one place.

unifyreg's own convention, which every continuous family maps onto its model's:

- **noise level** ``t`` in ``[0, 1]``: ``0`` = the clean latents ``x_0``, ``1`` = pure noise
  ``eps ~ N(0, I)``, and the noisy input ``x_t = (1 - t) * x_0 + t * eps`` (the straight
  path of rectified flow / flow matching);
- the model is trained on a mean squared error against the family's **target**: the
  velocity ``eps - x_0`` (Qwen-Image, SD3, FLUX, BAGEL: ``d x_t / d t``) or its negative
  ``x_0 - eps`` (OmniGen2, Lumina2-style models that run the time from noise to data);
- the **model time** is what the model's ``timestep`` argument receives: ``t`` itself
  (Qwen-Image: sigma, 1 = noise) or ``1 - t`` (OmniGen2, Lumina2: 1 = data), times a
  ``scale`` (1 when the model scales internally, as both do).

A :class:`FlowConvention` holds one family's choices; :data:`FLOW_CONVENTIONS` names the
known ones. Training draws ``t`` from the family's schedule (:func:`sample_noise_levels`:
uniform or logit-normal, optionally shifted); the probe fixes ``t`` (``probe.timestep``) and
seeds each example's noise from a stable hash of the example (:func:`example_seed`,
:func:`seeded_noise`), so two probes agree exactly and a DDP probe equals a single process
whatever the batch composition. The batch keys are ``timesteps`` ``[B]`` (noise levels) and
``noise_seeds`` ``[B]`` (int64); see :mod:`unifyreg.adapters.base`.

:func:`flow_mse` is the image loss: the mean of the squared error over the scored latent
elements, and the number of scored latent tokens as its count (``ForwardOutput.image_tokens``
with ``image_loss_kind = "mse"``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_PROBE_TIMESTEP",
    "FLOW_CONVENTIONS",
    "FlowConvention",
    "FlowSchedule",
    "example_seed",
    "flow_mse",
    "flow_training_batch",
    "seeded_noise",
    "sample_noise_levels",
    "shift_noise_levels",
]

#: The probe's default noise level (``probe.timestep``): half signal, half noise, where a
#: flow model's hidden states carry both the prompt's and the image's information.
DEFAULT_PROBE_TIMESTEP = 0.5


@dataclass(frozen=True)
class FlowConvention:
    """One family's flow-matching convention (module docstring).

    - ``target``: ``"noise_minus_data"`` (``eps - x_0``) or ``"data_minus_noise"``
      (``x_0 - eps``);
    - ``time``: ``"noise_level"`` (the model's time is ``t``, 1 = noise) or
      ``"data_level"`` (``1 - t``, 1 = data);
    - ``scale``: multiplies the model time (1: the model rescales internally).
    """

    name: str
    target: Literal["noise_minus_data", "data_minus_noise"] = "noise_minus_data"
    time: Literal["noise_level", "data_level"] = "noise_level"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.target not in ("noise_minus_data", "data_minus_noise"):
            raise ValueError(
                f"target must be noise_minus_data or data_minus_noise, got {self.target!r}"
            )
        if self.time not in ("noise_level", "data_level"):
            raise ValueError(f"time must be noise_level or data_level, got {self.time!r}")

    @staticmethod
    def noisy(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = (1 - t) * x0 + t * noise``, ``t`` ``[B]`` broadcast over the other dims."""
        t = t.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
        return (1 - t) * x0 + t * noise

    def target_of(self, x0: Tensor, noise: Tensor) -> Tensor:
        """The regression target: ``noise - x0`` or ``x0 - noise`` (``target``)."""
        return noise - x0 if self.target == "noise_minus_data" else x0 - noise

    def model_time(self, t: Tensor) -> Tensor:
        """What the model's ``timestep`` argument receives for noise levels ``t``."""
        time = t if self.time == "noise_level" else 1 - t
        return time * self.scale

    def velocity(self, prediction: Tensor) -> Tensor:
        """The model's output as ``d x_t / d t`` (``eps - x_0``, what an Euler step from
        noise level ``t`` to ``t'`` adds times ``t' - t``)."""
        return prediction if self.target == "noise_minus_data" else -prediction


#: The families' conventions. ``qwen_image``: diffusers' Qwen-Image pipeline and training
#: script (``x_t = (1 - sigma) x_0 + sigma eps``, target ``eps - x_0``, ``timestep = sigma``);
#: ``omnigen2``: OmniGen2's ``ICPlan`` (``x_t = t x_1 + (1 - t) x_0`` with ``x_1`` the data,
#: target data minus noise, the transformer given ``t`` in [0, 1]); ``lumina2``: diffusers'
#: Lumina2 pipeline (timestep ``1 - sigma``, the model's output negated before the Euler
#: step: it predicts ``x_0 - eps``).
FLOW_CONVENTIONS: dict[str, FlowConvention] = {
    "qwen_image": FlowConvention("qwen_image", "noise_minus_data", "noise_level"),
    "omnigen2": FlowConvention("omnigen2", "data_minus_noise", "data_level"),
    "lumina2": FlowConvention("lumina2", "data_minus_noise", "data_level"),
}


@dataclass(frozen=True)
class FlowSchedule:
    """How training draws noise levels: ``sampling`` ``uniform`` (``t ~ U(0, 1)``) or
    ``logit_normal`` (``t = sigmoid(n)``, ``n ~ N(logit_mean, logit_std)``: SD3's and
    OmniGen2's ``lognorm``), then :func:`shift_noise_levels` by ``shift`` (1 = none)."""

    sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"sampling must be uniform or logit_normal, got {self.sampling!r}")
        if not (self.logit_std > 0 and self.shift > 0):
            raise ValueError("logit_std and shift must be > 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> FlowSchedule:
        """From a settings dict (unknown keys raise ValueError naming them)."""
        data = dict(data or {})
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown flow schedule setting(s) {unknown}")
        return cls(**data)


def shift_noise_levels(t: Tensor, shift: float) -> Tensor:
    """``shift * t / (1 + (shift - 1) * t)``: the static time shift of SD3 / FLUX (``shift``
    > 1 spends more steps at high noise; 1 leaves ``t`` unchanged)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_noise_levels(
    n: int, schedule: FlowSchedule, generator: torch.Generator | None = None
) -> Tensor:
    """``[n]`` float32 noise levels in ``(0, 1)`` drawn by ``schedule`` (from ``generator``;
    None: the global torch generator, which checkpoints save)."""
    if schedule.sampling == "uniform":
        t = torch.rand(n, generator=generator)
    else:
        normal = torch.randn(n, generator=generator)
        t = torch.sigmoid(schedule.logit_mean + schedule.logit_std * normal)
    return shift_noise_levels(t, schedule.shift).float()


def flow_training_batch(batch: dict[str, Tensor], schedule: FlowSchedule) -> dict[str, Tensor]:
    """A copy of ``batch`` with the flow objective's draws: ``timesteps`` ``[B]`` from
    ``schedule`` (:func:`sample_noise_levels`) and fresh ``noise_seeds`` ``[B]`` (int64), both
    from the global torch generator (which checkpoints save); a continuous family's
    ``Adapter.training_batch``."""
    size = batch["roles"].shape[0]
    batch = dict(batch)
    batch["timesteps"] = sample_noise_levels(size, schedule)
    batch["noise_seeds"] = torch.randint(0, 2**62, (size,), dtype=torch.long)
    return batch


def _image_bytes(image: Any) -> bytes:
    if image is None:
        return b"-"
    if hasattr(image, "tobytes") and hasattr(image, "size") and hasattr(image, "mode"):
        return f"{image.mode}{image.size}".encode() + image.tobytes()  # a PIL image
    codes = getattr(image, "codes", None)
    array = np.ascontiguousarray(np.asarray(codes if codes is not None else image))
    return f"{array.dtype}{array.shape}".encode() + array.tobytes()


def example_seed(example: Any) -> int:
    """A stable 63-bit seed of an example's content (its prompt text and image, response
    text and image, category): the same in every process, batch and run, so the probe's
    noise does not depend on how the probe set is batched or sharded."""
    digest = hashlib.sha256()
    for name in ("prompt_text", "response_text", "category"):
        digest.update(repr(getattr(example, name, None)).encode())
        digest.update(b"\x00")
    for name in ("prompt_image", "response_image"):
        digest.update(_image_bytes(getattr(example, name, None)))
        digest.update(b"\x00")
    return int.from_bytes(digest.digest()[:8], "little") & ((1 << 63) - 1)


def seeded_noise(
    seeds: Tensor | Sequence[int],
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``[B, *shape]`` standard normal noise, row ``b`` drawn from a CPU generator seeded
    with ``seeds[b]`` (the same values on every device)."""
    rows = []
    for seed in [int(s) for s in (seeds.tolist() if isinstance(seeds, Tensor) else seeds)]:
        generator = torch.Generator().manual_seed(seed)
        rows.append(torch.randn(tuple(shape), generator=generator))
    if not rows:
        return torch.zeros((0, *shape), dtype=dtype, device=device)
    return torch.stack(rows).to(device=device, dtype=dtype)


def flow_mse(
    prediction: Tensor, target: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(mean squared error, scored tokens)`` over latent tokens ``[..., N, c]``.

    ``mask`` (``prediction.shape[:-1]``, bool) picks the scored tokens (None: all). The
    error is averaged over every element of the scored tokens (tokens x channels), in
    float32; the count is the number of scored tokens. No token scored: an exact 0 that
    stays on the graph, count 0.
    """
    error = (prediction.float() - target.float()) ** 2
    if mask is None:
        count = math.prod(error.shape[:-1])
        picked = error.reshape(-1, error.shape[-1])
    else:
        mask = mask.to(error.device).bool()
        count = int(mask.sum())
        picked = error[mask]
    tokens = torch.tensor(count, device=prediction.device)
    if count == 0:
        return error.sum() * 0.0, tokens
    return picked.mean(), tokens
