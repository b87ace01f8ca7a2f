"""The synthetic reasoning-transfer world: grids, tokenizer, task generators, scorers, splits.

See :mod:`unifyreg.toy.splits` for how the splits are made and why the held-out split
measures whether text-side knowledge reaches image generation.
"""

from unifyreg.toy.splits import (
    TRAINING_MIX,
    ObjectSplit,
    WorldConfig,
    build_splits,
    object_split,
    split_names,
)
from unifyreg.toy.tasks import (
    GENERATORS,
    MMBENCH_CATEGORIES,
    NUMBER_WORDS,
    OBJECT_COLOURS,
    OBJECTS,
    T2I_CATEGORIES,
    TASK_CATEGORIES,
    TASKS,
    TEXT_CATEGORIES,
    Example,
    categories,
    generate,
    score_example,
    score_image,
    score_text,
    world_vocabulary,
)
from unifyreg.toy.tokenizer import SPECIAL_TOKENS, WordTokenizer
from unifyreg.toy.world import (
    BACKGROUND,
    PALETTE,
    PALETTE_RGB,
    Grid,
    as_grid,
    format_grid,
    load_grid_png,
    make_grid,
    parse_image,
    render_grid,
    save_grid_png,
)

__all__ = [
    "BACKGROUND",
    "GENERATORS",
    "MMBENCH_CATEGORIES",
    "NUMBER_WORDS",
    "OBJECTS",
    "OBJECT_COLOURS",
    "PALETTE",
    "PALETTE_RGB",
    "SPECIAL_TOKENS",
    "T2I_CATEGORIES",
    "TASKS",
    "TASK_CATEGORIES",
    "TEXT_CATEGORIES",
    "TRAINING_MIX",
    "Example",
    "Grid",
    "ObjectSplit",
    "WordTokenizer",
    "WorldConfig",
    "as_grid",
    "build_splits",
    "categories",
    "format_grid",
    "generate",
    "load_grid_png",
    "make_grid",
    "object_split",
    "parse_image",
    "render_grid",
    "save_grid_png",
    "score_example",
    "score_image",
    "score_text",
    "split_names",
    "world_vocabulary",
]
