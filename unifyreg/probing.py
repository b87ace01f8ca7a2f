"""The paper's two-level entropy probe, over a fixed probe set -> :class:`ProbeResult`.

For every probe example (one forward pass, teacher-forced, eval mode, no gradient) and
every probed layer, the four quantities of :mod:`unifyreg.quantities` (prompt entropies
of text and of image prompts; the conditional-entropy proxy of text and of image
responses given their prompt) from the role-labelled hidden states only.
``ProbeConfig`` picks the estimator (``method``, ``max_gram_bytes``, ``slq``,
``max_tokens``; see :mod:`unifyreg.estimators`) and the bandwidth. Every value is kept raw
and length-normalised. Hidden states of one batch at a time are held in memory, as the
adapter's per-layer tensors; only per-sample scalars per layer are kept.

unifyreg's scalar scores (our definitions, not the paper's; DESIGN.md), on the
normalised per-layer means pooled over categories, ``Ht, Hi`` (encoding text/image) and
``Ct, Ci`` (response text/image), over the probed layers ``l``:

- ``encoding_gap   = mean_l |Ht(l) - Hi(l)|``
- ``response_split = mean_l (Ct(l) - Ci(l))`` (> 0: text "creative", image "fidelity")
- ``final_gap      = |Ct(L) - Ci(L)|`` at the last probed layer

A family with two stacks of layers (a two-stage model: the LLM and the denoiser) computes
each quantity on the stack that serves it (``ForwardOutput.extra_stacks``), so a pair may
lie on two stacks of different depth. Such a pair is put on one axis by **depth
fraction** ``l / L`` of each stack: the finer trajectory is interpolated linearly onto the
coarser one's fractions (:func:`unifyreg.quantities.align_by_depth`), the means run over
those fractions and ``final_gap`` is taken at the last of them (fraction 1 when both last
layers are probed). A pair on the same stack and layers is compared layer by layer, as
above, to the digit. Each quantity's layers are :meth:`ProbeResult.axis`.

Continuous families (``image_objective = "flow"``) are probed at the fixed noise level
``probe.timestep`` with each example's noise seeded from a stable hash of the example
(:mod:`unifyreg.adapters.continuous`), so two probes of one model agree exactly and a
sharded (DDP) probe equals a single process.

Files (tables, figures) are written by :mod:`unifyreg.report`; a result saves and loads
its own per-sample JSON (:meth:`ProbeResult.save`, :meth:`ProbeResult.load`).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unifyreg.config import ProbeConfig, canonical_bandwidth, probe_regime
from unifyreg.fileio import atomic_write_json
from unifyreg.quantities import PAIRS, QUANTITIES, align_by_depth, batch_quantities

__all__ = [
    "SCORE_NAMES",
    "ProbeResult",
    "QuantityAxis",
    "QuantityRecords",
    "probe_batch",
    "run_probe",
]

SCORE_NAMES = ("encoding_gap", "response_split", "final_gap")


@dataclass
class QuantityRecords:
    """Per-sample values of one quantity: ``values``/``normalized`` ``[N, n_layers]``."""

    values: np.ndarray
    normalized: np.ndarray
    categories: list[str]
    tokens: np.ndarray

    @classmethod
    def empty(cls, n_layers: int) -> QuantityRecords:
        """No samples: ``values``/``normalized`` ``[0, n_layers]``."""
        return cls(np.zeros((0, n_layers)), np.zeros((0, n_layers)), [], np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.categories)

    def extend(self, other: QuantityRecords) -> None:
        """Append ``other``'s samples (same layers) after these, in place."""
        self.values = np.concatenate([self.values, other.values])
        self.normalized = np.concatenate([self.normalized, other.normalized])
        self.categories = [*self.categories, *other.categories]
        self.tokens = np.concatenate([self.tokens, other.tokens])


