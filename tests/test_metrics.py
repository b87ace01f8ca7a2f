"""unifyreg.metrics: torchmetrics Metrics of the probe's quantities and scores, equal to
run_probe on the same examples, in a LightningModule's validation loop and under DDP."""

import json

import lightning as L
import numpy as np
import pytest
import torch

from unifyreg.callbacks import probe_metrics
from unifyreg.config import ProbeConfig
from unifyreg.metrics import ProbeQuantities, UnificationScores
from unifyreg.probing import run_probe


def _examples(splits):
    """Text and image probe examples of several categories (every quantity has samples)."""
    keys = [k for k in sorted(splits) if k.startswith("probe/")]
    return [e for k in keys for e in splits[k][:2]]


def _feed(metric, adapter, examples, batch_size, cfg):
    adapter.model.eval()
    layers = adapter.resolve_layers(cfg.layers or None)
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = adapter.encode(examples[start : start + batch_size])
            out = adapter.forward(batch, layers=layers)
            metric.update(out.hidden_layers, out.roles)


def _close(got, want, rel=1e-12):
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert float(got[key]) == pytest.approx(value, rel=rel, abs=1e-13), key


# The probe's own batches (5) give bit-identical hidden states: equal to round-off in the
# float64 sums. Other batchings pad the rows differently, which moves the float32 hidden
# states by round-off (about 1e-9 relative in a quantity here).
@pytest.mark.parametrize(("batch_size", "rel"), [(5, 1e-12), (3, 1e-7), (16, 1e-7)])
def test_metrics_equal_run_probe_on_the_same_examples(tiny_adapter, tiny_splits, batch_size, rel):
    examples = _examples(tiny_splits)
    cfg = ProbeConfig(layers=[0, 1, 2], batch_size=5)
    want = probe_metrics(run_probe(tiny_adapter, examples, cfg))
    layers = tiny_adapter.resolve_layers(cfg.layers)

    quantities = ProbeQuantities(layers, cfg)
    scores = UnificationScores(layers, cfg, with_quantities=True)
    for metric in (quantities, scores):
        _feed(metric, tiny_adapter, examples, batch_size, cfg)
    per_layer = {k: v for k, v in want.items() if not k.startswith("unify/")}
    _close(quantities.compute(), per_layer, rel)
    _close(scores.compute(), want, rel)
    assert {"unify/encoding_gap", "unify/response_split", "unify/final_gap"} <= set(want)

    # std and counts equal ProbeResult.stats's population std and counts
    result = run_probe(tiny_adapter, examples, cfg)
    for name, entry in quantities.stats().items():
        ref = result.stats(name)["all"]
        assert int(entry["count"]) == ref["count"]
        np.testing.assert_allclose(entry["std"].numpy(), ref["std"], rtol=1e-7, atol=1e-10)
    assert quantities.total.dtype == torch.float64

    quantities.reset()
    assert quantities.compute() == {}


def test_missing_modality_leaves_scores_out_and_bad_shapes_raise(tiny_adapter, tiny_splits):
    text_only = tiny_splits["probe/text/composition"][:3]
    metric = UnificationScores(tiny_adapter.resolve_layers(None))
    _feed(metric, tiny_adapter, text_only, 3, ProbeConfig())
    with pytest.warns(UserWarning, match="no samples for encoding_gap, response_split"):
        assert metric.compute() == {}
    wrong = ProbeQuantities([0, 1])  # the tiny model has layers 0..2
    batch = tiny_adapter.encode(text_only)
    out = tiny_adapter.forward(batch)
    with pytest.raises(ValueError, match="hidden states of 3 layers, but the metric was built"):
        wrong.update(out.hidden_layers, out.roles)
    with pytest.raises(TypeError, match="probe must be a ProbeConfig"):
        ProbeQuantities([0], probe={"alpha": 2})


class _Validated(L.LightningModule):
    """A user's module: the scores as one more metric of its validation step. Each rank
    validates its own shard of the probe set (no distributed sampler, which would pad
    an uneven set with repeated examples)."""

    def __init__(self, adapter, examples, cfg):
        super().__init__()
        self.model = adapter.model
        self._adapter = adapter
        self._examples = examples
        self._layers = adapter.resolve_layers(cfg.layers)
        self.scores = UnificationScores(self._layers, cfg)

    def val_dataloader(self):
        shard = self._examples[self.global_rank :: self.trainer.world_size]
        return torch.utils.data.DataLoader(shard, batch_size=2, collate_fn=self._adapter.encode)

    def validation_step(self, batch, batch_idx):
        out = self._adapter.forward(batch, layers=self._layers)
        self.scores.update(out.hidden_layers, out.roles)

    def on_validation_epoch_end(self):
        self.log_dict(self.scores.compute())
        self.scores.reset()


@pytest.mark.parametrize("devices", [1, 2])
def test_scores_in_a_lightning_validation_loop_also_under_ddp(
    devices, tiny_adapter, tiny_splits, tmp_path
):
    """2 devices: `ddp_spawn` on CPU (gloo), 7 examples split 4 + 3; the states are summed
    over the ranks at `compute()`, so the logged scores equal a single run_probe."""
    examples = [*tiny_splits["probe/text/deductive"][:4], *tiny_splits["probe/image/coarse"][:3]]
    cfg = ProbeConfig(layers=[0, 2])
    want = {
        k: v
        for k, v in probe_metrics(run_probe(tiny_adapter, examples, cfg)).items()
        if k.startswith("unify/")
    }
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.validate(_Validated(tiny_adapter, examples, cfg))
    got = {k: float(v) for k, v in trainer.callback_metrics.items()}
    names = {f"unify/{k}" for k in ("encoding_gap", "response_split", "final_gap")}
    assert set(got) == set(want) == names
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), json.dumps([got, want])
