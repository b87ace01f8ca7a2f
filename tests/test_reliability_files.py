"""Reliability of the run's files (docs/reliability.md, "Interruption"): a truncated or
corrupted `last.ckpt` is refused with a clear error naming it and nothing else is
touched; a write that fails midway (a full disk, simulated) loses no earlier file, and
the run resumes once there is space."""

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from unifyreg.cli import main
from unifyreg.config import ConfigError
from unifyreg.trainer import check_checkpoint, fit, load_checkpoint

RUN = ["probe.layers=[0,2]", "batch_size=32", "accelerator=cpu", "loggers=[csv]"]


def _snapshot(directory):
    """Every file under ``directory``: relative path -> (sha256, mtime_ns)."""
    return {
        str(p.relative_to(directory)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(Path(directory).rglob("*"))
        if p.is_file()
    }


def _history_epochs(run_dir):
    lines = (Path(run_dir) / "probe" / "probe_history.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines]


def _corruptions(good: bytes):
    middle = bytearray(good)
    for i in range(len(good) // 2, len(good) // 2 + 64):
        middle[i] ^= 0xFF  # inside a tensor's bytes: torch.load alone loads this silently
    return {
        "truncated": good[: len(good) // 2],
        "bytes flipped in a tensor": bytes(middle),
        "empty": b"",
        "not a checkpoint": b"this is not a checkpoint\n" * 40,
    }


def test_a_truncated_or_corrupted_last_ckpt_is_refused_naming_it_and_nothing_is_touched(
    tiny_base_overrides, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    args = ["finetune", *tiny_base_overrides, *RUN, f"run_dir={run_dir}"]
    assert main([*args, "max_epochs=1"]) == 0
    last = run_dir / "checkpoints" / "last.ckpt"
    good = last.read_bytes()
    check_checkpoint(last)  # our own checkpoint passes
    capsys.readouterr()
    for name, data in _corruptions(good).items():
        last.write_bytes(data)
        before = _snapshot(run_dir)
        assert main([*args, "max_epochs=2", "resume=last"]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith(
            f"unifyreg finetune: config error: resume: checkpoint '{last}' is truncated or "
            "corrupted ("
        ), (name, err)
        assert "no file was changed" in err
        assert _snapshot(run_dir) == before, name  # no file written, changed or added
    detail = {
        "truncated": "not a zip archive",
        "bytes flipped in a tensor": "fails its CRC-32 check",
        "empty": "empty file",
    }
    for name, data in _corruptions(good).items():
        last.write_bytes(data)
        with pytest.raises(ConfigError, match=detail.get(name, "not a zip archive")):
            check_checkpoint(last)

    # The other entry points that resume (pretrain-toy, ablate) go through fit(), which
    # checks before the Trainer sees the file.
    class Untouched:
        def fit(self, *args, **kwargs):
            raise AssertionError("the Trainer must not be reached")

    with pytest.raises(ConfigError, match="is truncated or corrupted"):
        fit(Untouched(), None, None, str(last))
    last.write_bytes(good)
    assert main([*args, "max_epochs=2", "resume=last"]) == 0  # the intact file resumes
    assert _history_epochs(run_dir) == [0, 1, 2]


class _FullDisk:
    """Simulates a disk that fills up: once ``trigger`` is opened for writing (the
    ``n``-th time), every write under ``root`` writes half its data and raises
    ``OSError(ENOSPC)``. Also records what each file under ``root`` held when it was
    renamed into place, to show later that no earlier file was lost or changed."""

    def __init__(self, root, trigger, n=1):
        self.root, self.trigger, self.n = str(root), trigger, n
        self.full = False
        self.opened = 0
        self.written = {}
        self.real_fdopen, self.real_replace = os.fdopen, os.replace

    def fdopen(self, fd, *args, **kwargs):
        handle = self.real_fdopen(fd, *args, **kwargs)
        target = os.readlink(f"/proc/self/fd/{fd}")
        if not target.startswith(self.root):
            return handle
        if Path(target).name.startswith(f".{self.trigger}."):
            self.opened += 1
            self.full = self.full or self.opened == self.n
        return _Filling(handle, self)

    def replace(self, src, dst):
        if str(dst).startswith(self.root):
            self.written[str(dst)] = hashlib.sha256(Path(src).read_bytes()).hexdigest()
        return self.real_replace(src, dst)


class _Filling:
    def __init__(self, handle, disk):
        self._handle, self._disk = handle, disk

    def write(self, data):
        if self._disk.full:
            self._handle.write(data[: len(data) // 2])
            self._handle.flush()  # the half that fitted really reaches the file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)


@pytest.mark.parametrize(
    "trigger, n, on_disk",
    [
        ("result_epoch_002.json", 1, [0, 1]),  # the probe's result file after epoch 2
        ("last.ckpt", 2, [0, 1, 2]),  # the checkpoint after epoch 2 (the probe is written)
    ],
)
def test_a_write_that_fails_midway_loses_no_earlier_file_and_the_run_resumes(
    trigger, n, on_disk, tiny_base_overrides, tmp_path, monkeypatch, capsys
):
    run_dir = tmp_path / "run"
    args = ["finetune", *tiny_base_overrides, *RUN, "max_epochs=3", f"run_dir={run_dir}"]
    disk = _FullDisk(run_dir, trigger, n)
    monkeypatch.setattr(os, "fdopen", disk.fdopen)
    monkeypatch.setattr(os, "replace", disk.replace)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert (
        f"unifyreg finetune: write failed: [Errno {errno.ENOSPC}] No space left on device:" in err
    )
    assert f"{trigger}'" in err and "resume=last" in err
    monkeypatch.undo()  # space again

    # Every file renamed into place before the failure is there, byte for byte as written;
    # the failed write left no staging file and did not replace its target.
    assert disk.written
    for path, digest in disk.written.items():
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest, path
    assert not list(run_dir.rglob("*.tmp"))
    if trigger.startswith("result_"):
        assert not (run_dir / "probe" / trigger).exists()
    assert _history_epochs(run_dir) == on_disk
    # The checkpoint is the one after epoch 1 (3 steps; Lightning counts epochs from 0).
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (0, 3)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run_dir"] == str(run_dir)

    assert main([*args, "resume=last"]) == 0
    assert _history_epochs(run_dir) == [0, 1, 2, 3]
