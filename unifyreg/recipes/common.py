"""Pieces shared by recipes: loading a model through its adapter, reading probe sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unifyreg.adapters.base import Adapter, get_adapter_class
from unifyreg.config import ConfigError, ModelSource, PretrainToyConfig
from unifyreg.manifest import read_manifest

__all__ = ["load_adapter", "load_probe_set", "load_training_examples"]


def load_adapter(source: ModelSource, pretrain: PretrainToyConfig | None = None) -> Adapter:
    """The adapter ``source.adapter`` loaded from ``source.path`` (local directory only).

    ``toy`` with an empty path loads (building if needed) the cached toy base.
    """
    if not source.path and source.adapter != "toy":
        raise ConfigError(f"model.path is required for adapter {source.adapter!r}")
    cls = _adapter_class(source.adapter)
    if not source.path:
        from unifyreg.recipes.pretrain_toy import build_toy_base

        return cls.load(build_toy_base(pretrain or PretrainToyConfig()))
    path = Path(source.path)
    if not path.is_dir():
        raise ConfigError(f"model.path: directory {str(path)!r} does not exist")
    kwargs: dict[str, Any] = {}
    if source.adapter != "toy":
        kwargs = {"dtype": source.dtype, "trust_remote_code": source.trust_remote_code}
    return cls.load(path, **kwargs)


def _adapter_class(name: str):
    try:
        return get_adapter_class(name)
    except ValueError as error:
        raise ConfigError(f"model.adapter: {error}") from None


def load_probe_set(probe_set: str, world=None, on_bad_example: str = "error") -> tuple[list, int]:
    """(examples, skipped count): the toy world's probe sets, or a JSONL manifest."""
    if probe_set == "toy":
        from unifyreg.toy.splits import build_splits

        splits = build_splits(world)
        examples = [e for name, split in splits.items() if name.startswith("probe/") for e in split]
        return examples, 0
    path = Path(probe_set)
    if not path.is_file():
        raise ConfigError(f"probe_set: expected 'toy' or a manifest file, {probe_set!r} not found")
    manifest = read_manifest(path, on_bad_example=on_bad_example)
    for line, reason in manifest.skipped:
        print(f"skipped {path}:{line}: {reason}")
    return manifest.examples, len(manifest.skipped)


def load_training_examples(
    data: str, world=None, on_bad_example: str = "error"
) -> tuple[list, int]:
    """(examples, skipped count): the toy world's ``finetune`` split, or a JSONL manifest."""
    if data == "toy":
        from unifyreg.toy.splits import build_splits

        return list(build_splits(world)["finetune"]), 0
    path = Path(data)
    if not path.is_file():
        raise ConfigError(f"data: expected 'toy' or a manifest file, {data!r} not found")
    manifest = read_manifest(path, on_bad_example=on_bad_example)
    for line, reason in manifest.skipped:
        print(f"skipped {path}:{line}: {reason}")
    return manifest.examples, len(manifest.skipped)
