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
