"""Tests of the two-level probe: per-sample correctness, invariances, files, scores."""

import json
import math

import numpy as np
import pytest
import torch

from unifyreg.config import ProbeConfig
from unifyreg.estimators import conditional_entropy_proxy, matrix_entropy
from unifyreg.probing import ProbeResult, probe_batch, run_probe
from unifyreg.quantities import QUANTITIES
from unifyreg.report import probe_table, write_probe_result
from unifyreg.roles import Role


@pytest.fixture
def probe_examples(tiny_splits):
    return [e for name, split in tiny_splits.items() if name.startswith("probe/") for e in split]


def test_each_quantity_gets_the_right_samples(tiny_adapter, probe_examples, tiny_splits):
    result = run_probe(tiny_adapter, probe_examples, ProbeConfig(batch_size=7))
    n_text = sum(len(v) for k, v in tiny_splits.items() if k.startswith("probe/text/"))
    n_image = sum(len(v) for k, v in tiny_splits.items() if k.startswith("probe/image/"))
    n_drawn = sum(e.answers_with_image for e in probe_examples)  # t2i grids
    counts = {q: len(r) for q, r in result.records.items()}
    assert counts == {
        "encoding/text": n_text,
        "encoding/image": n_image,
        # understanding and caption answers, and the text-reasoning answers
        "response/text": len(probe_examples) - n_drawn,
        "response/image": n_drawn,
    }
    assert n_drawn < n_text  # probe/text/ also holds text-reasoning prompts
    assert result.layers == tuple(range(tiny_adapter.num_layers + 1))
    stats = result.stats("encoding/text")
    assert set(stats) == {
        "composition",
        "deductive",
        "inductive",
        "abductive",
        "text_deductive",
        "text_abductive",
        "all",
    }
    assert stats["all"]["count"] == n_text and len(stats["all"]["mean"]) == len(result.layers)
    assert tiny_adapter.model.training  # mode restored


def test_values_equal_direct_estimator_calls_on_one_example(tiny_adapter, probe_examples):
    example = next(e for e in probe_examples if e.task == "understanding")
    result = run_probe(tiny_adapter, [example], ProbeConfig())
    tiny_adapter.model.eval()
    with torch.no_grad():
        out = tiny_adapter.forward(tiny_adapter.encode([example]))
    tiny_adapter.model.train()
    roles = out.roles[0]
    H = out.hidden_states[:, 0]
    image_prompt = H[:, roles == Role.IMAGE_PROMPT]
    prompt = H[:, (roles == Role.IMAGE_PROMPT) | (roles == Role.TEXT_PROMPT)]
    answer = H[:, roles == Role.TEXT_RESPONSE]
    np.testing.assert_allclose(
        result.records["encoding/image"].values[0], matrix_entropy(image_prompt).numpy(), atol=1e-10
    )
    np.testing.assert_allclose(
        result.records["response/text"].values[0],
        conditional_entropy_proxy(prompt, answer).numpy(),
        atol=1e-10,
    )
    np.testing.assert_allclose(
        result.records["encoding/image"].normalized[0],
        result.records["encoding/image"].values[0] / math.log2(16),
        atol=1e-12,
    )


def test_batch_size_does_not_change_any_value(tiny_adapter, probe_examples):
    one = run_probe(tiny_adapter, probe_examples[:12], ProbeConfig(batch_size=1))
    many = run_probe(
        tiny_adapter, probe_examples[:12], ProbeConfig(batch_size=12, layers_per_chunk=2)
    )
    for q in QUANTITIES:
        np.testing.assert_allclose(one.records[q].values, many.records[q].values, atol=1e-6)
        assert one.records[q].categories == many.records[q].categories


def test_merging_shards_equals_one_run(tiny_adapter, probe_examples):
    full = run_probe(tiny_adapter, probe_examples, ProbeConfig(batch_size=8))
    halves = [
        run_probe(tiny_adapter, part, ProbeConfig(batch_size=8))
        for part in (probe_examples[::2], probe_examples[1::2])
    ]
    merged = ProbeResult.merge(halves)
    for q in QUANTITIES:
        for cat, st in full.stats(q).items():
            np.testing.assert_allclose(merged.stats(q)[cat]["mean"], st["mean"], atol=1e-6)
            assert merged.stats(q)[cat]["count"] == st["count"]
    assert merged.scores() == pytest.approx(full.scores(), abs=1e-6)


def test_scores_follow_their_definitions(tiny_adapter, probe_examples):
    result = run_probe(tiny_adapter, probe_examples, ProbeConfig())
    Ht = result.records["encoding/text"].normalized.mean(0)
    Hi = result.records["encoding/image"].normalized.mean(0)
    Ct = result.records["response/text"].normalized.mean(0)
    Ci = result.records["response/image"].normalized.mean(0)
    scores = result.scores()
    assert scores["encoding_gap"] == pytest.approx(np.abs(Ht - Hi).mean())
    assert scores["response_split"] == pytest.approx((Ct - Ci).mean())
    assert scores["final_gap"] == pytest.approx(abs(Ct[-1] - Ci[-1]))


def test_missing_modality_leaves_scores_out_with_a_warning(tiny_adapter, probe_examples):
    text_only = [e for e in probe_examples if e.answers_with_image]  # no text response
    result = run_probe(tiny_adapter, text_only, ProbeConfig())
    with pytest.warns(UserWarning, match="encoding_gap"):
        scores = result.scores()
    assert scores == {}


