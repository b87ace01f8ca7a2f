"""The toy bases shipped with the package: built for today's default config and world."""

import json

import pytest

from unifyreg.adapters.toy import ToyAdapter
from unifyreg.config import PretrainToyConfig
from unifyreg.toy.base import (
    SHIPPED_DIR,
    SHIPPED_FILE,
    build_toy_base,
    cache_key,
    default_model_path,
    shipped_base,
)

OBJECTIVES = ("ar", "contextual")


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_shipped_base_matches_its_config_and_world(objective):
    """Fails when the world, the model, the layout or a default changed after the base was
    shipped: rebuild it with `python scripts/ship_toy_bases.py`."""
    directory = SHIPPED_DIR / objective
    record = json.loads((directory / SHIPPED_FILE).read_text())
    cfg = PretrainToyConfig(objective=objective)
    assert record["cache_key"] == cache_key(cfg), "rebuild: python scripts/ship_toy_bases.py"
    adapter = ToyAdapter.load(directory)
    assert adapter.objective == objective and adapter.num_layers == cfg.model.num_layers
    assert adapter.model_config_dict() == {**vars(cfg.model)}
    assert set(record["headline"]) >= {"t2i_direct", "understanding", "transfer"}


def test_the_default_model_is_the_shipped_base_and_no_training_runs(tmp_path, monkeypatch):
    import unifyreg.toy.base as toy_base

    def refuse(*_args, **_kwargs):
        raise AssertionError("trained although a shipped base matches")

    monkeypatch.setattr(toy_base, "_train_toy_base", refuse)
    cfg = PretrainToyConfig(cache_dir=str(tmp_path))
    assert build_toy_base(cfg, log=lambda *_: None) == SHIPPED_DIR / "ar"
    assert default_model_path(cfg) == SHIPPED_DIR / "ar"
    assert default_model_path(cfg, build=False) == SHIPPED_DIR / "ar"
    other = PretrainToyConfig(cache_dir=str(tmp_path), seed=1)
    assert shipped_base(other) is None  # another seed: a cache path, built on demand
    assert default_model_path(other, build=False).parent == tmp_path


def test_ctx_mode_is_keyed_only_while_ctx_is_on():
    """The mode changes no weight while `w_ctx` is 0: both modes give one key there (the
    shipped bases kept theirs when the default became `bidirectional`); with `L_ctx` on,
    the two modes are two bases."""
    from unifyreg.config import LossConfig

    off = {mode: cache_key(PretrainToyConfig(loss=LossConfig(ctx_mode=mode))) for mode in
           ("causal", "bidirectional")}  # fmt: skip
    assert off["causal"] == off["bidirectional"] == cache_key(PretrainToyConfig())
    on = {mode: cache_key(PretrainToyConfig(loss=LossConfig(w_ctx=1.0, ctx_mode=mode))) for
          mode in ("causal", "bidirectional")}  # fmt: skip
    assert on["causal"] != on["bidirectional"] and off["causal"] not in on.values()
