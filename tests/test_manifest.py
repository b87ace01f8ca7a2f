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


def test_image_codes_are_read_from_npy_files(tmp_path):
    from unifyreg.images import ImageCodes, as_rgb_image

    np.save(tmp_path / "grid.npy", np.arange(16).reshape(4, 4))
    np.save(tmp_path / "flat.npy", np.arange(8, dtype=np.int32))
    path = _write(
        tmp_path / "m.jsonl",
        [
            {"text": "draw", "response_image_codes": "grid.npy", "category": "composition"},
            {"text": "what is it", "image_codes": "flat.npy", "response": "a cat"},
        ],
    )
    t2i, understanding = read_manifest(path).examples
    assert isinstance(t2i.response_image, ImageCodes) and t2i.task == "t2i"
    assert t2i.response_image.codes.shape == (4, 4) and t2i.response_image.flat.dtype == np.int64
    assert understanding.task == "understanding"
    assert np.array_equal(understanding.prompt_image.flat, np.arange(8))
    with pytest.raises(ValueError, match="holds image codes.*showo"):
        as_rgb_image(t2i.response_image, "response_image")


@pytest.mark.parametrize(
    "row, content, message",
    [
        (
            {"text": "a", "image": "x.png", "image_codes": "c.npy", "response": "b"},
            None,
            "not both",
        ),
        ({"text": "a", "response_image_codes": "missing.npy"}, None, "does not exist"),
        ({"text": "a", "response_image_codes": "c.npy"}, np.zeros(3), "integer array"),
        ({"text": "a", "response_image_codes": "c.npy"}, -np.ones(3, int), "must be >= 0"),
        ({"text": "a", "response_image_codes": "c.npy"}, b"junk", "not a readable .npy"),
        (
            {"text": "a", "response": "b", "response_image_codes": "c.npy"},
            np.ones(2, int),
            "not both",
        ),
    ],
)
def test_bad_code_files_are_named_by_file_and_line(tmp_path, row, content, message):
    if isinstance(content, bytes):
        (tmp_path / "c.npy").write_bytes(content)
    elif content is not None:
        np.save(tmp_path / "c.npy", content)
    path = _write(tmp_path / "bad.jsonl", [row])
    with pytest.raises(ManifestError, match=rf"bad\.jsonl:1: .*{message}"):
        read_manifest(path)
