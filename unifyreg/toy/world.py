"""Grids of coloured cells: the images of the synthetic world, their renderer and parser.

An image is a ``G x G`` :data:`Grid` of colour indices into :data:`PALETTE`; index 0
("black") is the background. Rendering paints every cell as a ``cell_px`` square of its
palette RGB colour; parsing reads the centre pixel of each cell and snaps it to the
nearest palette colour, so ``parse_image(render_grid(g), G)`` returns ``g`` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from unifyreg.images import PALETTE_RGB as IMAGE_PALETTE_RGB
from unifyreg.images import render_index_image

PALETTE: tuple[str, ...] = (
    "black",
    "red",
    "green",
    "blue",
    "yellow",
    "white",
    "orange",
    "purple",
)
"""Colour names; a grid cell holds an index into this tuple. Index 0 is the background."""

PALETTE_RGB = IMAGE_PALETTE_RGB
"""RGB triple of each :data:`PALETTE` colour, same order."""

BACKGROUND = 0
"""Colour index of the background ("black")."""

MAX_GRID_SIZE = 8
"""Largest supported grid side: rows and columns are named by number words up to it."""

Grid = np.ndarray
"""A square ``int64`` array ``[G, G]`` of colour indices into :data:`PALETTE`."""


def check_grid_size(grid_size: int) -> int:
    """Return ``grid_size`` if it is an int in ``[2, MAX_GRID_SIZE]``, else raise ValueError."""
    if isinstance(grid_size, bool) or not isinstance(grid_size, (int, np.integer)):
        raise ValueError(f"grid_size must be an int, got {grid_size!r}")
    if grid_size < 2 or grid_size > MAX_GRID_SIZE:
        raise ValueError(f"grid_size must be between 2 and {MAX_GRID_SIZE}, got {grid_size}")
    return int(grid_size)


def make_grid(grid_size: int) -> Grid:
    """Return a ``[grid_size, grid_size]`` int64 grid filled with the background colour."""
    size = check_grid_size(grid_size)
    return np.full((size, size), BACKGROUND, dtype=np.int64)


def as_grid(cells: np.ndarray | Sequence[Sequence[int]], num_colours: int = len(PALETTE)) -> Grid:
    """Return ``cells`` as a fresh int64 Grid after checking shape and colour range.

    Raises ValueError if it is not a square 2-D array of side >= 2 or holds a value
    outside ``[0, num_colours)``.
    """
    array = np.asarray(cells)
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise ValueError(f"a grid must be a square 2-D array, got shape {array.shape}")
    check_grid_size(array.shape[0])
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"grid cells must be integers, got dtype {array.dtype}")
    grid = array.astype(np.int64, copy=True)
    bad = (grid < 0) | (grid >= num_colours)
    if bad.any():
        raise ValueError(
            f"grid cell value {int(grid[bad][0])} is not a colour index in [0, {num_colours})"
        )
    return grid


def format_grid(grid: Grid) -> str:
    """Return a human-readable multi-line rendering (first letter of each colour; '.' = bg)."""
    letters = [name[0] for name in PALETTE]
    letters[BACKGROUND] = "."
    return "\n".join(" ".join(letters[int(v)] for v in row) for row in as_grid(grid))


def render_grid(grid: Grid, cell_px: int = 8) -> np.ndarray:
    """Render ``grid`` to a uint8 RGB array ``[G * cell_px, G * cell_px, 3]``."""
    return render_index_image(as_grid(grid), cell_px, PALETTE_RGB)


def save_grid_png(grid: Grid, path: str | Path, cell_px: int = 8) -> Path:
    """Render ``grid`` and write it as a PNG at ``path``; return the path."""
    target = Path(path)
    Image.fromarray(render_grid(grid, cell_px), mode="RGB").save(target, format="PNG")
    return target


def parse_image(rgb_array: np.ndarray, grid_size: int) -> Grid:
    """Read a Grid back from an RGB image of a ``grid_size x grid_size`` grid.

    Samples the centre pixel of every cell and snaps it to the nearest palette colour
    (squared RGB distance), so it tolerates resizing and mild noise. Raises ValueError for
    a bad ``grid_size`` or an array that is not ``[H, W, 3]`` with ``H, W >= grid_size``.
    """
    size = check_grid_size(grid_size)
    image = np.asarray(rgb_array)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB array [H, W, 3], got shape {image.shape}")
    height, width = image.shape[:2]
    if height < size or width < size:
        raise ValueError(f"image of shape {image.shape} is too small for a {size}x{size} grid")
    rows = ((np.arange(size) + 0.5) * height / size).astype(np.int64)
    cols = ((np.arange(size) + 0.5) * width / size).astype(np.int64)
    centres = image[rows[:, None], cols[None, :]].astype(np.int64)  # [G, G, 3]
    palette = np.asarray(PALETTE_RGB, dtype=np.int64)  # [C, 3]
    distances = ((centres[:, :, None, :] - palette[None, None, :, :]) ** 2).sum(axis=-1)
    return distances.argmin(axis=-1).astype(np.int64)


def load_grid_png(path: str | Path, grid_size: int) -> Grid:
    """Load a PNG written by :func:`save_grid_png` (or any RGB image) and parse it."""
    with Image.open(Path(path)) as image:
        rgb = np.asarray(image.convert("RGB"))
    return parse_image(rgb, grid_size)
