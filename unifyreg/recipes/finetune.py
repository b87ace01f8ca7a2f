"""Recipe ``finetune``: fine-tune a UMM through its adapter and probe it every epoch.

Steps, in order:

1. seed; training examples (``data``) and the fixed probe set (``probe_set``): example
   sources or JSONL manifests, the adapter's defaults when empty;
2. load the model through its adapter (``model.adapter``, ``model.path``; an empty path
   takes the adapter's default model: the toy base, built first if needed); check the
   probed and regularized layers against it;
3. LoRA through peft (``lora.enabled``), targets from the adapter's defaults;
4. ``UMMModule``: task loss plus, when ``loss.w_ctx`` or ``loss.w_div`` > 0, the
   contextual-prediction regularizer (:mod:`unifyreg.losses`); AdamW + warm-up/cosine;
5. callbacks: ``EntropyProbe`` (epoch 0 baseline, then every ``every_n_epochs``),
   Lightning's ``ModelCheckpoint`` (``last.ckpt`` after every epoch, written atomically),
   ``LearningRateMonitor``, a progress bar; loggers (``loggers``): CSV, TensorBoard,
   wandb (offline unless ``WANDB_MODE=online``: ``run_dir/wandb``), MLflow (a file store
   at ``run_dir/mlruns`` unless ``MLFLOW_TRACKING_URI`` is set), each under ``run_dir``;
6. ``Trainer.fit`` (``resume=last`` continues from ``run_dir/checkpoints/last.ckpt``,
   loaded with ``weights_only=True``);
7. save (rank 0) the LoRA adapter (``run_dir/lora``) and, for adapters that ask for it
   (the toy), a merged model (``run_dir/merged``, loadable by ``unifyreg eval
   model_path=...``); under FSDP from the gathered full weights.

``--dry-run`` stops after step 5: every file, the model directory, the layers and the
Trainer's settings are checked, nothing is trained.

Run directory layout: ``config.yaml``, ``checkpoints/``, ``logs/version_N/metrics.csv``
(one version per start or resume), ``tensorboard/``, ``probe/`` (``probe_history.jsonl``,
per-epoch results, figures), ``lora/``, ``merged/``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from unifyreg.callbacks import EntropyProbe, last_checkpoint
from unifyreg.config import ConfigError, FinetuneConfig, to_yaml
from unifyreg.fileio import atomic_directory, atomic_write_text
from unifyreg.losses import ContextualPredictionLoss
from unifyreg.module import UMMModule, apply_lora, example_loader, trainable_parameter_count
from unifyreg.recipes.common import (
    check_layers,
    drop_examples_that_do_not_fit,
    load_adapter,
    load_probe_set,
    load_training_examples,
    model_directory,
)
from unifyreg.sources import example_source, resolve_source
from unifyreg.trainer import (
    AtomicCheckpointIO,
    build_strategy,
    check_checkpoint,
    fit,
    progress_bar,
)

__all__ = ["TrainerParts", "build_trainer_parts", "close_loggers", "resolve_resume", "run"]


def resolve_resume(cfg: FinetuneConfig) -> str | None:
    """The checkpoint to resume from, or None (``resume=last`` without one starts fresh).
    The checkpoint is checked first (:func:`unifyreg.trainer.check_checkpoint`): a missing,
    truncated or corrupted one, or one holding code, is a ConfigError naming the file,
    raised before anything in the run directory is touched."""
    if not cfg.resume:
        return None
    if cfg.resume == "last":
        last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
        if not last.is_file():
            print(f"resume=last: no {last} yet, starting fresh")
            return None
        path = last
    else:
        path = Path(cfg.resume)
        if not path.is_file():
            raise ConfigError(f"resume: checkpoint {str(path)!r} does not exist")
    try:
        check_checkpoint(path)
    except ConfigError as error:
        raise ConfigError(f"resume: {error}") from None
    return str(path)


@dataclass
class TrainerParts:
    """Everything a fine-tune needs, built from its config."""

    adapter: Any
    module: UMMModule
    loader: Any
    probe: EntropyProbe
    trainer: L.Trainer


def _require(package: str, logger: str) -> None:
    import importlib.util

    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(
            f"loggers: {logger!r} needs the {package!r} package, which is not installed "
            "(pip install 'unifyreg[loggers]')"
        )


def _loggers(cfg: FinetuneConfig, run_dir: Path) -> list:
    """The Lightning loggers ``cfg.loggers`` names (module docstring)."""
    import os

    loggers = []
    if "csv" in cfg.loggers:
        # A new version per (re)start: Lightning's CSV writer deletes an existing
        # metrics.csv of the same version, which would lose a resumed run's history.
        loggers.append(CSVLogger(run_dir, name="logs"))
    if "tensorboard" in cfg.loggers:
        loggers.append(
            TensorBoardLogger(run_dir, name="tensorboard", version=0, default_hp_metric=False)
        )
    if "wandb" in cfg.loggers:
        _require("wandb", "wandb")
        from lightning.pytorch.loggers import WandbLogger

        # Offline (files under run_dir/wandb, `wandb sync` them later) unless asked online.
        offline = os.environ.get("WANDB_MODE", "offline") != "online"
        loggers.append(
            WandbLogger(name=run_dir.name, save_dir=run_dir, offline=offline, project="unifyreg")
        )
    if "mlflow" in cfg.loggers:
        _require("mlflow", "mlflow")
        from lightning.pytorch.loggers import MLFlowLogger

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow >= 3.7 keeps its file store in maintenance mode and refuses it unless
            # this is set; a file store under the run directory needs no server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        logger = MLFlowLogger(experiment_name="unifyreg", run_name=run_dir.name, tracking_uri=uri)
        # MLflow sets MLFLOW_TRACKING_URI for the whole process; close_loggers puts it back.
        logger._unifyreg_previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
        loggers.append(logger)
    return loggers


def build_trainer_parts(cfg: FinetuneConfig) -> TrainerParts:
    """Adapter, module, train loader, probe callback and Trainer for ``cfg``."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = Path(cfg.run_dir)
    adapter_name = cfg.model.adapter
    train_examples, skipped_train = load_training_examples(
        cfg.data, adapter_name, cfg.pretrain, cfg.on_bad_example
    )
    probe_examples, skipped_probe = load_probe_set(
        cfg.probe_set, adapter_name, cfg.pretrain, cfg.on_bad_example
    )
    adapter = load_adapter(cfg.model, cfg.pretrain)
    check_layers(adapter, cfg.probe.layers, "probe.layers")
    check_layers(adapter, cfg.loss.div_layers, "loss.div_layers")
    _check_ctx_mode(adapter, cfg)
    if cfg.data_variant:
        train_examples = _apply_variant(adapter, cfg, train_examples)
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
    # Skip counts are logged for manifests only (a registered source has no bad lines).
    from_manifest = {
        key: example_source(resolve_source(value, adapter_name, key)) is None
        for key, value in (("data", cfg.data), ("probe_set", cfg.probe_set))
    }
    if cfg.lora.enabled:
        try:
            apply_lora(adapter, cfg.lora)
        except ValueError as error:
            raise ConfigError(f"lora.target_modules: {error}") from None
    loader = example_loader(
        adapter, train_examples, cfg.batch_size, shuffle=True, seed=cfg.seed,
        world_size=max(1, cfg.devices),
    )  # fmt: skip
    steps_per_epoch = max(1, len(loader))
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.max_epochs * steps_per_epoch
    loss_terms = []
    if cfg.loss.active:
        loss_terms.append(ContextualPredictionLoss(cfg.loss, adapter.mask_width, seed=cfg.seed))
    module = UMMModule(
        adapter,
        cfg.optim,
        total_steps=total_steps,
        loss_terms=loss_terms,
        hidden_states_for_terms=cfg.loss.w_div > 0,
        skipped_train_examples=skipped_train if from_manifest["data"] else None,
        text_weight=cfg.loss.text_weight,
        image_weight=cfg.loss.image_weight,
    )
    probe = EntropyProbe(
        probe_examples,
        probe=cfg.probe,
        every_n_epochs=cfg.every_n_epochs,
        probe_at_start=cfg.probe_at_start,
        output_dir=run_dir / "probe",
        figures=cfg.probe_figures,
        skipped_examples=skipped_probe if from_manifest["probe_set"] else None,
    )
    loggers = _loggers(cfg, run_dir)
    callbacks = [probe, last_checkpoint(run_dir / "checkpoints"), progress_bar()]
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    try:
        strategy = build_strategy(cfg.strategy, adapter)
        trainer = _trainer(cfg, run_dir, loggers, callbacks, steps_per_epoch, strategy)
        _check_strategy_device(trainer)
    except (MisconfigurationException, ValueError, TypeError, RuntimeError) as error:
        message = str(error).strip().splitlines()[0]
        raise ConfigError(
            f"accelerator/devices/strategy/precision ({cfg.accelerator}, {cfg.devices}, "
            f"{cfg.strategy}, {cfg.precision}): {message}"
        ) from None
    if cfg.probe.responses == "generated" and trainer.world_size > 1:
        from unifyreg.callbacks import _collective_forward

        if _collective_forward(trainer.strategy):
            raise ConfigError(
                "probe.responses: 'generated' cannot run under a sharded strategy (FSDP, "
                "DeepSpeed: generation is not a fixed number of collective forward passes); "
                "use 'reference'"
            )
    return TrainerParts(adapter, module, loader, probe, trainer)