@dataclass(frozen=True)
class QuantityAxis:
    """Where one quantity's values lie: the ``stack`` it was computed on, its ``layers``
    (one column of its records each) and the stack's ``depth`` L (None: not recorded, as in
    files written before stacks existed)."""

    stack: str
    layers: tuple[int, ...]
    depth: int | None = None

    def fractions(self) -> tuple[float, ...]:
        """Depth fraction ``l / L`` of each layer; ValueError when the depth is unknown."""
        if not self.depth:
            raise ValueError(f"the depth of stack {self.stack!r} is not recorded")
        return tuple(layer / self.depth for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """``{"stack", "layers", "depth"}`` (JSON-ready)."""
        return {"stack": self.stack, "layers": list(self.layers), "depth": self.depth}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantityAxis:
        """Inverse of :meth:`to_dict`."""
        depth = data.get("depth")
        return cls(str(data["stack"]), tuple(data["layers"]), None if depth is None else int(depth))


@dataclass
class ProbeResult:
    """Per-sample probe values for every quantity and layer, with statistics and output.

    ``stats(q)`` gives mean, std and count per category (and ``"all"``) and layer;
    ``scores()`` gives unifyreg's scalar scores; ``merge`` pools results of several
    shards (e.g. DDP ranks) exactly as one run over their union.

    ``layers`` are the primary stack's layers (``stack``, of ``depth`` blocks); a quantity
    computed on another stack (a two-stage model's denoiser) has its own entry in ``axes``.
    :meth:`axis` gives any quantity's stack, layers and depth.
    """

    layers: tuple[int, ...]
    records: dict[str, QuantityRecords]
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    depth: int | None = None
    axes: dict[str, QuantityAxis] = field(default_factory=dict)
    stack: str = "main"

    def axis(self, quantity: str) -> QuantityAxis:
        """The stack, layers and depth of ``quantity``'s values (the primary stack's unless
        ``axes`` names another)."""
        if quantity not in QUANTITIES:
            raise ValueError(f"unknown quantity {quantity!r}; valid: {', '.join(QUANTITIES)}")
        return self.axes.get(quantity) or QuantityAxis(self.stack, tuple(self.layers), self.depth)

    def quantity_layers(self, quantity: str) -> tuple[int, ...]:
        """The layer index of each column of ``quantity``'s records."""
        return self.axis(quantity).layers

    def pair_trajectories(
        self, level: str, normalized: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """The pooled text and image trajectories of a level (``encoding``, ``response``)
        on one axis: ``(text, image, fractions)``; ``fractions`` is None when both lie on
        the same stack and layers (compared layer by layer), else the depth fractions they
        were aligned at (module docstring). None when either has no sample."""
        text_q, image_q = PAIRS[level]
        text, image = self.pooled_mean(text_q, normalized), self.pooled_mean(image_q, normalized)
        if text is None or image is None:
            return None
        ax_t, ax_i = self.axis(text_q), self.axis(image_q)
        if (ax_t.stack, ax_t.layers) == (ax_i.stack, ax_i.layers):
            return text, image, None
        a, b, fractions = align_by_depth(
            torch.as_tensor(text, dtype=torch.float64),
            ax_t.fractions(),
            torch.as_tensor(image, dtype=torch.float64),
            ax_i.fractions(),
        )
        return a.numpy(), b.numpy(), fractions.numpy()

    # ------------------------------------------------------------------ statistics

    def stats(self, quantity: str, normalized: bool = False) -> dict[str, dict[str, Any]]:
        """``{category: {"mean": [n_layers], "std": [n_layers], "count": int}}`` (+ ``"all"``).

        ``std`` is the population standard deviation (0 for a single sample). Categories
        with no sample are absent.
        """
        if quantity not in self.records:
            raise ValueError(f"unknown quantity {quantity!r}; valid: {', '.join(QUANTITIES)}")
        rec = self.records[quantity]
        data = rec.normalized if normalized else rec.values
        out: dict[str, dict[str, Any]] = {}
        groups = {
            c: [i for i, x in enumerate(rec.categories) if x == c]
            for c in sorted(set(rec.categories))
        }
        if len(rec):
            groups["all"] = list(range(len(rec)))
        for category, rows in groups.items():
            block = data[rows]
            out[category] = {
                "mean": block.mean(axis=0).tolist(),
                "std": block.std(axis=0).tolist(),
                "count": len(rows),
            }
        return out

    def pooled_mean(self, quantity: str, normalized: bool = True) -> np.ndarray | None:
        """Mean over all samples of ``quantity`` per layer (None when it has no sample)."""
        rec = self.records[quantity]
        if not len(rec):
            return None
        return (rec.normalized if normalized else rec.values).mean(axis=0)

    def scores(self) -> dict[str, float]:
        """unifyreg's scalar scores (module docstring); a score whose inputs are missing
        from the probe set (e.g. no image prompts) is left out, with a warning."""
        encoding = self.pair_trajectories("encoding")
        response = self.pair_trajectories("response")
        scores: dict[str, float] = {}
        missing = []
        if encoding is not None:
            Ht, Hi, _ = encoding
            scores["encoding_gap"] = float(np.mean(np.abs(Ht - Hi)))
        else:
            missing.append("encoding_gap")
        if response is not None:
            Ct, Ci, _ = response
            scores["response_split"] = float(np.mean(Ct - Ci))
            scores["final_gap"] = float(abs(Ct[-1] - Ci[-1]))
        else:
            missing += ["response_split", "final_gap"]
        if missing:
            warnings.warn(
                f"probe set lacks the samples for {', '.join(missing)} "
                "(needs text and image prompts / responses); those scores are left out",
                stacklevel=2,
            )
        return scores

    # ------------------------------------------------------------------ combining

    @classmethod
    def merge(cls, results: Sequence[ProbeResult]) -> ProbeResult:
        """Pool the samples of several results over the same layers (e.g. DDP shards)."""
        if not results:
            raise ValueError("nothing to merge")
        first = results[0]
        layers = first.layers
        if any(r.layers != layers for r in results):
            raise ValueError("cannot merge probe results over different layers")
        if any(
            {q: r.axis(q) for q in QUANTITIES} != {q: first.axis(q) for q in QUANTITIES}
            for r in results
        ):
            raise ValueError("cannot merge probe results whose quantities lie on different stacks")
        records = {q: QuantityRecords.empty(len(first.quantity_layers(q))) for q in QUANTITIES}
        for result in results:
            for q in QUANTITIES:
                records[q].extend(result.records[q])
        return cls(
            layers,
            records,
            dict(first.settings),
            dict(first.meta),
            first.depth,
            dict(first.axes),
            first.stack,
        )

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: per-sample records, statistics and scores."""
        return {
            "layers": list(self.layers),
            "depth": self.depth,
            "stack": self.stack,
            "axes": {q: axis.to_dict() for q, axis in self.axes.items()},
            "settings": self.settings,
            "meta": self.meta,
            "records": {
                q: {
                    "values": r.values.tolist(),
                    "normalized": r.normalized.tolist(),
                    "categories": r.categories,
                    "tokens": r.tokens.tolist(),
                }
                for q, r in self.records.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeResult:
        """Inverse of :meth:`to_dict`; files written before stacks existed (no ``axes``,
        ``depth``) load with every quantity on the primary stack, depth unknown."""
        axes = {q: QuantityAxis.from_dict(a) for q, a in (data.get("axes") or {}).items()}
        depth = data.get("depth")
        records = {}
        for q in QUANTITIES:
            n_layers = len(axes[q].layers) if q in axes else len(data["layers"])
            r = data["records"][q]
            records[q] = QuantityRecords(
                np.asarray(r["values"], dtype=float).reshape(-1, n_layers),
                np.asarray(r["normalized"], dtype=float).reshape(-1, n_layers),
                list(r["categories"]),
                np.asarray(r["tokens"], dtype=np.int64),
            )
        return cls(
            tuple(data["layers"]),
            records,
            data.get("settings", {}),
            data.get("meta", {}),
            None if depth is None else int(depth),
            axes,
            str(data.get("stack", "main")),
        )

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (per-sample records, so it can be merged or re-analysed;
        one line: it is read by :meth:`load`, not by people)."""
        return atomic_write_json(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: str | Path) -> ProbeResult:
        """Read a file written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def regime(self) -> dict[str, Any]:
        """Which estimator settings produced these values: ``{"regime", "bandwidth",
        "alpha", "base"}`` (``regime``: ``default``, ``paper`` or ``custom``, see
        :func:`unifyreg.config.probe_regime`; ``bandwidth``: the rule in its canonical
        spelling, or the fixed sigma). A result without settings (written by hand) says
        ``unknown``."""
        alpha, base = self.settings.get("alpha"), self.settings.get("base")
        bandwidth = self.settings.get("bandwidth")
        if alpha is None or base is None or bandwidth is None:
            return {"regime": "unknown", "bandwidth": bandwidth, "alpha": alpha, "base": base}
        try:
            bandwidth = canonical_bandwidth(bandwidth)
        except (TypeError, ValueError):  # a hand-written setting: reported as written
            pass
        return {
            "regime": probe_regime(alpha, base, bandwidth),
            "bandwidth": bandwidth,
            "alpha": float(alpha),
            "base": float(base),
        }

    def summary(self) -> dict[str, Any]:
        """Compact JSON-ready summary: the regime that produced it (:meth:`regime`: top-level
        ``regime``, ``bandwidth``, ``alpha``, ``base``), scores and per-layer statistics
        (raw and normalised)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = self.scores()
        return {
            **self.regime(),
            "layers": list(self.layers),
            "depth": self.depth,
            "axes": {q: self.axis(q).to_dict() for q in QUANTITIES},
            "scores": scores,
            "stats": {
                q: {"raw": self.stats(q), "normalized": self.stats(q, normalized=True)}
                for q in QUANTITIES
                if len(self.records[q])
            },
        }

    def _column(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not probed; probed: {list(self.layers)}")
        return self.layers.index(layer)


# ---------------------------------------------------------------------- running


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _warn_non_finite(quantity: str, values: torch.Tensor, layers: Sequence[int]) -> None:
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        bad_layers = [layers[i] for i in torch.nonzero(bad.any(dim=1)).flatten().tolist()]
        warnings.warn(
            f"probe: non-finite hidden states for {quantity} at layer(s) {bad_layers}; "
            f"{int(bad.any(dim=0).sum())} sample(s) recorded as NaN",
            RuntimeWarning,
            stacklevel=3,
        )


def probe_batch(
    hidden_states: torch.Tensor | Sequence[torch.Tensor],
    roles: torch.Tensor,
    categories: Sequence[str],
    layers: Sequence[int],
    cfg: ProbeConfig,
    quantities: Sequence[str] = QUANTITIES,
) -> dict[str, QuantityRecords]:
    """The ``quantities`` (default: all four) for one batch of hidden states
    (``[n_layers, B, S, d]`` or per-layer ``[B, S, d]`` tensors), as per-sample records, with
    ``cfg``'s estimator (``method``, ``max_gram_bytes``, ``slq``, ``max_tokens``); warns,
    with layer and quantity, about non-finite values."""
    n_layers = len(layers)
    records = {q: QuantityRecords.empty(n_layers) for q in quantities}
    if roles.shape[0] == 0 or not quantities:  # a stack that holds no row of this batch
        return records
    computed = batch_quantities(
        hidden_states,
        roles,
        cfg.alpha,
        cfg.sigma,
        cfg.base,
        cfg.torch_dtype if cfg.method == "exact" else None,  # slq: float32 Grams
        cfg.layers_per_chunk,
        method=cfg.method,
        max_gram_bytes=cfg.max_gram_bytes,
        slq=cfg.slq_settings,
        max_tokens=cfg.max_tokens,
        quantities=quantities,
    )
    for name, q in computed.items():
        _warn_non_finite(name, q.values, layers)
        idx = torch.nonzero(q.select).flatten().tolist()
        records[name] = QuantityRecords(
            q.values.T.detach().cpu().numpy().astype(float),
            q.normalized.T.detach().cpu().numpy().astype(float),
            [categories[i] for i in idx],
            q.counts.cpu().numpy().astype(np.int64),
        )
    return records


def _with_generated_responses(adapter: Any, examples: Sequence[Any]) -> list[Any]:
    """Replace each reference response by the model's own greedy response."""
    images = [i for i, e in enumerate(examples) if e.response_image is not None]
    texts = [i for i, e in enumerate(examples) if e.response_image is None]
    out = list(examples)
    if images:
        for i, grid in zip(
            images, adapter.generate_images([examples[i] for i in images]), strict=True
        ):
            out[i] = dataclasses.replace(examples[i], response_image=grid)
    if texts:
        answers = adapter.generate_text([examples[i] for i in texts])
        for i, answer in zip(texts, answers, strict=True):
            # An empty answer cannot be probed; a single <eos>-like word keeps the slot.
            out[i] = dataclasses.replace(examples[i], response_text=answer or None)
    return [e for e in out if e.response_text is not None or e.response_image is not None]


def probe_inputs(adapter: Any, examples: Sequence[Any], cfg: ProbeConfig) -> dict[str, Any]:
    """The batch the probe runs ``adapter`` on: ``adapter.encode(examples)``, and for a
    continuous family (``image_objective = "flow"``) every row at the noise level
    ``probe.timestep`` (``timesteps``; the noise is seeded per example by ``encode``)."""
    batch = adapter.encode(examples)
    if getattr(adapter, "image_objective", "") == "flow":
        batch["timesteps"] = torch.full((len(examples),), float(cfg.timestep))
    return batch


def _primary_depth(adapter: Any, out: Any) -> int | None:
    if out.depth is not None:
        return int(out.depth)
    try:
        return int(adapter.num_layers)
    except (AttributeError, TypeError, ValueError):
        return None


@torch.no_grad()
def run_probe(
    adapter: Any,
    examples: Sequence[Any],
    cfg: ProbeConfig | None = None,
    progress: bool = False,
    *,
    forward: Callable[..., Any] | None = None,
    min_batches: int = 0,
    padding_example: Any = None,
) -> ProbeResult:
    """Probe ``adapter`` on ``examples`` (each with a ``category``) -> :class:`ProbeResult`.

    Runs in eval mode without gradient and restores the model's mode afterwards. Each
    quantity is computed on the stack that serves it (module docstring); ``probe.layers``
    names layers of the primary stack, and the adapter probes its other stacks at the
    same depth fractions (:func:`unifyreg.adapters.base.fraction_layers`).
    ``forward(batch, layers=..., final_norm=...) -> ForwardOutput`` replaces
    ``adapter.forward`` (a sharded model runs its forward through its wrapper this way).
    ``min_batches``: run at least this many forward passes, the missing ones on a batch of
    ``padding_example`` alone, whose values are dropped: under FSDP every forward pass is a
    collective of all ranks, so ranks with shorter shards of the probe set must run as
    many passes as the longest. ``examples`` may then be empty (all passes padding).
    """
    cfg = cfg or ProbeConfig()
    if len(examples) == 0 and min_batches == 0:
        raise ValueError("the probe set is empty")
    if min_batches and padding_example is None:
        raise ValueError("min_batches > 0 needs a padding_example")
    if min_batches and cfg.responses == "generated":
        raise ValueError(
            "probe.responses=generated cannot run with padding batches (sharded models: "
            "generation is not a fixed number of collective forward passes); use reference"
        )
    forward = forward or adapter.forward
    layers = adapter.resolve_layers(cfg.layers or None)
    model = adapter.model
    was_training = model.training
    model.eval()
    records: dict[str, QuantityRecords] | None = None
    axes: dict[str, QuantityAxis] = {}
    primary = ("main", layers, None)
    try:
        if cfg.responses == "generated":
            examples = _with_generated_responses(adapter, examples)
        batches = list(_batches(examples, cfg.batch_size))
        padding = max(0, min_batches - len(batches))
        iterator: Iterable = [*batches, *[None] * padding]
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="probe", unit="batch")
        for chunk in iterator:
            if chunk is None:  # a padding pass: every rank runs the forward, nothing kept
                padding_batch = probe_inputs(adapter, [padding_example], cfg)
                forward(padding_batch, layers=cfg.layers or None, final_norm=cfg.final_norm)
                continue
            batch = probe_inputs(adapter, chunk, cfg)
            out = forward(batch, layers=cfg.layers or None, final_norm=cfg.final_norm)
            categories = [str(getattr(e, "category", "default")) for e in chunk]
            primary = (out.stack_name, tuple(out.layers), _primary_depth(adapter, out))
            for index, stack in enumerate(out.stacks()):
                depth = primary[2] if index == 0 else stack.depth
                axis = QuantityAxis(stack.name, stack.layers, depth)
                for q in stack.quantities:
                    if axes.setdefault(q, axis) != axis:
                        raise RuntimeError(
                            f"the adapter put {q} on {axes[q]} in one batch and on {axis} in "
                            "another"
                        )
                rows = stack.rows.tolist() if stack.rows is not None else range(len(chunk))
                batch_records = probe_batch(
                    stack.hidden_layers if stack.hidden_layers is not None else [],
                    stack.roles,
                    [categories[i] for i in rows],
                    stack.layers,
                    cfg,
                    quantities=stack.quantities,
                )
                if records is None:
                    records = {}
                for q, rec in batch_records.items():
                    if q in records:
                        records[q].extend(rec)
                    else:
                        records[q] = rec
            del out
    finally:
        model.train(was_training)
    stack_name, layers, depth = primary
    records = records or {}
    for q in QUANTITIES:
        records.setdefault(q, QuantityRecords.empty(len(layers)))
    off_primary = {q: a for q, a in axes.items() if a.stack != stack_name}
    settings = dataclasses.asdict(cfg)
    settings["layers"] = list(layers)
    return ProbeResult(
        tuple(layers),
        {q: records[q] for q in QUANTITIES},
        settings,
        {"adapter": adapter.name},
        depth,
        off_primary,
        stack_name,
    )
