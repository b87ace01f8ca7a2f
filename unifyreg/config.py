"""Structured configs: dataclass schemas, YAML files and ``key=value`` overrides.

``load_config(Schema, path, overrides)`` merges, in order, the schema's defaults, a YAML
file and dotted command-line overrides (``train.max_steps=500``), then builds the
dataclasses. Types are checked by OmegaConf from the annotations (``Literal`` choices,
``Union``, nested sections, lists); ranges by one table, :data:`RANGE_CHECKS`; the few
rules that relate several keys by a section's ``check`` method. Any problem (unknown key,
wrong type, out-of-range value, unreadable file) raises :class:`ConfigError`, whose
message names the dotted key (and lists the valid keys), before anything is trained.
Sections built directly in Python (``ProbeConfig(alpha=0)``) are checked the same way.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from unifyreg.estimators import SLQSettings
from unifyreg.toy.model import ToyModelConfig
from unifyreg.toy.splits import WorldConfig

__all__ = [
    "AblateConfig",
    "ArmConfig",
    "BaseSpec",
    "ConfigError",
    "EvalConfig",
    "FinetuneConfig",
    "LoraSettings",
    "LossConfig",
    "ModelSource",
    "OptimConfig",
    "PROBE_PRESETS",
    "PretrainToyConfig",
    "ProbeConfig",
    "ProbeRunConfig",
    "RANGE_CHECKS",
    "SweepConfig",
    "canonical_bandwidth",
    "config_hash",
    "load_config",
    "probe_regime",
    "to_yaml",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


# ---------------------------------------------------------------------- range rules


@dataclass(frozen=True)
class Range:
    """A number in an interval (ends open or closed; None = unbounded), finite unless
    ``finite=False``; ``integer`` for int fields."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def __call__(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        if self.integer and not isinstance(value, int):
            return f"must be an integer, got {value!r}"
        inside = math.isfinite(value)
        if self.low is not None:
            inside &= value > self.low if self.low_open else value >= self.low
        if self.high is not None:
            inside &= value < self.high if self.high_open else value <= self.high
        return None if inside else f"must be {self.describe()}, got {value!r}"

    def describe(self) -> str:
        """``"> 0"``, ``">= 1"``, ``"in [0, 1)"``, with "a finite number" for floats."""
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            bound = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            bound = f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"an integer {bound}" if self.integer else f"a finite number {bound}"


