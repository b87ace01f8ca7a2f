"""Images as every adapter reads them: PIL images, RGB arrays, and index images.

An *index image* is a 2-D integer array of palette indices (the synthetic world's grids
are index images); it is drawn with :data:`PALETTE_RGB`, one ``cell_px`` square per
cell. An image may also arrive already tokenised, as :class:`ImageCodes` (a manifest's
``image_codes`` / ``response_image_codes``, or a family's generated codes): only
adapters whose image tokenizer is outside the model read those (``showo``), and
:func:`as_rgb_image` refuses them with a message saying so. This module depends on NumPy
and PIL only, so model families and the toy world both read images through it without
depending on each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["PALETTE_RGB", "ImageCodes", "as_rgb_image", "render_index_image"]

#: RGB triple of each palette index (index 0 black, then red, green, blue, yellow, white,
#: orange, purple): the colours of the synthetic world's grids.
PALETTE_RGB: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (220, 40, 40),
    (40, 170, 70),
    (40, 90, 220),
    (240, 220, 40),
    (255, 255, 255),
    (245, 140, 30),
    (140, 60, 180),
)


def render_index_image(
    cells: np.ndarray, cell_px: int = 8, palette: Sequence[Sequence[int]] = PALETTE_RGB
) -> np.ndarray:
    """``[G*cell_px, W*cell_px, 3]`` uint8 RGB drawing of an index image ``[G, W]``."""
    if isinstance(cell_px, bool) or not isinstance(cell_px, (int, np.integer)) or cell_px < 1:
        raise ValueError(f"cell_px must be a positive int, got {cell_px!r}")
    cells = np.asarray(cells)
    if cells.ndim != 2 or cells.dtype.kind not in "iu":
        raise ValueError(f"an index image is a 2-D integer array, got {cells.dtype} {cells.shape}")
    table = np.asarray(palette, dtype=np.uint8)
    if cells.size and (cells.min() < 0 or cells.max() >= len(table)):
        raise ValueError(f"index image values must lie in [0, {len(table)})")
    rgb = table[cells]
    return np.repeat(np.repeat(rgb, int(cell_px), axis=0), int(cell_px), axis=1)


@dataclass(frozen=True, eq=False)
class ImageCodes:
    """An image given as its image tokenizer's codes instead of pixels.

    ``codes``: a 1-D or 2-D array of non-negative integers (raster order when 2-D);
    ``preview``: optional codes of a smaller grid the family generates first (GLM-Image's
    preview grid), else None. ``source``: where the codes came from (a file), for errors.
    """

    codes: np.ndarray
    preview: np.ndarray | None = None
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("codes", "preview"):
            value = getattr(self, name)
            if value is None:
                continue
            array = np.asarray(value)
            if array.dtype.kind not in "iu" or array.ndim not in (1, 2) or array.size == 0:
                raise ValueError(
                    f"image {name} must be a non-empty 1-D or 2-D integer array, got "
                    f"{array.dtype} {array.shape}"
                )
            if int(array.min()) < 0:
                raise ValueError(f"image {name} must be >= 0, got a minimum of {int(array.min())}")
            object.__setattr__(self, name, array.astype(np.int64))

    @property
    def flat(self) -> np.ndarray:
        """The codes in raster order, ``[N]`` int64."""
        return self.codes.reshape(-1)


def as_rgb_image(image: object, what: str = "image") -> Image.Image:
    """An RGB PIL image from a PIL image, an ``[H, W, 3]`` uint8 array, or an index image
    (a 2-D integer array, e.g. a toy-world grid, drawn with :data:`PALETTE_RGB`).
    :class:`ImageCodes` raise ValueError: codes have no pixels to draw."""
    if isinstance(image, ImageCodes):
        raise ValueError(
            f"{what} holds image codes (image_codes / response_image_codes), not pixels: "
            "only an adapter with its own image tokenizer reads codes (showo); give this "
            "adapter an image file instead"
        )
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim == 2 and image.dtype.kind in "iu":
            return Image.fromarray(render_index_image(image), mode="RGB")
        if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
            return Image.fromarray(image, mode="RGB")
    raise ValueError(
        f"{what} must be a PIL image, an [H, W, 3] uint8 array or an index image "
        f"(2-D integer array), got {type(image).__name__}"
    )
