"""Adapters: one per model family, all returning :class:`ForwardOutput` (DESIGN.md).

The registry is lazy: each family is a line of :data:`ADAPTERS` naming the module and
class that implement it, imported on first use (:func:`get_adapter_class`), so reading a
config or importing the probe never imports a model family or ``transformers``' model
code. A spec also says what a family offers when a config leaves a key empty: a default
model (``model.path`` empty: the toy's cached base), default training data and a default
probe set (registered example sources, :mod:`unifyreg.sources`).

Adding a family: one module under ``unifyreg/adapters/`` with an :class:`Adapter`
subclass, one line in :data:`ADAPTERS`, its tiny-config test and its configs (README,
"Adding a model family"). User code registers its own class with
:func:`register_adapter`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from unifyreg.adapters.base import Adapter, ForwardOutput, LayerStack

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AdapterSpec",
    "ForwardOutput",
    "LayerStack",
    "adapter_spec",
    "available_adapters",
    "get_adapter_class",
    "register_adapter",
]


@dataclass
class AdapterSpec:
    """One registry line: ``target`` ``"module:Class"`` (imported on first use);
    ``default_model`` ``"module:function"`` returning a model directory when
    ``model.path`` is empty (called with the recipe's ``pretrain`` section; "" = a path
    is required); ``default_data`` / ``default_probe_set``: example source names used
    when ``data`` / ``probe_set`` are empty ("" = a manifest is required)."""

    target: str
    default_model: str = ""
    default_data: str = ""
    default_probe_set: str = ""
    description: str = ""
    cls: type[Adapter] | None = field(default=None, repr=False)


ADAPTERS: dict[str, AdapterSpec] = {
    "toy": AdapterSpec(
        "unifyreg.adapters.toy:ToyAdapter",
        default_model="unifyreg.toy.base:default_model_path",
        default_data="toy",
        default_probe_set="toy",
        description="the built-in toy UMM (Llama-style decoder over text + grid tokens)",
    ),
    "emu3": AdapterSpec(
        "unifyreg.adapters.emu3:Emu3Adapter",
        description="Emu3 (transformers Emu3ForConditionalGeneration): VQ tokens in the vocabulary",
    ),
    "janus": AdapterSpec(
        "unifyreg.adapters.janus:JanusAdapter",
        description="Janus / Janus-Pro (JanusForConditionalGeneration): VQ generation head",
    ),
    "chameleon": AdapterSpec(
        "unifyreg.adapters.chameleon:ChameleonAdapter",
        description="Chameleon / Anole (ChameleonForConditionalGeneration)",
    ),
    "showo": AdapterSpec(
        "unifyreg.adapters.showo:ShowoAdapter",
        description="Show-o (PhiForCausalLM + omni-attention): masked image-token prediction",
    ),
    "glm_image": AdapterSpec(
        "unifyreg.adapters.glm_image:GlmImageAdapter",
        description="GLM-Image's AR generator (GlmImageForConditionalGeneration): image tokens",
    ),
    "two_stage": AdapterSpec(
        "unifyreg.adapters.two_stage:TwoStageAdapter",
        description="two-stage (Qwen2.5-VL + a diffusers denoiser, VAE, scheduler): "
        "Qwen-Image(-Edit); OmniGen2 with its own transformer class",
    ),
    "mot": AdapterSpec(
        "unifyreg.adapters.mot:MoTAdapter",
        description="mixture-of-transformers (diffusers Cosmos3OmniTransformer + SigLIP + VAE): "
        "Cosmos3-Omni; BAGEL, BAGEL-RecA by key map",
    ),
    "hooked": AdapterSpec(
        "unifyreg.adapters.hooked:HookedAdapter",
        description="any user module: layer list + embeddings + a step function (Python only)",
    ),
}


def available_adapters() -> tuple[str, ...]:
    """Names of the registered adapters, sorted (nothing is imported)."""
    return tuple(sorted(ADAPTERS))


def adapter_spec(name: str) -> AdapterSpec:
    """The registry line of ``name``; ValueError lists the registered names."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ValueError(
            f"unknown adapter {name!r}; registered: {', '.join(available_adapters())}"
        ) from None


def import_object(target: str) -> object:
    """The object ``"package.module:attribute"`` names (its module imported now)."""
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def get_adapter_class(name: str) -> type[Adapter]:
    """The adapter class registered as ``name`` (its module imported on first use)."""
    spec = adapter_spec(name)
    if spec.cls is None:
        spec.cls = import_object(spec.target)  # type: ignore[assignment]
        spec.cls.name = name
    return spec.cls


def register_adapter(
    name: str, *, default_data: str = "", default_probe_set: str = "", description: str = ""
) -> Callable[[type[Adapter]], type[Adapter]]:
    """Class decorator for user adapters: make ``cls`` available to configs as ``name``
    (ValueError if the name is taken by another class)."""

    def decorate(cls: type[Adapter]) -> type[Adapter]:
        existing = ADAPTERS.get(name)
        if existing is not None and existing.target != f"{cls.__module__}:{cls.__qualname__}":
            raise ValueError(f"adapter name {name!r} is already registered")
        cls.name = name
        ADAPTERS[name] = AdapterSpec(
            f"{cls.__module__}:{cls.__qualname__}",
            default_data=default_data,
            default_probe_set=default_probe_set,
            description=description or (cls.__doc__ or "").strip().split("\n")[0],
            cls=cls,
        )
        return cls

    return decorate
