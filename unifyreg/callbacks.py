"""Lightning callbacks: probe unification during fine-tuning.

``EntropyProbe`` runs the paper's two-level probe (:mod:`unifyreg.probing`) on a fixed
probe set every ``every_n_epochs`` epochs (and once before training as the epoch-0
baseline), logs the results to every logger of the Trainer, writes a JSON line per probe
and trajectory figures, and keeps its history in ``state_dict`` so a resumed run
continues it without duplicated or missing epochs.

Logged metric names (``LL`` = the layer index, two digits; step = the global step):

- ``probe/<quantity>/layer_LL``: mean raw value over the probe set (bits), for
  ``<quantity>`` in ``encoding/text``, ``encoding/image``, ``response/text``,
  ``response/image``; ``LL`` is the layer of the stack the quantity is computed on
  (``ProbeResult.axis``: a two-stage model's ``response/image`` counts the denoiser's
  blocks, the other quantities the LLM's);
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
figures, one small function per logger kind (:data:`FIGURE_SINKS`: TensorBoard's
``add_figure``, wandb's ``log_image``, MLflow's ``log_figure``).

The trainer-independent part (sharded probe, history, files, figures) is
:class:`ProbeRecorder`; the Hugging Face ``Trainer`` callback
(:mod:`unifyreg.integrations.hf`) drives the same one.

Checkpoints for resuming come from Lightning's own ``ModelCheckpoint``
(:func:`last_checkpoint`); Lightning runs checkpoint callbacks after the others, so the
checkpoint of an epoch holds that epoch's probe whatever the order callbacks are listed in.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from unifyreg.config import ProbeConfig
from unifyreg.fileio import atomic_write_text
from unifyreg.probing import ProbeResult, run_probe
from unifyreg.quantities import QUANTITIES

__all__ = [
    "FIGURE_SCHEDULES",
    "FIGURE_SINKS",
    "EntropyProbe",
    "ProbeRecorder",
    "figure_sinks",
    "last_checkpoint",
    "probe_metrics",
]

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
            for layer, value in zip(result.quantity_layers(quantity), mean, strict=True):
                metrics[f"{prefix}/{quantity}/layer_{layer:02d}"] = float(value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missing modality was already reported once
        scores = result.scores()
    metrics.update({f"unify/{name}": value for name, value in scores.items()})
    return metrics


#: A figure sink: ``sink(name, figure, global_step)`` logs one matplotlib figure.
FigureSink = Callable[[str, Any, int], None]


def _tensorboard_sink(logger: Any) -> FigureSink | None:
    """TensorBoard (or any logger whose experiment has ``add_figure``)."""
    experiment = getattr(logger, "experiment", None)
    if experiment is None or not hasattr(experiment, "add_figure"):
        return None

    def sink(name: str, fig: Any, step: int) -> None:
        experiment.add_figure(f"figures/{name}", fig, global_step=step, close=False)

    return sink


def _wandb_sink(logger: Any) -> FigureSink | None:
    """Weights & Biases: ``WandbLogger.log_image`` (a ``wandb.Image`` of the figure)."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return None

    def sink(name: str, fig: Any, step: int) -> None:
        logger.log_image(key=f"figures/{name}", images=[fig], step=step)

    return sink


def _mlflow_sink(logger: Any) -> FigureSink | None:
    """MLflow: ``MlflowClient.log_figure`` into the run's artifacts
    (``figures/<name>_step<NNNNNN>.png``)."""
    from lightning.pytorch.loggers import MLFlowLogger

    if not isinstance(logger, MLFlowLogger):
        return None

    def sink(name: str, fig: Any, step: int) -> None:
        logger.experiment.log_figure(logger.run_id, fig, f"figures/{name}_step{step:06d}.png")

    return sink


#: One function per logger kind, tried in order; the first that takes a logger wins.
FIGURE_SINKS: tuple[Callable[[Any], FigureSink | None], ...] = (
    _wandb_sink,
    _mlflow_sink,
    _tensorboard_sink,
)


def figure_sinks(loggers: Sequence[Any]) -> list[FigureSink]:
    """The figure sink of every logger that takes figures (TensorBoard, wandb, MLflow;
    CSV takes none)."""
    sinks = []
    for logger in loggers:
        for make in FIGURE_SINKS:
            sink = make(logger)
            if sink is not None:
                sinks.append(sink)
                break
    return sinks


