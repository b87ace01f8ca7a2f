"""Tests of JSONL manifests: good files, bad lines named by file and line, skip-and-count."""

import json

import numpy as np
import pytest

from unifyreg.manifest import ManifestError, read_manifest
from unifyreg.toy import save_grid_png


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def image_dir(tmp_path):
    grid = np.zeros((4, 4), dtype=np.int64)
    grid[0] = 1
    save_grid_png(grid, tmp_path / "top_red.png")
    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    return tmp_path


def test_good_manifest_reads_images_and_derives_tasks(image_dir):
    path = _write(
        image_dir / "m.jsonl",
        [
            {"text": "top row red", "response_image": "top_red.png", "category": "composition"},
            {"text": "what colour is cell one one", "image": "top_red.png", "response": "red"},
            "",
        ],
    )
    manifest = read_manifest(path)
    t2i, understanding = manifest.examples
    assert (t2i.task, t2i.category) == ("t2i", "composition")
    assert (understanding.task, understanding.category) == ("understanding", "default")
    assert understanding.prompt_image.mode == "RGB" and manifest.skipped == []


@pytest.mark.parametrize(
    "row, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"text": "", "response": "x"}, "'text' is missing or empty"),
        ({"text": "hi"}, "a response is required"),
        ({"text": "hi", "response": "x", "colour": "red"}, r"unknown field\(s\) \['colour'\]"),
        ({"text": "hi", "image": "missing.png", "response": "x"}, "does not exist"),
        ({"text": "hi", "image": "corrupt.png", "response": "x"}, "not a readable image"),
        ({"text": "hi", "response": "x", "response_image": "top_red.png"}, "not both"),
    ],
)
def test_bad_lines_are_named_by_file_and_line(image_dir, row, message):
    path = _write(image_dir / "bad.jsonl", [{"text": "fine", "response": "ok"}, row])
    with pytest.raises(ManifestError, match=rf"bad\.jsonl:2: .*{message}"):
        read_manifest(path)


def test_skip_mode_counts_bad_lines(image_dir):
    path = _write(
        image_dir / "mixed.jsonl",
        [
            {"text": "fine", "response": "ok"},
            "{broken",
            {"text": "also fine", "response_image": "top_red.png"},
            {"text": "hi", "image": "corrupt.png", "response": "x"},
        ],
    )
    manifest = read_manifest(path, on_bad_example="skip")
    assert len(manifest.examples) == 2
    assert [line for line, _ in manifest.skipped] == [2, 4]


def test_manifest_of_only_bad_lines_or_missing_file_raises(image_dir):
    with pytest.raises(ManifestError, match="no usable example.*1 bad line"):
        read_manifest(_write(image_dir / "allbad.jsonl", ["{x"]), on_bad_example="skip")
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(image_dir / "nope.jsonl")


def test_toy_adapter_probes_manifest_images(image_dir, tiny_adapter):
    from unifyreg.config import ProbeConfig
    from unifyreg.probing import run_probe

    path = _write(
        image_dir / "m.jsonl",
        [
            {"text": "top row red", "response_image": "top_red.png"},
            {"text": "what colour is cell one one", "image": "top_red.png", "response": "red"},
        ],
    )
    examples = read_manifest(path).examples
    batch = tiny_adapter.encode(examples)
    red = tiny_adapter.tokenizer.image_token_ids[1]
    assert (batch["input_ids"][0] == red).sum() == 4  # the PNG's top row read back exactly
    result = run_probe(tiny_adapter, examples, ProbeConfig())
    assert len(result.records["encoding/image"]) == 1 and len(result.records["response/image"]) == 1
