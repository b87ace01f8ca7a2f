"""Recipe ``pretrain-toy``: train the toy UMM from scratch on the world's ``pretrain`` split.

Steps: build the world and tokenizer -> a fresh toy decoder -> Lightning ``Trainer.fit``
(progress bar, CSV log, a ``last.ckpt`` every ``checkpoint_every_n_steps``) -> save with
``save_pretrained`` + tokenizer -> exact-match evaluation -> cache.

Training happens in ``<cache>.partial/``; only a finished model is renamed to the cache
path, so an interrupted run never leaves a half-written base, and re-running the command
resumes from the partial run's ``last.ckpt``.
"""

from __future__ import annotations

import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from unifyreg.adapters.toy import ToyAdapter
from unifyreg.config import PretrainToyConfig, to_yaml
from unifyreg.fileio import atomic_write_json, atomic_write_text
from unifyreg.module import UMMModule, example_loader
from unifyreg.recipes.common import fit
from unifyreg.toy.evaluation import accuracy_table, evaluate_examples
from unifyreg.toy.splits import build_splits
from unifyreg.toy.tokenizer import WordTokenizer

__all__ = ["build_toy_base", "progress_bar", "run"]

EVAL_FILE = "eval.json"


def progress_bar() -> TQDMProgressBar:
    """A progress bar that refreshes often on a terminal and rarely in CI logs."""
    return TQDMProgressBar(refresh_rate=1 if sys.stderr.isatty() else 200)


@contextmanager
def _build_lock(path: Path):
    """An exclusive lock file, so concurrent builders (DDP ranks, parallel runs) wait for
    one build instead of racing on the same partial directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            import fcntl
        except ImportError:  # no fcntl (Windows): no cross-process lock
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_toy_base(cfg: PretrainToyConfig, log=print) -> Path:
    """Train (or reuse) the toy base for ``cfg``; returns its cache directory."""
    final = cfg.cache_path()
    if (final / "unifyreg_toy.json").is_file() and not cfg.force:
        log(f"reusing cached toy base {final}")
        return final
    with _build_lock(final.with_name(final.name + ".lock")):
        if (final / "unifyreg_toy.json").is_file() and not cfg.force:
            log(f"reusing toy base {final}, built meanwhile by another process")
            return final
        return _train_toy_base(cfg, final, log)


def _train_toy_base(cfg: PretrainToyConfig, final: Path, log) -> Path:
    partial = final.with_name(final.name + ".partial")
    if cfg.force and partial.exists():
        shutil.rmtree(partial)
    checkpoints = partial / "checkpoints"
    resume = checkpoints / "last.ckpt"

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    splits = build_splits(cfg.world)
    tokenizer = WordTokenizer.for_world(cfg.world)
    adapter = ToyAdapter.create(tokenizer, cfg.world.grid_size, cfg.model, seed=cfg.seed)
    module = UMMModule(adapter, cfg.optim, total_steps=cfg.max_steps)
    loader = example_loader(
        adapter, splits["pretrain"], cfg.batch_size, shuffle=True, seed=cfg.seed
    )
    trainer = L.Trainer(
        max_steps=cfg.max_steps,
        accelerator=cfg.accelerator,
        devices=1,
        logger=CSVLogger(partial, name="logs", version=0),
        callbacks=[
            ModelCheckpoint(
                dirpath=checkpoints,
                save_last=True,
                save_top_k=0,
                every_n_train_steps=cfg.checkpoint_every_n_steps,
            ),
            progress_bar(),
        ],
        gradient_clip_val=cfg.optim.grad_clip or None,
        log_every_n_steps=50,
        enable_model_summary=False,
        default_root_dir=partial,
    )
    log(
        f"pretraining the toy base: {len(splits['pretrain'])} examples, {cfg.max_steps} steps, "
        f"batch {cfg.batch_size} -> {final}"
        + (f" (resuming from {resume})" if resume.is_file() else "")
    )
    start = time.perf_counter()
    fit(trainer, module, loader, str(resume) if resume.is_file() else None)
    train_seconds = time.perf_counter() - start

    staged = partial / "model"
    adapter.save(staged)
    atomic_write_text(staged / "pretrain.yaml", to_yaml(cfg))
    summary: dict = {"train_seconds": train_seconds, "max_steps": cfg.max_steps}
    if cfg.evaluate:
        results = evaluate_examples(
            adapter, {"eval": splits["eval"], "heldout": splits["heldout"]}, cfg.eval_batch_size
        )
        summary.update(results)
        log(accuracy_table(results))
    atomic_write_json(staged / EVAL_FILE, summary)
    logs = partial / "logs"
    if logs.is_dir():
        shutil.move(str(logs), str(staged / "logs"))
    if final.exists():  # force=true over an existing base
        shutil.rmtree(final)
    staged.rename(final)
    shutil.rmtree(partial, ignore_errors=True)
    log(f"toy base saved to {final} (trained in {train_seconds:.0f} s)")
    return final


def run(cfg: PretrainToyConfig) -> int:
    """Command ``unifyreg pretrain-toy``."""
    build_toy_base(cfg)
    return 0
