"""Pieces shared by recipes: loading a model through its adapter, reading probe sets and
training data, checking that manifest examples fit the model."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unifyreg.adapters import Adapter, adapter_spec, get_adapter_class, import_object
from unifyreg.config import ConfigError, ModelSource, PretrainToyConfig
from unifyreg.manifest import ManifestError
from unifyreg.sources import load_examples, resolve_source

__all__ = [
    "check_layers",
    "drop_examples_that_do_not_fit",
    "load_adapter",
    "load_probe_set",
    "load_training_examples",
    "model_directory",
]


def model_directory(
    source: ModelSource, pretrain: PretrainToyConfig | None = None, build: bool = True
) -> Path:
    """The local directory ``source`` names: ``model.path``, or the adapter's default
    model (the toy's cached base, built first if absent; ``build=False``: only its path,
    which may not exist yet) when the path is empty."""
    try:
        spec = adapter_spec(source.adapter)
    except ValueError as error:
        raise ConfigError(f"model.adapter: {error}") from None
    if not source.path:
        if not spec.default_model:
            raise ConfigError(f"model.path is required for adapter {source.adapter!r}")
        default = import_object(spec.default_model)
        return Path(default(pretrain, build=build))  # type: ignore[operator]
    path = Path(source.path)
    if not path.is_dir():
        raise ConfigError(f"model.path: directory {str(path)!r} does not exist")
    return path


def load_adapter(source: ModelSource, pretrain: PretrainToyConfig | None = None) -> Adapter:
    """The adapter ``source.adapter`` loaded from :func:`model_directory` (local only).

    ``dtype`` and ``trust_remote_code`` go to adapters whose ``load`` takes them; an
    adapter that runs no code from the directory anyway warns that the flag is ignored.
    """
    cls = get_adapter_class(source.adapter)
    path = model_directory(source, pretrain)
    accepted = inspect.signature(cls.load).parameters
    kwargs: dict[str, Any] = {}
    if "dtype" in accepted:
        kwargs["dtype"] = source.dtype
    if "trust_remote_code" in accepted:
        kwargs["trust_remote_code"] = source.trust_remote_code
    elif source.trust_remote_code:
        warnings.warn(
            f"model.trust_remote_code=true is ignored by the {source.adapter!r} adapter: it "
            f"loads its own classes, and no code from {str(path)!r} is executed",
            UserWarning,
            stacklevel=2,
        )
    return cls.load(path, **kwargs)


def load_probe_set(
    probe_set: str, adapter: str, context: Any = None, on_bad_example: str = "error"
) -> tuple[list, int]:
    """``(examples, skipped)``: the probe set (an example source or a manifest; empty =
    the adapter's default)."""
    source = resolve_source(probe_set, adapter, "probe_set")
    return load_examples(source, "probe_set", context, on_bad_example)


def load_training_examples(
    data: str, adapter: str, context: Any = None, on_bad_example: str = "error"
) -> tuple[list, int]:
    """``(examples, skipped)``: the training data (an example source or a manifest;
    empty = the adapter's default)."""
    source = resolve_source(data, adapter, "data")
    return load_examples(source, "data", context, on_bad_example)


def check_layers(adapter: Adapter, layers: Sequence[int], key: str) -> tuple[int, ...]:
    """``adapter.resolve_layers(layers)`` with an out-of-range layer reported as a
    ConfigError naming ``key`` (all layers when ``layers`` is empty)."""
    try:
        return adapter.resolve_layers(list(layers) or None)
    except ValueError as error:
        raise ConfigError(f"{key}: {error}") from None


def drop_examples_that_do_not_fit(
    adapter: Adapter, examples: Sequence[Any], on_bad_example: str = "error", what: str = "data"
) -> tuple[list, int]:
    """(examples, skipped count): encode each manifest example once, alone, before any work.

    An example the adapter cannot encode (longer than the model allows, an image it
    cannot read) raises :class:`ManifestError` naming its ``file:line``, or with
    ``on_bad_example="skip"`` is skipped, printed and counted. Examples without a
    ``source`` (the toy world's) are not checked. Costs one extra encoding pass.
    """
    kept, skipped = [], 0
    for example in examples:
        source = getattr(example, "source", "")
        if not source:
            kept.append(example)
            continue
        try:
            adapter.encode([example])
        except ValueError as error:
            reason = f"{what} example {str(error).removeprefix('example 0 ')}"
            if on_bad_example == "error":
                raise ManifestError(f"{source}: {reason}") from None
            print(f"skipped {source}: {reason}")
            skipped += 1
            continue
        kept.append(example)
    if not kept:
        raise ManifestError(f"{what}: no example fits the model ({skipped} skipped)")
    return kept, skipped