def _each(rule: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """The rule applied to every element of a list."""

    def check(values: Any) -> str | None:
        for index, value in enumerate(values):
            problem = rule(value)
            if problem:
                return f"[{index}] {problem}"
        return None

    return check


def _optional(rule: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """The rule, or nothing to check for None (a key left unset)."""

    def check(value: Any) -> str | None:
        return None if value is None else rule(value)

    return check


def _non_empty(values: Any) -> str | None:
    return None if len(values) else "must not be empty"


def _bandwidth(value: Any) -> str | None:
    from unifyreg.estimators.kernel import BANDWIDTH_RULES, parse_bandwidth_rule

    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            try:
                parse_bandwidth_rule(value)
            except ValueError:
                rules = ", ".join(BANDWIDTH_RULES)
                return (
                    f"must be a rule ({rules}), a rule with a factor > 0 as <rule>:<factor> "
                    f"(e.g. rms:0.1), or a number > 0, got {value!r}"
                )
            return None
    return Range(0, low_open=True)(value)


def canonical_bandwidth(value: str | float) -> str | float:
    """A bandwidth setting as the estimators take it: a rule in its canonical spelling
    (``"rms:0.1"``, ``"median"``) or a float (a fixed sigma; ``"0.5"`` -> 0.5)."""
    from unifyreg.estimators.kernel import bandwidth_rule_name, parse_bandwidth_rule

    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return bandwidth_rule_name(*parse_bandwidth_rule(value))
    return float(value)


#: The probe's presets: the values each gives ``alpha``, ``base`` and ``bandwidth``
#: (README, "Comparing with the paper's Table 1"). ``default``: the median rule, which
#: tracks changes of a model's geometry at every scale (entropies stay well below
#: ``log2 n``); ``paper``: Silverman's rule, narrow against the distances between tokens
#: at the widths of real models, which gives the magnitudes of the paper's Table 1
#: (entropies close to ``log2`` of the token count).
PROBE_PRESETS: dict[str, dict[str, Any]] = {
    "default": {"alpha": 1.01, "base": 2.0, "bandwidth": "median"},
    "paper": {"alpha": 1.01, "base": 2.0, "bandwidth": "silverman"},
}


def probe_regime(alpha: Any, base: Any, bandwidth: Any) -> str:
    """The name of the preset whose settings these are (``default``, ``paper``), else
    ``custom``: what every probe output states, so that values of different regimes are
    never compared by mistake."""
    try:
        given = (float(alpha), float(base), canonical_bandwidth(bandwidth))
    except (TypeError, ValueError):
        return "custom"
    for name, values in PROBE_PRESETS.items():
        wanted = (values["alpha"], values["base"], canonical_bandwidth(values["bandwidth"]))
        if given == wanted:
            return name
    return "custom"


def _log_base(value: Any) -> str | None:
    problem = Range(0, low_open=True)(value)
    if problem or value != 1:
        return problem
    return "must be a finite number > 0 and != 1, got 1"


def _arm_name(value: Any) -> str | None:
    return None if value and "/" not in value else f"must be non-empty without '/', got {value!r}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)
AT_LEAST_ONE = Range(1, integer=True)
COUNT = Range(0, integer=True)


# ---------------------------------------------------------------------- sections


#: Set while :func:`load_config` builds a tree, which it then checks with full keys.
_DEFERRED = contextvars.ContextVar("unifyreg_config_deferred", default=False)

#: Set while :func:`load_config` builds the schema's default tree: keys a preset fills
#: stay unset (None) there, so that a preset given in the file or the overrides fills them.
_SCHEMA = contextvars.ContextVar("unifyreg_config_schema", default=False)


class Section:
    """Base of every config section: construction checks its fields against
    :data:`RANGE_CHECKS` and runs its ``check`` (rules across keys), raising
    :class:`ConfigError` with the section's default key prefix (``load_config`` checks
    the whole tree afterwards instead, with every key's full dotted path)."""

    _prefix: str = ""

    def __post_init__(self) -> None:
        if not _DEFERRED.get():
            validate(self, self._prefix)

    def check(self) -> None:
        """Rules that relate several keys (override in sections that have some)."""


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def validate(section: Any, prefix: str = "") -> None:
    """Check one section's own fields against :data:`RANGE_CHECKS`, then its ``check``;
    ConfigError names ``prefix.field``."""
    for f in dataclasses.fields(section):
        rule = RANGE_CHECKS.get((type(section), f.name))
        if rule is not None:
            problem = rule(getattr(section, f.name))
            if problem:
                sep = "" if problem.startswith("[") else " "
                raise ConfigError(f"{_key(prefix, f.name)}{sep}{problem}")
    try:
        section.check()
    except ConfigError as error:
        raise ConfigError(_key(prefix, str(error))) from None


def validate_tree(section: Any, prefix: str = "") -> None:
    """:func:`validate` every section of a config tree, children first, each with its
    full dotted key (``finetune.probe.alpha``, ``arms[2].w_ctx``)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        key = _key(prefix, f.name)
        if isinstance(value, Section):
            validate_tree(value, key)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, Section):
                    validate_tree(item, f"{key}[{index}]")
    validate(section, prefix)


@dataclass
class OptimConfig(Section):
    """Optimiser and schedule: AdamW, linear warm-up then cosine decay to ``min_lr_ratio``."""

    _prefix = "optim"
    lr: float = 3e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class ProbeConfig(Section):
    """Settings of the two-level entropy probe (PAPER.md; unifyreg's defaults).

    - ``preset``: ``""`` (none), ``"default"`` or ``"paper"`` (:data:`PROBE_PRESETS`): sets
      ``alpha``, ``base`` and ``bandwidth`` together. Those keys left unset (None) take the
      preset's values (without a preset: the ``default`` preset's); with a preset, a key
      set to another value than the preset's is a ConfigError;
    - ``alpha``: Renyi order (the paper: 1.01); ``base``: log base (2 = bits, as Table 1);
    - ``bandwidth``: a rule of :data:`unifyreg.estimators.BANDWIDTH_RULES`, optionally
      with a factor (``"median"``, ``"rms:0.1"``, ``"silverman"``), or a number (a fixed
      sigma);
    - ``layers``: layer indices to probe (0 = input embeddings; negative count from the
      end); empty = all;
    - ``final_norm``: take the last layer after the model's final norm (as
      ``transformers``' ``output_hidden_states`` does) instead of before it like every
      other layer (README, "Which hidden states");
    - ``batch_size``: probe examples per forward pass (bounds memory);
    - ``responses``: ``"reference"`` (teacher-forced reference responses) or
      ``"generated"`` (the model's own greedy responses, then teacher-forced);
    - ``dtype``: ``"float64"`` or ``"float32"`` for the exact entropy computation (the
      ``slq`` method builds its Grams in float32);
    - ``layers_per_chunk``: layers whose role segments are handed to the estimators at
      once; 0 (the default) = auto (:func:`unifyreg.quantities.auto_layers_per_chunk`);
    - ``method``: ``"exact"`` or ``"slq"`` (stochastic Lanczos quadrature: approximate, no
      gradient, faster for segments of more than ~1000 tokens);
    - ``max_gram_bytes``: bytes of Gram matrices built at once (> 0; default 256 MiB);
    - ``max_tokens``: keep at most this many tokens of each role segment, a seeded uniform
      subsample (0 = all tokens); changes the estimate (README, "Which path for which size");
    - ``slq``: settings of the ``slq`` method (:class:`unifyreg.estimators.SLQSettings`);
    - ``timestep``: the noise level ``t`` in [0, 1] at which continuous families (flow
      matching: ``x_t = (1 - t) x_0 + t eps``, 0 = clean, 1 = pure noise;
      :mod:`unifyreg.adapters.continuous`) are probed, with each example's noise seeded from
      a stable hash of the example; default 0.5. Discrete families ignore it.
    """

    _prefix = "probe"
    preset: Literal["", "default", "paper"] = ""
    alpha: float | None = None
    base: float | None = None
    bandwidth: str | float | None = None
    layers: list[int] = field(default_factory=list)
    final_norm: bool = False
    batch_size: int = 16
    responses: Literal["reference", "generated"] = "reference"
    dtype: Literal["float64", "float32"] = "float64"
    layers_per_chunk: int = 0
    method: Literal["exact", "slq"] = "exact"
    max_gram_bytes: int = 268435456
    max_tokens: int = 0
    slq: SLQSettings = field(default_factory=SLQSettings)
    timestep: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.slq, dict):  # Python convenience: ProbeConfig(slq={...})
            self.slq = _nested(SLQSettings, self.slq, f"{self._prefix}.slq")
        if not _SCHEMA.get():
            self._apply_preset()
        super().__post_init__()

    def _apply_preset(self) -> None:
        """Fill the unset regime keys from the preset; note the ones set otherwise."""
        values = PROBE_PRESETS.get(self.preset or "default", PROBE_PRESETS["default"])
        self._preset_conflicts = []
        for name, value in values.items():
            given = getattr(self, name)
            if given is None:
                setattr(self, name, value)
            elif self.preset in PROBE_PRESETS and not _same_setting(given, value):
                self._preset_conflicts.append(name)

    def check(self) -> None:
        if self.preset and self.preset not in PROBE_PRESETS:
            raise ConfigError(
                f"preset must be one of '', {', '.join(PROBE_PRESETS)}, got {self.preset!r}"
            )
        for name in getattr(self, "_preset_conflicts", ()):
            wanted = PROBE_PRESETS[self.preset][name]
            raise ConfigError(
                f"{name}={getattr(self, name)!r} conflicts with the preset {self.preset!r}, "
                f"which sets {name}={wanted!r}: leave {name} unset, or drop the preset"
            )

    @property
    def sigma(self) -> float | str:
        """The bandwidth as the estimators take it (a rule in its canonical spelling, or a
        float)."""
        return canonical_bandwidth(self.bandwidth)

    @property
    def regime(self) -> str:
        """``default``, ``paper`` (the settings of that preset) or ``custom``
        (:func:`probe_regime`)."""
        return probe_regime(self.alpha, self.base, self.bandwidth)

    @property
    def torch_dtype(self):
        """``dtype`` as a ``torch.dtype``."""
        import torch

        return getattr(torch, self.dtype)

    @property
    def slq_settings(self) -> SLQSettings:
        """The ``slq`` section (an :class:`~unifyreg.estimators.SLQSettings`)."""
        return self.slq


def _same_setting(given: Any, wanted: Any) -> bool:
    """Whether a given regime value equals the preset's (bandwidths compared canonically)."""
    try:
        if isinstance(wanted, str):
            return canonical_bandwidth(given) == canonical_bandwidth(wanted)
        return float(given) == float(wanted)
    except (TypeError, ValueError):
        return False


def _nested(cls: type, values: dict, prefix: str) -> Any:
    """``cls(**values)`` with unknown keys and rejected values reported as ConfigError."""
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in valid:
            listed = ", ".join(valid)
            raise ConfigError(
                f"unknown config key '{prefix}.{key}'; valid keys under {prefix}: {listed}"
            )
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(_prefixed(str(error), cls, prefix)) from None


def _prefixed(message: str, cls: type, prefix: str) -> str:
    """A nested dataclass's own error message with the dotted key in front."""
    names = [f.name for f in dataclasses.fields(cls)]
    for form in (f"{cls.__name__}.", "model.", ""):
        for name in names:
            if message.startswith(form + name + " "):
                return f"{prefix}.{name}{message[len(form + name) :]}"
    return f"{prefix}: {message}"


@dataclass
class LossConfig(Section):
    """The contextual-prediction regularizer: ``L = L_task + w_ctx L_ctx + w_div L_div``.

    - ``w_ctx``, ``w_div``: weights (>= 0; 0 switches a term off);
    - ``ctx_mode``: ``bidirectional`` (the default: masked prediction with image tokens
      attending within their image, the contextual objective as a regularizer; adapters
      that take masked prediction) or ``causal`` (masked inputs, next-token targets: any
      next-token adapter); chosen by the toy ablation (docs/replication_toy.md);
    - ``mask_ratio``: share of image-response inputs replaced by the mask embedding in
      ``L_ctx``'s causal mode, in [0, 1) (the bidirectional mode draws a cosine-schedule
      share per image);
    - ``ctx_row_fraction``: ``L_ctx`` runs on at most ``ceil(ctx_row_fraction * B)`` of
      the batch's rows that hold image responses, drawn each step, in (0, 1];
    - ``ctx_reuse_prefix``: ``L_ctx``'s second pass takes the keys and values of the
      positions before the first masked image input from the main pass and runs only the
      rest (default true; adapters with ``supports_prefix_reuse``; the same loss and
      gradient up to rounding, :mod:`unifyreg.adapters.prefix`); false runs it in full;
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
    - ``warmup_steps``: weights ramp linearly from 0 over this many steps;
    - ``text_weight``, ``image_weight``: the task loss as ``text_weight * L_text +
      image_weight * L_image`` (each a mean over its own targets; BAGEL's trainer's
      ``ce_weight``/``mse_weight``). Both unset (None, the default): the family's own
      weighting, which for discrete families is the token-weighted mean of today (numbers
      unchanged) and for continuous families (an MSE image loss) weights 1 and 1; one set
      alone: the other is 1.
    """

    _prefix = "loss"
    w_ctx: float = 0.0
    w_div: float = 0.0
    ctx_mode: Literal["causal", "bidirectional"] = "bidirectional"
    mask_ratio: float = 0.5
    ctx_row_fraction: float = 0.125
    ctx_reuse_prefix: bool = True
    div_alpha: float = 2.0
    div_layers: list[int] = field(default_factory=list)
    div_parts: list[Literal["encoding", "response"]] = field(
        default_factory=lambda: ["encoding", "response"]
    )
    div_dtype: Literal["float32", "float64"] = "float32"
    div_bandwidth: Literal["median_differentiable", "median"] = "median_differentiable"
    warmup_steps: int = 0
    text_weight: float | None = None
    image_weight: float | None = None

    @property
    def active(self) -> bool:
        """Whether any regularizer term is on."""
        return self.w_ctx > 0 or self.w_div > 0


@dataclass
class PretrainToyConfig(Section):
    """``unifyreg pretrain-toy``: train the toy base from scratch and cache it.

    ``objective``: the image objective, ``ar`` (next-token) or ``contextual`` (masked
    image tokens predicted with bidirectional attention within the image; MaskGIT
    decoding); see :mod:`unifyreg.adapters.toy`. ``loss``: the regularizer, also during
    pre-training (all weights 0 by default). The cache directory is
    ``cache_dir/toy-base-<key>`` (:func:`unifyreg.toy.base.cache_key`: the world, the
    model, the objective, the loss, the sequence layout, ``optim``, ``max_steps``,
    ``batch_size``, ``seed``); a second call with the same values reuses it
    (``force=true`` retrains).
    """

    _prefix = "pretrain"
    world: WorldConfig = field(default_factory=WorldConfig)
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    objective: Literal["ar", "contextual"] = "ar"
    loss: LossConfig = field(default_factory=LossConfig)
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


@dataclass
class EvalConfig(Section):
    """``unifyreg eval``: exact-match accuracy of a toy model per task and category.

    ``model_path`` empty means the toy base of the ``pretrain`` section (built first if
    it is not cached). ``splits`` are names from :func:`unifyreg.toy.build_splits`.
    ``decode_steps``: MaskGIT steps of a contextual model's drawings (0: the model's own).
    """

    model_path: str = ""
    pretrain: PretrainToyConfig = field(default_factory=PretrainToyConfig)
    splits: list[str] = field(default_factory=lambda: ["eval", "heldout"])
    batch_size: int = 256
    decode_steps: int = 0
    output: str = "runs/eval/eval.json"


@dataclass
class ModelSource(Section):
    """Which model to load: a registered ``adapter`` name and a local ``path``.

    An empty ``path`` takes the adapter's default model where it has one (the toy: the
    cached base of the ``pretrain`` section, trained first if absent) and is an error
    otherwise. Real models load with ``from_pretrained(path)`` from a local directory
    only; ``trust_remote_code`` stays off unless set here. ``dtype`` is the torch dtype the
    weights are loaded in.
    """

    _prefix = "model"
    adapter: str = "toy"
    path: str = ""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False

    def check(self) -> None:
        from unifyreg.adapters import adapter_spec

        try:
            adapter_spec(self.adapter)
        except ValueError as error:
            raise ConfigError(f"adapter: {error}") from None


def _check_sources(model: ModelSource, **sources: str) -> None:
    """An empty ``model.path``, ``data`` or ``probe_set`` needs the adapter's default."""
    from unifyreg.adapters import adapter_spec

    spec = adapter_spec(model.adapter)
    if not model.path and not spec.default_model:
        raise ConfigError(f"model.path is required for adapter {model.adapter!r}")
    for key, value in sources.items():
        default = spec.default_data if key == "data" else spec.default_probe_set
        if not value and not default:
            raise ConfigError(
                f"{key} is required for adapter {model.adapter!r}: the path of a JSONL "
                "manifest (or an example source such as 'toy')"
            )


@dataclass
class ProbeRunConfig(Section):
    """``unifyreg probe``: run the two-level probe and write tables and figures.

    ``probe_set`` is an example source (``"toy"``: the world's fixed probe sets of
    ``pretrain.world``), the path of a JSONL manifest (see :mod:`unifyreg.manifest`), or
    empty for the adapter's default; ``on_bad_example`` is ``"error"`` or ``"skip"`` for
    bad manifest lines.
    """

    model: ModelSource = field(default_factory=ModelSource)
    pretrain: PretrainToyConfig = field(default_factory=PretrainToyConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    probe_set: str = ""
    on_bad_example: Literal["error", "skip"] = "error"
    output_dir: str = "runs/probe"
    figures: bool = True

    def check(self) -> None:
        _check_sources(self.model, probe_set=self.probe_set)


@dataclass
class LoraSettings(Section):
    """LoRA through peft: rank ``r``, scale ``alpha / r``, ``dropout``; ``target_modules``
    empty = the adapter's defaults (language-model projections only)."""

    _prefix = "lora"
    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)


@dataclass
class FinetuneConfig(Section):
    """``unifyreg finetune``: fine-tune an adapter (LoRA by default) with per-epoch probes.

    ``data`` is an example source (``"toy"``: the world's ``finetune`` split), a JSONL
    manifest of training examples, or empty for the adapter's default; ``data_variant``
    transforms the training examples of a source that has variants (the toy:
    ``reca``, ``reason_then_draw``; :mod:`unifyreg.toy.variants`); ``probe_set``
    likewise (``"toy"``: the world's probe sets). ``resume`` is ``""`` (start fresh),
    ``"last"`` (``run_dir/checkpoints/last.ckpt`` when it exists) or a checkpoint path.
    ``loggers`` is a subset of ``csv``, ``tensorboard``, ``wandb`` (offline unless
    ``WANDB_MODE=online``), ``mlflow`` (a file store under ``run_dir/mlruns`` unless
    ``MLFLOW_TRACKING_URI`` is set); the last two need the ``loggers`` extra.
    ``probe_figures``: when the
    probe's trajectory figures are drawn: ``end`` (once, when training ends, one curve per
    probed epoch), ``every`` (after every probe, also sent to TensorBoard as they come)
    or ``never``.
    """

    model: ModelSource = field(default_factory=ModelSource)
    pretrain: PretrainToyConfig = field(default_factory=PretrainToyConfig)
    data: str = ""
    data_variant: Literal["", "reca", "reason_then_draw"] = ""
    lora: LoraSettings = field(default_factory=LoraSettings)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20))
    max_epochs: int = 3
    max_steps: int = -1
    batch_size: int = 32
    seed: int = 0
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    probe_set: str = ""
    every_n_epochs: int = 1
    probe_at_start: bool = True
    probe_figures: Literal["end", "every", "never"] = "end"
    on_bad_example: Literal["error", "skip"] = "error"
    run_dir: str = "runs/finetune/toy"
    resume: str = ""
    loggers: list[Literal["csv", "tensorboard", "wandb", "mlflow"]] = field(
        default_factory=lambda: ["csv", "tensorboard"]
    )
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    precision: str = "32-true"

    def check(self) -> None:
        _check_sources(self.model, data=self.data, probe_set=self.probe_set)
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps must be -1 (no limit) or >= 1, got {self.max_steps}")


@dataclass
class ArmConfig(Section):
    """One arm of an ablation: a name, the two regularizer weights, and optionally the
    ``L_ctx`` mode and a training-data variant ("" = the ``finetune`` section's)."""

    _prefix = "arms"
    name: str = "baseline"
    w_ctx: float = 0.0
    w_div: float = 0.0
    ctx_mode: Literal["", "causal", "bidirectional"] = ""
    data_variant: Literal["", "reca", "reason_then_draw"] = ""


@dataclass
class BaseSpec(Section):
    """One base of an ablation: a name, the toy base's image ``objective`` and
    pre-training ``seed`` (the rest of ``finetune.pretrain`` is shared)."""

    _prefix = "bases"
    name: str = "ar-0"
    objective: Literal["ar", "contextual"] = "ar"
    seed: int = 0


def _default_arms() -> list[ArmConfig]:
    return [
        ArmConfig("baseline", 0.0, 0.0),
        ArmConfig("ctx", 1.0, 0.0),
        ArmConfig("div", 0.0, 1.0),
        ArmConfig("ctx+div", 1.0, 1.0),
    ]


@dataclass
class SweepConfig(Section):
    """Extra arms sweeping one weight: ``weight`` is ``w_ctx`` or ``w_div`` ("" = none);
    each value v adds an arm named ``<weight>=<v>`` with the other weight 0."""

    _prefix = "sweep"
    weight: Literal["", "w_ctx", "w_div"] = ""
    values: list[float] = field(default_factory=list)

    def check(self) -> None:
        if self.weight and not self.values:
            raise ConfigError("values must list at least one weight")

    def arms(self) -> list[ArmConfig]:
        """The arms this sweep adds."""
        if not self.weight:
            return []
        return [ArmConfig(f"{self.weight}={v:g}", **{self.weight: float(v)}) for v in self.values]


@dataclass
class AblateConfig(Section):
    """``unifyreg ablate``: every arm x base x seed fine-tuned with the same data and
    steps (``finetune.*``), probed every epoch and at the end, scored exactly on the toy.

    ``bases`` lists toy bases (objective, pre-training seed) as a factor; empty = the one
    base of ``finetune``'s ``model``/``pretrain``. Each run lives in
    ``output_dir/runs/<arm>/<base>/seed_<s>`` (``runs/<arm>/seed_<s>`` without bases); a
    finished run (``done.json``) is skipped on a re-run, an interrupted one resumes from its
    ``last.ckpt``. Differences to the baseline arm are paired by (base, seed).
    """

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    arms: list[ArmConfig] = field(default_factory=_default_arms)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    bases: list[BaseSpec] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    output_dir: str = "runs/ablate/toy"
    eval_splits: list[str] = field(default_factory=lambda: ["eval", "heldout"])
    figures: bool = True

    def check(self) -> None:
        names = [arm.name for arm in self.all_arms()]
        if not names:
            raise ConfigError("arms: at least one arm is needed")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"arms: duplicate arm name(s) {duplicates}")
        bases = [base.name for base in self.bases]
        duplicates = sorted({n for n in bases if bases.count(n) > 1})
        if duplicates:
            raise ConfigError(f"bases: duplicate base name(s) {duplicates}")

    def all_arms(self) -> list[ArmConfig]:
        """The configured arms followed by the sweep's."""
        return [*self.arms, *self.sweep.arms()]