def _check_strategy_device(trainer: L.Trainer) -> None:
    """Lightning's DeepSpeed strategy runs on CUDA only but says so only when training
    starts: say it now (a RuntimeError, reported as a config error)."""
    from lightning.pytorch.accelerators import CUDAAccelerator
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if isinstance(trainer.strategy, DeepSpeedStrategy) and not isinstance(
        trainer.accelerator, CUDAAccelerator
    ):
        raise RuntimeError(
            "Lightning's DeepSpeed strategy runs on CUDA GPUs only; on this accelerator "
            "use strategy=fsdp"
        )


def _trainer(
    cfg: FinetuneConfig, run_dir: Path, loggers, callbacks, steps_per_epoch: int, strategy: Any
):
    return L.Trainer(
        max_epochs=cfg.max_epochs,
        max_steps=cfg.max_steps,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=strategy,
        precision=cfg.precision,
        logger=loggers or False,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        gradient_clip_val=cfg.optim.grad_clip or None,
        log_every_n_steps=min(50, steps_per_epoch),
        enable_model_summary=False,
        default_root_dir=run_dir,
    )


def _check_ctx_mode(adapter, cfg: FinetuneConfig) -> None:
    """``L_ctx``'s mode against what the model can take (ConfigError naming the key)."""
    if cfg.loss.w_ctx <= 0:
        return
    if cfg.loss.ctx_mode == "bidirectional" and not getattr(
        adapter, "supports_masked_prediction", False
    ):
        raise ConfigError(
            f"loss.ctx_mode=bidirectional needs masked prediction (a 4-D attention mask); "
            f"adapter {cfg.model.adapter!r} does not take it: use loss.ctx_mode=causal"
        )
    if cfg.loss.ctx_mode == "causal" and adapter.image_objective != "next_token":
        what = (
            "continuous latents, flow matching"
            if adapter.image_objective == "flow"
            else "bidirectional image attention"
        )
        raise ConfigError(
            "loss.ctx_mode=causal scores next-token image targets, which this model's "
            f"{adapter.image_objective} image objective ({what}) does "
            "not have: use loss.ctx_mode=bidirectional"
        )


