"""Lightning callbacks: probe unification during fine-tuning.

``EntropyProbe`` runs the paper's two-level probe (:mod:`unifyreg.probing`) on a fixed
probe set every ``every_n_epochs`` epochs (and once before training as the epoch-0
baseline), logs the results to every logger of the Trainer, writes a JSON line per probe
and trajectory figures, and keeps its history in ``state_dict`` so a resumed run
continues it without duplicated or missing epochs.

Logged metric names (``LL`` = the layer index, two digits; step = the global step):

- ``probe/<quantity>/layer_LL``: mean raw value over the probe set (bits), for
  ``<quantity>`` in ``encoding/text``, ``encoding/image``, ``response/text``,
  ``response/image``;
- ``probe_norm/<quantity>/layer_LL``: the same, length-normalised;
- ``unify/encoding_gap``, ``unify/response_split``, ``unify/final_gap``: unifyreg's
  scalar scores (see :mod:`unifyreg.probing`);
- ``probe/epoch``: the epoch label of the probe (0 = before training, e = after e
  epochs);
- ``probe/skipped_examples``: bad lines of the probe-set manifest that were skipped
  (``on_bad_example=skip``; logged when given).

After logging a probe, every logger is flushed (``logger.save()``), so a run killed later
keeps the probes it logged; ``probe_history.jsonl`` is rewritten atomically from the
history, which is the authority when a run is resumed. Figures are built by
:mod:`unifyreg.report`, saved as PNG and sent to every logger that takes matplotlib
figures (TensorBoard's ``add_figure``).

Checkpoints for resuming come from Lightning's own ``ModelCheckpoint``
(:func:`last_checkpoint`); Lightning runs checkpoint callbacks after the others, so the
checkpoint of an epoch holds that epoch's probe whatever the order callbacks are listed in.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from unifyreg.config import ProbeConfig
from unifyreg.fileio import atomic_write_text
from unifyreg.probing import ProbeResult, run_probe
from unifyreg.quantities import QUANTITIES

__all__ = ["FIGURE_SCHEDULES", "EntropyProbe", "last_checkpoint", "probe_metrics"]

#: When ``EntropyProbe`` draws its figures.
FIGURE_SCHEDULES = ("end", "every", "never")


def probe_metrics(result: ProbeResult) -> dict[str, float]:
    """Flat metric dict of a probe result (names in the module docstring)."""
    metrics: dict[str, float] = {}
    for quantity in QUANTITIES:
        for prefix, normalized in (("probe", False), ("probe_norm", True)):
            mean = result.pooled_mean(quantity, normalized=normalized)
            if mean is None:
                continue
            for layer, value in zip(result.layers, mean, strict=True):
                metrics[f"{prefix}/{quantity}/layer_{layer:02d}"] = float(value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missing modality was already reported once
        scores = result.scores()
    metrics.update({f"unify/{name}": value for name, value in scores.items()})
    return metrics


class EntropyProbe(Callback):
    """Probe the model every ``every_n_epochs`` epochs and log unification metrics.

    Args:
        examples: the fixed probe set (objects with ``prompt_text``, ``prompt_image``,
            ``response_text``, ``response_image``, ``category``).
        probe: probe settings (:class:`unifyreg.config.ProbeConfig`).
        every_n_epochs: probe after every n-th training epoch (>= 1).
        probe_at_start: also probe before training (epoch label 0).
        output_dir: where ``probe_history.jsonl`` and figures go (None: no files).
        adapter: the adapter to probe; None takes ``pl_module.adapter``.
        figures: when to draw the trajectory figures (one curve per probed epoch, also
            sent to TensorBoard): ``"end"`` (once, when fitting ends: the cheapest),
            ``"every"`` (after every probe; ``True`` means this) or ``"never"``
            (``False``).
        skipped_examples: bad probe-set lines skipped when it was read (logged as
            ``probe/skipped_examples`` with every probe); None: not logged.

    Example (plain Lightning)::

        from unifyreg.callbacks import EntropyProbe
        probe = EntropyProbe(probe_examples, every_n_epochs=1, output_dir="runs/x/probe",
                             adapter=my_adapter)
        trainer = lightning.Trainer(max_epochs=3, callbacks=[probe])
        trainer.fit(my_module, train_loader)
        probe.history[-1]["scores"]  # {"encoding_gap": ..., "response_split": ..., ...}
    """

    HISTORY_FILE = "probe_history.jsonl"

    def __init__(
        self,
        examples: Sequence[Any],
        probe: ProbeConfig | None = None,
        every_n_epochs: int = 1,
        probe_at_start: bool = True,
        output_dir: str | Path | None = None,
        adapter: Any = None,
        figures: bool | str = "end",
        skipped_examples: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(figures, bool):
            figures = "every" if figures else "never"
        if figures not in FIGURE_SCHEDULES:
            raise ValueError(
                f"figures must be one of {', '.join(FIGURE_SCHEDULES)} (or a bool), got {figures!r}"
            )
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int):
            raise ValueError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if len(examples) == 0:
            raise ValueError("EntropyProbe needs a non-empty probe set")
        if probe is not None and not isinstance(probe, ProbeConfig):
            raise TypeError(f"probe must be a ProbeConfig, got {type(probe).__name__}")
        self.examples = list(examples)
        self.probe = probe or ProbeConfig()
        self.every_n_epochs = every_n_epochs
        self.probe_at_start = bool(probe_at_start)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.adapter = adapter
        self.figures = figures
        self.skipped_examples = skipped_examples
        #: One entry per probe: {"epoch", "global_step", "seconds", "regime" (which
        #: bandwidth rule and regime produced it), "cost", "metrics", "summary"}.
        self.history: list[dict[str, Any]] = []
        self._epoch_started: float | None = None

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.probe_at_start and not self._has_epoch(0):
            self._probe(trainer, pl_module, epoch=0)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs == 0 and not self._has_epoch(epoch):
            started = self._epoch_started
            train_seconds = None if started is None else time.perf_counter() - started
            self._probe(trainer, pl_module, epoch=epoch, train_seconds=train_seconds)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (
            self.figures == "end"
            and self.history
            and self.output_dir is not None
            and trainer.is_global_zero
        ):
            self._draw_figures(trainer)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"history": json.loads(json.dumps(self.history))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    # ------------------------------------------------------------------ work

    def _has_epoch(self, epoch: int) -> bool:
        return any(entry["epoch"] == epoch for entry in self.history)

    def _resolve_adapter(self, pl_module: L.LightningModule) -> Any:
        adapter = self.adapter if self.adapter is not None else getattr(pl_module, "adapter", None)
        if adapter is None:
            raise ValueError(
                "EntropyProbe needs an adapter: pass adapter=... or use a module with .adapter"
            )
        return adapter

    def _probe(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        epoch: int,
        train_seconds: float | None = None,
    ) -> None:
        adapter = self._resolve_adapter(pl_module)
        start = time.perf_counter()
        rank, world = trainer.global_rank, trainer.world_size
        # Each rank probes every world-th example; per-sample records are gathered so the
        # statistics equal a single-process probe of the whole set.
        shard = self.examples[rank::world] if world > 1 else self.examples
        local = None
        if shard:
            local = run_probe(adapter, shard, self.probe)
        result = self._gather(trainer, local)
        seconds = time.perf_counter() - start
        metrics = probe_metrics(result)
        metrics["probe/epoch"] = float(epoch)
        if self.skipped_examples is not None:
            metrics["probe/skipped_examples"] = float(self.skipped_examples)
        entry = {
            "epoch": epoch,
            "global_step": int(trainer.global_step),
            "seconds": seconds,
            "regime": result.regime(),
            "metrics": metrics,
            "summary": result.summary(),
        }
        self.history.append(entry)
        self.history.sort(key=lambda e: e["epoch"])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=int(trainer.global_step))
        if trainer.is_global_zero:
            self._write_files(trainer, result)
        # What the probe cost, files and figures included, against the epoch it follows.
        cost = {"probe/seconds": time.perf_counter() - start}
        if train_seconds is not None:
            cost["probe/epoch_share"] = cost["probe/seconds"] / (
                train_seconds + cost["probe/seconds"]
            )
        entry["cost"] = cost
        for logger in trainer.loggers:
            logger.log_metrics(cost, step=int(trainer.global_step))
            logger.save()  # on disk now: a later kill does not lose this probe
        if trainer.is_global_zero:
            self._write_history()

    def _gather(self, trainer: L.Trainer, local: ProbeResult | None) -> ProbeResult:
        if trainer.world_size == 1:
            assert local is not None
            return local
        gathered: list[Any] = [None] * trainer.world_size
        payload = local.to_dict() if local is not None else None
        torch.distributed.all_gather_object(gathered, payload)
        parts = [ProbeResult.from_dict(p) for p in gathered if p is not None]
        return ProbeResult.merge(parts)

    def _write_files(self, trainer: L.Trainer, result: ProbeResult) -> None:
        """The epoch's result JSON and the figures (the history file comes after the cost
        is known, in :meth:`_write_history`)."""
        if self.output_dir is None:
            return
        result.save(self.output_dir / f"result_epoch_{self.history[-1]['epoch']:03d}.json")
        if self.figures == "every":
            self._draw_figures(trainer)

    def _draw_figures(self, trainer: L.Trainer) -> None:
        from unifyreg.report import close_figures, probe_history_figures, save_figures

        figures = probe_history_figures(self.history)
        try:
            save_figures(figures, self.output_dir, close=False)
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if experiment is None or not hasattr(experiment, "add_figure"):
                    continue
                for name, fig in figures.items():
                    experiment.add_figure(
                        f"figures/{name}", fig, global_step=trainer.global_step, close=False
                    )
        finally:
            close_figures(figures)

    def _write_history(self) -> None:
        if self.output_dir is None:
            return
        keys = ("epoch", "global_step", "seconds", "regime", "cost", "metrics")
        lines = [json.dumps({k: entry[k] for k in keys if k in entry}) for entry in self.history]
        atomic_write_text(self.output_dir / self.HISTORY_FILE, "\n".join(lines) + "\n")


def last_checkpoint(directory: str | Path) -> ModelCheckpoint:
    """Lightning's ``ModelCheckpoint`` writing ``directory/last.ckpt`` after every training
    epoch (a full checkpoint: weights, optimizer, callbacks' state, random state), which
    ``resume=last`` continues from. ``save_top_k=1`` without a monitor keeps the latest
    epoch's file only."""
    return ModelCheckpoint(
        dirpath=directory,
        filename="last",
        save_top_k=1,
        enable_version_counter=False,
        every_n_epochs=1,
        save_on_train_epoch_end=True,
    )
