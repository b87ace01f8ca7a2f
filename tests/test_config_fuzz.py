"""Fuzz: random config mutations, run through each command's own checks (``--dry-run``:
the config, the files, the model directory, the layers, the Trainer's settings, up to
the first model forward), end in exit code 0 or in exit code 2 with one message naming
what is wrong, never in another exception."""

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unifyreg.cli import main
from unifyreg.config import (
    AblateConfig,
    EvalConfig,
    FinetuneConfig,
    PretrainToyConfig,
    ProbeRunConfig,
)

#: command -> (schema, prefix of the tiny base's pretrain keys, where outputs go)
COMMANDS = {
    "pretrain-toy": (PretrainToyConfig, "", ()),
    "eval": (EvalConfig, "pretrain.", ("output",)),
    "probe": (ProbeRunConfig, "pretrain.", ("output_dir",)),
    "finetune": (FinetuneConfig, "pretrain.", ("run_dir",)),
    "ablate": (AblateConfig, "finetune.pretrain.", ("output_dir", "finetune.run_dir")),
}


def _keys(schema, prefix=""):
    """Every dotted leaf key of a schema (dataclass defaults walked recursively)."""
    keys = []
    instance = schema() if isinstance(schema, type) else schema
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            keys += _keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


VALUES = st.one_of(
    st.integers(-5, 5).map(str),
    st.floats(-2, 2, allow_nan=False).map(lambda x: f"{x:.3g}"),
    st.sampled_from(
        [
            "",
            "null",
            "abc",
            "true",
            "[1,2]",
            "[]",
            "{a: 1}",
            "nan",
            "inf",
            "-1",
            "1e9",
            "median",
            "toy",
            "last",
            "[0,-1]",
            "[0,99]",
            "/no/such/path",
        ]
    ),
)

#: Keys whose mutation would start real work or leave the sandbox in a dry run too:
#: none do (a dry run writes nothing); these only keep the runs small.
FIXED = {"max_steps", "finetune.max_steps", "world.n_pretrain", "pretrain.world.n_pretrain"}


@pytest.fixture(scope="module")
def base(tiny_base_overrides):
    """The tiny base's overrides without their ``pretrain.`` prefix."""
    return [item.removeprefix("pretrain.") for item in tiny_base_overrides]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(command=st.sampled_from(list(COMMANDS)), data=st.data())
def test_random_mutations_stop_with_exit_code_2_and_a_message_or_pass(
    command, data, base, tmp_path_factory, capsys
):
    schema, prefix, outputs = COMMANDS[command]
    out = tmp_path_factory.mktemp("fuzz")
    fixed = [f"{prefix}{item}" for item in base] + [f"{key}={out / key}" for key in outputs]
    keys = [k for k in _keys(schema) if k not in FIXED]
    mutations = []
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.one_of(st.sampled_from(keys), st.sampled_from(["bogus", "model.bogus"])))
        mutations.append(f"{key}={data.draw(VALUES)}")
    capsys.readouterr()
    code = main([command, "--dry-run", *fixed, *mutations])
    err = capsys.readouterr().err
    assert code in (0, 2), (mutations, err)
    if code == 2:  # (transformers' own loading bar may come before the message)
        ours = [line for line in err.splitlines() if line.startswith(f"unifyreg {command}: ")]
        assert len(ours) == 1 and ("error:" in ours[0] or "bad example" in ours[0]), err
        assert "Traceback" not in err, err
    assert not any(p.exists() for p in out.iterdir()), mutations  # a dry run writes nothing
