"""Fuzz: random config mutations give a clean config or one ConfigError, nothing else."""

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unifyreg.config import (
    AblateConfig,
    ConfigError,
    EvalConfig,
    FinetuneConfig,
    PretrainToyConfig,
    ProbeRunConfig,
    load_config,
)

SCHEMAS = [PretrainToyConfig, EvalConfig, ProbeRunConfig, FinetuneConfig, AblateConfig]


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
            "/no/such/path",
        ]
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    schema=st.sampled_from(SCHEMAS),
    data=st.data(),
)
def test_random_mutations_load_cleanly_or_raise_config_error(schema, data):
    keys = _keys(schema)
    n = data.draw(st.integers(1, 3))
    overrides = []
    for _ in range(n):
        key = data.draw(st.one_of(st.sampled_from(keys), st.sampled_from(["bogus", "model.bogus"])))
        overrides.append(f"{key}={data.draw(VALUES)}")
    try:
        cfg = load_config(schema, None, overrides)
    except ConfigError as error:
        message = str(error)
        assert message and "Traceback" not in message
    else:
        assert isinstance(cfg, schema)
