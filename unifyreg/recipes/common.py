"""Pieces shared by recipes: loading a model through its adapter, reading probe sets and
training data, checking that manifest examples fit the model, resuming safely."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unifyreg.adapters.base import Adapter, get_adapter_class
from unifyreg.config import ConfigError, ModelSource, PretrainToyConfig
from unifyreg.manifest import ManifestError, read_manifest

__all__ = [
    "drop_examples_that_do_not_fit",
    "fit",
    "load_adapter",
    "load_checkpoint",
    "load_probe_set",
    "load_training_examples",
]


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
    elif source.trust_remote_code:
        warnings.warn(
            "model.trust_remote_code=true is ignored by the 'toy' adapter: it loads the "
            "native transformers LlamaForCausalLM, and no code from "
            f"{str(path)!r} is executed",
            UserWarning,
            stacklevel=2,
        )
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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint loaded with ``torch.load(weights_only=True)``: tensors and
    plain containers only; a checkpoint that would run code when unpickled is refused
    with a :class:`ConfigError` (nothing in it runs)."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line for line in str(error).splitlines() if "GLOBAL" in line]
        detail = f" ({lines[0].strip()})" if lines else ""
        raise ConfigError(
            f"checkpoint {str(path)!r} holds more than tensors and plain data{detail}; "
            "refused: checkpoints load with weights_only=True, so no code in them runs"
        ) from None


def fit(trainer: Any, module: Any, loader: Any, ckpt_path: str | None = None) -> None:
    """``trainer.fit`` that restores ``ckpt_path`` with ``weights_only=True`` (Lightning
    >= 2.6 takes the flag; older versions get the checkpoint checked first)."""
    import pickle

    if ckpt_path is None:
        trainer.fit(module, loader)
    elif "weights_only" in inspect.signature(trainer.fit).parameters:
        try:
            trainer.fit(module, loader, ckpt_path=ckpt_path, weights_only=True)
        except pickle.UnpicklingError:
            load_checkpoint(ckpt_path)  # raises the same refusal with a plain message
            raise
    else:
        load_checkpoint(ckpt_path)
        trainer.fit(module, loader, ckpt_path=ckpt_path)
