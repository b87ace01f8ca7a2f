"""The splits of the synthetic world and why the held-out split measures reasoning transfer.

Objects. The 16 objects of :data:`~unifyreg.toy.tasks.OBJECT_COLOURS` are split once per
``(seed, heldout_fraction)`` into *train-transfer* objects and *held-out* objects
(:func:`object_split`). The split keeps at least one train-transfer object of every
colour, so every colour a held-out prompt asks for has also been drawn through a fact.

Splits (:func:`build_splits`), each from its own named random stream
(``random.Random("unifyreg-toy/<seed>/<split>/<task>/<category>")``), so that changing
one split's size never changes another split:

- ``pretrain``: ``n_pretrain`` examples mixed by :data:`TRAINING_MIX`: text knowledge
  (facts of **all** objects) and arithmetic, direct drawing, the six understanding
  categories, captions, the two text-reasoning categories (text_deductive over **all**
  objects) and the four t2i reasoning categories, whose ``deductive`` prompts use only
  train-transfer objects. Every category gets at least one example; the list is shuffled.
- ``finetune``: ``n_finetune`` examples, the same mix and object rule, other streams.
- ``eval``: ``n_eval_per_category`` examples of every (task, category) of the training
  mix, other streams; deductive drawing again uses only train-transfer objects. It
  measures in-distribution skill (direct drawing, understanding, text facts).
- ``heldout``: ``n_heldout`` ``transfer``/``deductive`` examples, "the colour of OBJECT
  in PLACE", over held-out objects only.
- ``probe/text/<category>`` for each of :data:`T2I_CATEGORIES` (text prompts, reference
  grids) and of :data:`TEXT_REASONING_CATEGORIES` (text prompts, multi-word reference
  answers), and ``probe/image/<category>`` for each of :data:`MMBENCH_CATEGORIES` (grid +
  question, one reference word) and ``caption`` (grid + "read the image", G*G reference
  words): ``n_probe_per_category`` each, fixed, for the entropy probes. The text
  reasoning and caption sets give the response-level probe text responses as long as an
  image; ``probe/text/*`` is therefore no longer image responses only.

Why ``heldout`` measures transfer. Every ingredient of a held-out prompt is trained: the
model reads "the colour of plum is" -> "purple" in text, draws purple into every place
in direct prompts, and executes "the colour of X in PLACE" for the train-transfer
objects. What it never sees is a held-out object's fact used inside a drawing: no
``t2i`` or ``transfer`` example of ``pretrain``, ``finetune`` or ``eval`` names a
held-out object. Drawing the right grid therefore requires the text-side knowledge to
reach image generation; the gap between ``eval`` t2i/deductive accuracy (seen objects)
and ``heldout`` accuracy (unseen combinations) is the failure to transfer.

Text reasoning about held-out objects is trained on purpose. ``text_reasoning`` examples
(``pretrain``, ``finetune``, ``eval``, probes) use every object, so the model does read
"describe the colour of plum in the top row" -> "plum is purple so the top row is
purple": the held-out combination is reasoned about in words, never drawn. That is the
paper's situation (a UMM reasons in text, and the question is whether that reaches its
images): ``heldout`` measures drawing what the model can already say. It gives the model
more text-side help than a world without text reasoning, so a failure on ``heldout`` is
all the more a failure to carry reasoning from text into images. The held-out rule is
about drawing only, and it holds for every split: no ``t2i`` or ``transfer`` prompt
outside ``heldout`` names a held-out object.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, fields
from typing import NamedTuple

from unifyreg.toy.tasks import (
    CAPTION_CATEGORIES,
    MMBENCH_CATEGORIES,
    OBJECT_COLOURS,
    OBJECTS,
    T2I_CATEGORIES,
    TEXT_CATEGORIES,
    TEXT_REASONING_CATEGORIES,
    Example,
    categories,
    generate,
)
from unifyreg.toy.world import MAX_GRID_SIZE

__all__ = [
    "CAPTION_CATEGORIES",
    "MMBENCH_CATEGORIES",
    "PROBE_SETS",
    "T2I_CATEGORIES",
    "TEXT_CATEGORIES",
    "TEXT_REASONING_CATEGORIES",
    "TRAINING_MIX",
    "ObjectSplit",
    "WorldConfig",
    "build_splits",
    "categories",
    "object_split",
    "split_names",
]

# Understanding gets the largest share: drawing and text facts are learnt within a few
# hundred steps, reading random scenes takes the longest. Captions and text reasoning
# are kept small in examples: each carries 8-16 answer words against one, so their
# share of the text-loss tokens is several times their share of examples.
TRAINING_MIX: tuple[tuple[str, str, float], ...] = (
    ("text", "knowledge", 0.05),
    ("text", "arithmetic", 0.03),
    ("text_reasoning", "text_deductive", 0.02),
    ("text_reasoning", "text_abductive", 0.02),
    ("t2i", "direct", 0.15),
    ("t2i", "composition", 0.05),
    ("t2i", "deductive", 0.05),
    ("t2i", "inductive", 0.04),
    ("t2i", "abductive", 0.04),
    ("understanding", "attribute", 0.085),
    ("understanding", "logical", 0.085),
    ("understanding", "relation", 0.085),
    ("understanding", "coarse", 0.085),
    ("understanding", "single_instance", 0.085),
    ("understanding", "cross_instance", 0.085),
    ("caption", "caption", 0.04),
)
"""(task, category, share) of the pretrain / finetune mix; shares sum to one."""

PROBE_SETS: tuple[tuple[str, str, str], ...] = (
    *(("text", "t2i", c) for c in T2I_CATEGORIES),
    *(("text", "text_reasoning", c) for c in TEXT_REASONING_CATEGORIES),
    *(("image", "understanding", c) for c in MMBENCH_CATEGORIES),
    *(("image", "caption", c) for c in CAPTION_CATEGORIES),
)
"""(prompt modality, task, category) of every probe set, named ``probe/<modality>/<category>``:
``text`` sets have text-only prompts, ``image`` sets a grid in the prompt."""

_MAX_HELDOUT_FRACTION = 0.5


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass
class WorldConfig:
    """Size and seed of the synthetic world and of each split.

    ``grid_size``: side of every grid (2..8). ``seed``: root of every random stream.
    ``n_pretrain`` / ``n_finetune``: examples in those splits (at least one per training
    category). ``n_heldout``: transfer examples. ``n_probe_per_category``: examples in each
    probe set. ``heldout_fraction``: share of the objects held out, in (0, 0.5].
    ``n_eval_per_category``: examples per (task, category) in ``eval``.

    Validated on construction (and again by :func:`build_splits`); a bad field raises
    ValueError naming the field and its value.
    """

    grid_size: int = 4
    seed: int = 0
    # Pre-training needs many distinct scenes: at 3000 steps x 64 a 4-layer model fitted
    # 6000 examples by rote (47% understanding) but generalised from 60000 (100%).
    n_pretrain: int = 60000
    n_finetune: int = 1500
    n_heldout: int = 200
    n_probe_per_category: int = 16
    heldout_fraction: float = 0.25
    n_eval_per_category: int = 50

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if isinstance(self.grid_size, bool) or not isinstance(self.grid_size, int):
            raise ValueError(f"grid_size must be an int, got {self.grid_size!r}")
        if not 2 <= self.grid_size <= MAX_GRID_SIZE:
            raise ValueError(
                f"grid_size must be between 2 and {MAX_GRID_SIZE}, got {self.grid_size}"
            )
        _check_int("seed", self.seed, 0)
        _check_int("n_pretrain", self.n_pretrain, len(TRAINING_MIX))
        _check_int("n_finetune", self.n_finetune, len(TRAINING_MIX))
        _check_int("n_heldout", self.n_heldout, 1)
        _check_int("n_probe_per_category", self.n_probe_per_category, 1)
        _check_int("n_eval_per_category", self.n_eval_per_category, 1)
        fraction = self.heldout_fraction
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or not 0 < fraction <= _MAX_HELDOUT_FRACTION
        ):
            raise ValueError(
                f"heldout_fraction must be in (0, {_MAX_HELDOUT_FRACTION}], got {fraction!r}"
            )

    def to_dict(self) -> dict[str, object]:
        """Field name -> value (e.g. for a cache key)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class ObjectSplit(NamedTuple):
    """Objects whose facts may be drawn in training, and those kept for the held-out split."""

    train_transfer: tuple[str, ...]
    heldout: tuple[str, ...]