def _apply_variant(adapter, cfg: FinetuneConfig, examples: list) -> list:
    """The training examples under ``data_variant``, and the adapter settings it asks for."""
    source = example_source(resolve_source(cfg.data, cfg.model.adapter, "data"))
    if source is None or not hasattr(source, "variant"):
        raise ConfigError(
            f"data_variant={cfg.data_variant}: the data source {cfg.data or 'default'!r} has "
            "no variants (the toy source has: reca, reason_then_draw)"
        )
    examples, settings = source.variant(cfg.data_variant, examples, 0)  # same data every seed
    for name, value in settings.items():
        setattr(adapter, name, value)
    return examples


def save_outputs(adapter, cfg: FinetuneConfig) -> dict[str, Path]:
    """Save the LoRA weights (peft ``save_pretrained``, safetensors) and, for adapters
    that ask for it (``save_merged_after_finetune``), a merged model; each directory is
    staged and renamed into place (atomic)."""
    run_dir = Path(cfg.run_dir)
    paths = {}
    if cfg.lora.enabled:
        with atomic_directory(run_dir / "lora") as staging:
            adapter.model.save_pretrained(staging, safe_serialization=True)
        paths["lora"] = run_dir / "lora"
    if adapter.save_merged_after_finetune:
        merged = copy.copy(adapter)
        model = copy.deepcopy(adapter.model)
        merged.model = model.merge_and_unload() if cfg.lora.enabled else model
        with atomic_directory(run_dir / "merged") as staging:
            merged.save(staging)
        paths["merged"] = run_dir / "merged"
    return paths


