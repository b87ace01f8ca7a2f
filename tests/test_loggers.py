"""`loggers=[wandb, mlflow]`: W&B offline and an MLflow file store under the run directory
receive the probe's metrics and its figures as images (no network)."""

import importlib.util
import os
from pathlib import Path

import pytest

from unifyreg.cli import main

FAST = ["probe.layers=[0,2]", "batch_size=32", "accelerator=cpu", "max_epochs=1"]


def _wandb_history(run_file):
    """The history rows of an offline W&B run file (`run-<id>.wandb`: W&B's record log,
    LevelDB's log format: 32 KiB blocks of records, each a 7-byte header
    (CRC-32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) and a
    protobuf `Record`)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B"
    position, block, chunks, pending = 7, 32768, [], b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # the rest of a block too short for a header is padding
            position += left
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        body = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:
            chunks.append(body)
        elif kind == 2:
            pending = body
        elif kind == 3:
            pending += body
        elif kind == 4:
            chunks.append(pending + body)
    rows = []
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): item.value_json
                    for item in record.history.item
                }
            )
    return rows


def test_wandb_offline_and_mlflow_get_the_metrics_and_the_figures(
    tiny_base_overrides, tmp_path, monkeypatch
):
    import json

    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    args = [*FAST, "loggers=[wandb,mlflow]", "probe_figures=every", f"run_dir={run_dir}"]
    assert main(["finetune", *tiny_base_overrides, *args]) == 0

    # W&B, offline: one run under run_dir/wandb; the probe's metrics at each probe's
    # global step, and every figure as an image (PNG media files).
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows = _wandb_history(run_file)
    probes = [r for r in rows if "unify/encoding_gap" in r]
    assert [json.loads(r["trainer/global_step"]) for r in probes] == [0, 3]
    assert {"probe/encoding/text/layer_00", "probe_norm/response/image/layer_02"} <= set(probes[0])
    key = "figures/encoding_text_by_epoch"
    images = [r for r in rows if f"{key}/_type" in r]
    assert [json.loads(r["trainer/global_step"]) for r in images] == [0, 3]
    assert json.loads(images[0][f"{key}/_type"]) == "images/separated"
    for row in images:
        (name,) = json.loads(row[f"{key}/filenames"])
        assert (run_file.parent / "files" / name).is_file(), name
    media = list(run_file.parent.glob("files/media/images/figures/*.png"))
    assert len(media) == 8  # 4 figures x 2 probes

    # MLflow, a file store under run_dir/mlruns: metrics with their steps, figures as
    # artifacts.
    client = MlflowClient((run_dir / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("unifyreg").experiment_id])
    history = client.get_metric_history(run.info.run_id, "unify/encoding_gap")
    assert [m.step for m in history] == [0, 3]
    csv_free = client.get_metric_history(run.info.run_id, "probe_norm/response/image/layer_02")
    assert len(csv_free) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {f"figures/response_text_by_epoch_step{s:06d}.png" for s in (0, 3)} <= artifacts
    assert run.info.status == "FINISHED"
    # Nothing is left behind for the next fine-tune in this process (an ablate arm): the
    # wandb run is finished, MLflow's process-wide tracking URI is put back.
    import wandb

    assert wandb.run is None
    assert os.environ.get("MLFLOW_TRACKING_URI") is None


@pytest.mark.parametrize("logger, package", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_logger_whose_package_is_missing_is_a_config_error(
    logger, package, tiny_base_overrides, tmp_path, monkeypatch, capsys
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a)
    )
    run_dir = tmp_path / "run"
    assert (
        main(["finetune", *tiny_base_overrides, *FAST, f"loggers=[{logger}]", f"run_dir={run_dir}"])
        == 2
    )
    err = capsys.readouterr().err
    assert f"loggers: '{logger}' needs the '{package}' package" in err
    assert "pip install 'unifyreg[loggers]'" in err
    assert not (run_dir / "checkpoints").exists()