def _stream(seed: int, name: str) -> random.Random:
    return random.Random(f"unifyreg-toy/{seed}/{name}")


def object_split(config: WorldConfig) -> ObjectSplit:
    """Split the objects into train-transfer and held-out ones, deterministic in the config.

    Holds out ``max(1, round(heldout_fraction * 16))`` objects, never the last
    train-transfer object of a colour. Both tuples keep :data:`OBJECTS` order.
    """
    config.validate()
    wanted = max(1, round(config.heldout_fraction * len(OBJECTS)))
    order = list(OBJECTS)
    _stream(config.seed, "objects").shuffle(order)
    remaining_per_colour: dict[str, int] = {}
    for name in OBJECTS:
        colour = OBJECT_COLOURS[name]
        remaining_per_colour[colour] = remaining_per_colour.get(colour, 0) + 1
    heldout: set[str] = set()
    for name in order:
        colour = OBJECT_COLOURS[name]
        if len(heldout) < wanted and remaining_per_colour[colour] > 1:
            heldout.add(name)
            remaining_per_colour[colour] -= 1
    return ObjectSplit(
        train_transfer=tuple(o for o in OBJECTS if o not in heldout),
        heldout=tuple(o for o in OBJECTS if o in heldout),
    )


def _allocate(total: int) -> list[int]:
    """Counts per TRAINING_MIX entry: one each, the rest by share (largest remainder)."""
    base = [1] * len(TRAINING_MIX)
    rest = total - len(base)
    quotas = [share * rest for _, _, share in TRAINING_MIX]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: rest - sum(counts)]:
        counts[i] += 1
    return [b + c for b, c in zip(base, counts, strict=True)]


