"""Shared fixtures: a tiny world and a tiny random toy model (CPU, seconds)."""

import pytest
import torch

from unifyreg.adapters.toy import ToyAdapter
from unifyreg.toy import WordTokenizer, WorldConfig, build_splits
from unifyreg.toy.model import ToyModelConfig

TINY_MODEL = ToyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
TINY_WORLD = WorldConfig(
    n_pretrain=300, n_finetune=150, n_heldout=20, n_probe_per_category=4, n_eval_per_category=4
)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_world():
    return TINY_WORLD


@pytest.fixture(scope="session")
def tiny_splits():
    return build_splits(TINY_WORLD)


@pytest.fixture(scope="session")
def tokenizer():
    return WordTokenizer.for_world(TINY_WORLD)


@pytest.fixture
def tiny_adapter(tokenizer):
    return ToyAdapter.create(tokenizer, grid_size=TINY_WORLD.grid_size, model_config=TINY_MODEL)


#: `pretrain-toy` overrides for a tiny base that trains in a few seconds.
TINY_PRETRAIN = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "world.n_pretrain=200",
    "world.n_finetune=96",
    "world.n_heldout=10",
    "world.n_eval_per_category=2",
    "world.n_probe_per_category=3",
    "max_steps=6",
    "batch_size=16",
    "checkpoint_every_n_steps=3",
    "accelerator=cpu",
    "evaluate=false",
]


@pytest.fixture(scope="session")
def tiny_base_overrides(tmp_path_factory):
    """`pretrain.*` overrides naming a tiny toy base, built once per test session."""
    from unifyreg.config import PretrainToyConfig, load_config
    from unifyreg.toy.base import build_toy_base

    overrides = [*TINY_PRETRAIN, f"cache_dir={tmp_path_factory.mktemp('toy-cache')}"]
    build_toy_base(load_config(PretrainToyConfig, None, overrides), log=lambda *_: None)
    return [f"pretrain.{item}" for item in overrides]


def reuse_matches_full_pass(make_adapter, examples, mode, rtol=1e-5, atol=1e-7):
    """L_ctx through the main pass's shared prefix against the full second pass, on fresh
    adapters from ``make_adapter()`` with the same seeds: equal losses, token counts and
    gradients (``rtol``/``atol``), and a second pass that really was shorter. Returns the
    two passes' input lengths with reuse (``[main, second]``)."""
    import functools

    from unifyreg.config import LossConfig
    from unifyreg.losses import ContextualPredictionLoss, forward_with_terms

    results = {}
    for reuse in (False, True):
        torch.manual_seed(0)
        adapter = make_adapter()
        batch = adapter.training_batch(adapter.encode(examples))
        config = LossConfig(w_ctx=1.0, ctx_mode=mode, ctx_row_fraction=1.0, ctx_reuse_prefix=reuse)
        term = ContextualPredictionLoss(config, adapter.mask_width, seed=3)
        term.to(dtype=next(adapter.model.parameters()).dtype)
        lengths = []
        layers = (
            adapter.base_model.get_decoder() if hasattr(adapter.base_model, "get_decoder") else None
        )
        target = getattr(adapter, "language_model", None) or layers or adapter.model
        original = target.forward

        @functools.wraps(original)
        def spy(*args, _original=original, _lengths=lengths, **kwargs):
            _lengths.append(int(kwargs["inputs_embeds"].shape[1]))
            return _original(*args, **kwargs)

        target.forward = spy
        out, extra, logs = forward_with_terms(adapter, batch, [term], step=0)
        (out.task_loss + extra).backward()
        grads = [p.grad for p in adapter.model.parameters() if p.requires_grad]
        results[reuse] = (
            logs,
            [torch.zeros(()) if g is None else g for g in grads],
            [term.mask_embedding.grad],
            lengths,
        )
    (full_logs, full_grads, full_mask, full_lengths) = results[False]
    (logs, grads, mask, lengths) = results[True]
    assert len(lengths) == len(full_lengths) == 2 and lengths[1] < full_lengths[1], (
        lengths,
        full_lengths,
    )
    assert int(logs["loss/ctx_tokens"]) == int(full_logs["loss/ctx_tokens"]) > 0
    torch.testing.assert_close(logs["loss/ctx"], full_logs["loss/ctx"], rtol=rtol, atol=0)
    assert mask[0].abs().sum() > 0
    for reused, full in zip(grads + mask, full_grads + full_mask, strict=True):
        torch.testing.assert_close(reused, full, rtol=rtol, atol=atol)
    return lengths
