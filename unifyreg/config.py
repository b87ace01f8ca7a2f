"""Structured configs: dataclass schemas, YAML files and ``key=value`` overrides.

``load_config(Schema, path, overrides)`` merges, in order, the schema's defaults, a YAML
file and dotted command-line overrides (``train.max_steps=500``), then builds the
dataclasses (whose ``__post_init__`` validates ranges). Any problem (unknown key, wrong
type, out-of-range value, unreadable file) raises :class:`ConfigError`, whose message
names the key and lists the valid ones, before anything is trained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from unifyreg.adapters.toy import LAYOUT_VERSION, ToyModelConfig
from unifyreg.toy.splits import WorldConfig

__all__ = [
    "AblateConfig",
    "ArmConfig",
    "ConfigError",
    "EvalConfig",
    "FinetuneConfig",
    "LoraSettings",
    "LossConfig",
    "ModelSource",
    "OptimConfig",
    "ProbeConfig",
    "ProbeRunConfig",
    "SweepConfig",
    "PretrainToyConfig",
    "config_hash",
    "load_config",
    "to_yaml",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


#: Values of ``probe.method``.
PROBE_METHODS = ("exact", "slq")


@dataclass
class OptimConfig:
    """Optimiser and schedule: AdamW, linear warm-up then cosine decay to ``min_lr_ratio``."""

    lr: float = 3e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"optim.lr must be a finite number > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be in [0, 1), got {tuple(self.betas)}")


@dataclass
class ProbeConfig:
    """Settings of the two-level entropy probe (PAPER.md; unifyreg's defaults).

    - ``alpha``: Renyi order (the paper: 1.01); ``base``: log base (2 = bits, as Table 1);
    - ``bandwidth``: ``"median"`` (per sequence), or a number (a fixed sigma);
    - ``layers``: layer indices to probe (0 = input embeddings; negative count from the
      end); empty = all;
    - ``batch_size``: probe examples per forward pass (bounds memory);
    - ``responses``: ``"reference"`` (teacher-forced reference responses) or
      ``"generated"`` (the model's own greedy responses, then teacher-forced);
    - ``dtype``: ``"float64"`` or ``"float32"`` for the exact entropy computation (the
      ``slq`` method builds its Grams in float32 and returns float64);
    - ``layers_per_chunk``: layers whose role segments are gathered (cast to ``dtype``)
      and whose Gram matrices are built at once; 0 (the default) = auto
      (:func:`unifyreg.probing.auto_layers_per_chunk`: 1 for large batches, which keeps
      the probe's extra memory within that of the model's forward pass, all layers for
      small ones); each further layer adds its segments' float64 copies and Grams;
    - ``method``: ``"exact"`` (:func:`~unifyreg.estimators.matrix_entropy_chunked`, equal to
      the unchunked estimators to round-off) or ``"slq"`` (stochastic Lanczos quadrature,
      :func:`~unifyreg.estimators.matrix_entropy_slq`: approximate, no gradient, faster
      for segments of more than ~1000 tokens);
    - ``max_gram_bytes``: bytes of Gram matrices built at once (> 0; default 256 MiB);
    - ``max_tokens``: keep at most this many tokens of each role segment, a seeded uniform
      subsample (0 = all tokens); changes the estimate (README, "Which path for which size");
    - ``slq``: settings of the ``slq`` method, keys of :class:`unifyreg.estimators.SLQSettings`
      (``num_probes``, ``deflation_rank``, ``lanczos_steps``, ``power_iterations``,
      ``exact_max_tokens``, ``seed``); empty = its defaults.
    """

    alpha: float = 1.01
    base: float = 2.0
    bandwidth: str = "median"
    layers: list[int] = field(default_factory=list)
    batch_size: int = 16
    responses: str = "reference"
    dtype: str = "float64"
    layers_per_chunk: int = 0
    method: str = "exact"
    max_gram_bytes: int = 268435456
    max_tokens: int = 0
    slq: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise ConfigError(f"probe.alpha must be > 0, got {self.alpha}")
        if not self.base > 0 or self.base == 1:
            raise ConfigError(f"probe.base must be > 0 and != 1, got {self.base}")
        if self.bandwidth != "median":
            try:
                sigma = float(self.bandwidth)
            except ValueError:
                raise ConfigError(
                    f"probe.bandwidth must be 'median' or a number > 0, got {self.bandwidth!r}"
                ) from None
            if not sigma > 0:
                raise ConfigError(f"probe.bandwidth must be > 0, got {self.bandwidth!r}")
        if self.batch_size < 1:
            raise ConfigError(f"probe.batch_size must be >= 1, got {self.batch_size}")
        if self.responses not in ("reference", "generated"):
            raise ConfigError(
                f"probe.responses must be 'reference' or 'generated', got {self.responses!r}"
            )
        if self.dtype not in ("float64", "float32"):
            raise ConfigError(f"probe.dtype must be 'float64' or 'float32', got {self.dtype!r}")
        if self.layers_per_chunk < 0:
            raise ConfigError(
                f"probe.layers_per_chunk must be >= 0 (0 = auto), got {self.layers_per_chunk}"
            )
        if self.method not in PROBE_METHODS:
            raise ConfigError(
                f"probe.method must be one of {', '.join(PROBE_METHODS)}, got {self.method!r}"
            )
        for name, low in (("max_gram_bytes", 1), ("max_tokens", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                relation = "> 0" if low else ">= 0 (0 = no limit)"
                raise ConfigError(f"probe.{name} must be an integer {relation}, got {value!r}")
        _ = self.slq_settings  # validates probe.slq

    @property
    def sigma(self) -> float | str:
        """The bandwidth as the estimators take it."""
        return "median" if self.bandwidth == "median" else float(self.bandwidth)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def slq_settings(self):
        """``probe.slq`` as a :class:`unifyreg.estimators.SLQSettings` (ConfigError naming
        the key for an unknown key or a value it rejects)."""
        from unifyreg.estimators import SLQSettings

        if not isinstance(self.slq, dict):
            raise ConfigError(f"probe.slq must be a mapping of SLQSettings keys, got {self.slq!r}")
        valid = [f.name for f in dataclasses.fields(SLQSettings)]
        for key, value in self.slq.items():
            if key not in valid:
                raise ConfigError(
                    f"unknown config key 'probe.slq.{key}'; valid keys under probe.slq: "
                    f"{', '.join(valid)}"
                )
            try:
                SLQSettings(**{key: value})
            except (TypeError, ValueError) as error:
                reason = str(error).removeprefix(f"SLQSettings.{key} ")
                raise ConfigError(f"probe.slq.{key} {reason}") from None
        return SLQSettings(**self.slq)


@dataclass
class PretrainToyConfig:
    """``unifyreg pretrain-toy``: train the toy base from scratch and cache it.

    The cache directory is ``cache_dir/toy-base-<hash>`` where the hash covers ``world``
    (its settings and a fingerprint of its content), ``model``, the toy adapter's sequence
    layout version, ``optim``, ``max_steps``, ``batch_size`` and ``seed``; a second call with
    the same values reuses it (``force=true`` retrains).
    """

    world: WorldConfig = field(default_factory=WorldConfig)
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    # 1e-3 and above never learned single-cell reading in 3000 steps; 5e-4 did (README).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4))
    max_steps: int = 2700
    batch_size: int = 64
    seed: int = 0
    cache_dir: str = ".cache/unifyreg"
    force: bool = False
    evaluate: bool = True
    eval_batch_size: int = 256
    checkpoint_every_n_steps: int = 500
    accelerator: str = "auto"

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.checkpoint_every_n_steps < 1:
            raise ConfigError(
                f"checkpoint_every_n_steps must be >= 1, got {self.checkpoint_every_n_steps}"
            )

    def cache_key(self) -> str:
        """Hash of everything that changes the trained weights, including a fingerprint
        of the world's content (so a changed generator or vocabulary retrains)."""
        return config_hash(
            {
                "world": dataclasses.asdict(self.world),
                "world_content": world_fingerprint(self.world),
                "model": dataclasses.asdict(self.model),
                "layout_version": LAYOUT_VERSION,
                "optim": dataclasses.asdict(self.optim),
                "max_steps": self.max_steps,
                "batch_size": self.batch_size,
                "seed": self.seed,
            }
        )

    def cache_path(self) -> Path:
        """Where the trained base lives: ``cache_dir/toy-base-<hash>``."""
        return Path(self.cache_dir) / f"toy-base-{self.cache_key()}"


@dataclass
class EvalConfig:
    """``unifyreg eval``: exact-match accuracy of a toy model per task and category.

    ``model_path`` empty means the toy base of the ``pretrain`` section (built first if
    it is not cached). ``splits`` are names from :func:`unifyreg.toy.build_splits`.
    """

    model_path: str = ""
    pretrain: PretrainToyConfig = field(default_factory=PretrainToyConfig)
    splits: list[str] = field(default_factory=lambda: ["eval", "heldout"])
    batch_size: int = 256
    output: str = "runs/eval/eval.json"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.splits:
            raise ConfigError("splits must name at least one split")


@dataclass
class ModelSource:
    """Which model to load: a registered ``adapter`` name and a local ``path``.

    With ``adapter: toy`` an empty ``path`` means the cached toy base of the ``pretrain``
    section (trained first if absent). Real models load with ``from_pretrained(path)``
    from a local directory only; ``trust_remote_code`` stays off unless set here.
    ``dtype`` is the torch dtype the weights are loaded in.
    """

    adapter: str = "toy"
    path: str = ""
    dtype: str = "float32"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        from unifyreg.adapters import available_adapters

        if self.adapter not in available_adapters():
            raise ConfigError(
                f"model.adapter: unknown adapter {self.adapter!r}; "
                f"registered: {', '.join(available_adapters())}"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(
                f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}"
            )


def _check_model_and_sets(model: ModelSource, **sets: str) -> None:
    """Non-toy adapters need a local model path and manifests (toy examples only fit toy)."""
    if model.adapter == "toy":
        return
    if not model.path:
        raise ConfigError(f"model.path is required for adapter {model.adapter!r}")
    for key, value in sets.items():
        if not value:
            raise ConfigError(f"{key} is required: the path of a JSONL manifest")
        if value == "toy":
            raise ConfigError(
                f"{key}=toy only fits the toy adapter; give a JSONL manifest for "
                f"adapter {model.adapter!r}"
            )


@dataclass
class ProbeRunConfig:
    """``unifyreg probe``: run the two-level probe and write tables and figures.

    ``probe_set`` is ``"toy"`` (the world's fixed probe sets of ``pretrain.world``) or
    the path of a JSONL manifest (see :mod:`unifyreg.manifest`); ``on_bad_example`` is
    ``"error"`` or ``"skip"`` for bad manifest lines.
    """

    model: ModelSource = field(default_factory=ModelSource)
    pretrain: PretrainToyConfig = field(default_factory=PretrainToyConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    probe_set: str = "toy"
    on_bad_example: str = "error"
    output_dir: str = "runs/probe"
    figures: bool = True

    def __post_init__(self) -> None:
        _check_model_and_sets(self.model, probe_set=self.probe_set)
        if self.on_bad_example not in ("error", "skip"):
            raise ConfigError(
                f"on_bad_example must be 'error' or 'skip', got {self.on_bad_example!r}"
            )


@dataclass
class LoraSettings:
    """LoRA through peft: rank ``r``, scale ``alpha / r``, ``dropout``; ``target_modules``
    empty = the adapter's defaults (language-model projections only)."""

    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class LossConfig:
    """The contextual-prediction regularizer: ``L = L_task + w_ctx L_ctx + w_div L_div``.

    - ``w_ctx``, ``w_div``: weights (>= 0; 0 switches a term off);
    - ``mask_ratio``: share of image-response inputs replaced by the mask embedding in
      ``L_ctx``, in [0, 1);
    - ``ctx_row_fraction``: ``L_ctx`` runs on at most ``ceil(ctx_row_fraction * B)`` of
      the batch's rows that hold image responses, drawn each step, in (0, 1];
    - ``div_alpha``: Renyi order of ``L_div`` (2 = Frobenius, no eigendecomposition);
    - ``div_layers``: layers ``L_div`` compares (empty = all; 0 = input embeddings);
    - ``div_parts``: which trajectories ``L_div`` aligns: ``encoding`` (text vs image
      prompt entropy), ``response`` (text vs image response proxy);
    - ``div_bandwidth``: ``median_differentiable`` (default: the median bandwidth keeps
      its gradient, so rescaling hidden states cannot game the loss) or ``median``
      (detached, as the paper's probe; measured to make Adam *raise* ``L_div``);
    - ``div_dtype``: precision of ``L_div``'s estimator, ``float32`` (default: alpha = 2
      needs no eigendecomposition, and float32 stays within 1e-4 relative of float64,
      tested) or ``float64``;
    - ``warmup_steps``: weights ramp linearly from 0 over this many steps.
    """

    w_ctx: float = 0.0
    w_div: float = 0.0
    mask_ratio: float = 0.5
    ctx_row_fraction: float = 0.125
    div_alpha: float = 2.0
    div_layers: list[int] = field(default_factory=list)
    div_parts: list[str] = field(default_factory=lambda: ["encoding", "response"])
    div_dtype: str = "float32"
    div_bandwidth: str = "median_differentiable"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        for name in ("w_ctx", "w_div"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"loss.{name} must be a finite number >= 0, got {value}")
        if not 0 <= self.mask_ratio < 1:
            raise ConfigError(f"loss.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if not 0 < self.ctx_row_fraction <= 1:
            raise ConfigError(
                f"loss.ctx_row_fraction must be in (0, 1], got {self.ctx_row_fraction}"
            )
        if not self.div_alpha > 0:
            raise ConfigError(f"loss.div_alpha must be > 0, got {self.div_alpha}")
        unknown = sorted(set(self.div_parts) - {"encoding", "response"})
        if unknown or not self.div_parts:
            raise ConfigError(
                f"loss.div_parts must be a non-empty subset of [encoding, response], "
                f"got {list(self.div_parts)}"
            )
        if self.div_bandwidth not in ("median_differentiable", "median"):
            raise ConfigError(
                "loss.div_bandwidth must be 'median_differentiable' or 'median', "
                f"got {self.div_bandwidth!r}"
            )
        if self.div_dtype not in ("float32", "float64"):
            raise ConfigError(
                f"loss.div_dtype must be 'float32' or 'float64', got {self.div_dtype!r}"
            )
        if self.warmup_steps < 0:
            raise ConfigError(f"loss.warmup_steps must be >= 0, got {self.warmup_steps}")

    @property
    def active(self) -> bool:
        return self.w_ctx > 0 or self.w_div > 0


#: When ``EntropyProbe`` draws its figures.
FIGURE_SCHEDULES = ("end", "every", "never")


@dataclass
class FinetuneConfig:
    """``unifyreg finetune``: fine-tune an adapter (LoRA by default) with per-epoch probes.

    ``data`` is ``"toy"`` (the world's ``finetune`` split) or a JSONL manifest of training
    examples; ``probe_set`` likewise (``"toy"``: the world's probe sets). ``resume`` is
    ``""`` (start fresh), ``"last"`` (``run_dir/checkpoints/last.ckpt`` when it exists)
    or a checkpoint path. ``loggers`` is a subset of ``csv``, ``tensorboard``.
    ``probe_figures``: when the probe's trajectory figures are drawn: ``end`` (once, when
    training ends, one curve per probed epoch), ``every`` (after every probe, also sent to
    TensorBoard as they come) or ``never``.
    """

    model: ModelSource = field(default_factory=ModelSource)
    pretrain: PretrainToyConfig = field(default_factory=PretrainToyConfig)
    data: str = "toy"
    lora: LoraSettings = field(default_factory=LoraSettings)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20))
    max_epochs: int = 3
    max_steps: int = -1
    batch_size: int = 32
    seed: int = 0
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    probe_set: str = "toy"
    every_n_epochs: int = 1
    probe_at_start: bool = True
    probe_figures: str = "end"
    on_bad_example: str = "error"
    run_dir: str = "runs/finetune/toy"
    resume: str = ""
    loggers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    precision: str = "32-true"

    def __post_init__(self) -> None:
        _check_model_and_sets(self.model, data=self.data, probe_set=self.probe_set)
        if self.max_epochs < 1:
            raise ConfigError(f"max_epochs must be >= 1, got {self.max_epochs}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps must be -1 (no limit) or >= 1, got {self.max_steps}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.every_n_epochs < 1:
            raise ConfigError(f"every_n_epochs must be >= 1, got {self.every_n_epochs}")
        if self.probe_figures not in FIGURE_SCHEDULES:
            raise ConfigError(
                f"probe_figures must be one of {', '.join(FIGURE_SCHEDULES)}, "
                f"got {self.probe_figures!r}"
            )
        if self.on_bad_example not in ("error", "skip"):
            raise ConfigError(
                f"on_bad_example must be 'error' or 'skip', got {self.on_bad_example!r}"
            )
        unknown = sorted(set(self.loggers) - {"csv", "tensorboard"})
        if unknown:
            raise ConfigError(f"loggers: unknown logger(s) {unknown}; valid: csv, tensorboard")
        if self.devices < 1:
            raise ConfigError(f"devices must be >= 1, got {self.devices}")


def world_fingerprint(world: WorldConfig) -> str:
    """Hash of the world's vocabulary and the first examples of every split."""
    from unifyreg.toy.splits import build_splits
    from unifyreg.toy.tokenizer import WordTokenizer

    splits = build_splits(world)
    sample = {name: [e.to_dict() for e in split[:20]] for name, split in splits.items()}
    return config_hash({"words": list(WordTokenizer.for_world(world).words), "sample": sample})


@dataclass
class ArmConfig:
    """One arm of an ablation: a name and the two regularizer weights."""

    name: str = "baseline"
    w_ctx: float = 0.0
    w_div: float = 0.0

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ConfigError(f"arms: an arm name must be non-empty without '/', got {self.name!r}")
        if not all(math.isfinite(w) and w >= 0 for w in (self.w_ctx, self.w_div)):
            raise ConfigError(f"arms.{self.name}: weights must be finite numbers >= 0")


def _default_arms() -> list[ArmConfig]:
    return [
        ArmConfig("baseline", 0.0, 0.0),
        ArmConfig("ctx", 1.0, 0.0),
        ArmConfig("div", 0.0, 1.0),
        ArmConfig("ctx+div", 1.0, 1.0),
    ]


@dataclass
class SweepConfig:
    """Extra arms sweeping one weight: ``weight`` is ``w_ctx`` or ``w_div`` ("" = none);
    each value v adds an arm named ``<weight>=<v>`` with the other weight 0."""

    weight: str = ""
    values: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.weight not in ("", "w_ctx", "w_div"):
            raise ConfigError(f"sweep.weight must be '', 'w_ctx' or 'w_div', got {self.weight!r}")
        if self.weight and not self.values:
            raise ConfigError("sweep.values must list at least one weight")
        if any(v < 0 for v in self.values):
            raise ConfigError("sweep.values must be >= 0")

    def arms(self) -> list[ArmConfig]:
        if not self.weight:
            return []
        return [ArmConfig(f"{self.weight}={v:g}", **{self.weight: float(v)}) for v in self.values]


@dataclass
class AblateConfig:
    """``unifyreg ablate``: every arm x seed fine-tuned from the same base, same data and
    steps (``finetune.*``), probed every epoch and at the end, scored exactly on the toy.

    Each run lives in ``output_dir/runs/<arm>/seed_<s>``; a finished run (``done.json``)
    is skipped on a re-run, an interrupted one resumes from its ``last.ckpt``.
    """

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    arms: list[ArmConfig] = field(default_factory=_default_arms)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    output_dir: str = "runs/ablate/toy"
    eval_splits: list[str] = field(default_factory=lambda: ["eval", "heldout"])
    figures: bool = True

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError("seeds must list at least one seed")
        names = [arm.name for arm in self.all_arms()]
        if not names:
            raise ConfigError("arms: at least one arm is needed")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"arms: duplicate arm name(s) {duplicates}")

    def all_arms(self) -> list[ArmConfig]:
        """The configured arms followed by the sweep's."""
        return [*self.arms, *self.sweep.arms()]


def config_hash(data: Any) -> str:
    """First 12 hex digits of the SHA-256 of ``data`` as canonical JSON."""
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _valid_keys(schema: type, dotted: str) -> tuple[str, list[str]]:
    """(parent path, valid keys there) for a dotted key that did not resolve."""
    parts = [p for p in dotted.split(".") if p]
    node: Any = schema
    parent: list[str] = []
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(node):
            break
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            break
        node = fields[part].type if not isinstance(fields[part].type, str) else None
        if node is None:
            # Postponed annotations: resolve through a default instance.
            default = fields[part].default_factory  # type: ignore[misc]
            node = type(default()) if callable(default) else None
        parent.append(part)
    keys = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
    return ".".join(parent) or "<top level>", keys


def _describe(error: OmegaConfBaseException, schema: type) -> str:
    key = getattr(error, "full_key", None) or ""
    message = str(error).splitlines()[0]
    if isinstance(error, MissingMandatoryValue):
        return f"missing required config key {key!r}: set it in the file or as {key}=..."
    if "Key" in type(error).__name__ or "not in" in message:
        where, valid = _valid_keys(schema, key)
        return f"unknown config key {key!r}; valid keys under {where}: {', '.join(valid)}"
    if key:
        return f"bad value for config key {key!r}: {message}"
    return message


def load_config(
    schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()
) -> T:
    """Defaults of ``schema`` <- YAML ``path`` <- ``key=value`` overrides -> a ``schema``.

    Raises :class:`ConfigError` naming the offending key (and the valid keys) for an
    unknown key, a value of the wrong type, an out-of-range value, a malformed override
    or an unreadable file.
    """
    base = OmegaConf.structured(schema)
    layers: list[DictConfig] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except Exception as error:  # YAML syntax errors come in several types
            raise ConfigError(f"cannot read config file {str(path)!r}: {error}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys")
        layers.append(loaded)
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} must look like key=value")
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(base, *layers)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ConfigError:
        raise
    except OmegaConfBaseException as error:
        raise ConfigError(_describe(error, schema)) from None
    except (ValueError, TypeError) as error:
        # Validation in a dataclass __post_init__ of a nested section.
        raise ConfigError(str(error)) from None


def to_yaml(config: Any) -> str:
    """The resolved config as YAML (for run directories and logs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))
