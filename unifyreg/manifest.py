"""User probe sets and training data as JSON Lines manifests.

One JSON object per line::

    {"text": "a red cube on a table", "response_image": "imgs/cube.png", "category": "composition"}
    {"text": "what colour is the cube?", "image": "imgs/cube.png", "response": "red",
     "category": "attribute"}

Fields: ``text`` (the text prompt, required, non-empty), ``image`` (an image prompt, a
path), ``response`` (a text response) or ``response_image`` (an image response, a path),
``category`` (default ``"default"``). Relative paths are read from the manifest's folder.
Images are opened with PIL and converted to RGB.

An image may be given as precomputed codes of the family's image tokenizer instead:
``image_codes`` (for ``image``) and ``response_image_codes`` (for ``response_image``), each
the path of a ``.npy`` file of non-negative integers (1-D, or 2-D in raster order), read
as :class:`unifyreg.images.ImageCodes`. Only adapters whose image tokenizer lies outside
the model read codes (``showo``: MAGVIT-v2 is in neither transformers nor diffusers);
the others refuse them when they encode the example.

A bad line (not JSON, not an object, missing/empty ``text``, unknown field, both or
neither response when one is required, an image given both as a file and as codes, a
missing or unreadable image or code file) raises :class:`ManifestError` naming the file
and line, or, with ``on_bad_example="skip"``, is skipped and counted in
:attr:`Manifest.skipped`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unifyreg.images import ImageCodes

__all__ = ["Manifest", "ManifestError", "ManifestExample", "read_manifest"]

FIELDS = (
    "text",
    "image",
    "image_codes",
    "response",
    "response_image",
    "response_image_codes",
    "category",
)


class ManifestError(ValueError):
    """A bad manifest line; the message names the file and line."""


@dataclass(frozen=True, eq=False)
class ManifestExample:
    """One example read from a manifest (same attributes as :class:`unifyreg.toy.Example`).

    ``task`` is derived: ``"understanding"`` with an image prompt, ``"t2i"`` with an
    image response, else ``"text"``.
    """

    category: str
    prompt_text: str
    prompt_image: Image.Image | ImageCodes | None = None
    response_text: str | None = None
    response_image: Image.Image | ImageCodes | None = None
    source: str = ""

    @property
    def task(self) -> str:
        """``"understanding"``, ``"t2i"`` or ``"text"`` (class docstring)."""
        if self.prompt_image is not None:
            return "understanding"
        return "t2i" if self.response_image is not None else "text"

    @property
    def answers_with_image(self) -> bool:
        """Whether the example has an image response."""
        return self.response_image is not None


@dataclass
class Manifest:
    """The examples of a manifest and what was skipped (``(line, reason)`` pairs)."""

    path: Path
    examples: list[ManifestExample] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)


def _open_image(root: Path, value: Any, key: str) -> Image.Image:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key!r} must be a non-empty path string")
    path = Path(value) if Path(value).is_absolute() else root / value
    if not path.is_file():
        raise ValueError(f"{key!r} file {str(path)!r} does not exist")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as error:  # PIL raises several types for corrupt files
        raise ValueError(f"{key!r} file {str(path)!r} is not a readable image ({error})") from None


def _open_codes(root: Path, value: Any, key: str) -> ImageCodes:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key!r} must be a non-empty path string")
    path = Path(value) if Path(value).is_absolute() else root / value
    if not path.is_file():
        raise ValueError(f"{key!r} file {str(path)!r} does not exist")
    try:
        codes = np.load(path, allow_pickle=False)
    except Exception as error:  # numpy raises several types for bad files
        raise ValueError(f"{key!r} file {str(path)!r} is not a readable .npy ({error})") from None
    try:
        return ImageCodes(codes, source=str(path))
    except ValueError as error:
        raise ValueError(f"{key!r} file {str(path)!r}: {error}") from None


def _image_field(root: Path, data: dict, key: str) -> Image.Image | ImageCodes | None:
    """The image of ``key`` (``image`` / ``response_image``): a file, or ``<key>_codes``."""
    codes_key = f"{key}_codes"
    has_file, has_codes = data.get(key) is not None, data.get(codes_key) is not None
    if has_file and has_codes:
        raise ValueError(f"give either {key!r} or {codes_key!r}, not both")
    if has_codes:
        return _open_codes(root, data[codes_key], codes_key)
    return _open_image(root, data[key], key) if data.get(key) else None


def _parse_line(raw: str, root: Path, require_response: bool, source: str) -> ManifestExample:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; valid: {', '.join(FIELDS)}")
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("'text' is missing or empty")
    has_text_response = data.get("response") is not None
    has_image_response = (
        data.get("response_image") is not None or data.get("response_image_codes") is not None
    )
    if has_text_response and has_image_response:
        raise ValueError("give either 'response' or an image response, not both")
    if require_response and not (has_text_response or has_image_response):
        raise ValueError(
            "a response is required ('response', 'response_image' or 'response_image_codes')"
        )
    response = data.get("response")
    if has_text_response and (not isinstance(response, str) or not response.strip()):
        raise ValueError("'response' must be a non-empty string")
    category = data.get("category", "default")
    if not isinstance(category, str) or not category:
        raise ValueError("'category' must be a non-empty string")
    return ManifestExample(
        category=category,
        prompt_text=text,
        prompt_image=_image_field(root, data, "image"),
        response_text=response if has_text_response else None,
        response_image=_image_field(root, data, "response_image"),
        source=source,
    )


def read_manifest(
    path: str | Path, on_bad_example: str = "error", require_response: bool = True
) -> Manifest:
    """Read a JSONL manifest (module docstring). ``on_bad_example`` is ``"error"`` or
    ``"skip"``; blank lines are ignored. An empty result raises :class:`ManifestError`."""
    if on_bad_example not in ("error", "skip"):
        raise ValueError(f"on_bad_example must be 'error' or 'skip', got {on_bad_example!r}")
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {str(path)!r} does not exist")
    manifest = Manifest(path)
    with path.open(encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                example = _parse_line(raw, path.parent, require_response, f"{path}:{number}")
            except ValueError as error:
                if on_bad_example == "error":
                    raise ManifestError(f"{path}:{number}: {error}") from None
                manifest.skipped.append((number, str(error)))
                continue
            manifest.examples.append(example)
    if not manifest.examples:
        raise ManifestError(
            f"manifest {str(path)!r} holds no usable example"
            + (f" ({len(manifest.skipped)} bad line(s) skipped)" if manifest.skipped else "")
        )
    return manifest
