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
   ``ModelCheckpoint`` (``last.ckpt`` every epoch), a progress bar;
   loggers: CSV and TensorBoard under ``run_dir``;
6. ``Trainer.fit`` (``resume=last`` continues from ``run_dir/checkpoints/last.ckpt``);
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
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from unifyreg.callbacks import EntropyProbe
from unifyreg.config import ConfigError, FinetuneConfig, to_yaml
from unifyreg.fileio import atomic_write_text
from unifyreg.losses import ContextualPredictionLoss
from unifyreg.module import UMMModule, apply_lora, example_loader, trainable_parameter_count
from unifyreg.recipes.common import load_adapter, load_probe_set, load_training_examples
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
    probe_examples, _ = load_probe_set(cfg.probe_set, world, cfg.on_bad_example)
    adapter = load_adapter(cfg.model, cfg.pretrain)
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
    )
    probe = EntropyProbe(
        probe_examples,
        probe=cfg.probe,
        every_n_epochs=cfg.every_n_epochs,
        probe_at_start=cfg.probe_at_start,
        output_dir=run_dir / "probe",
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
        callbacks=[
            probe,
            ModelCheckpoint(
                dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0, every_n_epochs=1
            ),
            progress_bar(),
        ],
        gradient_clip_val=cfg.optim.grad_clip or None,
        log_every_n_steps=min(50, steps_per_epoch),
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
    module.skipped_train_examples = skipped_train
    return adapter, module, loader, probe, trainer


def save_outputs(adapter, cfg: FinetuneConfig) -> dict[str, Path]:
    """Save the LoRA weights (peft ``save_pretrained``) and, for the toy, a merged model."""
    run_dir = Path(cfg.run_dir)
    paths = {}
    if cfg.lora.enabled:
        adapter.model.save_pretrained(run_dir / "lora")
        paths["lora"] = run_dir / "lora"
    if cfg.model.adapter == "toy":
        merged = copy.copy(adapter)
        model = copy.deepcopy(adapter.model)
        merged.model = model.merge_and_unload() if cfg.lora.enabled else model
        merged.save(run_dir / "merged")
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
    trainer.fit(module, loader, ckpt_path=ckpt_path)
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
