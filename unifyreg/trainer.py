"""Trainer-side helpers shared by the recipes: the progress bar, checkpoint writing
(atomic, in the checkpoint's directory) and loading (``weights_only=True``), ``fit`` that
resumes through it, and the strategy a ``strategy`` config value names (FSDP wrapping
each of the adapter's blocks)."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.strategies import FSDPStrategy

from unifyreg.config import ConfigError

__all__ = [
    "AtomicCheckpointIO",
    "BlockFSDPStrategy",
    "build_strategy",
    "check_checkpoint",
    "fit",
    "load_checkpoint",
    "progress_bar",
]


def progress_bar() -> TQDMProgressBar:
    """A progress bar that refreshes often on a terminal and rarely in CI logs."""
    return TQDMProgressBar(refresh_rate=1 if sys.stderr.isatty() else 200)


def _refusal(path: str | Path, error: Exception) -> ConfigError:
    """The ConfigError for a weights-only unpickling failure: code in the file (a GLOBAL
    the weights-only unpickler blocks) or else a file that is not a checkpoint."""
    lines = [line for line in str(error).splitlines() if "GLOBAL" in line]
    if lines:
        return ConfigError(
            f"checkpoint {str(path)!r} holds more than tensors and plain data "
            f"({lines[0].strip()}); refused: checkpoints load with weights_only=True, so no "
            "code in them runs"
        )
    return _corrupted(path, error)


def _corrupted(path: str | Path, error: Exception | str) -> ConfigError:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ConfigError(
        f"checkpoint {str(path)!r} is truncated or corrupted ({detail}); nothing was loaded "
        "from it and no file was changed: delete it to start fresh, or resume from another "
        "checkpoint"
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint loaded with ``torch.load(weights_only=True)``: tensors and
    plain containers only; a checkpoint that would run code when unpickled is refused
    with a :class:`ConfigError` (nothing in it runs), and so is a file that is not a
    readable checkpoint (truncated, corrupted), named in the message."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise _refusal(path, error) from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise _corrupted(path, error) from None


#: Checkpoints already checked by :func:`check_checkpoint`: (path, size, mtime) -> True.
_CHECKED: set[tuple[str, int, int]] = set()


def check_checkpoint(path: str | Path) -> None:
    """Raise a :class:`ConfigError` naming ``path`` unless it is a complete checkpoint of
    tensors and plain data; nothing is changed either way.

    1. torch writes a zip archive: every record is read through and its CRC-32 checked
       (``zipfile.testzip``, streaming, at disk speed). A truncated file has no central
       directory; a byte changed anywhere fails its record's checksum, which
       ``torch.load`` alone does not check (flipped tensor bytes load silently).
    2. ``torch.load(weights_only=True, mmap=True)`` unpickles the structure without
       reading the tensors: code in the file is refused (:func:`load_checkpoint`).

    A file of the legacy (non-zip) format gets a full ``weights_only`` load instead. A
    file checked before, unchanged since (same size and modification time), is not read
    again.
    """
    import pickle
    import zipfile

    import torch

    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _CHECKED:
        return
    if stat.st_size == 0:
        raise _corrupted(path, "empty file")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            magic = handle.read(2)
        if magic != b"\x80\x02":  # the legacy format starts with a protocol-2 pickle
            raise _corrupted(path, "not a zip archive: no central directory")
        load_checkpoint(path)
    else:
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            raise _corrupted(path, error) from None
        if bad is not None:
            raise _corrupted(path, f"record {bad!r} fails its CRC-32 check")
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as error:
            raise _refusal(path, error) from None
        except (RuntimeError, EOFError, ValueError, OSError) as error:
            raise _corrupted(path, error) from None
    _CHECKED.add(key)


def fit(trainer: Any, module: Any, loader: Any, ckpt_path: str | None = None) -> None:
    """``trainer.fit`` that first checks ``ckpt_path`` (:func:`check_checkpoint`: complete,
    tensors and plain data only) and restores it with ``weights_only=True`` where
    Lightning takes the flag (>= 2.6; its FSDP strategy unpickles full checkpoints itself,
    which the check has vetted)."""
    import pickle

    if ckpt_path is None:
        trainer.fit(module, loader)
        return
    check_checkpoint(ckpt_path)
    if "weights_only" in inspect.signature(trainer.fit).parameters:
        try:
            trainer.fit(module, loader, ckpt_path=ckpt_path, weights_only=True)
        except pickle.UnpicklingError:
            load_checkpoint(ckpt_path)  # raises the same refusal with a plain message
            raise
    else:
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


class BlockFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` (full-state checkpoints: one ``last.ckpt`` file written
    by rank 0 through the Trainer's ``CheckpointIO``), on any device.

    Lightning refuses ``strategy="fsdp"`` (the registered name or the class itself) unless
    the accelerator is CUDA; torch's FSDP itself also runs on CPU with the gloo backend,
    which is how unifyreg's tests try it. Two things differ on the CPU only: FSDP is given
    the CPU as its device (Lightning passes none, which torch's FSDP then refuses), and
    full state dicts are gathered without ``offload_to_cpu`` (on a CPU device that
    offload frees the memory it then clones: a segmentation fault, measured with torch
    2.13). Behaviour is otherwise Lightning's own.
    """

    @contextmanager
    def _cpu_safe_state_dicts(self) -> Iterator[None]:
        """On the CPU, Lightning's full-state-dict context without ``offload_to_cpu``."""
        if self.root_device.type != "cpu":
            yield
            return
        import lightning.pytorch.strategies.fsdp as lightning_fsdp
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.api import FullOptimStateDictConfig

        def full_state_dict_context(module: Any, world_size: int, rank0_only: bool = True):
            return FSDP.state_dict_type(
                module=module,
                state_dict_type=StateDictType.FULL_STATE_DICT,
                state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                optim_state_dict_config=FullOptimStateDictConfig(
                    offload_to_cpu=False, rank0_only=rank0_only
                ),
            )

        original = lightning_fsdp._get_full_state_dict_context
        lightning_fsdp._get_full_state_dict_context = full_state_dict_context
        try:
            yield
        finally:
            lightning_fsdp._get_full_state_dict_context = original

    def lightning_module_state_dict(self) -> dict[str, Any]:
        with self._cpu_safe_state_dicts():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        with self._cpu_safe_state_dicts():
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        with self._cpu_safe_state_dicts():
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def _setup_model(self, model: Any) -> Any:
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        import torch
        from lightning.pytorch.strategies.fsdp import (
            _move_torchmetrics_to_device,
            _setup_activation_checkpointing,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
        _move_torchmetrics_to_device(model, self.root_device)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model


def build_strategy(name: str, adapter: Any) -> Any:
    """The Lightning strategy for a ``strategy`` config value: ``"fsdp"`` gives a
    :class:`BlockFSDPStrategy` that wraps each block of the adapter's layer stack
    (``auto_wrap_policy`` = the block class: one FSDP unit per decoder layer, so a rank
    holds one full layer at a time); any other name goes to Lightning unchanged."""
    if name != "fsdp":
        return name
    blocks, _ = adapter.layer_stack.modules(adapter.base_model)
    return BlockFSDPStrategy(auto_wrap_policy={type(blocks[0])})
