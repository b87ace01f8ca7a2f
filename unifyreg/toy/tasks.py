"""Examples, task generators and exact scorers of the synthetic world.

Six tasks, each split into categories (:data:`TASK_CATEGORIES`):

- ``text``: text-only statements. ``knowledge`` ("what colour is grass" -> "green",
  "the colour of grass is" -> "green") and ``arithmetic`` ("two plus one is" -> "three").
- ``t2i``: text -> grid. ``direct`` drawing ("top row green", "cell two three blue",
  "three green cells in the top row": counts fill from the left of a row, from the top of
  a column) and the T2I-CoReBench-style reasoning categories: ``composition`` (two
  non-overlapping drawing clauses joined by "and"), ``deductive`` (needs a knowledge fact:
  "the colour of grass in the top row"), ``inductive`` (extend a pattern: "red blue
  repeated in the top row", "red blue checkerboard") and ``abductive`` (needs arithmetic:
  "two plus one red cells in the top row").
- ``understanding``: grid + question -> one word, MMBench-style categories over random
  scenes: ``attribute`` ("what colour is shown in cell two three"), ``logical`` ("is
  there nothing shown in cell two three" -> yes/no, a negation), ``relation`` ("what
  colour is west of cell two three"; west or east), ``coarse`` ("which colour is most
  common": non-background, ahead of every other colour by two cells or more),
  ``single_instance`` ("is there anything shown in cell two three" -> yes/no) and
  ``cross_instance`` ("which colour is least common": the shown colour that trails every
  other shown colour by two cells or more). Cells are always named last, so in a
  question-first layout the cell words sit at a fixed place relative to the image. Every
  question is a single cell look-up or a global statistic: questions that make the model
  find a colour named in the question, read two cells, or compare a cell with the
  whole scene were far slower to learn for the small CPU-trained model this world is
  sized for. Yes/no answers are balanced by construction.
- ``transfer``: category ``deductive``, the same template as t2i/deductive. It is a task
  of its own so that the splits can give it only held-out objects, whose facts no
  training drawing prompt uses (see :mod:`unifyreg.toy.splits`).
- ``caption``: category ``caption``, grid + "read the image" -> the G*G cell colours in
  words, row by row ("red black ... blue", background cells as "black"): the exact twin
  of direct text-to-image, one answer word per image token (16 words for 4x4).
- ``text_reasoning``: text prompt -> a multi-word text answer that states the fact it
  uses and what is drawn; the text twins of the t2i reasoning categories.
  ``text_deductive``: "describe the colour of grass in the top row" -> "grass is green so
  the top row is green". ``text_abductive``: "describe two plus one red cells in the top
  row" -> "two plus one is three so three cells in the top row are red" (one cell: "...
  so one cell in the top row is red"). The prompt is the t2i prompt behind "describe",
  so no prompt asks for both a grid and words. Like ``text``, these are text, not
  drawing: the splits let them mention every object, held-out ones included.

Text answers therefore come in lengths comparable to an image (captions 16 words,
reasoning answers 8-14 words against 16 image tokens) next to the one-word answers of
``text`` and ``understanding``, so the response-level probe compares behaviour rather
than token counts.

Rows and columns are numbered from one ("row one" is the top row); "top row", "bottom
row", "left column" and "right column" are aliases. Every prompt has exactly one correct
answer, which the generator computes; the scorers compare exactly.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unifyreg.toy.world import BACKGROUND, PALETTE, Grid, as_grid, check_grid_size, make_grid

TASKS: tuple[str, ...] = (
    "text",
    "t2i",
    "understanding",
    "transfer",
    "caption",
    "text_reasoning",
    "reconstruction",
)
"""Every task name."""

IMAGE_PROMPT_TASKS: tuple[str, ...] = ("understanding", "caption", "reconstruction")
"""Tasks whose prompt carries a grid (and only these)."""

IMAGE_RESPONSE_TASKS: tuple[str, ...] = ("t2i", "transfer", "reconstruction")
"""Tasks that answer with a grid; every other task answers with words."""

TEXT_CATEGORIES: tuple[str, ...] = ("knowledge", "arithmetic")
"""Categories of the text-only task."""

T2I_CATEGORIES: tuple[str, ...] = ("composition", "deductive", "inductive", "abductive")
"""Text-to-image reasoning categories mirroring T2I-CoReBench (``direct`` is not one)."""

MMBENCH_CATEGORIES: tuple[str, ...] = (
    "attribute",
    "logical",
    "relation",
    "coarse",
    "single_instance",
    "cross_instance",
)
"""Understanding categories mirroring MMBench."""

CAPTION_CATEGORIES: tuple[str, ...] = ("caption",)
"""Categories of the caption task (grid -> its cells in words)."""

TEXT_REASONING_CATEGORIES: tuple[str, ...] = ("text_deductive", "text_abductive")
"""Categories of the text-reasoning task: text twins of t2i deductive / abductive."""

TASK_CATEGORIES: dict[str, tuple[str, ...]] = {
    "text": TEXT_CATEGORIES,
    "t2i": ("direct", *T2I_CATEGORIES),
    "understanding": MMBENCH_CATEGORIES,
    "transfer": ("deductive",),
    "caption": CAPTION_CATEGORIES,
    "text_reasoning": TEXT_REASONING_CATEGORIES,
    "reconstruction": ("reconstruction",),
}
"""Valid categories of each task. Category names are unique across tasks except
``deductive`` (t2i and transfer), so a probe set can be named by its category alone."""

OBJECT_COLOURS: dict[str, str] = {
    "blood": "red",
    "cherry": "red",
    "tomato": "red",
    "grass": "green",
    "leaf": "green",
    "frog": "green",
    "sky": "blue",
    "sea": "blue",
    "banana": "yellow",
    "lemon": "yellow",
    "snow": "white",
    "milk": "white",
    "carrot": "orange",
    "pumpkin": "orange",
    "plum": "purple",
    "grape": "purple",
}
"""The world's facts: each object's colour (never the background colour)."""

OBJECTS: tuple[str, ...] = tuple(OBJECT_COLOURS)
"""Every object, in a fixed order."""

NUMBER_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)
"""Number words; index = value. Arithmetic operands and results stay within them."""

MAX_OPERAND = 5
"""Largest operand of an arithmetic statement (results reach ``2 * MAX_OPERAND``)."""
DRAW_COLOURS: tuple[str, ...] = tuple(c for i, c in enumerate(PALETTE) if i != BACKGROUND)
"""Colours a prompt may draw with (drawing the background would be invisible)."""

# Words used by the templates besides colours, numbers, objects and place phrases.
_TEMPLATE_WORDS: tuple[str, ...] = (
    "what", "colour", "is", "the", "of", "in", "plus", "minus", "and", "cell", "cells",
    "repeated", "checkerboard", "there", "anything", "nothing", "shown", "which", "most",
    "least", "common", "east", "west", "yes", "no", "top", "bottom", "left", "right", "row",
    "column", "read", "image", "describe", "so", "are", "redraw",
)  # fmt: skip

CAPTION_PROMPT = "read the image"
"""The fixed question of every caption example."""


# --------------------------------------------------------------------------- validation


def check_task(task: str) -> str:
    """Return ``task`` if it is a known task, else raise ValueError listing the valid ones."""
    if task not in TASK_CATEGORIES:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return task


def check_category(task: str, category: str) -> str:
    """Return ``category`` if ``task`` has it, else raise ValueError listing the valid ones."""
    valid = TASK_CATEGORIES[check_task(task)]
    if category not in valid:
        raise ValueError(
            f"unknown category {category!r} for task {task!r}; valid categories: {', '.join(valid)}"
        )
    return category


def categories(task: str) -> tuple[str, ...]:
    """Return the categories of ``task`` (ValueError for an unknown task)."""
    return TASK_CATEGORIES[check_task(task)]


def check_objects(objects: Iterable[str]) -> tuple[str, ...]:
    """Return ``objects`` as a tuple after checking each is a known object and it is non-empty."""
    chosen = tuple(objects)
    if not chosen:
        raise ValueError("objects must not be empty")
    for name in chosen:
        if name not in OBJECT_COLOURS:
            raise ValueError(f"unknown object {name!r}; valid objects: {', '.join(OBJECTS)}")
    return chosen


# ------------------------------------------------------------------------------ Example


def _frozen_grid(cells: Any) -> Grid | None:
    if cells is None:
        return None
    grid = as_grid(cells)
    grid.setflags(write=False)
    return grid


def _grid_key(grid: Grid | None) -> tuple | None:
    return None if grid is None else tuple(tuple(int(v) for v in row) for row in grid)


@dataclass(frozen=True, eq=False)
class Example:
    """One example of the world: a prompt (text, plus a grid for understanding) and its answer.

    ``task`` / ``category`` name its generator (see :data:`TASK_CATEGORIES`). ``t2i`` and
    ``transfer`` examples answer with ``response_image``; every other task (``text``,
    ``understanding``, ``caption``, ``text_reasoning``) with ``response_text``; only
    ``understanding`` and ``caption`` have a ``prompt_image``. Grids are stored
    as read-only int64 arrays; equality and hashing compare their cells, so examples can
    be put in sets. ``meta`` holds generator details (e.g. ``{"object": "grass"}``); it
    takes part in equality but not in the hash.
    """

    task: str
    category: str
    prompt_text: str
    prompt_image: Grid | None = None
    response_text: str | None = None
    response_image: Grid | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_category(self.task, self.category)
        if not isinstance(self.prompt_text, str) or not self.prompt_text.strip():
            raise ValueError(f"empty prompt: prompt_text={self.prompt_text!r}")
        object.__setattr__(self, "prompt_image", _frozen_grid(self.prompt_image))
        object.__setattr__(self, "response_image", _frozen_grid(self.response_image))
        object.__setattr__(self, "meta", dict(self.meta))
        wants_image = self.task in IMAGE_RESPONSE_TASKS
        # An image response may come with a response_text: reasoning written before the
        # drawing (the reason-then-draw variant, unifyreg.toy.variants).
        if wants_image and self.response_image is None:
            raise ValueError(f"a {self.task!r} example needs response_image")
        if not wants_image and (self.response_text is None or self.response_image is not None):
            raise ValueError(f"a {self.task!r} example needs response_text and no response_image")
        if (self.prompt_image is not None) != (self.task in IMAGE_PROMPT_TASKS):
            raise ValueError(
                f"prompt_image is required for {' and '.join(map(repr, IMAGE_PROMPT_TASKS))} "
                "and only there"
            )

    @property
    def answers_with_image(self) -> bool:
        """True when the reference answer is a grid (t2i, transfer)."""
        return self.response_image is not None

    def _key(self) -> tuple:
        return (
            self.task,
            self.category,
            self.prompt_text,
            _grid_key(self.prompt_image),
            self.response_text,
            _grid_key(self.response_image),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Example):
            return NotImplemented
        return self._key() == other._key() and self.meta == other.meta

    def __hash__(self) -> int:
        return hash(self._key())

    def __reduce__(self) -> tuple:
        # Rebuild through __init__ so unpickled grids are validated and read-only again.
        return (
            Example,
            (
                self.task,
                self.category,
                self.prompt_text,
                self.prompt_image,
                self.response_text,
                self.response_image,
                self.meta,
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (grids as nested lists); see :meth:`from_dict`."""
        return {
            "task": self.task,
            "category": self.category,
            "prompt_text": self.prompt_text,
            "prompt_image": None if self.prompt_image is None else self.prompt_image.tolist(),
            "response_text": self.response_text,
            "response_image": (
                None if self.response_image is None else self.response_image.tolist()
            ),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Example:
        """Rebuild an Example written by :meth:`to_dict`."""
        return cls(
            task=data["task"],
            category=data["category"],
            prompt_text=data["prompt_text"],
            prompt_image=data.get("prompt_image"),
            response_text=data.get("response_text"),
            response_image=data.get("response_image"),
            meta=data.get("meta", {}),
        )


# ------------------------------------------------------------------------------ scorers


def score_image(pred: Grid | None, ref: Grid) -> bool:
    """True iff ``pred`` has ``ref``'s shape and every cell equal; None is False."""
    if pred is None:
        return False
    predicted = np.asarray(pred)
    reference = np.asarray(ref)
    return predicted.shape == reference.shape and bool(np.array_equal(predicted, reference))


def score_text(pred: str | None, ref: str) -> bool:
    """True iff ``pred`` has exactly ``ref``'s words, in order, after lower-casing.

    Whitespace between words is not compared (runs of spaces or a trailing newline are
    ignored); every word is: a multi-word answer with one word wrong, missing or extra
    scores False. None is False.
    """
    if pred is None:
        return False
    return pred.lower().split() == ref.lower().split()


def score_example(
    example: Example, predicted_text: str | None = None, predicted_grid: Grid | None = None
) -> bool:
    """Score a prediction against ``example``'s reference: grid for t2i/transfer, else text."""
    if example.response_image is not None:
        return score_image(predicted_grid, example.response_image)
    assert example.response_text is not None
    return score_text(predicted_text, example.response_text)


# ------------------------------------------------------------------------------- places


@dataclass(frozen=True)
class Place:
    """A drawable region: a row, a column or a cell, and how prompts name it.

    ``name`` is used at the start of a clause ("top row green"); ``name_after_in`` after
    "in" ("in the top row"). ``cells`` lists (row, column) in fill order: left to right
    for a row, top to bottom for a column.
    """

    kind: str
    name: str
    name_after_in: str
    cells: tuple[tuple[int, int], ...]


@functools.cache
def line_places(grid_size: int) -> tuple[Place, ...]:
    """Every row and column name of a ``grid_size`` grid, numbered and aliased."""
    size = check_grid_size(grid_size)
    places: list[Place] = []
    for index in range(size):
        word = NUMBER_WORDS[index + 1]
        row = tuple((index, c) for c in range(size))
        column = tuple((r, index) for r in range(size))
        places.append(Place("row", f"row {word}", f"row {word}", row))
        places.append(Place("column", f"column {word}", f"column {word}", column))
    aliases = (
        ("row", "top row", 0),
        ("row", "bottom row", size - 1),
        ("column", "left column", 0),
        ("column", "right column", size - 1),
    )
    for kind, name, index in aliases:
        if kind == "row":
            cells = tuple((index, c) for c in range(size))
        else:
            cells = tuple((r, index) for r in range(size))
        places.append(Place(kind, name, f"the {name}", cells))
    return tuple(places)


@functools.cache
def cell_places(grid_size: int) -> tuple[Place, ...]:
    """Every single-cell place ("cell two three" = row two, column three)."""
    size = check_grid_size(grid_size)
    return tuple(
        Place("cell", name, name, ((r, c),))
        for r in range(size)
        for c in range(size)
        for name in [f"cell {NUMBER_WORDS[r + 1]} {NUMBER_WORDS[c + 1]}"]
    )


def _colour_index(name: str) -> int:
    return PALETTE.index(name)


def _paint(grid_size: int, strokes: Iterable[tuple[Iterable[tuple[int, int]], str]]) -> Grid:
    grid = make_grid(grid_size)
    for cells, colour in strokes:
        for r, c in cells:
            grid[r, c] = _colour_index(colour)
    return grid


def _cell_word(count: int) -> str:
    return "cell" if count == 1 else "cells"


def _cell_name(row: int, column: int) -> str:
    return f"cell {NUMBER_WORDS[row + 1]} {NUMBER_WORDS[column + 1]}"


# ----------------------------------------------------------------------- text generators

Generator = Callable[[random.Random, int, Sequence[str]], Example]


def _knowledge(rng: random.Random, grid_size: int, objects: Sequence[str]) -> Example:
    name = rng.choice(objects)
    template = rng.choice(("what colour is {}", "the colour of {} is"))
    return Example(
        "text",
        "knowledge",
        template.format(name),
        response_text=OBJECT_COLOURS[name],
        meta={"object": name},
    )


def _arithmetic_facts() -> tuple[tuple[str, int, int, int], ...]:
    """Every (operator, a, b, result) the world states; operands stay small so all are seen."""
    facts = [("plus", a, b, a + b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    facts += [("minus", a, b, a - b) for a in range(MAX_OPERAND + 1) for b in range(a + 1)]
    return tuple(facts)


ARITHMETIC_FACTS: tuple[tuple[str, int, int, int], ...] = _arithmetic_facts()
"""(operator, a, b, result) of every arithmetic statement: "a plus b is", "a minus b is"."""


def _pick_fact(rng: random.Random, low: int, high: int) -> tuple[str, int, int, int]:
    return rng.choice([fact for fact in ARITHMETIC_FACTS if low <= fact[3] <= high])


def _arithmetic(rng: random.Random, grid_size: int, objects: Sequence[str]) -> Example:
    operator, a, b, result = rng.choice(ARITHMETIC_FACTS)
    return Example(
        "text",
        "arithmetic",
        f"{NUMBER_WORDS[a]} {operator} {NUMBER_WORDS[b]} is",
        response_text=NUMBER_WORDS[result],
        meta={"operator": operator, "a": a, "b": b},
    )


# ------------------------------------------------------------------------ t2i generators


def _direct(rng: random.Random, grid_size: int, objects: Sequence[str]) -> Example:
    colour = rng.choice(DRAW_COLOURS)
    if rng.random() < 0.5:
        place = rng.choice(line_places(grid_size) + cell_places(grid_size))
        prompt = f"{place.name} {colour}"
        cells = place.cells
    else:
        place = rng.choice(line_places(grid_size))
        count = rng.randint(1, grid_size)
        prompt = f"{NUMBER_WORDS[count]} {colour} {_cell_word(count)} in {place.name_after_in}"
        cells = place.cells[:count]
    return Example(
        "t2i",
        "direct",
        prompt,
        response_image=_paint(grid_size, [(cells, colour)]),
        meta={"place": place.name, "colour": colour},
    )


def _composition(rng: random.Random, grid_size: int, objects: Sequence[str]) -> Example:
    places = line_places(grid_size) + cell_places(grid_size)
    first = rng.choice(places)
    disjoint = [p for p in places if not set(p.cells) & set(first.cells)]
    second = rng.choice(disjoint)
    colour_a, colour_b = rng.choice(DRAW_COLOURS), rng.choice(DRAW_COLOURS)
    return Example(
        "t2i",
        "composition",
        f"{first.name} {colour_a} and {second.name} {colour_b}",
        response_image=_paint(grid_size, [(first.cells, colour_a), (second.cells, colour_b)]),
        meta={"places": [first.name, second.name], "colours": [colour_a, colour_b]},
    )


def _deductive_drawing(
    task: str, rng: random.Random, grid_size: int, objects: Sequence[str]
) -> Example:
    name = rng.choice(objects)
    colour = OBJECT_COLOURS[name]
    place = rng.choice(line_places(grid_size) + cell_places(grid_size))
    return Example(
        task,
        "deductive",
        f"the colour of {name} in {place.name_after_in}",
        response_image=_paint(grid_size, [(place.cells, colour)]),
        meta={"object": name, "colour": colour, "place": place.name},
    )


def _deductive(rng: random.Random, grid_size: int, objects: Sequence[str]) -> Example:
    return _deductive_drawing("t2i", rng, grid_size, objects)


def _transfer(rng: random.Random, grid_size: int, objects: Sequence[str]) -> Example:
    return _deductive_drawing("transfer", rng, grid_size, objects)


def _inductive(rng: random.Random, grid_size: int, objects: Sequence[str]) -> Example:
    if rng.random() < 0.25:
        first, second = rng.sample(DRAW_COLOURS, 2)
        grid = make_grid(grid_size)
        for r in range(grid_size):
            for c in range(grid_size):
                grid[r, c] = _colour_index(first if (r + c) % 2 == 0 else second)
        return Example(
            "t2i",
            "inductive",
            f"{first} {second} checkerboard",
            response_image=grid,
            meta={"pattern": [first, second], "place": "grid"},
        )
    period = rng.randint(2, min(3, grid_size))
    pattern = rng.sample(DRAW_COLOURS, period)
    place = rng.choice(line_places(grid_size))
    strokes = [((cell,), pattern[i % period]) for i, cell in enumerate(place.cells)]
    return Example(
        "t2i",
        "inductive",
        f"{' '.join(pattern)} repeated in {place.name_after_in}",
        response_image=_paint(grid_size, strokes),
        meta={"pattern": pattern, "place": place.name},
    )


def _abductive(rng: random.Random, grid_size: int, objects: Sequence[str]) -> Example:
    operator, a, b, count = _pick_fact(rng, 1, grid_size)
    colour = rng.choice(DRAW_COLOURS)
    place = rng.choice(line_places(grid_size))
    return Example(
        "t2i",
        "abductive",
        f"{NUMBER_WORDS[a]} {operator} {NUMBER_WORDS[b]} {colour} cells in {place.name_after_in}",
        response_image=_paint(grid_size, [(place.cells[:count], colour)]),
        meta={"operator": operator, "a": a, "b": b, "count": count, "place": place.name},
    )


# -------------------------------------------------------------- understanding generators


def _random_scene(rng: random.Random, grid_size: int, fill_probability: float = 0.5) -> Grid:
    grid = make_grid(grid_size)
    for r in range(grid_size):
        for c in range(grid_size):
            if rng.random() < fill_probability:
                grid[r, c] = rng.randint(1, len(PALETTE) - 1)
    return grid


def _coloured_cells(grid: Grid) -> list[tuple[int, int]]:
    return [(int(r), int(c)) for r, c in zip(*np.nonzero(grid != BACKGROUND), strict=True)]


def _understanding(category: str, grid: Grid, question: str, answer: str, **meta) -> Example:
    return Example(
        "understanding",
        category,
        question,
        prompt_image=grid,
        response_text=answer,
        meta=meta,
    )


def _attribute(rng: random.Random, grid_size: int, objects: Sequence[str]) -> Example:
    grid = _random_scene(rng, grid_size)
    coloured = _coloured_cells(grid)
    # Mostly ask about a coloured cell so the answer is not dominated by "black".
    if coloured and rng.random() < 0.75:
        r, c = rng.choice(coloured)
    else:
        r, c = rng.randrange(grid_size), rng.randrange(grid_size)
    return _understanding(
        "attribute",
        grid,
        f"what colour is shown in {_cell_name(r, c)}",
        PALETTE[grid[r, c]],
        cell=[r, c],
    )


def _scene_with_cells(
    rng: random.Random,
    grid_size: int,
    cells: Sequence[tuple[int, int]],
    coloured: Sequence[bool],
) -> Grid:
    """A random scene in which each of ``cells`` is coloured or empty as ``coloured`` says."""
    grid = _random_scene(rng, grid_size)
    for (r, c), is_coloured in zip(cells, coloured, strict=True):
        grid[r, c] = rng.randint(1, len(PALETTE) - 1) if is_coloured else BACKGROUND
    return grid


def _logical(rng: random.Random, grid_size: int, objects: Sequence[str]) -> Example:
    r, c = rng.randrange(grid_size), rng.randrange(grid_size)
    is_coloured = rng.random() < 0.5
    grid = _scene_with_cells(rng, grid_size, [(r, c)], [is_coloured])
    return _understanding(
        "logical",
        grid,
        f"is there nothing shown in {_cell_name(r, c)}",
        "no" if is_coloured else "yes",
        cell=[r, c],
    )


# Horizontal neighbours only: each extra direction is another look-up table to learn.
_DIRECTIONS: tuple[tuple[str, int, int], ...] = (
    ("west of", 0, -1),
    ("east of", 0, 1),
)


def _relation(rng: random.Random, grid_size: int, objects: Sequence[str]) -> Example:
    grid = _random_scene(rng, grid_size)
    words, dr, dc = rng.choice(_DIRECTIONS)
    anchors = [
        (r, c)
        for r in range(grid_size)
        for c in range(grid_size)
        if 0 <= r + dr < grid_size and 0 <= c + dc < grid_size
    ]
    coloured_targets = [(r, c) for r, c in anchors if grid[r + dr, c + dc] != BACKGROUND]
    if coloured_targets and rng.random() < 0.75:
        r, c = rng.choice(coloured_targets)
    else:
        r, c = rng.choice(anchors)
    return _understanding(
        "relation",
        grid,
        f"what colour is {words} {_cell_name(r, c)}",
        PALETTE[grid[r + dr, c + dc]],
        cell=[r, c],
        direction=words,
    )


def _dominant_scene(rng: random.Random, grid_size: int) -> tuple[Grid, str]:
    """A scene whose most common non-background colour leads every other by two or more."""
    cells = [(r, c) for r in range(grid_size) for c in range(grid_size)]
    rng.shuffle(cells)
    dominant = rng.choice(DRAW_COLOURS)
    dominant_count = rng.randint(3, max(3, len(cells) // 3))
    others = rng.sample([c for c in DRAW_COLOURS if c != dominant], rng.randint(0, 3))
    strokes = [(cells[:dominant_count], dominant)]
    used = dominant_count
    for colour in others:
        # A margin of two keeps "most common" unambiguous and readable at a glance.
        count = min(rng.randint(1, dominant_count - 2), len(cells) - used)
        strokes.append((cells[used : used + count], colour))
        used += count
    return _paint(grid_size, strokes), dominant


def _coarse(rng: random.Random, grid_size: int, objects: Sequence[str]) -> Example:
    grid, dominant = _dominant_scene(rng, grid_size)
    return _understanding("coarse", grid, "which colour is most common", dominant)


def _single_instance(rng: random.Random, grid_size: int, objects: Sequence[str]) -> Example:
    r, c = rng.randrange(grid_size), rng.randrange(grid_size)
    is_coloured = rng.random() < 0.5
    grid = _scene_with_cells(rng, grid_size, [(r, c)], [is_coloured])
    return _understanding(
        "single_instance",
        grid,
        f"is there anything shown in {_cell_name(r, c)}",
        "yes" if is_coloured else "no",
        cell=[r, c],
    )


def _cross_instance(rng: random.Random, grid_size: int, objects: Sequence[str]) -> Example:
    total = grid_size * grid_size
    # The rarest colour trails every other shown colour by two cells or more.
    rarest_count = 1 if total < 12 else rng.randint(1, 2)
    most_kinds = 1 + (total - rarest_count) // (rarest_count + 2)
    kinds = rng.randint(2, min(3, most_kinds))
    colours = rng.sample(DRAW_COLOURS, kinds)
    counts = [rarest_count]
    for still_to_place in range(kinds - 2, -1, -1):
        room = total - sum(counts) - still_to_place * (rarest_count + 2)
        counts.append(rng.randint(rarest_count + 2, min(6, room)))
    cells = [(r, c) for r in range(grid_size) for c in range(grid_size)]
    rng.shuffle(cells)
    strokes, used = [], 0
    for colour, count in zip(colours, counts, strict=True):
        strokes.append((cells[used : used + count], colour))
        used += count
    return _understanding(
        "cross_instance",
        _paint(grid_size, strokes),
        "which colour is least common",
        colours[0],
        counts=dict(zip(colours, counts, strict=True)),
    )


# ------------------------------------------------------------------ caption generator


def caption_words(grid: Any) -> str:
    """The caption of ``grid``: its cells' colour names in raster order (row by row, left
    to right), background cells as ``"black"``, joined by single spaces; G*G words."""
    cells = as_grid(grid)
    return " ".join(PALETTE[int(v)] for v in cells.flatten())


def _caption(rng: random.Random, grid_size: int, objects: Sequence[str]) -> Example:
    grid = _random_scene(rng, grid_size)
    return Example(
        "caption",
        "caption",
        CAPTION_PROMPT,
        prompt_image=grid,
        response_text=caption_words(grid),
    )


# ---------------------------------------------------------- text-reasoning generators


def _deductive_answer(name: str, colour: str, place: Place) -> str:
    return f"{name} is {colour} so {place.name_after_in} is {colour}"


def _abductive_answer(operator: str, a: int, b: int, count: int, colour: str, place: Place) -> str:
    fact = f"{NUMBER_WORDS[a]} {operator} {NUMBER_WORDS[b]}"
    verb = "is" if count == 1 else "are"
    drawn = f"{NUMBER_WORDS[count]} {_cell_word(count)} in {place.name_after_in} {verb} {colour}"
    return f"{fact} is {NUMBER_WORDS[count]} so {drawn}"


def _text_deductive(rng: random.Random, grid_size: int, objects: Sequence[str]) -> Example:
    name = rng.choice(objects)
    colour = OBJECT_COLOURS[name]
    place = rng.choice(line_places(grid_size) + cell_places(grid_size))
    return Example(
        "text_reasoning",
        "text_deductive",
        f"describe the colour of {name} in {place.name_after_in}",
        response_text=_deductive_answer(name, colour, place),
        meta={"object": name, "colour": colour, "place": place.name},
    )


def _text_abductive(rng: random.Random, grid_size: int, objects: Sequence[str]) -> Example:
    operator, a, b, count = _pick_fact(rng, 1, grid_size)
    colour = rng.choice(DRAW_COLOURS)
    place = rng.choice(line_places(grid_size))
    fact = f"{NUMBER_WORDS[a]} {operator} {NUMBER_WORDS[b]}"
    return Example(
        "text_reasoning",
        "text_abductive",
        f"describe {fact} {colour} cells in {place.name_after_in}",
        response_text=_abductive_answer(operator, a, b, count, colour, place),
        meta={"operator": operator, "a": a, "b": b, "count": count, "place": place.name},
    )


def drawing_reasoning(example: Example) -> str:
    """The reasoning behind a deductive or abductive drawing (``t2i`` or ``transfer``) in
    the words of its ``text_reasoning`` twin: "grass is green so the top row is green",
    "two plus one is three so three cells in the top row are red"; ``""`` for every other
    drawing (nothing to state). The colour of an abductive drawing is read off its grid."""
    if example.response_image is None or example.category not in ("deductive", "abductive"):
        return ""
    size = example.response_image.shape[0]
    place = {p.name: p for p in (*line_places(size), *cell_places(size))}[example.meta["place"]]
    if example.category == "deductive":
        return _deductive_answer(example.meta["object"], example.meta["colour"], place)
    meta = example.meta
    row, column = place.cells[0]
    colour = PALETTE[int(example.response_image[row, column])]
    return _abductive_answer(meta["operator"], meta["a"], meta["b"], meta["count"], colour, place)


# ------------------------------------------------------------------ reconstruction


def _reconstruction(rng: random.Random, grid_size: int, objects: Sequence[str]) -> Example:
    """A structured drawing (direct, composition or inductive) shown with half of its
    cells hidden (``meta["hidden_cells"]``, fed as ``<mask>``), to be redrawn whole: the
    partial-view reconstruction of :mod:`unifyreg.toy.variants` (not in the training mix)."""
    make = rng.choice((_direct, _composition, _inductive))
    grid = make(rng, grid_size, objects).response_image
    cells = [[r, c] for r in range(grid_size) for c in range(grid_size)]
    hidden = sorted(rng.sample(cells, len(cells) // 2))
    return Example(
        "reconstruction",
        "reconstruction",
        RECONSTRUCTION_PROMPT,
        prompt_image=grid,
        response_image=grid,
        meta={"hidden_cells": hidden},
    )


RECONSTRUCTION_PROMPT = "redraw the image"
"""The text prompt of every reconstruction example."""


# ---------------------------------------------------------------------------- dispatcher

GENERATORS: dict[tuple[str, str], Generator] = {
    ("text", "knowledge"): _knowledge,
    ("text", "arithmetic"): _arithmetic,
    ("t2i", "direct"): _direct,
    ("t2i", "composition"): _composition,
    ("t2i", "deductive"): _deductive,
    ("t2i", "inductive"): _inductive,
    ("t2i", "abductive"): _abductive,
    ("understanding", "attribute"): _attribute,
    ("understanding", "logical"): _logical,
    ("understanding", "relation"): _relation,
    ("understanding", "coarse"): _coarse,
    ("understanding", "single_instance"): _single_instance,
    ("understanding", "cross_instance"): _cross_instance,
    ("transfer", "deductive"): _transfer,
    ("reconstruction", "reconstruction"): _reconstruction,
    ("caption", "caption"): _caption,
    ("text_reasoning", "text_deductive"): _text_deductive,
    ("text_reasoning", "text_abductive"): _text_abductive,
}
"""One example generator per (task, category): ``fn(rng, grid_size, objects) -> Example``."""


def generate(
    task: str,
    category: str,
    n: int,
    seed: int | str | random.Random,
    grid_size: int = 4,
    objects: Iterable[str] | None = None,
) -> list[Example]:
    """Return ``n`` examples of ``(task, category)``, deterministic in ``seed``.

    ``seed`` may be an int or str (a fresh ``random.Random(seed)``) or a ``random.Random``
    to draw from. ``objects`` restricts which objects knowledge / deductive / transfer /
    text_deductive examples may mention (default: all). Raises ValueError for an unknown
    task, category or object, a bad grid size or a negative ``n``.
    """
    check_category(task, category)
    size = check_grid_size(grid_size)
    chosen = OBJECTS if objects is None else check_objects(objects)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    make = GENERATORS[(task, category)]
    return [make(rng, size, chosen) for _ in range(n)]


def world_vocabulary(grid_size: int = 4) -> tuple[str, ...]:
    """Every word any generator can emit for a ``grid_size`` grid, sorted."""
    size = check_grid_size(grid_size)
    words: set[str] = set(_TEMPLATE_WORDS) | set(PALETTE) | set(NUMBER_WORDS) | set(OBJECTS)
    for place in line_places(size) + cell_places(size):
        words.update(place.name_after_in.split())
    return tuple(sorted(words))
