"""The probe's quantities and unifyreg's scores as torchmetrics ``Metric``s, for any
validation loop.

``update(hidden_states, roles)`` takes one batch's role-labelled hidden states (what an
adapter's forward returns: ``out.hidden_layers``, ``out.roles``), computes the four
quantities of :mod:`unifyreg.quantities` per sample and layer with the probe's estimator
(:class:`unifyreg.config.ProbeConfig`), and adds them to tensor states, all declared with
``add_state(..., dist_reduce_fx="sum")`` (float64):

- ``total[q, l]``, ``total_sq[q, l]``: sum and sum of squares of the raw values (bits) of
  quantity ``q`` at layer ``l`` over the samples seen;
- ``total_norm[q, l]``, ``total_norm_sq[q, l]``: the same for the length-normalised values;
- ``count[q]``: how many samples took part in quantity ``q``.

``compute()`` divides (and, under DDP, first sums the states over the ranks), so the
result equals :func:`unifyreg.probing.run_probe` on the union of the batches to round-off
(summation order): ``mean = total / count``, ``std = sqrt(total_sq / count - mean^2)``
(population std, as ``ProbeResult.stats``), and the scores of
:meth:`unifyreg.probing.ProbeResult.scores` on the pooled normalised means
``Ht, Hi, Ct, Ci``: ``encoding_gap = mean_l |Ht - Hi|``, ``response_split = mean_l
(Ct - Ci)``, ``final_gap = |Ct(L) - Ci(L)|``.

Metric names are :class:`unifyreg.callbacks.EntropyProbe`'s: ``probe/<quantity>/layer_LL``,
``probe_norm/<quantity>/layer_LL`` and ``unify/<score>``.

Example, in any LightningModule::

    from unifyreg.metrics import UnificationScores

    class MyModule(lightning.LightningModule):
        def __init__(self, adapter):
            super().__init__()
            self.adapter = adapter
            self.scores = UnificationScores(adapter.resolve_layers(None))

        def validation_step(self, batch, batch_idx):
            out = self.adapter.forward(batch)  # hidden states of every layer
            self.scores.update(out.hidden_layers, out.roles)

        def on_validation_epoch_end(self):
            self.log_dict(self.scores.compute())  # unify/encoding_gap, ...
            self.scores.reset()
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from unifyreg.config import ProbeConfig
from unifyreg.quantities import PAIRS, QUANTITIES, batch_quantities

__all__ = ["ProbeQuantities", "UnificationScores"]

_STATES = ("total", "total_sq", "total_norm", "total_norm_sq")


class ProbeQuantities(Metric):
    """Per-layer means of the probe's four quantities over every sample seen.

    Args:
        layers: the layer indices the hidden states given to :meth:`update` are of, in
            order (e.g. ``adapter.resolve_layers(None)``: all; their count fixes the
            states' shape, the indices name the metrics).
        probe: the estimator settings (``alpha``, ``bandwidth``, ``base``, ``method``,
            ``dtype``, ``max_tokens``, ...); the probe's defaults when None.
        **kwargs: torchmetrics ``Metric`` options (``sync_on_compute``, ...).

    ``compute()`` returns ``{"probe/<quantity>/layer_LL": mean raw value,
    "probe_norm/<quantity>/layer_LL": mean normalised value}`` (0-d float64 tensors) for
    the quantities that had samples; :meth:`stats` also gives std and counts.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(
        self, layers: Sequence[int], probe: ProbeConfig | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.layers = tuple(int(layer) for layer in layers)
        if not self.layers:
            raise ValueError("layers must name at least one layer")
        if probe is not None and not isinstance(probe, ProbeConfig):
            raise TypeError(f"probe must be a ProbeConfig, got {type(probe).__name__}")
        self.probe = probe or ProbeConfig()
        shape = (len(QUANTITIES), len(self.layers))
        for name in _STATES:
            self.add_state(name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(
            "count", torch.zeros(len(QUANTITIES), dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, hidden_states: Tensor | Sequence[Tensor], roles: Tensor) -> None:
        """Add one batch: ``hidden_states`` ``[n_layers, B, S, d]`` or ``n_layers`` tensors
        ``[B, S, d]`` (of :attr:`layers`, in order), ``roles`` ``[B, S]``. No gradient."""
        cfg = self.probe
        with torch.no_grad():
            computed = batch_quantities(
                hidden_states,
                roles,
                cfg.alpha,
                cfg.sigma,
                cfg.base,
                cfg.torch_dtype if cfg.method == "exact" else None,
                cfg.layers_per_chunk,
                method=cfg.method,
                max_gram_bytes=cfg.max_gram_bytes,
                slq=cfg.slq_settings,
                max_tokens=cfg.max_tokens,
            )
        for index, name in enumerate(QUANTITIES):
            if name not in computed:
                continue
            q = computed[name]
            if q.values.shape[0] != len(self.layers):
                raise ValueError(
                    f"hidden states of {q.values.shape[0]} layers, but the metric was built "
                    f"for {len(self.layers)} ({list(self.layers)})"
                )
            raw = q.values.to(self.total.device, torch.float64)
            norm = q.normalized.to(self.total.device, torch.float64)
            self.total[index] += raw.sum(dim=1)
            self.total_sq[index] += (raw * raw).sum(dim=1)
            self.total_norm[index] += norm.sum(dim=1)
            self.total_norm_sq[index] += (norm * norm).sum(dim=1)
            self.count[index] += raw.shape[1]

    def _means(self) -> dict[str, tuple[Tensor, Tensor] | None]:
        """``quantity -> (raw means [n_layers], normalised means [n_layers])`` or None."""
        out: dict[str, tuple[Tensor, Tensor] | None] = {}
        for index, name in enumerate(QUANTITIES):
            n = self.count[index]
            out[name] = None if n == 0 else (self.total[index] / n, self.total_norm[index] / n)
        return out

    def stats(self) -> dict[str, dict[str, Tensor]]:
        """``quantity -> {"mean", "std", "mean_norm", "std_norm": [n_layers], "count"}``
        for the quantities with samples (population std, as ``ProbeResult.stats``).
        Call after :meth:`compute` under DDP (or inside ``sync_context``) for all ranks."""
        out = {}
        for index, name in enumerate(QUANTITIES):
            n = self.count[index]
            if n == 0:
                continue
            entry: dict[str, Tensor] = {"count": n}
            for suffix, total, total_sq in (
                ("", self.total, self.total_sq),
                ("_norm", self.total_norm, self.total_norm_sq),
            ):
                mean = total[index] / n
                entry[f"mean{suffix}"] = mean
                entry[f"std{suffix}"] = (total_sq[index] / n - mean * mean).clamp_min(0).sqrt()
            out[name] = entry
        return out

    def _quantity_metrics(self, means: dict[str, tuple[Tensor, Tensor] | None]) -> dict:
        metrics: dict[str, Tensor] = {}
        for name, pair in means.items():
            if pair is None:
                continue
            for prefix, values in (("probe", pair[0]), ("probe_norm", pair[1])):
                for layer, value in zip(self.layers, values, strict=True):
                    metrics[f"{prefix}/{name}/layer_{layer:02d}"] = value
        return metrics

    def compute(self) -> dict[str, Tensor]:
        """The per-layer means (class docstring)."""
        return self._quantity_metrics(self._means())


class UnificationScores(ProbeQuantities):
    """unifyreg's scalar scores over every sample seen (module docstring):
    ``compute()`` returns ``{"unify/encoding_gap", "unify/response_split",
    "unify/final_gap"}`` (0-d float64 tensors); a score whose quantities had no sample is
    left out, with a warning (as ``ProbeResult.scores``).

    Args:
        layers, probe, **kwargs: as :class:`ProbeQuantities`.
        with_quantities: also return the per-layer means of :class:`ProbeQuantities`
            (computed once for both).
    """

    def __init__(
        self,
        layers: Sequence[int],
        probe: ProbeConfig | None = None,
        with_quantities: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(layers, probe, **kwargs)
        self.with_quantities = bool(with_quantities)

    def compute(self) -> dict[str, Tensor]:
        """The scores (and, ``with_quantities``, the per-layer means)."""
        means = self._means()
        metrics = self._quantity_metrics(means) if self.with_quantities else {}
        text, image = (means[q] for q in PAIRS["encoding"])
        missing = []
        if text is not None and image is not None:
            metrics["unify/encoding_gap"] = (text[1] - image[1]).abs().mean()
        else:
            missing.append("encoding_gap")
        text, image = (means[q] for q in PAIRS["response"])
        if text is not None and image is not None:
            metrics["unify/response_split"] = (text[1] - image[1]).mean()
            metrics["unify/final_gap"] = (text[1][-1] - image[1][-1]).abs()
        else:
            missing += ["response_split", "final_gap"]
        if missing:
            warnings.warn(
                f"UnificationScores: no samples for {', '.join(missing)} "
                "(needs text and image prompts / responses); those scores are left out",
                stacklevel=2,
            )
        return metrics
