"""Recipe ``finetune``: fine-tune a UMM through its adapter and probe it every epoch.

Steps, in order:

1. seed; load the model through its adapter (``model.adapter``, ``model.path``; the toy
   base is built first if needed);
2. training examples (``data``: the toy world's ``finetune`` split or a JSONL manifest)
   and the fixed probe set (``probe_set``);
3. LoRA through peft (``lora.enabled``), targets from the adapter's defaults;
4. ``UMMModule``: task loss plus, when ``loss.w_ctx`` or ``loss.w_div`` > 0, the
   contextual-prediction regularizer (:mod:`unifyreg.losses`); AdamW + warm-up/cosine;
5. callbacks: ``EntropyProbe`` (epoch 0 baseline, then every ``every_n_epochs``),
   ``LastCheckpoint`` (``last.ckpt`` after every epoch, atomically), a progress bar;
   loggers: CSV and TensorBoard under ``run_dir``;
6. ``Trainer.fit`` (``resume=last`` continues from ``run_dir/checkpoints/last.ckpt``,
   loaded with ``weights_only=True``);
7. save the LoRA adapter (``run_dir/lora``) and, for the toy, a merged model
   (``run_dir/merged``, loadable by ``unifyreg eval model_path=...``).

Run directory layout: ``config.yaml``, ``checkpoints/``, ``logs/version_N/metrics.csv``
(one version per start or resume),
``tensorboard/``, ``probe/`` (``probe_history.jsonl``, per-epoch results, figures),
``lora/``, ``merged/``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from unifyreg.callbacks import EntropyProbe, LastCheckpoint
from unifyreg.config import ConfigError, FinetuneConfig, to_yaml
from unifyreg.fileio import atomic_directory, atomic_write_text
from unifyreg.losses import ContextualPredictionLoss
from unifyreg.module import UMMModule, apply_lora, example_loader, trainable_parameter_count
from unifyreg.recipes.common import (
    drop_examples_that_do_not_fit,
    fit,
    load_adapter,
    load_probe_set,
    load_training_examples,
)
from unifyreg.recipes.pretrain_toy import progress_bar

__all__ = ["build_trainer_parts", "resolve_resume", "run"]


def resolve_resume(cfg: FinetuneConfig) -> str | None:
    """The checkpoint to resume from, or None (``resume=last`` without one starts fresh)."""
    if not cfg.resume:
        return None
    if cfg.resume == "last":
        last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
        if last.is_file():
            return str(last)
        print(f"resume=last: no {last} yet, starting fresh")
        return None
    path = Path(cfg.resume)
    if not path.is_file():
        raise ConfigError(f"resume: checkpoint {str(path)!r} does not exist")
    return str(path)


def build_trainer_parts(cfg: FinetuneConfig):
    """(adapter, module, train loader, probe callback, trainer) for ``cfg``."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = Path(cfg.run_dir)
    world = cfg.pretrain.world
    train_examples, skipped_train = load_training_examples(cfg.data, world, cfg.on_bad_example)
    probe_examples, skipped_probe = load_probe_set(cfg.probe_set, world, cfg.on_bad_example)
    adapter = load_adapter(cfg.model, cfg.pretrain)
    # Manifest examples the model cannot take (too long, say) stop the run here, naming
    # file:line, or are skipped and counted; the counts are logged (data/skipped_examples,
    # probe/skipped_examples).
    train_examples, too_long = drop_examples_that_do_not_fit(
        adapter, train_examples, cfg.on_bad_example, "data"
    )
    skipped_train += too_long
    probe_examples, too_long = drop_examples_that_do_not_fit(
        adapter, probe_examples, cfg.on_bad_example, "probe_set"
    )
    skipped_probe += too_long
    for key, count in (("data", skipped_train), ("probe_set", skipped_probe)):
        if count:
            print(f"{key}: {count} bad example(s) skipped (on_bad_example=skip)")
    if cfg.lora.enabled:
        apply_lora(adapter, cfg.lora)
    loader = example_loader(adapter, train_examples, cfg.batch_size, shuffle=True, seed=cfg.seed)
    steps_per_epoch = max(1, len(loader))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.max_epochs * steps_per_epoch
    loss_terms = []
    if cfg.loss.active:
        loss_terms.append(ContextualPredictionLoss(cfg.loss, adapter.hidden_size, seed=cfg.seed))
    module = UMMModule(
        adapter,
        cfg.optim,
        total_steps=total_steps,
        loss_terms=loss_terms,
        hidden_states_for_terms=cfg.loss.w_div > 0,
        skipped_train_examples=skipped_train if cfg.data != "toy" else None,
    )
    probe = EntropyProbe(
        probe_examples,
        probe=cfg.probe,
        every_n_epochs=cfg.every_n_epochs,
        probe_at_start=cfg.probe_at_start,
        output_dir=run_dir / "probe",
        figures=cfg.probe_figures,
        skipped_examples=skipped_probe if cfg.probe_set != "toy" else None,
    )
    loggers = []
    if "csv" in cfg.loggers:
        # A new version per (re)start: Lightning's CSV writer deletes an existing
        # metrics.csv of the same version, which would lose a resumed run's history.
        loggers.append(CSVLogger(run_dir, name="logs"))
    if "tensorboard" in cfg.loggers:
        loggers.append(
            TensorBoardLogger(run_dir, name="tensorboard", version=0, default_hp_metric=False)
        )
    trainer = L.Trainer(
        max_epochs=cfg.max_epochs,
        max_steps=cfg.max_steps,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        precision=cfg.precision,
        logger=loggers or False,
        # last.ckpt after every epoch, after the probe (so it holds that epoch's probe).
        callbacks=[probe, LastCheckpoint(run_dir / "checkpoints" / "last.ckpt"), progress_bar()],
        enable_checkpointing=False,  # no other checkpoint files
        gradient_clip_val=cfg.optim.grad_clip or None,
        log_every_n_steps=min(50, steps_per_epoch),
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
    return adapter, module, loader, probe, trainer


def save_outputs(adapter, cfg: FinetuneConfig) -> dict[str, Path]:
    """Save the LoRA weights (peft ``save_pretrained``, safetensors) and, for the toy, a
    merged model; each directory is staged and renamed into place (atomic)."""
    run_dir = Path(cfg.run_dir)
    paths = {}
    if cfg.lora.enabled:
        with atomic_directory(run_dir / "lora") as staging:
            adapter.model.save_pretrained(staging, safe_serialization=True)
        paths["lora"] = run_dir / "lora"
    if cfg.model.adapter == "toy":
        merged = copy.copy(adapter)
        model = copy.deepcopy(adapter.model)
        merged.model = model.merge_and_unload() if cfg.lora.enabled else model
        with atomic_directory(run_dir / "merged") as staging:
            merged.save(staging)
        paths["merged"] = run_dir / "merged"
    return paths


def run(cfg: FinetuneConfig) -> int:
    """Command ``unifyreg finetune``."""
    run_dir = Path(cfg.run_dir)
    ckpt_path = resolve_resume(cfg)
    adapter, module, loader, probe, trainer = build_trainer_parts(cfg)
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    trainable, total = trainable_parameter_count(adapter.model)
    print(
        f"fine-tuning {cfg.model.adapter}: {len(loader.dataset)} examples, "
        f"{trainable:,} of {total:,} parameters trainable -> {run_dir}"
        + (f" (resuming from {ckpt_path})" if ckpt_path else "")
    )
    fit(trainer, module, loader, ckpt_path)  # a checkpoint loads with weights_only=True
    paths = save_outputs(adapter, cfg)
    for entry in probe.history:
        scores = {
            k.split("/", 1)[1]: round(v, 4)
            for k, v in entry["metrics"].items()
            if k.startswith("unify/")
        }
        print(f"epoch {entry['epoch']}: {scores}")
    print(f"run directory: {run_dir} ({', '.join(str(p) for p in paths.values())})")
    return 0
