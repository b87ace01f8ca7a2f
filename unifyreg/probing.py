"""The paper's two-level entropy probe, over a fixed probe set -> :class:`ProbeResult`.

For every probe example (one forward pass, teacher-forced, eval mode, no gradient) and
every probed layer l, from the role-labelled hidden states only:

- ``encoding/text``: ``H(text-prompt tokens)`` of examples without an image prompt;
- ``encoding/image``: ``H(image-prompt tokens)`` of examples with an image prompt;
- ``response/text``: ``H(R | P)`` proxy with R = the text-response tokens and P = all
  prompt tokens (text and image) of the same example, same layer;
- ``response/image``: the same proxy with R = the image-response tokens.

``H`` is :func:`unifyreg.estimators.matrix_entropy` (alpha = 1.01, median bandwidth,
bits by default); the proxy is :func:`unifyreg.estimators.conditional_entropy_proxy`.
``ProbeConfig.method`` picks how they are computed: ``exact`` (the bounded-memory
``*_chunked`` functions, ``max_gram_bytes`` of Gram at a time; equal to round-off) or
``slq`` (the approximate ``*_slq`` functions, no gradient); ``max_tokens`` optionally
caps each role segment by a seeded uniform subsample. Every value is kept raw and
length-normalised (entropies divided by log2 of the token count, proxies by log2 of the
joint count; kept counts when subsampled). Hidden states of one batch at a time are held
in memory, as the adapter's per-layer tensors; role segments are gathered and cast one
chunk of ``layers_per_chunk`` layers at a time; only per-sample scalars per layer are
kept. For short sequences (fewer than
:data:`~unifyreg.estimators.SYMMETRIC_GRAM_MIN_TOKENS` positions) whose per-sample
distance matrices fit ``max_gram_bytes``, ``exact`` computes each sample's pairwise
distances once per layer and cuts every segment's (and every proxy's joint) distances
out of them: the same values, fewer passes over the token vectors.

unifyreg's scalar scores (our definitions, not the paper's; DESIGN.md), on the
normalised per-layer means pooled over categories, ``Ht, Hi`` (encoding text/image) and
``Ct, Ci`` (response text/image), over the probed layers ``l``:

- ``encoding_gap   = mean_l |Ht(l) - Hi(l)|``
- ``response_split = mean_l (Ct(l) - Ci(l))`` (> 0: text "creative", image "fidelity")
- ``final_gap      = |Ct(L) - Ci(L)|`` at the last probed layer
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

from unifyreg.config import PROBE_METHODS, ProbeConfig
from unifyreg.estimators import (
    SYMMETRIC_GRAM_MIN_TOKENS,
    SLQSettings,
    conditional_entropy_proxy,
    conditional_entropy_proxy_chunked,
    conditional_entropy_proxy_from_sq_distances,
    conditional_entropy_proxy_slq,
    finite_tokens,
    matrix_entropy,
    matrix_entropy_chunked,
    matrix_entropy_from_sq_distances,
    matrix_entropy_slq,
    normalize_by_count,
    pairwise_sq_distances,
    subsample_tokens,
)
from unifyreg.fileio import atomic_write_json, atomic_write_text
from unifyreg.roles import Role, role_counts, role_mask

__all__ = [
    "BatchQuantity",
    "QUANTITIES",
    "SCORE_NAMES",
    "ProbeResult",
    "QuantityRecords",
    "batch_quantities",
    "probe_batch",
    "run_probe",
]

QUANTITIES = ("encoding/text", "encoding/image", "response/text", "response/image")
SCORE_NAMES = ("encoding_gap", "response_split", "final_gap")
PROMPT_ROLES = (Role.TEXT_PROMPT, Role.IMAGE_PROMPT)


@dataclass
class QuantityRecords:
    """Per-sample values of one quantity: ``values``/``normalized`` ``[N, n_layers]``."""

    values: np.ndarray
    normalized: np.ndarray
    categories: list[str]
    tokens: np.ndarray

    @classmethod
    def empty(cls, n_layers: int) -> QuantityRecords:
        return cls(np.zeros((0, n_layers)), np.zeros((0, n_layers)), [], np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.categories)

    def extend(self, other: QuantityRecords) -> None:
        self.values = np.concatenate([self.values, other.values])
        self.normalized = np.concatenate([self.normalized, other.normalized])
        self.categories = [*self.categories, *other.categories]
        self.tokens = np.concatenate([self.tokens, other.tokens])


@dataclass
class ProbeResult:
    """Per-sample probe values for every quantity and layer, with statistics and output.

    ``stats(q)`` gives mean, std and count per category (and ``"all"``) and layer;
    ``scores()`` gives unifyreg's scalar scores; ``merge`` pools results of several
    shards (e.g. DDP ranks) exactly as one run over their union.
    """

    layers: tuple[int, ...]
    records: dict[str, QuantityRecords]
    settings: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

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
        Ht, Hi = self.pooled_mean("encoding/text"), self.pooled_mean("encoding/image")
        Ct, Ci = self.pooled_mean("response/text"), self.pooled_mean("response/image")
        scores: dict[str, float] = {}
        missing = []
        if Ht is not None and Hi is not None:
            scores["encoding_gap"] = float(np.mean(np.abs(Ht - Hi)))
        else:
            missing.append("encoding_gap")
        if Ct is not None and Ci is not None:
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
        layers = results[0].layers
        if any(r.layers != layers for r in results):
            raise ValueError("cannot merge probe results over different layers")
        records = {q: QuantityRecords.empty(len(layers)) for q in QUANTITIES}
        for result in results:
            for q in QUANTITIES:
                records[q].extend(result.records[q])
        return cls(layers, records, dict(results[0].settings), dict(results[0].meta))

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: per-sample records, statistics and scores."""
        return {
            "layers": list(self.layers),
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
        n_layers = len(data["layers"])
        records = {}
        for q in QUANTITIES:
            r = data["records"][q]
            records[q] = QuantityRecords(
                np.asarray(r["values"], dtype=float).reshape(-1, n_layers),
                np.asarray(r["normalized"], dtype=float).reshape(-1, n_layers),
                list(r["categories"]),
                np.asarray(r["tokens"], dtype=np.int64),
            )
        return cls(tuple(data["layers"]), records, data.get("settings", {}), data.get("meta", {}))

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (per-sample records, so it can be merged or re-analysed;
        one line: it is read by :meth:`load`, not by people)."""
        return atomic_write_json(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: str | Path) -> ProbeResult:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def summary(self) -> dict[str, Any]:
        """Compact JSON-ready summary: scores and per-layer statistics (raw and normalised)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = self.scores()
        return {
            "layers": list(self.layers),
            "scores": scores,
            "stats": {
                q: {"raw": self.stats(q), "normalized": self.stats(q, normalized=True)}
                for q in QUANTITIES
                if len(self.records[q])
            },
        }

    def table(self, layer: int | None = None, fmt: str = "markdown") -> str:
        """Table-1-style table: mean entropy per prompt category at one layer (default:
        the first probed, i.e. the embedding entropy when layer 0 is probed), text
        categories then image categories; ``fmt`` is ``"markdown"`` or ``"csv"``."""
        column = 0 if layer is None else self._column(layer)
        header, cells = ["layer"], [str(self.layers[column])]
        for q in ("encoding/text", "encoding/image"):
            for category, st in self.stats(q).items():
                if category == "all":
                    continue
                header.append(f"{q.split('/')[1]}:{category}")
                cells.append(f"{st['mean'][column]:.3f}")
        if fmt == "csv":
            return ",".join(header) + "\n" + ",".join(cells) + "\n"
        if fmt != "markdown":
            raise ValueError(f"fmt must be 'markdown' or 'csv', got {fmt!r}")
        return (
            "| "
            + " | ".join(header)
            + " |\n|"
            + "---|" * len(header)
            + "\n| "
            + " | ".join(cells)
            + " |\n"
        )

    def long_csv(self) -> str:
        """Every statistic in long form, one CSV row per (quantity, category, layer)."""
        lines = ["quantity,category,layer,mean,std,count,normalized_mean,normalized_std"]
        for q in QUANTITIES:
            raw, norm = self.stats(q), self.stats(q, normalized=True)
            for category in raw:
                for i, layer in enumerate(self.layers):
                    r, n = raw[category], norm[category]
                    lines.append(
                        f"{q},{category},{layer},{r['mean'][i]:.6f},{r['std'][i]:.6f},"
                        f"{r['count']},{n['mean'][i]:.6f},{n['std'][i]:.6f}"
                    )
        return "\n".join(lines) + "\n"

    def write(self, directory: str | Path, figures: bool = True) -> dict[str, Path]:
        """Write result.json, summary.json, table.md, table.csv, stats.csv (+ figures)."""
        directory = Path(directory)
        paths = {
            "result": self.save(directory / "result.json"),
            "summary": atomic_write_json(directory / "summary.json", self.summary()),
            "table_md": atomic_write_text(directory / "table.md", self.table()),
            "table_csv": atomic_write_text(directory / "table.csv", self.table(fmt="csv")),
            "stats_csv": atomic_write_text(directory / "stats.csv", self.long_csv()),
        }
        if figures:
            from unifyreg.report import plot_probe_result

            paths.update(plot_probe_result(self, directory))
        return paths

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


@dataclass
class BatchQuantity:
    """One quantity on one batch: ``values`` ``[n_layers, b]`` (raw), ``normalized``,
    ``counts`` ``[b]`` (tokens the normaliser uses) and ``select`` ``[B]`` (which samples)."""

    values: torch.Tensor
    normalized: torch.Tensor
    counts: torch.Tensor
    select: torch.Tensor


@dataclass
class _Segment:
    """Where one role segment of the selected samples lies: ``index`` ``[b, k]`` positions
    (per row, the segment's kept positions in order, then arbitrary positions as padding),
    ``mask`` ``[b, k]`` (True = kept token), ``counts`` ``[b]`` (kept tokens)."""

    rows: torch.Tensor
    index: torch.Tensor
    mask: torch.Tensor
    counts: torch.Tensor


def _segment(roles: torch.Tensor, rows: torch.Tensor, role, max_tokens: int) -> _Segment:
    """The positions :func:`unifyreg.roles.role_segments` gathers (same order, same padding),
    optionally subsampled to at most ``max_tokens`` tokens per row."""
    is_role = role_mask(roles[rows], role)
    counts = is_role.sum(dim=1)
    k = int(counts.max())
    index = torch.argsort((~is_role).to(torch.int8), dim=1, stable=True)[:, :k]
    if max_tokens and k > max_tokens:
        kept = []
        for positions, count in zip(index, counts.tolist(), strict=True):
            if count > max_tokens:
                # Seeded by the segment's length: the same subset whatever the batch, the
                # rank or the layer (every layer of a sample sees the same tokens).
                sub, _ = subsample_tokens(
                    positions[:count, None].to(torch.float64), None, max_tokens, generator=count
                )
                positions = sub[:, 0].to(index.dtype)
            kept.append(positions[:max_tokens])
        index, counts, k = torch.stack(kept), counts.clamp_max(max_tokens), max_tokens
    mask = torch.arange(k, device=roles.device)[None, :] < counts[:, None]
    return _Segment(rows, index, mask, counts)


def _gather(
    layers: Sequence[torch.Tensor] | torch.Tensor, seg: _Segment, dtype: torch.dtype | None
):
    """``[n_layers, b, k, d]``: the segment's tokens in each layer.

    ``dtype=None``: differentiable, from ``layers`` stacked as one ``[n, B, S, d]``
    tensor: one ``index_select`` for all layers (its backward is a single ``index_add``;
    two-dimensional advanced indexing would backpropagate through a slow ``index_put``).
    Otherwise ``layers`` is a sequence of ``[B, S, d]`` tensors and the result one buffer
    in ``dtype``, filled a layer at a time (no stacked or full-precision copy)."""
    seq_len, width = layers[0].shape[-2:]
    flat = (seg.rows[:, None] * seq_len + seg.index).flatten()
    shape = (*seg.index.shape, width)
    if dtype is None:
        return torch.stack([h.flatten(0, 1).index_select(0, flat).view(shape) for h in layers])
    out = torch.empty((len(layers), *shape), dtype=dtype, device=layers[0].device)
    for j, h in enumerate(layers):
        out[j] = h.flatten(0, 1).index_select(0, flat).view(shape)
    return out


def _as_layers(hidden_states, roles: torch.Tensor) -> list[torch.Tensor]:
    """Per-layer ``[B, S, d]`` tensors from a stacked ``[n, B, S, d]`` tensor (views) or a
    sequence of per-layer tensors."""
    if isinstance(hidden_states, torch.Tensor):
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


#: Extra memory the probe may always use per chunk of layers, however small the batch.
AUTO_CHUNK_FLOOR_BYTES = 64 * 2**20


def auto_layers_per_chunk(layer: torch.Tensor, dtype: torch.dtype = torch.float64) -> int:
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


def _plan(
    roles: torch.Tensor, quantities: Sequence[str], max_tokens: int
) -> dict[str, tuple[torch.Tensor, tuple[_Segment, ...]]]:
    """Which samples each wanted quantity takes and where their tokens are: ``name ->
    (select [B], segments)``, one segment for an entropy, (prompt, response) for a proxy
    (see the module docstring); quantities without a sample are left out."""
    image_prompt_counts = role_counts(roles, Role.IMAGE_PROMPT)
    prompt_counts = role_counts(roles, PROMPT_ROLES)
    plan: dict[str, tuple[torch.Tensor, tuple[_Segment, ...]]] = {}
    for name, role, select in (
        ("encoding/text", Role.TEXT_PROMPT, image_prompt_counts == 0),
        ("encoding/image", Role.IMAGE_PROMPT, image_prompt_counts > 0),
    ):
        select = select & (role_counts(roles, role) > 0)
        if name in quantities and bool(select.any()):
            rows = torch.nonzero(select).flatten()
            plan[name] = (select, (_segment(roles, rows, role, max_tokens),))
    for name, role in (
        ("response/text", Role.TEXT_RESPONSE),
        ("response/image", Role.IMAGE_RESPONSE),
    ):
        select = (role_counts(roles, role) > 0) & (prompt_counts > 0)
        if name in quantities and bool(select.any()):
            rows = torch.nonzero(select).flatten()
            segments = (
                _segment(roles, rows, PROMPT_ROLES, max_tokens),
                _segment(roles, rows, role, max_tokens),
            )
            plan[name] = (select, segments)
    return plan


def _sample_sq_distances(
    chunk: Sequence[torch.Tensor], roles: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D, finite)``: ``D`` ``[c, B, S, S]`` the squared distances between every two
    positions of each sample in each layer of ``chunk`` (in ``dtype``; each sample centred
    on the mean of its finite non-padding tokens; non-finite tokens count as zero
    vectors), ``finite`` ``[c, B, S]``."""
    batch, seq_len = roles.shape
    D = torch.empty((len(chunk), batch, seq_len, seq_len), dtype=dtype, device=roles.device)
    finite = torch.empty((len(chunk), batch, seq_len), dtype=torch.bool, device=roles.device)
    not_padding = roles != int(Role.PAD)
    for j, h in enumerate(chunk):
        Z = h.to(dtype)
        finite[j] = finite_tokens(Z)
        D[j] = pairwise_sq_distances(Z, not_padding & finite[j])
    return D, finite


def _quantities_from_sample_distances(
    chunk: Sequence[torch.Tensor],
    roles: torch.Tensor,
    plan: dict[str, tuple[torch.Tensor, tuple[_Segment, ...]]],
    alpha: float,
    sigma: float | str,
    base: float,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Each planned quantity ``[c, b]`` on one chunk of layers, without gradient, from one
    distance matrix per sample and layer (:func:`_sample_sq_distances`): a segment's
    distances are that matrix at the segment's positions (a proxy's joint sequence is the
    prompt's positions, then the response's: the order the ``*_chunked`` functions
    concatenate them in). The same values as those functions to round-off; a sequence
    with a non-finite valid token gives NaN."""
    D, finite = _sample_sq_distances(chunk, roles, dtype)
    n_layers, _, seq_len = finite.shape
    flat_D, flat_finite = D.view(n_layers, -1), finite.view(n_layers, -1)
    out = {}
    for name, (_, segments) in plan.items():
        rows = segments[0].rows
        index = torch.cat([seg.index for seg in segments], dim=1)
        mask = torch.cat([seg.mask for seg in segments], dim=1)
        b, k = index.shape
        positions = rows[:, None] * seq_len + index  # [b, k] into [B * S]
        pairs = positions[:, :, None] * seq_len + index[:, None, :]  # [b, k, k] into [B*S*S]
        Dq = flat_D.index_select(1, pairs.flatten()).view(n_layers * b, k, k)
        ok = flat_finite.index_select(1, positions.flatten()).view(n_layers, b, k) | ~mask
        masks = mask.expand(n_layers, b, k).reshape(n_layers * b, k)
        if len(segments) == 1:
            values = matrix_entropy_from_sq_distances(Dq, alpha, sigma, base, masks)
        else:
            n = segments[0].index.shape[1]
            values = conditional_entropy_proxy_from_sq_distances(Dq, n, alpha, sigma, base, masks)
        values = values.view(n_layers, b)
        out[name] = values.masked_fill_(~ok.all(dim=-1), float("nan"))
    return out


def _quantities_from_segments(
    chunk: Sequence[torch.Tensor],
    plan: dict[str, tuple[torch.Tensor, tuple[_Segment, ...]]],
    gather_dtype: torch.dtype | None,
    entropy_fn: Callable[..., torch.Tensor],
    proxy_fn: Callable[..., torch.Tensor],
    common: dict,
) -> dict[str, torch.Tensor]:
    """Each planned quantity ``[c, b]`` on one chunk of layers: each segment gathered
    (cast to ``gather_dtype`` unless None) and passed to ``entropy_fn`` (one segment) or
    ``proxy_fn`` (prompt, response) with the keyword arguments ``common``."""
    out = {}
    for name, (_, segments) in plan.items():
        if len(segments) == 1:
            (seg,) = segments
            Z = _gather(chunk, seg, gather_dtype)
            out[name] = entropy_fn(Z, mask=seg.mask.expand(len(chunk), *seg.mask.shape), **common)
        else:
            seg_p, seg_r = segments
            out[name] = proxy_fn(
                _gather(chunk, seg_p, gather_dtype),
                _gather(chunk, seg_r, gather_dtype),
                mask_p=seg_p.mask.expand(len(chunk), *seg_p.mask.shape),
                mask_r=seg_r.mask.expand(len(chunk), *seg_r.mask.shape),
                **common,
            )
    return out


def batch_quantities(
    hidden_states: torch.Tensor | Sequence[torch.Tensor],
    roles: torch.Tensor,
    alpha: float = 1.01,
    sigma: float | str = "median",
    base: float = 2.0,
    dtype: torch.dtype = torch.float64,
    layers_per_chunk: int = 8,
    quantities: Sequence[str] = QUANTITIES,
    *,
    method: str = "exact",
    max_gram_bytes: int | None = None,
    slq: SLQSettings | None = None,
    max_tokens: int = 0,
) -> dict[str, BatchQuantity]:
    """The probe's quantities on one batch.

    ``hidden_states``: ``[n_layers, B, S, d]`` or a sequence of ``n_layers`` tensors
    ``[B, S, d]`` (e.g. :attr:`ForwardOutput.hidden_layers`, without a stacked copy);
    ``roles`` ``[B, S]``. Returns only the quantities that have at least one sample in the
    batch (see the module docstring for which samples each takes). Non-finite inputs give
    NaN for exactly the affected samples. Used by the probe (without gradient) and by the
    divergence loss (with).

    Layers are processed ``layers_per_chunk`` at a time (0: :func:`auto_layers_per_chunk`):
    each role segment is gathered (and, without gradient, cast to ``dtype``) for one chunk
    of layers only, so the extra memory is one chunk's segments plus its Gram matrices.

    - ``method="exact"``, ``max_gram_bytes=None`` (the default, used by the loss):
      :func:`~unifyreg.estimators.matrix_entropy` and
      :func:`~unifyreg.estimators.conditional_entropy_proxy`, differentiable;
    - ``method="exact"`` with ``max_gram_bytes``: the bounded-memory ``*_chunked``
      functions (equal values to round-off; identical values and gradients with gradient);
      without gradient, when ``S < SYMMETRIC_GRAM_MIN_TOKENS`` and one layer's ``[B, S, S]``
      distances fit ``max_gram_bytes``, each sample's distances are computed once per
      layer and every segment's are cut out of them
      (:func:`~unifyreg.estimators.matrix_entropy_from_sq_distances`,
      :func:`~unifyreg.estimators.conditional_entropy_proxy_from_sq_distances`; equal
      values to round-off);
    - ``method="slq"``: the approximate ``*_slq`` functions with ``slq`` settings (default
      :class:`~unifyreg.estimators.SLQSettings`), Grams in float32, no gradient: raises
      ``ValueError`` when ``hidden_states`` require gradient under grad mode.

    ``max_tokens`` > 0 keeps at most that many tokens of each role segment (prompt and
    response separately), a uniform subset seeded by the segment's length (the same for
    every layer and whatever the batch), and normalises by the kept count.
    """
    if method not in PROBE_METHODS:
        raise ValueError(f"method must be one of {', '.join(PROBE_METHODS)}, got {method!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens must be an integer >= 0 (0 = no limit), got {max_tokens!r}")
    if layers_per_chunk < 0:
        raise ValueError(f"layers_per_chunk must be >= 0 (0 = auto), got {layers_per_chunk}")
    layers = _as_layers(hidden_states, roles)
    n_layers = len(layers)
    if layers_per_chunk == 0:
        layers_per_chunk = auto_layers_per_chunk(layers[0], dtype)
    needs_grad = torch.is_grad_enabled() and any(h.requires_grad for h in layers)
    if method == "slq" and needs_grad:
        raise ValueError(
            "method='slq' (probe.method=slq) is approximate and has no gradient: use "
            "method='exact' where gradients are needed (e.g. the divergence loss), or run "
            "the probe under torch.no_grad()"
        )
    settings = slq if slq is not None else SLQSettings()
    common = dict(alpha=alpha, sigma=sigma, base=base, nan_policy="propagate")
    if method == "slq":
        gather_dtype = None if needs_grad else layers[0].dtype
        common.update(settings=settings, dtype=torch.float32, max_gram_bytes=max_gram_bytes)
        entropy_fn, proxy_fn = matrix_entropy_slq, conditional_entropy_proxy_slq
    elif max_gram_bytes is None:
        gather_dtype = None if needs_grad else dtype
        common.update(dtype=dtype)
        entropy_fn, proxy_fn = matrix_entropy, conditional_entropy_proxy
    else:
        gather_dtype = None if needs_grad else dtype
        common.update(dtype=dtype, max_gram_bytes=max_gram_bytes)
        entropy_fn, proxy_fn = matrix_entropy_chunked, conditional_entropy_proxy_chunked

    plan = _plan(roles, quantities, max_tokens)
    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in plan}
    batch, seq_len = roles.shape
    sample_bytes = batch * seq_len**2 * torch.empty((), dtype=dtype).element_size()
    if (
        method == "exact"
        and max_gram_bytes is not None
        and not needs_grad
        and seq_len < SYMMETRIC_GRAM_MIN_TOKENS
        and sample_bytes <= max_gram_bytes
    ):
        # Short sequences: the cost is in passes over the token vectors, not in products,
        # so each sample's distances are computed once per layer and every segment's
        # are cut out of them.
        per_chunk = min(layers_per_chunk, max_gram_bytes // sample_bytes)

        def quantities_of(chunk: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
            return _quantities_from_sample_distances(chunk, roles, plan, alpha, sigma, base, dtype)

    else:
        per_chunk = layers_per_chunk

        def quantities_of(chunk: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
            return _quantities_from_segments(
                chunk, plan, gather_dtype, entropy_fn, proxy_fn, common
            )

    for start in range(0, n_layers, per_chunk):
        for name, values in quantities_of(layers[start : start + per_chunk]).items():
            pieces[name].append(values)

    out: dict[str, BatchQuantity] = {}
    for name, (select, segments) in plan.items():
        values = torch.cat(pieces[name])
        counts = sum(seg.counts for seg in segments)
        normalized = normalize_by_count(values, counts.to(values.dtype)[None, :], base)
        out[name] = BatchQuantity(values, normalized, counts, select)
    return out


def probe_batch(
    hidden_states: torch.Tensor | Sequence[torch.Tensor],
    roles: torch.Tensor,
    categories: Sequence[str],
    layers: Sequence[int],
    cfg: ProbeConfig,
) -> dict[str, QuantityRecords]:
    """The four quantities for one batch of hidden states (``[n_layers, B, S, d]`` or
    per-layer ``[B, S, d]`` tensors), as per-sample records, with ``cfg``'s estimator
    (``method``, ``max_gram_bytes``, ``slq``, ``max_tokens``); warns, with layer and
    quantity, about non-finite values."""
    n_layers = len(layers)
    records = {q: QuantityRecords.empty(n_layers) for q in QUANTITIES}
    computed = batch_quantities(
        hidden_states,
        roles,
        cfg.alpha,
        cfg.sigma,
        cfg.base,
        cfg.torch_dtype,
        cfg.layers_per_chunk,
        method=cfg.method,
        max_gram_bytes=cfg.max_gram_bytes,
        slq=cfg.slq_settings,
        max_tokens=cfg.max_tokens,
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


@torch.no_grad()
def run_probe(
    adapter: Any,
    examples: Sequence[Any],
    cfg: ProbeConfig | None = None,
    progress: bool = False,
) -> ProbeResult:
    """Probe ``adapter`` on ``examples`` (each with a ``category``) -> :class:`ProbeResult`.

    Runs in eval mode without gradient and restores the model's mode afterwards.
    """
    cfg = cfg or ProbeConfig()
    if len(examples) == 0:
        raise ValueError("the probe set is empty")
    layers = adapter.resolve_layers(cfg.layers or None)
    model = adapter.model
    was_training = model.training
    model.eval()
    records = {q: QuantityRecords.empty(len(layers)) for q in QUANTITIES}
    try:
        if cfg.responses == "generated":
            examples = _with_generated_responses(adapter, examples)
        batches = list(_batches(examples, cfg.batch_size))
        iterator: Iterable = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc="probe", unit="batch")
        for chunk in iterator:
            out = adapter.forward(adapter.encode(chunk), layers=layers)
            categories = [str(getattr(e, "category", "default")) for e in chunk]
            batch_records = probe_batch(out.hidden_layers, out.roles, categories, layers, cfg)
            for q in QUANTITIES:
                records[q].extend(batch_records[q])
            del out
    finally:
        model.train(was_training)
    settings = dataclasses.asdict(cfg)
    settings["layers"] = list(layers)
    return ProbeResult(tuple(layers), records, settings, {"adapter": adapter.name})
