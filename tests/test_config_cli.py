"""Tests of structured configs, the command line, and the pretrain-toy / eval recipes."""

import json
import re
from pathlib import Path

import pytest

from unifyreg.cli import main
from unifyreg.config import (
    ConfigError,
    EvalConfig,
    FinetuneConfig,
    PretrainToyConfig,
    load_config,
)
from unifyreg.toy.base import cache_key, cache_path

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_file_and_overrides_merge_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 50\nmodel:\n  hidden_size: 64\n")
    cfg = load_config(PretrainToyConfig, path, ["model.hidden_size=96", "optim.lr=0.01"])
    assert (cfg.max_steps, cfg.model.hidden_size, cfg.optim.lr) == (50, 96, 0.01)
    assert cfg.batch_size == PretrainToyConfig().batch_size


@pytest.mark.parametrize(
    "override, message",
    [
        ("max_step=5", "unknown config key 'max_step'; valid keys under <top level>: world"),
        ("model.width=5", "unknown config key 'model.width'; valid keys under model: hidden_size"),
        ("max_steps=many", "bad value for config key 'max_steps'"),
        ("max_steps=0", "max_steps must be an integer >= 1"),
        ("optim.lr=-1", "optim.lr must be a finite number > 0"),
        ("model.num_heads=3", "divisible by model.num_heads"),
        ("world.grid_size=1", "grid_size must be between 2"),
        ("max_steps", "must look like key=value"),
    ],
)
def test_bad_values_raise_one_clear_config_error(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(PretrainToyConfig, None, [override])


@pytest.mark.parametrize("override", ["probe.layers=[0,", "data=@x", "data=*a", "data=!x"])
def test_an_override_value_that_is_not_yaml_is_a_config_error_with_exit_code_2(override, capsys):
    with pytest.raises(ConfigError, match=f"override '{re.escape(override)}': the value is not"):
        load_config(FinetuneConfig, None, [override])
    assert main(["finetune", "--print-config", override]) == 2
    err = capsys.readouterr().err
    assert "config error: override" in err and "Traceback" not in err


def test_bad_files_raise_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PretrainToyConfig, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(PretrainToyConfig, tmp_path / "list.yaml")


def test_cache_key_tracks_what_changes_the_weights():
    base = cache_key(PretrainToyConfig())
    assert base == cache_key(PretrainToyConfig())
    assert base != cache_key(PretrainToyConfig(max_steps=10))
    # Where the cache lives and whether to evaluate do not change the weights.
    assert base == cache_key(PretrainToyConfig(cache_dir="/elsewhere", evaluate=False))


def test_the_pretrain_file_builds_the_base_every_other_recipe_uses():
    # eval / probe / finetune / ablate take the toy base of their `pretrain` section, whose
    # defaults are the dataclass's: configs/toy/pretrain.yaml must name the same base.
    from_file = load_config(PretrainToyConfig, ROOT / "configs/toy/pretrain.yaml")
    assert cache_key(from_file) == cache_key(PretrainToyConfig())
    assert cache_key(EvalConfig().pretrain) == cache_key(from_file)


def test_cache_key_covers_the_toy_sequence_layout(monkeypatch):
    import unifyreg.toy.base as toy_base

    before = cache_key(PretrainToyConfig())
    monkeypatch.setattr(toy_base, "LAYOUT_VERSION", toy_base.LAYOUT_VERSION + 1)
    assert cache_key(PretrainToyConfig()) != before


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert main(["pretrain-toy", "max_stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "max_stepz" in err and "max_steps" in err
    assert main(["eval", "splits=[nope]", "pretrain.cache_dir=/nonexistent"]) == 2
    assert "unknown split(s) ['nope']" in capsys.readouterr().err


TINY = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "world.n_pretrain=200",
    "world.n_heldout=10",
    "world.n_eval_per_category=2",
    "max_steps=6",
    "batch_size=16",
    "checkpoint_every_n_steps=3",
    "accelerator=cpu",
]


def test_pretrain_toy_builds_then_reuses_and_eval_reports(tmp_path, capsys):
    cache = f"cache_dir={tmp_path / 'cache'}"
    assert main(["pretrain-toy", *TINY, cache]) == 0
    out = capsys.readouterr().out
    assert "toy base saved to" in out and "| headline | accuracy |" in out
    cfg = load_config(PretrainToyConfig, None, [*TINY, cache])
    base = cache_path(cfg)
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "eval.json",
        "pretrain.yaml",
    ):
        assert (base / name).is_file(), name
    assert not base.with_name(base.name + ".partial").exists()
    summary = json.loads((base / "eval.json").read_text())
    assert summary["max_steps"] == 6 and set(summary["headline"]) >= {"t2i_direct", "transfer"}
    mtime = (base / "model.safetensors").stat().st_mtime_ns

    assert main(["pretrain-toy", *TINY, cache]) == 0
    assert "reusing cached toy base" in capsys.readouterr().out
    assert (base / "model.safetensors").stat().st_mtime_ns == mtime

    output = tmp_path / "eval.json"
    pretrain = [f"pretrain.{item}" for item in [*TINY, cache]]
    assert main(["eval", *pretrain, "splits=[heldout]", f"output={output}"]) == 0
    result = json.loads(output.read_text())
    assert set(result["by_task"]) == {"heldout/transfer"}
    assert result["by_task"]["heldout/transfer"]["count"] == 10
    assert result["model_path"] == str(base)


def test_eval_with_missing_model_path_is_a_config_error():
    with pytest.raises(ConfigError, match="model_path"):
        from unifyreg.recipes.evaluate import run

        run(EvalConfig(model_path="/definitely/not/here"))


def test_probe_command_writes_tables_figures_and_scores(tmp_path, capsys):
    pretrain = [f"pretrain.{item}" for item in [*TINY, f"cache_dir={tmp_path / 'cache'}"]]
    out_dir = tmp_path / "probe"
    assert main(["probe", *pretrain, "probe.layers=[0,1,2]", f"output_dir={out_dir}"]) == 0
    printed = capsys.readouterr().out
    assert "unify/encoding_gap = " in printed and "| layer | text:" in printed
    for name in (
        "result.json",
        "summary.json",
        "table.md",
        "table.csv",
        "stats.csv",
        "encoding_trajectories.png",
        "response_trajectories.png",
    ):
        assert (out_dir / name).is_file(), name
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["layers"] == [0, 1, 2]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.adapter=gpt5"], "model.adapter: unknown adapter 'gpt5'"),
        (["model.adapter=emu3"], "model.path is required for adapter 'emu3'"),
        (["model.adapter=janus", "model.path=/tmp"], "probe_set is required for adapter 'janus'"),
        (["model.path=/not/a/dir"], "model.path: directory '/not/a/dir' does not exist"),
        (["probe_set=/no/such.jsonl"], "probe_set: expected 'toy' or a manifest"),
        (["probe.alpha=0"], "probe.alpha must be a finite number > 0"),
        # inf used to pass the config and fail after the model was loaded (a raw ValueError)
        (["probe.alpha=inf"], "probe.alpha must be a finite number > 0, got inf"),
        (
            ["probe.bandwidth=wide"],
            "probe.bandwidth must be a rule (median, median_differentiable, rms, silverman), "
            "a rule with a factor > 0",
        ),
        (["probe.bandwidth=rms:0"], "probe.bandwidth must be a rule"),
        (["probe.bandwidth=silverman:x"], "probe.bandwidth must be a rule"),
        (["probe.preset=table1"], "probe.preset must be one of"),
        (
            ["probe.preset=paper", "probe.bandwidth=median"],
            "probe.bandwidth='median' conflicts with the preset 'paper', which sets "
            "bandwidth='silverman'",
        ),
        (["probe.preset=default", "probe.alpha=2"], "probe.alpha=2.0 conflicts with the preset"),
        (["probe.responses=sampled"], "probe.responses must be one of reference, generated"),
        (["on_bad_example=ignore"], "on_bad_example must be one of error, skip"),
    ],
)
def test_probe_config_errors_stop_before_work(overrides, message, capsys):
    assert main(["probe", *overrides]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["probe", "finetune"])