def _collective_forward(strategy: Any) -> bool:
    """Whether every forward pass of ``strategy``'s model is a collective of all ranks
    (sharded parameters: FSDP, DeepSpeed), so the probe must run it through the wrapper
    on every rank the same number of times."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    return isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy))


def _through_wrapper(wrapper: torch.nn.Module, module: torch.nn.Module, adapter: Any):
    """``forward(batch, **kw)`` that runs ``adapter.forward`` inside ``wrapper``'s own
    forward (FSDP gathers the root's sharded parameters there): ``module.forward`` is
    swapped for the call and put back as soon as the wrapper calls it (the adapter's
    forward may call ``module`` itself), as Lightning routes ``training_step``."""

    def forward(batch: Any, **kwargs: Any) -> Any:
        def inner(*_args: Any, **_kwargs: Any) -> Any:
            module.__dict__.pop("forward", None)
            return adapter.forward(batch, **kwargs)

        module.forward = inner  # an instance attribute shadows the class's method
        try:
            return wrapper()
        finally:
            module.__dict__.pop("forward", None)

    return forward


class ProbeRecorder:
    """What a per-epoch probe callback does, whatever the trainer: run the probe (sharded
    across ranks when there are several), keep the history, write the files, build the
    metrics and figures. :class:`EntropyProbe` (Lightning) and
    :class:`unifyreg.integrations.hf.EntropyProbeCallback` (Hugging Face) drive it.

    Args: see :class:`EntropyProbe`.
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

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """``{"history": [...]}``: plain JSON data (checkpoints load it with
        ``weights_only=True``)."""
        return {"history": json.loads(json.dumps(self.history))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history of :meth:`state_dict`."""
        self.history = list(state_dict.get("history", []))

    def has_epoch(self, epoch: int) -> bool:
        """Whether the history holds a probe of ``epoch``."""
        return any(entry["epoch"] == epoch for entry in self.history)

    def wants_epoch(self, epoch: int) -> bool:
        """Whether ``epoch`` (after e epochs; 0 = before training) is due and not done."""
        if epoch == 0:
            return self.probe_at_start and not self.has_epoch(0)
        return epoch % self.every_n_epochs == 0 and not self.has_epoch(epoch)

    # ------------------------------------------------------------------ work

    def run_probe(
        self,
        adapter: Any,
        epoch: int,
        global_step: int,
        rank: int = 0,
        world: int = 1,
        forward: Callable[..., Any] | None = None,
        collective: bool = False,
    ) -> tuple[dict[str, Any], ProbeResult]:
        """Probe once and append the history entry (without its cost yet).

        Rank r of ``world`` probes ``examples[r::world]``; the per-sample records are
        gathered (``all_gather_object``) so the statistics equal a single-process probe of
        the whole set. ``collective``: the forward pass is a collective (FSDP), so every
        rank runs as many passes as the longest shard (padding passes on the first example,
        their values dropped) through ``forward``.
        """
        start = time.perf_counter()
        shard = self.examples[rank::world] if world > 1 else self.examples
        local = None
        if collective and world > 1:
            longest = -(-len(self.examples) // world)
            batches = -(-longest // self.probe.batch_size)
            local = run_probe(
                adapter,
                shard,
                self.probe,
                forward=forward,
                min_batches=batches,
                padding_example=self.examples[0],
            )
        elif shard:
            local = run_probe(adapter, shard, self.probe, forward=forward)
        result = _gather(world, local)
        metrics = probe_metrics(result)
        metrics["probe/epoch"] = float(epoch)
        if self.skipped_examples is not None:
            metrics["probe/skipped_examples"] = float(self.skipped_examples)
        entry = {
            "epoch": epoch,
            "global_step": int(global_step),
            "seconds": time.perf_counter() - start,
            "regime": result.regime(),
            "metrics": metrics,
            "summary": result.summary(),
        }
        self.history.append(entry)
        self.history.sort(key=lambda e: e["epoch"])
        return entry, result

    def write_result(self, entry: dict[str, Any], result: ProbeResult) -> None:
        """The epoch's per-sample result file (``result_epoch_NNN.json``)."""
        if self.output_dir is not None:
            result.save(self.output_dir / f"result_epoch_{entry['epoch']:03d}.json")

    @staticmethod
    def cost(started: float, train_seconds: float | None) -> dict[str, float]:
        """``probe/seconds`` since ``started`` and, after an epoch of ``train_seconds``,
        ``probe/epoch_share``."""
        cost = {"probe/seconds": time.perf_counter() - started}
        if train_seconds is not None:
            cost["probe/epoch_share"] = cost["probe/seconds"] / (
                train_seconds + cost["probe/seconds"]
            )
        return cost

    def draw_figures(self, sinks: Sequence[FigureSink] = (), global_step: int = 0) -> None:
        """Draw the trajectory figures of the history, save them as PNG in ``output_dir``
        and hand each to every sink; the figures are closed afterwards."""
        from unifyreg.report import close_figures, probe_history_figures, save_figures

        figures = probe_history_figures(self.history)
        try:
            if self.output_dir is not None:
                save_figures(figures, self.output_dir, close=False)
            for sink in sinks:
                for name, fig in figures.items():
                    sink(name, fig, int(global_step))
        finally:
            close_figures(figures)

    def write_history(self) -> None:
        """Rewrite ``probe_history.jsonl`` atomically from the history (one line per probe)."""
        if self.output_dir is None:
            return
        keys = ("epoch", "global_step", "seconds", "regime", "cost", "metrics")
        lines = [json.dumps({k: entry[k] for k in keys if k in entry}) for entry in self.history]
        atomic_write_text(self.output_dir / self.HISTORY_FILE, "\n".join(lines) + "\n")

    def resolve_adapter(self, module: Any) -> Any:
        """``adapter`` or else ``module.adapter``; ValueError when neither exists."""
        adapter = self.adapter if self.adapter is not None else getattr(module, "adapter", None)
        if adapter is None:
            raise ValueError(
                "EntropyProbe needs an adapter: pass adapter=... or use a module with .adapter"
            )
        return adapter


def _gather(world: int, local: ProbeResult | None) -> ProbeResult:
    """All ranks' results merged (every rank gets the merged result)."""
    if world == 1:
        assert local is not None
        return local
    gathered: list[Any] = [None] * world
    payload = local.to_dict() if local is not None else None
    torch.distributed.all_gather_object(gathered, payload)
    parts = [ProbeResult.from_dict(p) for p in gathered if p is not None]
    return ProbeResult.merge(parts)


class EntropyProbe(ProbeRecorder, Callback):
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
            sent to every logger that takes figures: TensorBoard, wandb, MLflow):
            ``"end"`` (once, when fitting ends: the cheapest), ``"every"`` (after every
            probe; ``True`` means this) or ``"never"`` (``False``).
        skipped_examples: bad probe-set lines skipped when it was read (logged as
            ``probe/skipped_examples`` with every probe); None: not logged.

    Under DDP every rank probes its shard of the probe set with the unwrapped model; under
    FSDP (and DeepSpeed) every forward pass is a collective, so the passes run through the
    strategy's wrapper and ranks with a shorter shard run padding passes whose values are
    dropped. Either way the logged values equal a single-process probe.

    Example (plain Lightning)::

        from unifyreg.callbacks import EntropyProbe
        probe = EntropyProbe(probe_examples, every_n_epochs=1, output_dir="runs/x/probe",
                             adapter=my_adapter)
        trainer = lightning.Trainer(max_epochs=3, callbacks=[probe])
        trainer.fit(my_module, train_loader)
        probe.history[-1]["summary"]["scores"]  # {"encoding_gap": ..., ...}
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch_started: float | None = None

    # ------------------------------------------------------------------ hooks

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not on_fit_start: under FSDP Lightning restores callbacks' state after
        # on_fit_start, so a resumed run would probe epoch 0 again there.
        if self.wants_epoch(0):
            self._probe(trainer, pl_module, epoch=0)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.wants_epoch(epoch):
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
            self.draw_figures(figure_sinks(trainer.loggers), trainer.global_step)

    # ------------------------------------------------------------------ work

    def _probe(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        epoch: int,
        train_seconds: float | None = None,
    ) -> None:
        adapter = self.resolve_adapter(pl_module)
        start = time.perf_counter()
        strategy = trainer.strategy
        collective = trainer.world_size > 1 and _collective_forward(strategy)
        forward = None
        if collective and strategy.model is not None and strategy.model is not pl_module:
            forward = _through_wrapper(strategy.model, pl_module, adapter)
        entry, result = self.run_probe(
            adapter,
            epoch,
            trainer.global_step,
            rank=trainer.global_rank,
            world=trainer.world_size,
            forward=forward,
            collective=collective,
        )
        step = int(trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics(entry["metrics"], step=step)
        if trainer.is_global_zero:
            self.write_result(entry, result)
            if self.figures == "every":
                self.draw_figures(figure_sinks(trainer.loggers), step)
        # What the probe cost, files and figures included, against the epoch it follows.
        entry["cost"] = self.cost(start, train_seconds)
        for logger in trainer.loggers:
            logger.log_metrics(entry["cost"], step=step)
            logger.save()  # on disk now: a later kill does not lose this probe
        if trainer.is_global_zero:
            self.write_history()


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
