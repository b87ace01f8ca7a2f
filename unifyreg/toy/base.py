"""The toy base: its cache identity, and building (or reusing) it.

A base is identified by everything that changes its trained weights
(:func:`cache_key`): the world's settings and a fingerprint of its content, the model
size, the image objective, the regularizer's settings, the toy adapter's sequence layout
version, ``optim``, ``max_steps``, ``batch_size`` and ``seed``. It lives in
``cache_dir/toy-base-<key>`` (:func:`cache_path`).

:func:`build_toy_base` trains it from scratch on the world's ``pretrain`` split
(Lightning, progress bar, CSV log, a ``last.ckpt`` every ``checkpoint_every_n_steps``),
saves it with ``save_pretrained`` + tokenizer, evaluates it exactly and renames it into
the cache. Training happens in ``<cache>.partial/``; only a finished model is renamed to
the cache path, so an interrupted build never leaves a half-written base, and building
again resumes from the partial run's ``last.ckpt``. Concurrent builders (DDP ranks,
parallel runs) wait on a lock file for one build.

**Shipped bases.** The package carries the trained default bases (``unifyreg/toy/bases/
<objective>/``: the default config with ``objective`` ``ar`` and ``contextual``, a few MB
of safetensors each, with the cache key they were built for in ``shipped.json``). When a
config's cache key equals a shipped base's, that base is used as it is: no training, the
same weights on every machine (a rebuilt base differs between CPU types, BENCHMARKS.md).
``force=true`` trains from scratch anyway. ``python scripts/ship_toy_bases.py`` rebuilds
and replaces them; a test fails when a shipped base no longer matches the key its config
and world give.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from unifyreg.adapters.toy import ADAPTER_FILE, ToyAdapter
from unifyreg.config import PretrainToyConfig, config_hash, to_yaml
from unifyreg.fileio import atomic_write_json, atomic_write_text
from unifyreg.losses import ContextualPredictionLoss
from unifyreg.module import UMMModule, example_loader
from unifyreg.toy.evaluation import accuracy_table, evaluate_examples
from unifyreg.toy.model import LAYOUT_VERSION
from unifyreg.toy.splits import WorldConfig, build_splits
from unifyreg.toy.tokenizer import WordTokenizer
from unifyreg.trainer import AtomicCheckpointIO, fit, progress_bar

__all__ = [
    "EVAL_FILE",
    "SHIPPED_DIR",
    "SHIPPED_FILE",
    "build_toy_base",
    "cache_key",
    "cache_path",
    "default_model_path",
    "shipped_base",
]

EVAL_FILE = "eval.json"
#: Where the shipped bases live, one directory per objective.
SHIPPED_DIR = Path(__file__).resolve().parent / "bases"
SHIPPED_FILE = "shipped.json"


def world_fingerprint(world: WorldConfig) -> str:
    """Hash of the world's vocabulary and the first examples of every split."""
    splits = build_splits(world)
    sample = {name: [e.to_dict() for e in split[:20]] for name, split in splits.items()}
    return config_hash({"words": list(WordTokenizer.for_world(world).words), "sample": sample})


#: ``loss`` keys added after the cache key was defined, with their defaults: left out of
#: the key while at the default (they do not change the weights then), so existing caches
#: and the shipped bases keep their keys.
LOSS_KEYS_ADDED_LATER = {"text_weight": None, "image_weight": None}
#: ``loss`` keys that choose how a loss is computed, not what it is: never in the key.
LOSS_KEYS_OF_METHOD = ("ctx_reuse_prefix",)


