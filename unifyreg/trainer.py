"""Trainer-side helpers shared by the recipes: the progress bar, checkpoint writing
(atomic, in the checkpoint's directory) and loading (``weights_only=True``), and
``fit`` that resumes through it."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import TQDMProgressBar

from unifyreg.config import ConfigError

__all__ = ["AtomicCheckpointIO", "fit", "load_checkpoint", "progress_bar"]


def progress_bar() -> TQDMProgressBar:
    """A progress bar that refreshes often on a terminal and rarely in CI logs."""
    return TQDMProgressBar(refresh_rate=1 if sys.stderr.isatty() else 200)


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing through :func:`unifyreg.fileio.atomic_file`
    (a temporary file in the checkpoint's own directory, renamed over it). Lightning's
    own write goes through fsspec, whose temporary file lives in the system temporary
    directory: where that is another filesystem (a tmpfs ``/tmp``) the final move is a
    copy, and a kill during it leaves a truncated ``last.ckpt``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        import torch

        from unifyreg.fileio import atomic_file

        with atomic_file(path, "wb") as handle:
            torch.save(checkpoint, handle)