def test_non_finite_hidden_states_give_nan_and_a_warning_naming_the_layer():
    roles = torch.tensor([[Role.TEXT_PROMPT] * 4 + [Role.IMAGE_RESPONSE] * 4] * 2)
    hidden = torch.randn(3, 2, 8, 5)
    hidden[1, 0, 2, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"encoding/text at layer\(s\) \[1\]") as caught:
        records = probe_batch(hidden, roles, ["a", "b"], [0, 1, 2], ProbeConfig())
    assert any("response/image at layer(s) [1]" in str(w.message) for w in caught)
    values = records["encoding/text"].values
    assert (
        np.isnan(values[0, 1])
        and np.isfinite(values[1]).all()
        and np.isfinite(values[0, [0, 2]]).all()
    )


def test_generated_responses_are_probed(tiny_adapter, probe_examples):
    t2i = [e for e in probe_examples if e.answers_with_image][:4]
    result = run_probe(tiny_adapter, t2i, ProbeConfig(responses="generated"))
    assert len(result.records["response/image"]) == 4
    assert result.settings["responses"] == "generated"


def test_files_round_trip_and_tables(tiny_adapter, probe_examples, tmp_path):
    result = run_probe(tiny_adapter, probe_examples, ProbeConfig(layers=[0, -1]))
    assert result.layers == (0, tiny_adapter.num_layers)
    paths = write_probe_result(result, tmp_path)
    loaded = ProbeResult.load(paths["result"])
    for q in QUANTITIES:
        np.testing.assert_array_equal(loaded.records[q].values, result.records[q].values)
    summary = json.loads(paths["summary"].read_text())
    assert set(summary["scores"]) == {"encoding_gap", "response_split", "final_gap"}
    # every output says which regime produced it
    assert (summary["regime"], summary["bandwidth"]) == ("default", "median")
    assert (summary["alpha"], summary["base"]) == (1.01, 2.0)
    caption, blank, table = paths["table_md"].read_text().split("\n", 2)
    assert caption == (
        "Mean prompt entropy at layer 0 (bits, alpha 1.01); regime: default, bandwidth: median"
    )
    assert blank == "" and table.startswith("| layer | text:abductive")
    assert "image:single_instance" in table
    header, row = paths["table_csv"].read_text().splitlines()
    header, row = header.split(","), row.split(",")
    assert (
        header[:3] == ["layer", "regime", "bandwidth"] and len(header) == 3 + 6 + 7
    )  # text / image categories
    assert row[:3] == ["0", "default", "median"] and len(row) == len(header)
    assert paths["stats_csv"].read_text().startswith("quantity,category,layer,mean")
    for key in ("encoding_figure", "response_figure"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="was not probed"):
        probe_table(result, layer=1)


def test_empty_probe_set_raises(tiny_adapter):
    with pytest.raises(ValueError, match="empty"):
        run_probe(tiny_adapter, [], ProbeConfig())


@pytest.mark.parametrize("family", ["emu3", "janus", "chameleon"])
def test_probe_command_runs_on_real_adapters_through_the_cli(family, tmp_path, tiny_splits):
    """The user's path: a local checkpoint + a JSONL manifest -> `unifyreg probe`."""
    import importlib

    from unifyreg.cli import main
    from unifyreg.toy import save_grid_png

    module = importlib.import_module(f"unifyreg.adapters.{family}")
    checkpoint = getattr(module, f"save_tiny_{family}")(tmp_path / "ckpt")
    t2i = tiny_splits["probe/text/composition"][0]
    understanding = tiny_splits["probe/image/attribute"][0]
    save_grid_png(t2i.response_image, tmp_path / "r.png")
    save_grid_png(understanding.prompt_image, tmp_path / "p.png")
    manifest = tmp_path / "probe.jsonl"
    manifest.write_text(
        json.dumps({"text": t2i.prompt_text, "response_image": "r.png", "category": "composition"})
        + "\n"
        + json.dumps(
            {
                "text": understanding.prompt_text,
                "image": "p.png",
                "response": understanding.response_text,
                "category": "attribute",
            }
        )
        + "\n"
    )
    out = tmp_path / "out"
    args = [
        f"model.adapter={family}",
        f"model.path={checkpoint}",
        f"probe_set={manifest}",
        f"output_dir={out}",
        "figures=false",
    ]
    assert main(["probe", *args]) == 0
    result = ProbeResult.load(out / "result.json")
    counts = {q: len(r) for q, r in result.records.items()}
    assert counts == {
        "encoding/text": 1,
        "encoding/image": 1,
        "response/text": 1,
        "response/image": 1,
    }
    assert set(result.scores()) == {"encoding_gap", "response_split", "final_gap"}
    assert all(np.isfinite(r.values).all() for r in result.records.values())


def test_auto_layers_per_chunk_bounds_the_gathered_bytes():
    from unifyreg.quantities import AUTO_CHUNK_FLOOR_BYTES, auto_layers_per_chunk

    small = torch.zeros(16, 30, 128)  # a toy batch: every layer fits the floor at once
    assert auto_layers_per_chunk(small) == AUTO_CHUNK_FLOOR_BYTES // (2 * small.numel() * 8)
    assert auto_layers_per_chunk(small) >= 25
    large = torch.zeros(16, 669, 1024)  # a real-width batch: one layer at a time
    assert auto_layers_per_chunk(large) == 1
    # float32 estimators halve the per-layer bytes, so twice the layers fit the floor
    assert auto_layers_per_chunk(small, torch.float32) == 2 * auto_layers_per_chunk(small)


def test_auto_chunking_gives_the_values_of_one_layer_at_a_time(tiny_adapter, probe_examples):
    auto = run_probe(tiny_adapter, probe_examples[:12], ProbeConfig(batch_size=6))
    single = run_probe(
        tiny_adapter, probe_examples[:12], ProbeConfig(batch_size=6, layers_per_chunk=1)
    )
    for q in QUANTITIES:
        np.testing.assert_allclose(auto.records[q].values, single.records[q].values, atol=1e-9)