def cache_key(cfg: PretrainToyConfig) -> str:
    """Hash of everything that changes the trained weights (module docstring), including
    a fingerprint of the world's content (so a changed generator or vocabulary retrains)."""
    loss = {
        key: value
        for key, value in dataclasses.asdict(cfg.loss).items()
        if key not in LOSS_KEYS_OF_METHOD
        and (key not in LOSS_KEYS_ADDED_LATER or value != LOSS_KEYS_ADDED_LATER[key])
    }
    if cfg.loss.w_ctx == 0:
        # The mode changes nothing while L_ctx is off; keyed at its first default
        # ("causal") so bases built before the default became "bidirectional" keep their keys.
        loss["ctx_mode"] = "causal"
    return config_hash(
        {
            "world": dataclasses.asdict(cfg.world),
            "world_content": world_fingerprint(cfg.world),
            "model": dataclasses.asdict(cfg.model),
            "objective": cfg.objective,
            "loss": loss,
            "layout_version": LAYOUT_VERSION,
            "optim": dataclasses.asdict(cfg.optim),
            "max_steps": cfg.max_steps,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
        }
    )


def cache_path(cfg: PretrainToyConfig) -> Path:
    """Where the trained base lives: ``cache_dir/toy-base-<key>``."""
    return Path(cfg.cache_dir) / f"toy-base-{cache_key(cfg)}"


def default_model_path(pretrain: PretrainToyConfig | None = None, build: bool = True) -> Path:
    """The toy adapter's default model (``model.path`` empty): the base of ``pretrain``
    (defaults if None), built first if it is not cached (``build=False``: its path only,
    which may not exist yet)."""
    pretrain = pretrain or PretrainToyConfig()
    if build:
        return build_toy_base(pretrain)
    return shipped_base(pretrain) or cache_path(pretrain)


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


def shipped_base(cfg: PretrainToyConfig) -> Path | None:
    """The shipped base built for exactly ``cfg`` (the same cache key), or None."""
    key = None
    for directory in sorted(SHIPPED_DIR.glob("*")):
        record = directory / SHIPPED_FILE
        if not (record.is_file() and (directory / ADAPTER_FILE).is_file()):
            continue
        key = key or cache_key(cfg)
        if json.loads(record.read_text()).get("cache_key") == key:
            return directory
    return None


def build_toy_base(cfg: PretrainToyConfig, log=print) -> Path:
    """Train (or reuse) the toy base for ``cfg``; returns its directory: a shipped base
    built for this config (module docstring), else the cache (trained first if absent).
    ``force=true`` always trains into the cache."""
    final = cache_path(cfg)
    if not cfg.force:
        shipped = shipped_base(cfg)
        if shipped is not None:
            log(f"using the shipped toy base {shipped} (this config's; force=true retrains)")
            return shipped
    if (final / ADAPTER_FILE).is_file() and not cfg.force:
        log(f"reusing cached toy base {final}")
        return final
    with _build_lock(final.with_name(final.name + ".lock")):
        if (final / ADAPTER_FILE).is_file() and not cfg.force:
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
    adapter = ToyAdapter.create(
        tokenizer, cfg.world.grid_size, cfg.model, seed=cfg.seed, objective=cfg.objective
    )
    terms = []
    if cfg.loss.active:  # the regularizer during pre-training
        terms.append(ContextualPredictionLoss(cfg.loss, adapter.hidden_size, seed=cfg.seed))
    module = UMMModule(
        adapter,
        cfg.optim,
        total_steps=cfg.max_steps,
        loss_terms=terms,
        hidden_states_for_terms=cfg.loss.w_div > 0,
        text_weight=cfg.loss.text_weight,
        image_weight=cfg.loss.image_weight,
    )
    loader = example_loader(
        adapter, splits["pretrain"], cfg.batch_size, shuffle=True, seed=cfg.seed
    )
    trainer = L.Trainer(
        max_steps=cfg.max_steps,
        accelerator=cfg.accelerator,
        devices=1,
        logger=CSVLogger(partial, name="logs", version=0),
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            ModelCheckpoint(
                dirpath=checkpoints,
                save_last=True,
                save_top_k=0,
                every_n_train_steps=cfg.checkpoint_every_n_steps,
            ),
            progress_bar(),
            LearningRateMonitor(logging_interval="step"),
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
