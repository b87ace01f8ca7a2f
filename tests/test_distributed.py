"""Two CPU ranks (gloo) under DDP and FSDP: the probe equals a single process, FSDP trains
as DDP does, and a killed FSDP run resumes (docs/reliability.md, "Distributed").

One set of runs (module fixture), as few and small as they can be: a single process
in-process; `devices=2 strategy=ddp`; `devices=2 strategy=fsdp` killed with SIGKILL in
the middle of epoch 2, then resumed with `resume=last`. The probe set has 5 examples and
`probe.batch_size=2`, so rank 0 probes 3 examples in 2 forward passes and rank 1 probes 2
in 1: under FSDP, where every forward pass is a collective, rank 1 must run a padding
pass or both ranks hang (the subprocess timeout would fail the test).
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unifyreg.cli import main
from unifyreg.trainer import load_checkpoint

UNIFYREG = str(Path(sys.executable).parent / "unifyreg")

#: Runs the real CLI as a script (Lightning relaunches `python <script> <args>` for rank
#: 1), pausing every rank at one training step after rank 0 writes a marker file.
PAUSING_SCRIPT = """
import os, sys, time
from pathlib import Path
from unifyreg.cli import main
from unifyreg.module import UMMModule

epoch, batch = (int(x) for x in os.environ["PAUSE_AT"].split(":"))
marker = Path(os.environ["PAUSE_MARKER"])
step = UMMModule.training_step

def training_step(self, batch_, batch_idx):
    if self.current_epoch == epoch and batch_idx == batch:
        if self.global_rank == 0:
            marker.write_text(str(self.global_step))
        time.sleep(600)
    return step(self, batch_, batch_idx)