#: Every range check of every section, one line each: ``(section, field) -> rule``; a
#: rule returns None for a good value or the end of a message ("must be >= 1, got 0").
RANGE_CHECKS: dict[tuple[type, str], Callable[[Any], str | None]] = {
    (OptimConfig, "lr"): POSITIVE,
    (OptimConfig, "weight_decay"): NON_NEGATIVE,
    (OptimConfig, "betas"): _each(Range(0, 1, high_open=True)),
    (OptimConfig, "warmup_steps"): COUNT,
    (OptimConfig, "min_lr_ratio"): FRACTION,
    (OptimConfig, "grad_clip"): NON_NEGATIVE,
    (ProbeConfig, "alpha"): POSITIVE,
    (ProbeConfig, "base"): _log_base,
    (ProbeConfig, "bandwidth"): _bandwidth,
    (ProbeConfig, "batch_size"): AT_LEAST_ONE,
    (ProbeConfig, "layers_per_chunk"): COUNT,
    (ProbeConfig, "max_gram_bytes"): AT_LEAST_ONE,
    (ProbeConfig, "max_tokens"): COUNT,
    (ProbeConfig, "timestep"): FRACTION,
    (PretrainToyConfig, "max_steps"): AT_LEAST_ONE,
    (PretrainToyConfig, "seed"): COUNT,
    (PretrainToyConfig, "batch_size"): AT_LEAST_ONE,
    (PretrainToyConfig, "eval_batch_size"): AT_LEAST_ONE,
    (PretrainToyConfig, "checkpoint_every_n_steps"): AT_LEAST_ONE,
    (EvalConfig, "batch_size"): AT_LEAST_ONE,
    (EvalConfig, "decode_steps"): COUNT,
    (EvalConfig, "splits"): _non_empty,
    (LoraSettings, "r"): AT_LEAST_ONE,
    (LoraSettings, "alpha"): Range(0, low_open=True, integer=True),
    (LoraSettings, "dropout"): Range(0, 1, high_open=True),
    (LossConfig, "w_ctx"): NON_NEGATIVE,
    (LossConfig, "w_div"): NON_NEGATIVE,
    (LossConfig, "mask_ratio"): Range(0, 1, high_open=True),
    (LossConfig, "ctx_row_fraction"): Range(0, 1, low_open=True),
    (LossConfig, "div_alpha"): POSITIVE,
    (LossConfig, "div_parts"): _non_empty,
    (LossConfig, "warmup_steps"): COUNT,
    (LossConfig, "text_weight"): _optional(NON_NEGATIVE),
    (LossConfig, "image_weight"): _optional(NON_NEGATIVE),
    (FinetuneConfig, "max_epochs"): AT_LEAST_ONE,
    (FinetuneConfig, "seed"): COUNT,
    (FinetuneConfig, "batch_size"): AT_LEAST_ONE,
    (FinetuneConfig, "every_n_epochs"): AT_LEAST_ONE,
    (FinetuneConfig, "devices"): AT_LEAST_ONE,
    (ArmConfig, "name"): _arm_name,
    (BaseSpec, "name"): _arm_name,
    (BaseSpec, "seed"): COUNT,
    (ArmConfig, "w_ctx"): NON_NEGATIVE,
    (ArmConfig, "w_div"): NON_NEGATIVE,
    (SweepConfig, "values"): _each(NON_NEGATIVE),
    (AblateConfig, "seeds"): lambda seeds: _non_empty(seeds) or _each(COUNT)(seeds),
}


