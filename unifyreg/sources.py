"""Where examples come from: registered example sources and JSONL manifests.

A ``data`` or ``probe_set`` value is either the name of a registered source (``toy``: the
synthetic world's splits) or the path of a JSONL manifest (:mod:`unifyreg.manifest`). An
empty value takes the adapter's default source (:class:`unifyreg.adapters.AdapterSpec`).
Like the adapter registry, the source registry is lazy: a line names the object that
implements it, imported on first use.

A source offers ``training_examples(context)`` and ``probe_examples(context)`` (lists of
examples; ``context`` is the recipe's ``pretrain`` section, whose ``world`` the toy uses),
and may offer exact scoring, ``evaluate(adapter, split_names, context)`` -> headline
accuracies, and ``split_names(context)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unifyreg.config import ConfigError

__all__ = ["SOURCES", "example_source", "load_examples", "resolve_source"]

#: name -> ``"module:object"`` of each registered example source.
SOURCES: dict[str, str] = {"toy": "unifyreg.toy.sources:TOY_SOURCE"}


def resolve_source(value: str, adapter: str, key: str) -> str:
    """``value``, or the adapter's default source for ``key`` (``data`` or
    ``probe_set``) when it is empty; ConfigError when there is none."""
    if value:
        return value
    from unifyreg.adapters import adapter_spec

    spec = adapter_spec(adapter)
    default = spec.default_data if key == "data" else spec.default_probe_set
    if not default:
        raise ConfigError(f"{key} is required for adapter {adapter!r}: a JSONL manifest")
    return default


def example_source(name: str) -> Any | None:
    """The registered source called ``name``, or None when ``name`` is not one."""
    target = SOURCES.get(name)
    if target is None:
        return None
    from unifyreg.adapters import import_object

    return import_object(target)


def load_examples(
    source: str, kind: str, context: Any = None, on_bad_example: str = "error"
) -> tuple[list, int]:
    """``(examples, skipped count)`` of ``kind`` (``"data"``: training examples,
    ``"probe_set"``: the fixed probe set) from a registered source or a manifest.
    Skipped bad manifest lines (``on_bad_example="skip"``) are printed."""
    if kind not in ("data", "probe_set"):
        raise ValueError(f"kind must be 'data' or 'probe_set', got {kind!r}")
    registered = example_source(source)
    if registered is not None:
        if kind == "data":
            return list(registered.training_examples(context)), 0
        return list(registered.probe_examples(context)), 0
    path = Path(source)
    if not path.is_file():
        names = ", ".join(repr(name) for name in SOURCES)
        raise ConfigError(f"{kind}: expected {names} or a manifest file, {source!r} not found")
    from unifyreg.manifest import read_manifest

    manifest = read_manifest(path, on_bad_example=on_bad_example)
    for line, reason in manifest.skipped:
        print(f"skipped {path}:{line}: {reason}")
    return manifest.examples, len(manifest.skipped)