def _objects_for(task: str, category: str, objects: ObjectSplit) -> tuple[str, ...]:
    # Drawing tasks are the only ones the held-out rule restricts; text and
    # text_reasoning use every object (see the module docstring).
    if task == "t2i":
        return objects.train_transfer
    if task == "transfer":
        return objects.heldout
    return OBJECTS


def _training_split(
    config: WorldConfig, name: str, total: int, objects: ObjectSplit
) -> list[Example]:
    examples: list[Example] = []
    for (task, category, _), count in zip(TRAINING_MIX, _allocate(total), strict=True):
        rng = _stream(config.seed, f"{name}/{task}/{category}")
        chosen = _objects_for(task, category, objects)
        examples += generate(task, category, count, rng, config.grid_size, chosen)
    _stream(config.seed, f"{name}/shuffle").shuffle(examples)
    return examples


def split_names() -> tuple[str, ...]:
    """Every key :func:`build_splits` returns, in its order."""
    return (
        "pretrain",
        "finetune",
        "eval",
        "heldout",
        *(f"probe/{modality}/{category}" for modality, _, category in PROBE_SETS),
    )


def build_splits(config: WorldConfig | None = None) -> dict[str, list[Example]]:
    """Build every split of the world described by ``config`` (default: ``WorldConfig()``).

    Keys are :func:`split_names`; see the module docstring for how each is made. The
    same config always gives identical splits. The last few worlds built are kept in
    memory (generating the default world takes about 2.5 s, and one recipe needs it for
    its cache key, its training data and its probe set); every call returns new lists of
    the same immutable examples, so a caller may reorder or extend what it gets.
    """
    config = WorldConfig() if config is None else config
    config.validate()
    cached = _cached_splits(tuple(config.to_dict().items()))
    return {name: list(split) for name, split in cached.items()}


@functools.lru_cache(maxsize=4)
def _cached_splits(fields_and_values: tuple[tuple[str, object], ...]) -> dict[str, tuple]:
    built = _generate_splits(WorldConfig(**dict(fields_and_values)))
    return {name: tuple(split) for name, split in built.items()}


def _generate_splits(config: WorldConfig) -> dict[str, list[Example]]:
    objects = object_split(config)
    size = config.grid_size
    splits: dict[str, list[Example]] = {
        "pretrain": _training_split(config, "pretrain", config.n_pretrain, objects),
        "finetune": _training_split(config, "finetune", config.n_finetune, objects),
    }
    evaluation: list[Example] = []
    for task, category, _ in TRAINING_MIX:
        rng = _stream(config.seed, f"eval/{task}/{category}")
        chosen = _objects_for(task, category, objects)
        evaluation += generate(task, category, config.n_eval_per_category, rng, size, chosen)
    splits["eval"] = evaluation
    splits["heldout"] = generate(
        "transfer",
        "deductive",
        config.n_heldout,
        _stream(config.seed, "heldout/transfer/deductive"),
        size,
        objects.heldout,
    )
    for modality, task, category in PROBE_SETS:
        rng = _stream(config.seed, f"probe/{modality}/{category}")
        chosen = _objects_for(task, category, objects)
        splits[f"probe/{modality}/{category}"] = generate(
            task, category, config.n_probe_per_category, rng, size, chosen
        )
    return splits