def close_loggers(trainer: L.Trainer) -> None:
    """Undo what the loggers leave behind in the process after ``fit``, so the next
    fine-tune in it (an ``ablate`` arm) starts clean: a wandb run stays the process's
    active run until ``finish`` (the next run would log into it); MLflow's logger sets the
    process's tracking URI (the next run would log into this run's store)."""
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()
        if isinstance(logger, MLFlowLogger) and hasattr(logger, "_unifyreg_previous_uri"):
            import mlflow

            mlflow.set_tracking_uri(logger._unifyreg_previous_uri)


def unsharded_adapter(parts: TrainerParts, cfg: FinetuneConfig) -> Any:
    """The fine-tuned adapter as one plain model: ``parts.adapter`` itself, or, when the
    strategy shards the parameters (FSDP), a fresh copy (base model + LoRA reloaded)
    holding the gathered full weights on rank 0 (every rank must call this: gathering is
    a collective; the other ranks get None)."""
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = parts.trainer.strategy
    if not isinstance(strategy, FSDPStrategy):
        return parts.adapter
    state = strategy.lightning_module_state_dict()  # full weights on rank 0 only
    if not parts.trainer.is_global_zero:
        return None
    fresh = load_adapter(cfg.model, cfg.pretrain)
    if cfg.lora.enabled:
        apply_lora(fresh, cfg.lora)
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    fresh.model.load_state_dict(weights, strict=True)
    return fresh


def run(cfg: FinetuneConfig, dry_run: bool = False) -> int:
    """Command ``unifyreg finetune`` (``dry_run``: build and check everything, train nothing)."""
    run_dir = Path(cfg.run_dir)
    ckpt_path = resolve_resume(cfg)
    if dry_run and not model_directory(cfg.model, cfg.pretrain, build=False).exists():
        load_training_examples(cfg.data, cfg.model.adapter, cfg.pretrain, cfg.on_bad_example)
        load_probe_set(cfg.probe_set, cfg.model.adapter, cfg.pretrain, cfg.on_bad_example)
        where = model_directory(cfg.model, cfg.pretrain, build=False)
        print(f"dry run: the default model would be built first ({where}); data checked")
        return 0
    parts = build_trainer_parts(cfg)
    adapter = parts.adapter
    trainable, total = trainable_parameter_count(adapter.model)
    summary = (
        f"fine-tuning {cfg.model.adapter}: {len(parts.loader.dataset)} examples, "
        f"{trainable:,} of {total:,} parameters trainable -> {run_dir}"
    )
    if dry_run:
        print(f"dry run: {summary}; {len(parts.probe.examples)} probe examples; nothing trained")
        return 0
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    print(summary + (f" (resuming from {ckpt_path})" if ckpt_path else ""))
    try:
        fit(parts.trainer, parts.module, parts.loader, ckpt_path)  # weights_only=True
    finally:
        close_loggers(parts.trainer)
    final = unsharded_adapter(parts, cfg)
    paths = save_outputs(final, cfg) if parts.trainer.is_global_zero else {}
    for entry in parts.probe.history:
        scores = {
            k.split("/", 1)[1]: round(v, 4)
            for k, v in entry["metrics"].items()
            if k.startswith("unify/")
        }
        print(f"epoch {entry['epoch']}: {scores}")
    print(f"run directory: {run_dir} ({', '.join(str(p) for p in paths.values())})")
    return 0