# ---------------------------------------------------------------------- loading


def config_hash(data: Any) -> str:
    """First 12 hex digits of the SHA-256 of ``data`` as canonical JSON."""
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _field_type(node: Any, name: str) -> Any:
    """The dataclass type of field ``name`` of dataclass ``node`` (via a default)."""
    f = {f.name: f for f in dataclasses.fields(node)}[name]
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            return type(value[0])
        return type(value)
    return type(f.default)


def _valid_keys(schema: type, dotted: str) -> tuple[str, list[str]]:
    """(parent path, valid keys there) for a dotted key that did not resolve."""
    parts = [p for p in re.split(r"\.|\[\d+\]", dotted) if p]
    node: Any = schema
    parent: list[str] = []
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(node) or part not in {
            f.name for f in dataclasses.fields(node)
        }:
            break
        node = _field_type(node, part)
        parent.append(part)
    keys = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
    return ".".join(parent) or "<top level>", keys


_CHOICES = re.compile(r"Invalid value '(.*)', expected one of \[(.*)\]")
_CONVERT = re.compile(r"Value '(.*)' of type '\w+' could not be converted to (\w+)")


def _describe(error: OmegaConfBaseException, schema: type) -> str:
    key = getattr(error, "full_key", None) or ""
    message = str(error).splitlines()[0]
    if isinstance(error, MissingMandatoryValue):
        return f"missing required config key {key!r}: set it in the file or as {key}=..."
    if "Key" in type(error).__name__ or "not in" in message:
        where, valid = _valid_keys(schema, key)
        return f"unknown config key {key!r}; valid keys under {where}: {', '.join(valid)}"
    choices = _CHOICES.search(message)
    if choices:
        options = ", ".join(c.strip().strip("'") for c in choices.group(2).split(","))
        return f"{key} must be one of {options}, got {choices.group(1)!r}"
    converted = _CONVERT.search(message)
    if converted:
        kind = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false"}
        wanted = kind.get(converted.group(2), converted.group(2))
        return f"bad value for config key {key!r}: must be {wanted}, got {converted.group(1)!r}"
    if key:
        return f"bad value for config key {key!r}: {message}"
    return message