def test_a_layer_the_model_does_not_have_stops_with_exit_code_2(
    command, tiny_base_overrides, tmp_path, capsys
):
    out = [f"output_dir={tmp_path}"] if command == "probe" else [f"run_dir={tmp_path / 'r'}"]
    assert main([command, *tiny_base_overrides, "probe.layers=[0,9]", *out]) == 2
    assert (
        "probe.layers: layer 9 out of range: this model has layers 0..2" in capsys.readouterr().err
    )
    assert not (tmp_path / "r").exists() and not (tmp_path / "result.json").exists()


def test_print_config_prints_the_resolved_config_and_does_nothing(tmp_path, capsys):
    assert main(["finetune", "--print-config", "loss.w_div=0.5", f"run_dir={tmp_path / 'r'}"]) == 0
    printed = capsys.readouterr().out
    from omegaconf import OmegaConf

    resolved = OmegaConf.create(printed)
    assert resolved.loss.w_div == 0.5 and resolved.model.adapter == "toy"
    assert not (tmp_path / "r").exists()
    assert load_config(FinetuneConfig, None, ["loss.w_div=0.5"]).loss.w_div == 0.5


def test_dry_run_checks_everything_and_trains_nothing(tiny_base_overrides, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["finetune", "--dry-run", *tiny_base_overrides, f"run_dir={run_dir}"]) == 0
    assert "dry run" in capsys.readouterr().out and not run_dir.exists()
    assert main(["probe", "--dry-run", *tiny_base_overrides, f"output_dir={tmp_path / 'p'}"]) == 0
    assert not (tmp_path / "p").exists()


CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


# Every folder under configs/ (a new family's configs are covered without editing this list).
@pytest.mark.parametrize("family", sorted(p.name for p in CONFIG_ROOT.iterdir() if p.is_dir()))
def test_every_shipped_config_loads(family):
    from unifyreg.config import FinetuneConfig, ProbeRunConfig

    root = CONFIG_ROOT / family
    overrides = [] if family == "toy" else ["model.path=/tmp", "probe_set=p.jsonl"]
    assert load_config(ProbeRunConfig, root / "probe.yaml", overrides).output_dir
    name = "finetune.yaml" if family == "toy" else "finetune_lora.yaml"
    extra = [] if family == "toy" else ["data=d.jsonl"]
    assert load_config(FinetuneConfig, root / name, [*overrides, *extra]).lora.enabled
