"""Tests of the ablation recipe: aggregation, verdicts, files, skipping finished runs."""

import json

import pytest

from unifyreg.cli import main
from unifyreg.config import AblateConfig
from unifyreg.recipes.ablate import aggregate, render_report


def _record(arm, seed, gap, transfer):
    return {
        "arm": arm,
        "seed": seed,
        "layers": [0, 1],
        "scores": {"encoding_gap": gap, "response_split": 0.1, "final_gap": 0.05},
        "accuracies": {"transfer": transfer},
        "trajectories": {"encoding/text": [0.5, 0.6]},
    }


def test_aggregate_pairs_differences_by_seed_and_flags_clear_changes():
    records = [
        _record("baseline", 0, 0.30, 0.10),
        _record("baseline", 1, 0.40, 0.20),
        _record("ctx", 0, 0.20, 0.12),
        _record("ctx", 1, 0.31, 0.18),
    ]
    by_arm = aggregate(records, ["baseline", "ctx"])
    gap = by_arm["baseline"]["metrics"]["score/encoding_gap"]
    assert gap["mean"] == pytest.approx(0.35) and gap["std"] == pytest.approx(0.0707107, rel=1e-5)
    diff = by_arm["ctx"]["vs_baseline"]["score/encoding_gap"]
    assert diff["mean"] == pytest.approx(-0.095) and diff["n"] == 2
    assert diff["clear"]  # -0.10 and -0.09: tight, well below zero
    transfer = by_arm["ctx"]["vs_baseline"]["accuracy/transfer"]
    assert transfer["mean"] == pytest.approx(0.0) and not transfer["clear"]
    report = render_report(by_arm, AblateConfig(seeds=[0, 1]))
    assert "encoding gap: clearly lower (-0.0950" in report
    assert "held-out transfer accuracy: no clear change" in report


def test_the_response_split_verdict_pairs_distances_from_zero_per_seed():
    """A split that moves from -0.081 to +0.120 moved *away* from 0: |arm| - |baseline|
    per seed, not the signed difference negated when the baseline is negative."""

    def run(arm, seed, split):
        record = _record(arm, seed, 0.3, 0.1)
        record["scores"]["response_split"] = split
        return record

    records = [
        run("baseline", 0, -0.081),
        run("baseline", 1, -0.079),
        run("div", 0, 0.120),
        run("div", 1, 0.118),
        run("ctx", 0, -0.020),
        run("ctx", 1, -0.021),
    ]
    by_arm = aggregate(records, ["baseline", "div", "ctx"])
    distance = by_arm["div"]["vs_baseline"]["score/response_split_distance"]
    assert distance["mean"] == pytest.approx(0.039) and distance["clear"]
    report = render_report(by_arm, AblateConfig(seeds=[0, 1]))
    div, ctx = report.split("- **div**:")[1].split("- **ctx**:")
    assert "|response split| (distance from 0): clearly higher (+0.0390" in div
    assert "the wrong way" in div.split("\n")[2]
    assert "|response split| (distance from 0): clearly lower (-0.0595" in ctx


def test_one_seed_gives_no_verdict():
    records = [_record("baseline", 0, 0.3, 0.1), _record("ctx", 0, 0.2, 0.1)]
    report = render_report(aggregate(records, ["baseline", "ctx"]), AblateConfig(seeds=[0]))
    assert "one pair: no spread, no verdict" in report


def test_tiny_ablation_end_to_end_and_rerun_skips_finished_runs(
    tmp_path, tiny_base_overrides, capsys
):
    pretrain = [f"finetune.{item}" for item in tiny_base_overrides]
    args = [
        "ablate",
        *pretrain,
        "arms=[{name: baseline},{name: ctx+div, w_ctx: 1.0, w_div: 1.0}]",
        "seeds=[0,1]",
        "finetune.max_epochs=1",
        "finetune.batch_size=16",
        "finetune.accelerator=cpu",
        "finetune.probe.layers=[0,2]",
        "finetune.loggers=[csv]",
        f"output_dir={tmp_path}",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[1/4] arm baseline" in out and "[4/4] arm ctx+div" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["runs"]) == 4
    assert set(results["runs"][0]["accuracies"]) == {
        "t2i_direct",
        "understanding",
        "text_facts",
        "t2i_reasoning",
        "caption",
        "text_reasoning",
        "transfer",
    }
    assert set(results["arms"]) == {"baseline", "ctx+div"}
    report = (tmp_path / "report.md").read_text()
    assert "## Mean ± 95% interval over runs" in report and "- **ctx+div**:" in report
    for name in ("trajectories.png", "scores.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    # The regularized arm really trained with both terms.
    log = next((tmp_path / "runs" / "ctx+div" / "seed_0" / "logs").glob("version_*/metrics.csv"))
    assert "loss/ctx" in log.read_text().splitlines()[0]

    assert main(args) == 0
    assert capsys.readouterr().out.count("finished earlier, skipping") == 4
    assert json.loads((tmp_path / "results.json").read_text())["arms"] == results["arms"]