def _check_foreign_sections(schema: type, values: Any, prefix: str) -> None:
    """Build every nested dataclass defined outside this module (``WorldConfig``,
    ``ToyModelConfig``, ``SLQSettings``: they validate themselves) from the merged
    values first, so that their errors carry the full dotted key."""
    if not isinstance(values, DictConfig):
        return
    for f in dataclasses.fields(schema):
        kind = _field_type(schema, f.name)
        value = values.get(f.name)
        if value is None or not dataclasses.is_dataclass(kind):
            continue
        items = list(value) if OmegaConf.is_list(value) else [value]
        for index, item in enumerate(items):
            key = (
                f"{_key(prefix, f.name)}[{index}]"
                if OmegaConf.is_list(value)
                else _key(prefix, f.name)
            )
            if issubclass(kind, Section):
                _check_foreign_sections(kind, item, key)
            else:
                _nested(kind, OmegaConf.to_container(item, resolve=True), key)


def load_config(
    schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()
) -> T:
    """Defaults of ``schema`` <- YAML ``path`` <- ``key=value`` overrides -> a ``schema``.

    Raises :class:`ConfigError` naming the offending key (and the valid keys) for an
    unknown key, a value of the wrong type, an out-of-range value, a malformed override
    or an unreadable file.
    """
    tokens = _DEFERRED.set(True), _SCHEMA.set(True)
    try:
        base = OmegaConf.structured(schema)
    finally:
        _SCHEMA.reset(tokens[1])
        _DEFERRED.reset(tokens[0])
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
            OmegaConf.from_dotlist([item])
        except OmegaConfBaseException:
            pass  # reported below, with the schema's key
        except Exception as error:  # a value that is not YAML (yaml's errors: several types)
            problem = " ".join(str(error).split())
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({problem}); quote it as "
                "key='\"...\"' if it is a string"
            ) from None
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(base, *layers)
        _check_foreign_sections(schema, merged, "")
        token = _DEFERRED.set(True)
        try:
            config = OmegaConf.to_object(merged)
        finally:
            _DEFERRED.reset(token)
        validate_tree(config)
        return config  # type: ignore[return-value]
    except ConfigError:
        raise
    except OmegaConfBaseException as error:
        raise ConfigError(_describe(error, schema)) from None
    except (ValueError, TypeError) as error:
        # Validation in the __post_init__ of a section defined elsewhere.
        raise ConfigError(str(error)) from None


def to_yaml(config: Any) -> str:
    """The resolved config as YAML (for run directories, logs and ``--print-config``)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))
