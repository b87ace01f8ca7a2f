"""Shared fixtures: a tiny world and a tiny random toy model (CPU, seconds)."""

import pytest
import torch

from unifyreg.adapters.toy import ToyAdapter, ToyModelConfig
from unifyreg.toy import WordTokenizer, WorldConfig, build_splits

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