UMMModule.training_step = training_step
sys.exit(main(sys.argv[1:]))
"""


def _history(run_dir):
    lines = (Path(run_dir) / "probe" / "probe_history.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _csv_probe_epochs(run_dir):
    epochs = []
    for path in sorted((Path(run_dir) / "logs").glob("version_*/metrics.csv")):
        epochs += [
            int(float(r["probe/epoch"]))
            for r in csv.DictReader(path.open())
            if r.get("probe/epoch")
        ]
    return epochs


def _probe_manifest(directory, examples):
    from unifyreg.toy import save_grid_png

    lines = []
    for index, e in enumerate(examples):
        row = {"text": e.prompt_text, "category": e.category}
        if e.prompt_image is not None:
            save_grid_png(e.prompt_image, directory / f"prompt_{index}.png")
            row["image"] = f"prompt_{index}.png"
        if e.response_image is not None:
            save_grid_png(e.response_image, directory / f"response_{index}.png")
            row["response_image"] = f"response_{index}.png"
        else:
            row["response"] = e.response_text
        lines.append(json.dumps(row))
    path = directory / "probe.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(args, **kwargs):
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tiny_base_overrides, tiny_splits, tmp_path_factory):
    """Run directories: ``single``, ``ddp``, ``fsdp`` (killed in epoch 2, then resumed);
    ``killed`` holds the FSDP run's history and marker right after the kill."""
    tmp = tmp_path_factory.mktemp("distributed")
    examples = [*tiny_splits["probe/text/deductive"][:3], *tiny_splits["probe/image/relation"][:2]]
    manifest = _probe_manifest(tmp, examples)
    common = [
        "finetune",
        *tiny_base_overrides,
        f"probe_set={manifest}",
        "probe.layers=[0,2]",
        "probe.batch_size=2",
        "batch_size=16",
        "accelerator=cpu",
        "max_epochs=2",
        "loggers=[csv]",
    ]
    dirs = {name: tmp / name for name in ("single", "ddp", "fsdp")}
    assert main([*common, f"run_dir={dirs['single']}"]) == 0
    _run([UNIFYREG, *common, f"run_dir={dirs['ddp']}", "devices=2", "strategy=ddp"])

    fsdp = [*common, f"run_dir={dirs['fsdp']}", "devices=2", "strategy=fsdp"]
    script, marker = tmp / "pausing_cli.py", tmp / "paused"
    script.write_text(PAUSING_SCRIPT)
    env = {**os.environ, "PAUSE_AT": "1:1", "PAUSE_MARKER": str(marker)}
    child = subprocess.Popen(
        [sys.executable, str(script), *fsdp],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: both ranks are killed at once
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, child.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the FSDP run never reached the pause"
            time.sleep(0.1)
        time.sleep(0.5)  # rank 1 reaches the same step
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    child.stderr.close()
    killed = {"history": _history(dirs["fsdp"]), "step": int(marker.read_text())}
    resumed = _run([UNIFYREG, *fsdp, "resume=last"])
    assert "resuming from" in resumed.stdout
    return {**dirs, "killed": killed}


def test_ddp_and_fsdp_probes_equal_a_single_process(runs):
    """Epoch 0 probes the same base weights everywhere: the sharded probes (DDP: the
    unwrapped model on each rank; FSDP: through the wrapper, with a padding pass on rank 1)
    equal the single process up to summation order."""
    single = _history(runs["single"])[0]["metrics"]
    assert "unify/encoding_gap" in single and "unify/final_gap" in single
    for name in ("ddp", "fsdp"):
        sharded = _history(runs[name])[0]["metrics"]
        assert sharded.keys() == single.keys(), name
        for key, value in single.items():
            if key != "probe/seconds":
                assert sharded[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, key)


def test_a_killed_fsdp_run_resumes_without_lost_or_repeated_epochs(runs):
    assert runs["killed"]["step"] == 4  # killed at step 2 of epoch 2 (steps 3-5)
    assert [e["epoch"] for e in runs["killed"]["history"]] == [0, 1]
    fsdp, ddp = _history(runs["fsdp"]), _history(runs["ddp"])
    assert [e["epoch"] for e in fsdp] == [e["epoch"] for e in ddp] == [0, 1, 2]
    assert [e["global_step"] for e in fsdp] == [e["global_step"] for e in ddp] == [0, 3, 6]
    assert sorted(_csv_probe_epochs(runs["fsdp"])) == [0, 1, 2]  # over both CSV versions
    # FSDP trains as DDP does (same global batch, gradients averaged over the ranks): the
    # probes after each epoch agree to float32 round-off (measured: 1e-8).
    for f, d in zip(fsdp[1:], ddp[1:], strict=True):
        for key, value in d["metrics"].items():
            if not key.startswith(("probe/seconds", "probe/epoch_share")):
                assert f["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_fsdp_keeps_the_optimizer_groups_and_saves_plain_weights(runs):
    """FSDP flattens every parameter into a 1-D shard; weight decay still goes to the LoRA
    matrices (the groups equal the single process's), and the saved LoRA weights are the
    gathered full ones (equal to DDP's), loadable without FSDP."""
    from unifyreg.adapters.toy import ToyAdapter

    def groups(name):
        checkpoint = load_checkpoint(runs[name] / "checkpoints" / "last.ckpt")
        return [
            (g["name"], len(g["params"]), g["weight_decay"])
            for g in checkpoint["optimizer_states"][0]["param_groups"]
        ]

    assert groups("fsdp") == groups("single") == [("decay", 28, 0.01)]
    fsdp = load_file(runs["fsdp"] / "lora" / "adapter_model.safetensors")
    ddp = load_file(runs["ddp"] / "lora" / "adapter_model.safetensors")
    assert fsdp.keys() == ddp.keys() and len(fsdp) == 28
    for key, value in ddp.items():
        assert fsdp[key].shape == value.shape
        torch.testing.assert_close(fsdp[key], value, rtol=1e-5, atol=1e-7)
    merged = ToyAdapter.load(runs["fsdp"] / "merged")
    assert merged.generate_images([]) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["strategy=fsdp", "devices=2", "probe.responses=generated"],
            "config error: probe.responses: 'generated' cannot run under a sharded strategy",
        ),
        # Without deepspeed installed Lightning says so; with it, unifyreg says it needs CUDA.
        (["strategy=deepspeed_stage_2"], "DeepSpeed"),
    ],
)
def test_sharded_settings_that_cannot_run_stop_before_training(
    extra, message, tiny_base_overrides, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    args = ["finetune", "--dry-run", *tiny_base_overrides, "accelerator=cpu", *extra]
    assert main([*args, f"run_dir={run_dir}"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after the loading bar)
    assert last.startswith("unifyreg finetune: config error: ") and message in last
    assert not run_dir.exists()
