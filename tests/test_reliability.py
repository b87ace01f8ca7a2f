"""Reliability (issue 7, docs/reliability.md): interruption, safe loading, numerics and bad
data, each tried for real.

Bad configuration is tried in test_config_cli.py and test_config_fuzz.py; the uneven DDP
probe in test_callbacks_finetune.py; single bad manifest lines in test_manifest.py.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.loggers.logger import Logger
from PIL import Image

from unifyreg.cli import main
from unifyreg.config import (
    FinetuneConfig,
    LossConfig,
    ModelSource,
    OptimConfig,
    ProbeConfig,
    ProbeRunConfig,
)
from unifyreg.fileio import atomic_directory, atomic_write_json, atomic_write_text
from unifyreg.losses import ContextualPredictionLoss, divergence_loss
from unifyreg.probing import probe_batch, run_probe
from unifyreg.quantities import QUANTITIES
from unifyreg.roles import Role
from unifyreg.toy import save_grid_png

UNIFYREG = str(Path(sys.executable).parent / "unifyreg")


def _decoder_layers(model):
    """The ModuleList of transformer blocks (also under a peft wrapper)."""
    return next(
        m
        for name, m in model.named_modules()
        if name.endswith("layers") and isinstance(m, torch.nn.ModuleList)
    )


def _write_manifest(directory, rows, name="m.jsonl"):
    path = Path(directory) / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _example_rows(directory, examples, prefix="x"):
    """Manifest rows of toy examples, their grids saved as PNG files in ``directory``."""
    rows = []
    for index, e in enumerate(examples):
        row = {"text": e.prompt_text, "category": e.category}
        if e.prompt_image is not None:
            save_grid_png(e.prompt_image, Path(directory) / f"{prefix}_p{index}.png")
            row["image"] = f"{prefix}_p{index}.png"
        if e.response_image is not None:
            save_grid_png(e.response_image, Path(directory) / f"{prefix}_r{index}.png")
            row["response_image"] = f"{prefix}_r{index}.png"
        else:
            row["response"] = e.response_text
        rows.append(row)
    return rows


def _csv_rows(run_dir):
    """Every logged (step, metric) -> value over all CSV versions; fails on a duplicate."""
    values = {}
    for path in sorted((Path(run_dir) / "logs").glob("version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            for key, value in row.items():
                if key == "step" or value in ("", None):
                    continue
                slot = (int(row["step"]), key)
                assert slot not in values, f"{slot} logged twice ({path})"
                values[slot] = float(value)
    return values


def _history(run_dir):
    text = (Path(run_dir) / "probe" / "probe_history.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def _assert_files_complete(run_dir):
    """Every file unifyreg wrote parses completely (no truncated JSON line, JSON, YAML,
    PNG or CSV row), and no staging file is left behind."""
    run_dir = Path(run_dir)
    history = _history(run_dir)  # every line parses
    assert history, "empty probe history"
    for path in (run_dir / "probe").glob("result_epoch_*.json"):
        assert set(json.loads(path.read_text())) >= {"layers", "records"}, path
    for path in (run_dir / "probe").glob("*.png"):
        with Image.open(path) as image:
            image.verify()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run_dir"] == str(run_dir)
    for path in (run_dir / "logs").glob("version_*/metrics.csv"):
        rows = list(csv.reader(path.open()))
        assert all(len(row) == len(rows[0]) for row in rows), path
    assert not [p for p in run_dir.rglob("*.tmp")], "staging files left behind"


# ---------------------------------------------------------------------- bad configuration


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.w_div=-0.5", "loss.w_div must be a finite number >= 0, got -0.5"),
        ("probe.alpha=0", "probe.alpha must be a finite number > 0"),
        ("loss.div_alpha=-1", "loss.div_alpha must be a finite number > 0"),
        ("loss.mask_ratio=1.0", "loss.mask_ratio must be in [0, 1)"),
        ("loss.mask_ratio=-0.1", "loss.mask_ratio must be in [0, 1)"),
        ("every_n_epochs=0", "every_n_epochs must be an integer >= 1"),
        ("max_epochs=two", "bad value for config key 'max_epochs'"),
        ("lora.rank=4", "unknown config key 'lora.rank'; valid keys under lora: enabled, r,"),
        (
            "model.adapter=gpt5",
            "unknown adapter 'gpt5'; registered: chameleon, emu3, glm_image, hooked, janus, mot, "
            "showo, toy, two_stage",
        ),
        ("model.path=/no/such/model", "model.path: directory '/no/such/model' does not exist"),
    ],
)
def test_bad_finetune_settings_stop_before_any_training(
    override, message, tiny_base_overrides, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    assert main(["finetune", *tiny_base_overrides, override, f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unifyreg finetune: config error: ") and message in err
    assert not run_dir.exists()


# ---------------------------------------------------------------------- interruption

#: Runs the real CLI, but pauses (sleeps) at one training step, after writing a marker
#: file, so the test can SIGKILL it at a known point in the middle of an epoch.
PAUSING_CLI = """
import os, sys, time
from pathlib import Path
from unifyreg.cli import main
from unifyreg.module import UMMModule

epoch, batch = (int(x) for x in os.environ["PAUSE_AT"].split(":"))
marker = Path(os.environ["PAUSE_MARKER"])
step = UMMModule.training_step

def training_step(self, batch_, batch_idx):
    if self.current_epoch == epoch and batch_idx == batch:
        marker.write_text(str(self.global_step))
        time.sleep(600)
    return step(self, batch_, batch_idx)

UMMModule.training_step = training_step
sys.exit(main(sys.argv[1:]))
"""

#: 3 epochs of 3 steps (96 examples, batch 32) on the tiny base.
RUN = ["probe.layers=[0,2]", "batch_size=32", "accelerator=cpu", "loggers=[csv]", "max_epochs=3"]


@pytest.fixture(scope="module")
def reference_run(tiny_base_overrides, tmp_path_factory):
    """An uninterrupted `unifyreg finetune` of RUN (in-process)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert main(["finetune", *tiny_base_overrides, *RUN, f"run_dir={run_dir}"]) == 0
    return run_dir


def test_sigkill_mid_epoch_then_resume_last_equals_an_uninterrupted_run(
    reference_run, tiny_base_overrides, tmp_path
):
    """SIGKILL at step 2 of epoch 2 (after epoch 1's last.ckpt), then `resume=last`: the
    same per-epoch probe history (epochs 0-3, none lost or duplicated, values equal to
    1e-9) and the same logged values as the uninterrupted run; no file truncated."""
    from unifyreg.trainer import load_checkpoint

    run_dir = tmp_path / "run"
    marker = tmp_path / "paused"
    args = ["finetune", *tiny_base_overrides, *RUN, f"run_dir={run_dir}"]
    env = {**os.environ, "PAUSE_AT": "1:1", "PAUSE_MARKER": str(marker)}
    child = subprocess.Popen(
        [sys.executable, "-c", PAUSING_CLI, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert child.poll() is None, child.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the child never reached the pause"
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert int(marker.read_text()) == 4  # killed in the middle of epoch 2 (steps 3-5)
    assert [e["epoch"] for e in _history(run_dir)] == [0, 1]
    _assert_files_complete(run_dir)
    # Our own checkpoints load with weights_only=True (and carry the random state).
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 3 and "unifyreg" in checkpoint

    resumed = subprocess.run(
        [UNIFYREG, *args, "resume=last"], capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout

    _assert_files_complete(run_dir)
    got, want = _history(run_dir), _history(reference_run)
    assert [e["epoch"] for e in got] == [e["epoch"] for e in want] == [0, 1, 2, 3]
    assert [e["global_step"] for e in got] == [e["global_step"] for e in want] == [0, 3, 6, 9]
    for g, w in zip(got, want, strict=True):
        assert g["metrics"].keys() == w["metrics"].keys()
        for key, value in w["metrics"].items():
            assert g["metrics"][key] == pytest.approx(value, rel=0, abs=1e-9), (g["epoch"], key)
    # The logged values (CSV over both versions): nothing lost, nothing duplicated, equal.
    logged, reference = _csv_rows(run_dir), _csv_rows(reference_run)
    assert logged.keys() == reference.keys()
    probe_epochs = sorted(v for (_, k), v in logged.items() if k == "probe/epoch")
    assert probe_epochs == [0, 1, 2, 3]
    for slot, value in reference.items():
        if slot[1] in ("probe/seconds", "probe/epoch_share"):  # wall-clock timings
            continue
        assert logged[slot] == pytest.approx(value, rel=0, abs=1e-9), slot


def test_the_shuffle_order_depends_only_on_seed_and_epoch():
    from unifyreg.module import EpochRandomSampler

    data = list(range(50))
    first, second = EpochRandomSampler(data, seed=3), EpochRandomSampler(data, seed=3)
    for epoch in (2, 0, 2):
        first.set_epoch(epoch)
        assert list(first) == list(first)  # re-iterating an epoch repeats it
    second.set_epoch(2)
    assert list(first) == list(second) and sorted(first) == data
    second.set_epoch(1)
    assert list(second) != list(first)
    assert list(EpochRandomSampler(data, seed=4)) != list(EpochRandomSampler(data, seed=3))


def test_checkpoints_carry_the_random_state_of_the_process_and_the_loss_terms(
    tiny_adapter, tmp_path
):
    """What a resumed run draws next (dropout, L_ctx masks) equals what the
    uninterrupted run drew; the state survives a weights_only=True load."""
    from unifyreg.module import UMMModule
    from unifyreg.trainer import load_checkpoint

    term = ContextualPredictionLoss(LossConfig(w_ctx=1.0), tiny_adapter.hidden_size)
    module = UMMModule(tiny_adapter, total_steps=10, loss_terms=[term])
    torch.rand(5, generator=term._generator)  # some masks were drawn
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "state.ckpt")
    expected = (torch.rand(4), torch.rand(4, generator=term._generator))

    torch.manual_seed(123)  # the resumed process starts elsewhere
    fresh_term = ContextualPredictionLoss(LossConfig(w_ctx=1.0), tiny_adapter.hidden_size)
    fresh = UMMModule(tiny_adapter, total_steps=10, loss_terms=[fresh_term])
    fresh.on_load_checkpoint(load_checkpoint(tmp_path / "state.ckpt"))
    assert torch.equal(torch.rand(4), expected[0])
    assert torch.equal(torch.rand(4, generator=fresh_term._generator), expected[1])


def test_saved_weights_are_safetensors_only(reference_run, tiny_base_overrides):
    """LoRA weights, the merged model and the toy base are safetensors; no pickle-based
    weight file (.bin/.pt/.pth/.pkl) is written anywhere (Lightning's .ckpt aside)."""
    assert (reference_run / "lora" / "adapter_model.safetensors").is_file()
    assert (reference_run / "merged" / "model.safetensors").is_file()
    cache = Path(next(o for o in tiny_base_overrides if ".cache_dir=" in o).split("=", 1)[1])
    assert list(cache.glob("toy-base-*/model.safetensors"))
    for root in (reference_run, cache):
        pickled = [p for p in root.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        assert pickled == [], pickled


def test_a_kill_during_a_write_never_leaves_a_truncated_file(tmp_path):
    """A child rewrites a 2 MB JSON file in a loop with atomic_write_text; SIGKILL at
    several moments: the file always parses completely."""
    target = tmp_path / "big.json"
    writer = (
        "import json, sys\n"
        "from unifyreg.fileio import atomic_write_text\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    atomic_write_text(sys.argv[1], json.dumps({'i': i, 'pad': 'x' * 2_000_000}))\n"
    )
    for delay in (0.05, 0.17, 0.31):
        child = subprocess.Popen([sys.executable, "-c", writer, str(target)])
        try:
            deadline = time.monotonic() + 60
            while not target.exists():
                assert child.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(delay)
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        data = json.loads(target.read_text())
        assert data["i"] >= 1 and len(data["pad"]) == 2_000_000


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, tiny_adapter, tiny_splits):
    """Files used to keep mkstemp's 0600 (unreadable to a TensorBoard or a colleague
    running as another user): every writer must give what a plain open() gives."""
    from unifyreg.probing import run_probe
    from unifyreg.report import write_probe_result

    previous = os.umask(umask)
    try:
        written = [
            atomic_write_text(tmp_path / "a.txt", "x"),
            atomic_write_json(tmp_path / "b.json", {"a": 1}),
            *write_probe_result(
                run_probe(tiny_adapter, tiny_splits["probe/image/attribute"][:2], ProbeConfig()),
                tmp_path / "probe",
            ).values(),
        ]
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(previous)
    expected = plain.stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for path in written:
        assert path.stat().st_mode & 0o777 == expected, path


def test_atomic_writes_leave_the_old_file_or_directory_on_error(tmp_path):
    path = atomic_write_text(tmp_path / "a.json", '{"v": 1}\n')
    with pytest.raises(TypeError):
        atomic_write_text(path, None)  # fails while writing
    assert path.read_text() == '{"v": 1}\n' and sorted(os.listdir(tmp_path)) == ["a.json"]

    target = tmp_path / "weights"
    with atomic_directory(target) as staging:
        (staging / "w.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "w.txt").write_text("half")
        raise RuntimeError("killed mid-save")
    assert (target / "w.txt").read_text() == "old"
    with atomic_directory(target) as staging:
        (staging / "w.txt").write_text("new")
    assert (target / "w.txt").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["a.json", "weights"]


# ---------------------------------------------------------------------- safe loading


def test_json_files_are_indented_or_one_line_and_load_back_equal(tmp_path):
    data = {"b": [1.5, float("1e-300"), 0.1 + 0.2], "a": {"x": "é", "y": None}}
    pretty = atomic_write_json(tmp_path / "pretty.json", data).read_text()
    compact = atomic_write_json(tmp_path / "compact.json", data, indent=None).read_text()
    assert pretty.count("\n") > 5 and pretty.index('"a"') < pretty.index('"b"')
    assert compact.count("\n") == 1 and " " not in compact
    assert json.loads(pretty) == json.loads(compact) == data


def test_resume_refuses_a_checkpoint_that_would_run_code(tiny_base_overrides, tmp_path, capsys):
    """A checkpoint whose unpickling would create a directory is refused
    (weights_only=True): exit code 2, a plain message, nothing executed."""
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    checkpoint = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, checkpoint)
    code = main(
        [
            "finetune",
            *tiny_base_overrides,
            *RUN[:4],
            "max_epochs=1",
            f"run_dir={tmp_path / 'run'}",
            f"resume={checkpoint}",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"config error: resume: checkpoint '{checkpoint}' holds more than tensors" in err
    assert "weights_only=True" in err
    assert not marker.exists()
    assert not (tmp_path / "run").exists()  # refused before anything was written
    # Control: the file really is a code-running pickle.
    torch.load(checkpoint, weights_only=False)
    assert marker.is_dir()


def test_trust_remote_code_is_off_by_default_and_warns_when_set(tiny_adapter, tmp_path):
    from unifyreg.recipes.common import load_adapter

    assert ModelSource().trust_remote_code is False
    assert FinetuneConfig().model.trust_remote_code is False
    assert ProbeRunConfig().model.trust_remote_code is False
    tiny_adapter.save(tmp_path / "toy")
    with pytest.warns(UserWarning, match="trust_remote_code=true is ignored by the 'toy'"):
        load_adapter(ModelSource(adapter="toy", path=str(tmp_path / "toy"), trust_remote_code=True))


def test_hf_adapters_load_locally_and_never_pass_trust_remote_code(tmp_path, monkeypatch):
    """`model.trust_remote_code=true` on a real family: a warning, and from_pretrained is
    still called with local_files_only=True and without trust_remote_code."""
    import transformers

    from unifyreg.adapters.emu3 import Emu3Adapter, save_tiny_emu3
    from unifyreg.recipes.common import load_adapter

    checkpoint = save_tiny_emu3(tmp_path / "emu3")
    calls = []

    def spy(original):
        def wrapped(*args, **kwargs):
            calls.append(kwargs)
            return original(*args, **kwargs)

        return wrapped

    model_class = Emu3Adapter.model_class
    monkeypatch.setattr(model_class, "from_pretrained", spy(model_class.from_pretrained))
    monkeypatch.setattr(
        transformers.AutoProcessor,
        "from_pretrained",
        spy(transformers.AutoProcessor.from_pretrained),
    )
    with pytest.warns(UserWarning, match="trust_remote_code=True is ignored"):
        load_adapter(ModelSource(adapter="emu3", path=str(checkpoint), trust_remote_code=True))
    assert len(calls) >= 2  # the model and the processor
    for kwargs in calls:
        assert kwargs.get("local_files_only") is True
        assert not kwargs.get("trust_remote_code", False)


@pytest.mark.parametrize(
    "command, override, message",
    [
        ("probe", "model.path={}", "model.path: directory"),
        ("probe", "probe_set={}", "probe_set: expected 'toy' or a manifest file"),
        ("finetune", "data={}", "data: expected 'toy' or a manifest file"),
        ("finetune", "resume={}", "resume: checkpoint"),
    ],
)
def test_paths_from_configs_are_never_evaluated(
    command, override, message, tiny_base_overrides, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    code = "__import__('os').system('touch pwned')"
    extra = [f"run_dir={tmp_path / 'run'}"] if command == "finetune" else []
    assert main([command, *tiny_base_overrides, override.format(code), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------- numerics


@pytest.fixture
def probe_examples(tiny_splits):
    return [e for name, split in tiny_splits.items() if name.startswith("probe/") for e in split]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_probe_to_float64_close_to_float32(
    dtype, tiny_adapter, probe_examples
):
    reference = run_probe(tiny_adapter, probe_examples, ProbeConfig())
    tiny_adapter.model.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no non-finite warning either
        result = run_probe(tiny_adapter, probe_examples, ProbeConfig())
    for q in QUANTITIES:
        values = result.records[q].values
        assert values.dtype == np.float64 and np.isfinite(values).all(), q
        np.testing.assert_allclose(values, reference.records[q].values, atol=0.02)


def test_fp16_overflow_gives_nan_with_a_warning_only_where_it_happens(tiny_adapter, probe_examples):
    """An fp16 model whose block 1 overflows to inf: NaN (with a warning naming the
    quantity and layer) at layer 2 only; layers 0 and 1 finite."""
    tiny_adapter.model.to(torch.float16)
    layers = _decoder_layers(tiny_adapter.model)
    handle = layers[1].register_forward_hook(lambda m, i, out: out + 1e5)  # > fp16 max
    try:
        with pytest.warns(RuntimeWarning, match="non-finite") as caught:
            result = run_probe(tiny_adapter, probe_examples, ProbeConfig())
    finally:
        handle.remove()
    messages = " ".join(str(w.message) for w in caught)
    for q in QUANTITIES:
        assert q in messages and "[2]" in messages
        values = result.records[q].values
        assert np.isfinite(values[:, :2]).all() and np.isnan(values[:, 2]).all(), q


def test_nan_hidden_states_give_nan_for_exactly_the_affected_sample(tiny_adapter, probe_examples):
    """NaN injected (forward hook) into one sample's block-0 output: that sample is NaN
    from there on, with a warning naming quantity and layer; every other value is
    unchanged."""
    clean = run_probe(tiny_adapter, probe_examples, ProbeConfig(batch_size=len(probe_examples)))
    layers = _decoder_layers(tiny_adapter.model)

    def inject(module, inputs, output):
        output = output.clone()
        output[0, 3] = float("nan")  # sample 0 (a text prompt), one prompt position
        return output

    handle = layers[0].register_forward_hook(inject)
    try:
        # (transformers records block 0's output before this hook changes it, so the
        # NaN shows from layer 2, the first block that reads it.)
        with pytest.warns(RuntimeWarning, match=r"encoding/text at layer\(s\) \[(1, )?2\]"):
            dirty = run_probe(
                tiny_adapter, probe_examples, ProbeConfig(batch_size=len(probe_examples))
            )
    finally:
        handle.remove()
    assert probe_examples[0].prompt_image is None
    for q in ("encoding/text", "response/image"):  # the two quantities of sample 0
        values = dirty.records[q].values
        assert np.isfinite(values[0, 0]) and np.isnan(values[0, -1]), q
        np.testing.assert_array_equal(values[1:], clean.records[q].values[1:])
    for q in ("encoding/image", "response/text"):
        np.testing.assert_array_equal(dirty.records[q].values, clean.records[q].values)


class _Recorder(Logger):
    """A logger that keeps every logged (step, name) -> value."""

    def __init__(self):
        super().__init__()
        self.values = {}

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        for key, value in metrics.items():
            self.values.setdefault(key, {})[step] = float(value)


def test_training_continues_through_a_nan_batch_and_nothing_is_corrupted(
    tiny_adapter, tiny_splits, probe_examples
):
    """NaN hidden states in one training batch (step 2): both loss terms contribute 0
    and log so (loss/ctx_tokens 0, loss/div_parts 0), the optimizer step is skipped
    with a warning (loss/skipped_steps 1), weights and optimizer state are unchanged,
    and training and the probes go on with finite values."""
    from unifyreg.callbacks import EntropyProbe
    from unifyreg.module import UMMModule, example_loader

    term = ContextualPredictionLoss(LossConfig(w_ctx=1.0, w_div=1.0), tiny_adapter.hidden_size)
    module = UMMModule(
        tiny_adapter,
        OptimConfig(lr=1e-2, warmup_steps=0),
        total_steps=8,
        loss_terms=[term],
        hidden_states_for_terms=True,
    )
    state = {"poison": False, "snapshots": {}}

    def inject(module_, inputs, output):
        if not state["poison"]:
            return output
        output = output.clone()
        output[0, 2] = float("nan")
        return output

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            state["poison"] = trainer.global_step == 2
            if trainer.global_step == 2:
                state["snapshots"]["before"] = _snapshot(trainer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if state["poison"]:
                state["snapshots"]["after"] = _snapshot(trainer)
            state["poison"] = False

    def _snapshot(trainer):
        params = {n: p.detach().clone() for n, p in module.named_parameters()}
        optim = trainer.optimizers[0].state_dict()["state"]
        moments = {k: v["exp_avg"].clone() for k, v in optim.items()}
        return params, moments

    handle = _decoder_layers(tiny_adapter.model)[0].register_forward_hook(inject)
    recorder = _Recorder()
    probe = EntropyProbe(
        probe_examples[::5], ProbeConfig(layers=[0, 2]), adapter=tiny_adapter, figures=False
    )
    trainer = L.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=recorder,
        callbacks=[probe, Watch()],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
    )
    examples = [*tiny_splits["probe/text/composition"], *tiny_splits["probe/image/attribute"]]
    loader = example_loader(tiny_adapter, examples * 2, batch_size=8, shuffle=True)
    try:
        with pytest.warns(RuntimeWarning, match=r"step 2: non-finite gradients.*skipped"):
            trainer.fit(module, loader)
    finally:
        handle.remove()
    assert trainer.global_step == 6  # training went on to the end
    logged = recorder.values
    assert np.isnan(logged["loss/task"][2]) and np.isfinite(logged["loss/task"][1])
    assert logged["loss/ctx_tokens"][2] == 0 and logged["loss/ctx_tokens"][1] > 0
    assert logged["loss/div_parts"][2] == 0 and logged["loss/div_parts"][1] == 2
    assert logged["loss/skipped_steps"][1] == 0 and logged["loss/skipped_steps"][5] == 1
    (params_before, moments_before), (params_after, moments_after) = (
        state["snapshots"]["before"],
        state["snapshots"]["after"],
    )
    for name, value in params_before.items():
        assert torch.equal(value, params_after[name]), name
    for key, value in moments_before.items():
        assert torch.equal(value, moments_after[key])
    assert all(torch.isfinite(p).all() for p in module.parameters())
    final = probe.history[-1]["metrics"]
    assert all(np.isfinite(v) for v in final.values())


def test_a_batch_without_image_tokens_trains_with_zero_regularizer(tiny_adapter, tiny_splits):
    from unifyreg.module import UMMModule

    text_only = [e for e in tiny_splits["finetune"] if e.task == "text"][:6]
    batch = tiny_adapter.encode(text_only)
    assert not (
        (batch["roles"] == Role.IMAGE_PROMPT) | (batch["roles"] == Role.IMAGE_RESPONSE)
    ).any()
    term = ContextualPredictionLoss(LossConfig(w_ctx=1.0, w_div=1.0), tiny_adapter.hidden_size)
    module = UMMModule(
        tiny_adapter, total_steps=10, loss_terms=[term], hidden_states_for_terms=True
    )
    logged = {}
    module.log_dict = lambda d, **k: logged.update(d)
    module.log = lambda *a, **k: None
    total = module.training_step(batch, 0)
    assert torch.isfinite(total)
    assert total.item() == pytest.approx(logged["loss/task"].item())
    assert logged["tokens/image"] == 0 and logged["loss/image"].item() == 0.0
    assert logged["loss/ctx_tokens"] == 0 and logged["loss/div_parts"] == 0
    total.backward()
    assert all(
        torch.isfinite(p.grad).all() for p in tiny_adapter.model.parameters() if p.grad is not None
    )


def test_one_token_segments_give_finite_values_and_gradients():
    """Every segment one token long: entropy 0 (normalised 0), finite proxy, finite
    divergence gradients."""
    R = Role
    roles = torch.tensor(
        [
            [R.SPECIAL, R.TEXT_PROMPT, R.SPECIAL, R.IMAGE_RESPONSE, R.SPECIAL],
            [R.SPECIAL, R.IMAGE_PROMPT, R.SPECIAL, R.TEXT_RESPONSE, R.SPECIAL],
        ]
    )
    hidden = torch.randn(3, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = probe_batch(hidden.detach(), roles, ["a", "b"], [0, 1, 2], ProbeConfig())
    for q in QUANTITIES:
        assert len(records[q]) == 1, q
        assert np.isfinite(records[q].values).all() and np.isfinite(records[q].normalized).all()
    for q in ("encoding/text", "encoding/image"):
        assert (records[q].values == 0).all() and (records[q].normalized == 0).all()
    value, used = divergence_loss(hidden, roles)
    value.backward()
    assert used == 2 and torch.isfinite(value) and torch.isfinite(hidden.grad).all()


# ---------------------------------------------------------------------- bad data


@pytest.fixture
def bad_manifest(tmp_path, tiny_splits):
    """Three good lines and one of each bad kind (line numbers in the comments)."""
    good = _example_rows(
        tmp_path,
        [*tiny_splits["probe/text/composition"][:2], *tiny_splits["probe/image/attribute"][:1]],
    )
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG but not really")
    rows = [
        good[0],  # 1
        "{this is not json",  # 2
        {"text": "a", "image": "missing.png", "response": "red"},  # 3
        {"text": "a", "image": "corrupt.png", "response": "red"},  # 4
        {"text": "   ", "response": "red"},  # 5
        {"text": " ".join(["red"] * 70), "response": "red"},  # 6: 74 tokens > 64
        good[1],  # 7
        good[2],  # 8
    ]
    return _write_manifest(tmp_path, rows)


def test_probe_skips_and_counts_bad_lines(bad_manifest, tiny_base_overrides, tmp_path, capsys):
    out = tmp_path / "out"
    args = [
        "probe",
        *tiny_base_overrides,
        f"probe_set={bad_manifest}",
        "on_bad_example=skip",
        "probe.layers=[0,2]",
        f"output_dir={out}",
        "figures=false",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for line in (2, 3, 4, 5, 6):
        assert f"skipped {bad_manifest}:{line}:" in printed, line
    assert "probe_set: 5 bad example(s) skipped" in printed
    assert "allows 64" in printed
    result = json.loads((out / "result.json").read_text())
    assert result["meta"]["skipped_examples"] == 5
    assert sum(len(r["categories"]) for r in result["records"].values()) == 6  # 3 x 2


@pytest.mark.parametrize(
    "line, message",
    [
        (2, "not valid JSON"),
        (3, "does not exist"),
        (4, "not a readable image"),
        (5, "'text' is missing or empty"),
        (6, "has 74 tokens; the model allows 64"),
    ],
)
def test_a_bad_line_stops_the_command_naming_file_and_line(
    line, message, bad_manifest, tiny_base_overrides, tmp_path, capsys
):
    lines = bad_manifest.read_text().splitlines()
    keep = [lines[0], *[""] * (line - 2), lines[line - 1], *lines[6:]]  # same line number
    bad_manifest.write_text("\n".join(keep) + "\n")
    args = [
        "probe",
        *tiny_base_overrides,
        f"probe_set={bad_manifest}",
        f"output_dir={tmp_path / 'out'}",
        "figures=false",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"unifyreg probe: bad example: {bad_manifest}:{line}: " in err and message in err
    assert not (tmp_path / "out").exists()  # stopped before any work


def test_finetune_logs_the_skipped_counts(
    bad_manifest, tiny_base_overrides, tiny_splits, tmp_path, capsys
):
    data = _write_manifest(
        tmp_path,
        [
            *_example_rows(tmp_path, tiny_splits["finetune"][:16], prefix="d"),
            "not json",
            {"text": "red", "response": "red", "colour": "red"},
        ],
        name="data.jsonl",
    )
    run_dir = tmp_path / "run"
    args = [
        "finetune",
        *tiny_base_overrides,
        f"data={data}",
        f"probe_set={bad_manifest}",
        "on_bad_example=skip",
        "probe.layers=[0,2]",
        "batch_size=8",
        "max_epochs=1",
        "accelerator=cpu",
        "loggers=[csv]",
        f"run_dir={run_dir}",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "data: 2 bad example(s) skipped" in printed
    assert "probe_set: 5 bad example(s) skipped" in printed
    logged = _csv_rows(run_dir)
    assert {v for (_, k), v in logged.items() if k == "data/skipped_examples"} == {2.0}
    assert [v for (_, k), v in sorted(logged.items()) if k == "probe/skipped_examples"] == [5, 5]
    assert all(e["metrics"]["probe/skipped_examples"] == 5 for e in _history(run_dir))
