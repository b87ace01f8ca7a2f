"""Tests of the synthetic world: grids, renderer, tokenizer, generators, scorers, splits."""

from __future__ import annotations

import itertools
import pickle
import random
from collections import Counter

import numpy as np
import pytest

from unifyreg.toy import (
    MMBENCH_CATEGORIES,
    NUMBER_WORDS,
    OBJECT_COLOURS,
    OBJECTS,
    PALETTE,
    PALETTE_RGB,
    PROBE_SETS,
    SPECIAL_TOKENS,
    T2I_CATEGORIES,
    TASK_CATEGORIES,
    TEXT_CATEGORIES,
    TEXT_REASONING_CATEGORIES,
    TRAINING_MIX,
    Example,
    WordTokenizer,
    WorldConfig,
    build_splits,
    caption_words,
    categories,
    generate,
    load_grid_png,
    make_grid,
    object_split,
    parse_image,
    render_grid,
    save_grid_png,
    score_example,
    score_image,
    score_text,
    split_names,
    world_vocabulary,
)
from unifyreg.toy.evaluation import (
    HEADLINE_GROUPS,
    MIN_TEXT_STEPS,
    accuracy_table,
    evaluate_examples,
    text_step_budget,
)
from unifyreg.toy.splits import _cached_splits

ALL_TASK_CATEGORIES = [(t, c) for t, cats in TASK_CATEGORIES.items() for c in cats]
DRAWING_TASKS = ("t2i", "transfer")
MAX_ENCODED_LENGTH = 48
SMALL = {"n_pretrain": 260, "n_finetune": 130, "n_heldout": 20, "n_eval_per_category": 5}


@pytest.fixture(scope="module")
def config() -> WorldConfig:
    return WorldConfig()


@pytest.fixture(scope="module")
def splits(config: WorldConfig) -> dict[str, list[Example]]:
    return build_splits(config)


@pytest.fixture(scope="module")
def tokenizer(config: WorldConfig) -> WordTokenizer:
    return WordTokenizer.for_world(config)


def grid_from_rows(*rows: str) -> np.ndarray:
    """Hand-made grid from strings of colour initials ('.' = background)."""
    initials = {name[0]: index for index, name in enumerate(PALETTE)}
    initials["."] = 0
    return np.array([[initials[ch] for ch in row] for row in rows], dtype=np.int64)


# ------------------------------------------------------------- an independent solver
# Re-derives every answer from the prompt text (and image) without the generators' code,
# so a generator that emits a wrong reference answer fails the test.

WORD_VALUE = {word: value for value, word in enumerate(NUMBER_WORDS)}


def solve_place(words: list[str], size: int) -> list[tuple[int, int]]:
    if words and words[0] == "the":
        words = words[1:]
    phrase = " ".join(words)
    aliases = {
        "top row": [(0, c) for c in range(size)],
        "bottom row": [(size - 1, c) for c in range(size)],
        "left column": [(r, 0) for r in range(size)],
        "right column": [(r, size - 1) for r in range(size)],
    }
    if phrase in aliases:
        return aliases[phrase]
    if words[0] == "row":
        return [(WORD_VALUE[words[1]] - 1, c) for c in range(size)]
    if words[0] == "column":
        return [(r, WORD_VALUE[words[1]] - 1) for r in range(size)]
    assert words[0] == "cell" and len(words) == 3, phrase
    return [(WORD_VALUE[words[1]] - 1, WORD_VALUE[words[2]] - 1)]


def solve_arithmetic(a: str, operator: str, b: str) -> int:
    return WORD_VALUE[a] + WORD_VALUE[b] if operator == "plus" else WORD_VALUE[a] - WORD_VALUE[b]


def paint(grid: np.ndarray, cells: list[tuple[int, int]], colours: list[str]) -> None:
    for (r, c), colour in zip(cells, itertools.cycle(colours)):
        grid[r, c] = PALETTE.index(colour)


def solve_drawing(example: Example, size: int) -> np.ndarray:
    words = example.prompt_text.split()
    grid = np.zeros((size, size), dtype=np.int64)
    category = example.category
    if category == "direct" and words[-1] in PALETTE:
        paint(grid, solve_place(words[:-1], size), [words[-1]])
    elif category == "direct":
        cut = words.index("in")
        count, colour = WORD_VALUE[words[0]], words[1]
        paint(grid, solve_place(words[cut + 1 :], size)[:count], [colour])
    elif category == "composition":
        cut = words.index("and")
        for clause in (words[:cut], words[cut + 1 :]):
            paint(grid, solve_place(clause[:-1], size), [clause[-1]])
    elif category == "deductive":
        assert words[:3] == ["the", "colour", "of"]
        paint(grid, solve_place(words[5:], size), [OBJECT_COLOURS[words[3]]])
    elif category == "inductive" and words[-1] == "checkerboard":
        cells = [(r, c) for r in range(size) for c in range(size)]
        for r, c in cells:
            grid[r, c] = PALETTE.index(words[(r + c) % 2])
    elif category == "inductive":
        cut = words.index("repeated")
        paint(grid, solve_place(words[cut + 2 :], size), words[:cut])
    elif category == "abductive":
        count = solve_arithmetic(*words[:3])
        paint(grid, solve_place(words[words.index("in") + 1 :], size)[:count], [words[3]])
    else:
        raise AssertionError(f"no solver for {category}")
    return grid


def solve_text(example: Example) -> str:
    words = example.prompt_text.split()
    if example.category == "knowledge":
        name = words[3] if words[:3] == ["the", "colour", "of"] else words[-1]
        return OBJECT_COLOURS[name]
    assert words[-1] == "is"
    return NUMBER_WORDS[solve_arithmetic(*words[:3])]


def solve_understanding(example: Example) -> str:
    grid = example.prompt_image
    size = grid.shape[0]
    words = example.prompt_text.split()
    colour_names = [PALETTE[v] for v in grid.flatten()]
    category = example.category
    if "cell" in words:
        (r, c) = solve_place(words[-3:], size)[0]
    if category == "attribute":
        return PALETTE[grid[r, c]]
    if category == "relation":
        offsets = {"west": (0, -1), "east": (0, 1)}
        dr, dc = offsets[words[3]]
        return PALETTE[grid[r + dr, c + dc]]
    if category in ("single_instance", "logical"):
        occupied = grid[r, c] != 0
        asks_for_nothing = "nothing" in words
        return "yes" if occupied != asks_for_nothing else "no"
    counts = Counter(name for name in colour_names if name != "black").most_common()
    if category == "coarse":
        assert len(counts) == 1 or counts[0][1] >= counts[1][1] + 2, "must stand out"
        return counts[0][0]
    if category == "cross_instance":
        assert len(counts) >= 2 and counts[-1][1] <= counts[-2][1] - 2, "must stand out"
        return counts[-1][0]
    raise AssertionError(f"no solver for {category}")


def solve_caption(example: Example) -> str:
    assert example.prompt_text == "read the image"
    words = []
    for row in example.prompt_image:  # top row first
        for value in row:  # left to right
            words.append(PALETTE[int(value)])
    return " ".join(words)


def solve_text_reasoning(example: Example, size: int) -> str:
    words = example.prompt_text.split()
    assert words[0] == "describe", example.prompt_text
    body = words[1:]
    cut = body.index("in")
    place = body[cut + 1 :]
    cells = solve_place(place, size)  # must name a real place
    phrase = " ".join(place)
    if example.category == "text_deductive":
        assert body[:3] == ["the", "colour", "of"] and cut == 4, example.prompt_text
        name = body[3]
        colour = OBJECT_COLOURS[name]
        return f"{name} is {colour} so {phrase} is {colour}"
    assert example.category == "text_abductive", example.category
    a, operator, b, colour, cells_word = body[:cut]
    assert cells_word == "cells" and colour in PALETTE[1:]
    count = solve_arithmetic(a, operator, b)
    assert 1 <= count <= len(cells), example.prompt_text
    number = NUMBER_WORDS[count]
    noun, verb = ("cell", "is") if count == 1 else ("cells", "are")
    return f"{a} {operator} {b} is {number} so {number} {noun} in {phrase} {verb} {colour}"


def check_reference(example: Example, size: int) -> None:
    if example.task in DRAWING_TASKS:
        expected_grid = solve_drawing(example, size)
        assert score_example(example, predicted_grid=expected_grid), example.prompt_text
        assert score_image(expected_grid, example.response_image)
    elif example.task == "text":
        assert score_example(example, predicted_text=solve_text(example)), example.prompt_text
    elif example.task == "caption":
        assert example.response_text == solve_caption(example)
    elif example.task == "text_reasoning":
        assert example.response_text == solve_text_reasoning(example, size), example.prompt_text
    elif example.task == "reconstruction":
        # The whole drawing is the answer; half of it (rounded down) is hidden in the prompt.
        assert score_image(example.prompt_image, example.response_image)
        hidden = example.meta["hidden_cells"]
        assert len(hidden) == size * size // 2 and len({tuple(c) for c in hidden}) == len(hidden)
        assert example.response_image.any()  # a drawing, never an empty grid
    else:
        assert example.task == "understanding", example.task
        answer = solve_understanding(example)
        assert score_example(example, predicted_text=answer), example.prompt_text


# ------------------------------------------------------------------------- the world


def test_palette_has_black_background_and_distinct_rgb():
    assert len(PALETTE) == 8 and PALETTE[0] == "black"
    assert len(PALETTE_RGB) == len(PALETTE)
    assert len(set(PALETTE_RGB)) == len(PALETTE)
    assert PALETTE_RGB[0] == (0, 0, 0)


def test_make_grid_is_background_int64():
    grid = make_grid(4)
    assert grid.shape == (4, 4) and grid.dtype == np.int64 and not grid.any()


@pytest.mark.parametrize("bad_size", [1, 0, -3])
def test_grid_size_below_two_is_rejected_naming_the_value(bad_size: int):
    with pytest.raises(ValueError, match=rf"grid_size.*{bad_size}"):
        make_grid(bad_size)
    with pytest.raises(ValueError, match=rf"grid_size.*{bad_size}"):
        parse_image(np.zeros((8, 8, 3), dtype=np.uint8), bad_size)
    with pytest.raises(ValueError, match=rf"grid_size.*{bad_size}"):
        WorldConfig(grid_size=bad_size)


def test_render_then_parse_round_trips_exactly():
    rng = np.random.default_rng(0)
    for size, cell_px in [(2, 1), (4, 8), (5, 3), (8, 2)]:
        grid = rng.integers(0, len(PALETTE), size=(size, size))
        image = render_grid(grid, cell_px=cell_px)
        assert image.shape == (size * cell_px, size * cell_px, 3) and image.dtype == np.uint8
        assert tuple(image[0, 0]) == PALETTE_RGB[grid[0, 0]]
        np.testing.assert_array_equal(parse_image(image, size), grid)


def test_parse_tolerates_noise_and_snaps_to_palette():
    grid = grid_from_rows("rgby", "wop.", "....", "rrrr")
    image = render_grid(grid, cell_px=6).astype(np.int64)
    noise = np.random.default_rng(1).integers(-20, 21, size=image.shape)
    noisy = np.clip(image + noise, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(parse_image(noisy, 4), grid)


def test_png_save_load_round_trips(tmp_path):
    grid = grid_from_rows("r..b", ".g..", "..y.", "wop.")
    path = save_grid_png(grid, tmp_path / "grid.png", cell_px=5)
    assert path.exists()
    np.testing.assert_array_equal(load_grid_png(path, 4), grid)


def test_render_rejects_non_grids():
    with pytest.raises(ValueError, match="square"):
        render_grid(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="9"):
        render_grid(np.full((2, 2), 9))


# ----------------------------------------------------------------------------- scorers


def test_score_image_on_hand_made_grids():
    reference = grid_from_rows("gggg", "....", "....", "....")  # "top row green"
    assert score_image(reference.copy(), reference)
    assert score_image(reference.tolist(), reference)
    wrong_colour = grid_from_rows("gggr", "....", "....", "....")
    wrong_place = grid_from_rows("....", "gggg", "....", "....")
    extra_cells = grid_from_rows("gggg", "g...", "....", "....")
    missing_cell = grid_from_rows("ggg.", "....", "....", "....")
    for prediction in (wrong_colour, wrong_place, extra_cells, missing_cell):
        assert not score_image(prediction, reference)
    assert not score_image(None, reference)
    assert not score_image(np.zeros((3, 3), dtype=np.int64), reference)
    assert not score_image(np.zeros((16,), dtype=np.int64), reference)


def test_score_text_is_exact_after_strip_and_lower():
    assert score_text(" Green\n", "green")
    assert not score_text("greenish", "green")
    assert not score_text("", "green")
    assert not score_text(None, "green")


def test_score_example_uses_the_answer_modality():
    drawing = Example(
        "t2i",
        "direct",
        "top row green",
        response_image=grid_from_rows("gggg", "....", "....", "...."),
    )
    assert score_example(drawing, predicted_grid=grid_from_rows("gggg", "....", "....", "...."))
    assert not score_example(drawing, predicted_text="green")
    assert not score_example(drawing, predicted_grid=grid_from_rows("gggg", "...r", "....", "...."))
    fact = Example("text", "knowledge", "what colour is grass", response_text="green")
    assert score_example(fact, predicted_text="green")
    assert not score_example(fact, predicted_text="blue")
    assert not score_example(fact, predicted_grid=make_grid(4))


def test_every_reference_answer_is_correct(splits, config):
    # check_reference asserts that the exact scorer accepts the reference (and, where a
    # solver exists, that the solver's answer is the reference).
    checked = 0
    for examples in splits.values():
        for example in examples:
            check_reference(example, config.grid_size)
            checked += 1
    assert checked == sum(len(examples) for examples in splits.values()) > 0
    for size in (2, 3, 6):
        for task, category in ALL_TASK_CATEGORIES:
            examples = generate(task, category, 20, seed=size, grid_size=size)
            assert len(examples) == 20
            for example in examples:
                check_reference(example, size)


# -------------------------------------------------------------------------- generators


@pytest.mark.parametrize(("task", "category"), ALL_TASK_CATEGORIES)
def test_generators_are_deterministic_and_seed_dependent(task: str, category: str):
    first = generate(task, category, 40, seed=7)
    again = generate(task, category, 40, seed=7)
    other = generate(task, category, 40, seed=8)
    assert first == again
    assert first != other
    assert all(e.task == task and e.category == category for e in first)


def test_generate_accepts_a_random_instance():
    assert generate("t2i", "direct", 5, random.Random(3)) == generate("t2i", "direct", 5, 3)


def test_examples_compare_and_hash_by_content():
    grid = grid_from_rows("r...", "....", "....", "....")
    a = Example("t2i", "direct", "cell one one red", response_image=grid)
    b = Example("t2i", "direct", "cell one one red", response_image=grid.tolist())
    c = Example("t2i", "direct", "cell one one red", response_image=make_grid(4))
    assert a == b and hash(a) == hash(b) and len({a, b, c}) == 2
    assert a != c
    assert isinstance(a.response_image, np.ndarray) and a.response_image.dtype == np.int64
    assert a.prompt_image is None
    with pytest.raises(ValueError):
        a.response_image[0, 0] = 2  # stored grids are read-only
    assert Example.from_dict(a.to_dict()) == a
    unpickled = pickle.loads(pickle.dumps(a))
    assert unpickled == a and not unpickled.response_image.flags.writeable


def test_understanding_examples_carry_an_image_and_a_word(splits):
    for example in splits["eval"]:
        if example.task == "understanding":
            assert isinstance(example.prompt_image, np.ndarray)
            assert example.prompt_image.shape == (4, 4)
            assert len(example.response_text.split()) == 1


def test_answers_are_not_degenerate(splits):
    # A category whose answer never varies could be solved without reading the input.
    for task, category in ALL_TASK_CATEGORIES:
        if task == "transfer":
            continue
        examples = [e for e in splits["eval"] if (e.task, e.category) == (task, category)]
        if task == "reconstruction":  # not in the eval split: generated here
            examples = generate(task, category, 20, seed=3)
        answers = {
            e.response_text if e.response_text else e.response_image.tobytes() for e in examples
        }
        assert len(answers) >= 2, (task, category)
    for category in ("single_instance", "logical"):
        answers = Counter(e.response_text for e in generate("understanding", category, 200, 1))
        assert min(answers["yes"], answers["no"]) > 50, (category, answers)


def test_unknown_task_or_category_names_the_value_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"'sketch'.*direct.*composition"):
        generate("t2i", "sketch", 1, 0)
    with pytest.raises(ValueError, match=r"'video'.*text.*t2i.*understanding.*transfer"):
        generate("video", "direct", 1, 0)
    with pytest.raises(ValueError, match=r"'sketch'"):
        Example("t2i", "sketch", "top row red", response_image=make_grid(4))
    with pytest.raises(ValueError, match="'video'"):
        categories("video")
    with pytest.raises(ValueError, match="'unicorn'"):
        generate("t2i", "deductive", 1, 0, objects=["unicorn"])


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_rejected(prompt: str):
    with pytest.raises(ValueError, match="empty"):
        Example("text", "knowledge", prompt, response_text="green")


def test_example_requires_the_right_answer_modality():
    with pytest.raises(ValueError, match="response_image"):
        Example("t2i", "direct", "top row red", response_text="red")
    with pytest.raises(ValueError, match="response_text"):
        Example("text", "knowledge", "what colour is sky", response_image=make_grid(4))
    with pytest.raises(ValueError, match="prompt_image"):
        Example("understanding", "coarse", "which colour is most common", response_text="red")
    with pytest.raises(ValueError, match="prompt_image"):
        Example("caption", "caption", "read the image", response_text="red " * 16)
    with pytest.raises(ValueError, match="prompt_image"):
        Example(
            "text_reasoning",
            "text_deductive",
            "describe the colour of sky in row one",
            prompt_image=make_grid(4),
            response_text="sky is blue so row one is blue",
        )
    with pytest.raises(ValueError, match="response_text"):
        Example("caption", "caption", "read the image", prompt_image=make_grid(4))


def test_category_constants():
    assert TEXT_CATEGORIES == ("knowledge", "arithmetic")
    assert T2I_CATEGORIES == ("composition", "deductive", "inductive", "abductive")
    assert len(MMBENCH_CATEGORIES) == 6
    assert categories("t2i") == ("direct", *T2I_CATEGORIES)
    assert categories("transfer") == ("deductive",)
    assert sum(share for _, _, share in TRAINING_MIX) == pytest.approx(1.0)


def test_objects_have_drawable_colours():
    assert len(OBJECTS) == 16
    assert "black" not in OBJECT_COLOURS.values()
    assert set(OBJECT_COLOURS.values()) <= set(PALETTE)


# ------------------------------------------------------------------------------ splits


def test_splits_have_the_configured_sizes(splits, config):
    assert tuple(splits) == split_names()
    assert len(splits["pretrain"]) == config.n_pretrain
    assert len(splits["finetune"]) == config.n_finetune
    assert len(splits["heldout"]) == config.n_heldout
    assert len(splits["eval"]) == config.n_eval_per_category * len(TRAINING_MIX)
    for name in split_names():
        if name.startswith("probe/"):
            assert len(splits[name]) == config.n_probe_per_category


def test_every_split_covers_its_categories(splits):
    training = {(task, category) for task, category, _ in TRAINING_MIX}
    # transfer is held out; reconstruction only enters through the RecA-style variant
    assert training == {
        tc for tc in ALL_TASK_CATEGORIES if tc[0] not in ("transfer", "reconstruction")
    }
    for name in ("pretrain", "finetune", "eval"):
        assert {(e.task, e.category) for e in splits[name]} == training, name
    assert {(e.task, e.category) for e in splits["heldout"]} == {("transfer", "deductive")}
    for category in T2I_CATEGORIES:
        assert {(e.task, e.category) for e in splits[f"probe/text/{category}"]} == {
            ("t2i", category)
        }
    for category in MMBENCH_CATEGORIES:
        probe = splits[f"probe/image/{category}"]
        assert {(e.task, e.category) for e in probe} == {("understanding", category)}
        assert all(e.prompt_image is not None and e.response_text for e in probe)
    for category in TEXT_REASONING_CATEGORIES:
        probe = splits[f"probe/text/{category}"]
        assert {(e.task, e.category) for e in probe} == {("text_reasoning", category)}
        assert all(e.prompt_image is None and len(e.response_text.split()) >= 8 for e in probe)
    probe = splits["probe/image/caption"]
    assert {(e.task, e.category) for e in probe} == {("caption", "caption")}
    assert all(e.prompt_image is not None and len(e.response_text.split()) == 16 for e in probe)
    expected = {f"probe/{m}/{c}" for m, _, c in PROBE_SETS}
    assert {n for n in splits if n.startswith("probe/")} == expected
    assert len(expected) == len(PROBE_SETS)  # category names do not collide


def test_small_splits_still_cover_every_category():
    smallest = WorldConfig(n_pretrain=len(TRAINING_MIX), n_finetune=len(TRAINING_MIX))
    built = build_splits(smallest)
    assert len({(e.task, e.category) for e in built["pretrain"]}) == len(TRAINING_MIX)


def test_build_splits_is_deterministic_and_seed_dependent():
    first = build_splits(WorldConfig(seed=3, **SMALL))
    _cached_splits.cache_clear()  # generate the world again instead of reusing the kept one
    again = build_splits(WorldConfig(seed=3, **SMALL))
    assert again["pretrain"][0] is not first["pretrain"][0]
    other = build_splits(WorldConfig(seed=4, **SMALL))
    assert first == again
    for name in split_names():
        assert first[name] != other[name], name


def test_build_splits_keeps_the_world_but_returns_fresh_lists():
    config = WorldConfig(seed=5, **SMALL)
    first = build_splits(config)
    first["pretrain"].clear()
    first["eval"].reverse()
    again = build_splits(WorldConfig(seed=5, **SMALL))
    assert len(again["pretrain"]) == SMALL["n_pretrain"]
    assert again["eval"][0] is first["eval"][-1]  # the same examples, not regenerated
    assert again["eval"][0] is not first["eval"][0]


def test_training_splits_use_different_streams(splits):
    assert splits["pretrain"][:50] != splits["finetune"][:50]
    assert splits["eval"] != splits["probe/text/composition"]


def test_object_split_is_deterministic_and_keeps_every_colour_drawable(config):
    objects = object_split(config)
    assert objects == object_split(WorldConfig())
    assert len(objects.heldout) == round(config.heldout_fraction * len(OBJECTS))
    assert set(objects.heldout).isdisjoint(objects.train_transfer)
    assert set(objects.heldout) | set(objects.train_transfer) == set(OBJECTS)
    train_colours = {OBJECT_COLOURS[o] for o in objects.train_transfer}
    assert train_colours == set(OBJECT_COLOURS.values())
    for seed in range(20):
        half = object_split(WorldConfig(seed=seed, heldout_fraction=0.5))
        assert {OBJECT_COLOURS[o] for o in half.train_transfer} == train_colours
    assert object_split(WorldConfig(seed=1)) != objects or object_split(WorldConfig(seed=2)) != (
        objects
    )


def _mentioned_objects(example: Example) -> set[str]:
    mentioned = set(example.prompt_text.split()) & set(OBJECTS)
    if "object" in example.meta:
        mentioned.add(example.meta["object"])
    return mentioned


def test_heldout_objects_are_never_drawn_in_training_splits(splits, config):
    heldout = set(object_split(config).heldout)
    for name in ("pretrain", "finetune", "eval", *(n for n in splits if n.startswith("probe"))):
        for example in splits[name]:
            if example.task in DRAWING_TASKS:
                assert not _mentioned_objects(example) & heldout, (name, example.prompt_text)
    drawn = set().union(*(_mentioned_objects(e) for e in splits["pretrain"] if e.task == "t2i"))
    assert drawn == set(object_split(config).train_transfer)


def test_heldout_facts_are_taught_in_text(splits, config):
    heldout = set(object_split(config).heldout)
    knowledge = [e for e in splits["pretrain"] if (e.task, e.category) == ("text", "knowledge")]
    taught = Counter(e.meta["object"] for e in knowledge)
    assert set(taught) == set(OBJECTS)
    assert all(taught[name] >= 10 for name in heldout)


def test_heldout_split_asks_only_about_heldout_objects(splits, config):
    heldout = set(object_split(config).heldout)
    used = set().union(*(_mentioned_objects(e) for e in splits["heldout"]))
    assert used == heldout
    assert all(e.prompt_text.startswith("the colour of ") for e in splits["heldout"])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_pretrain", 3),
        ("n_finetune", -1),
        ("n_heldout", 0),
        ("n_probe_per_category", 0),
        ("n_eval_per_category", 0),
        ("heldout_fraction", 0.0),
        ("heldout_fraction", 0.9),
        ("seed", -1),
        ("grid_size", 9),
    ],
)
def test_world_config_rejects_bad_fields_naming_them(field: str, value):
    with pytest.raises(ValueError, match=rf"{field}.*{value}"):
        WorldConfig(**{field: value})


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_layout(tokenizer):
    assert [tokenizer.id_to_token(i) for i in range(7)] == list(SPECIAL_TOKENS)
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert (tokenizer.boi_id, tokenizer.eoi_id, tokenizer.sep_id) == (3, 4, 5)
    assert tokenizer.mask_id == 6 and tokenizer.id_to_token(6) == "<mask>"
    assert tokenizer.image_token_ids == list(range(7, 7 + len(PALETTE)))
    assert [tokenizer.id_to_token(i) for i in tokenizer.image_token_ids[:2]] == [
        "<img_black>",
        "<img_red>",
    ]
    words = [tokenizer.id_to_token(i) for i in range(7 + len(PALETTE), tokenizer.vocab_size)]
    assert words == sorted(words) and words == list(tokenizer.words)
    assert tokenizer.is_image_token(7) and not tokenizer.is_image_token(6)
    assert not tokenizer.is_image_token(tokenizer.encode_text("red")[0])
    assert tokenizer.vocab_size < 120
    assert WordTokenizer(["b", "a", "b"]).words == ("a", "b")


def test_tokenizer_text_round_trip(tokenizer):
    text = "the colour of grass in the top row"
    ids = tokenizer.encode_text(text)
    assert len(ids) == 8
    assert tokenizer.decode_text(ids) == text
    padded = [
        tokenizer.bos_id,
        *ids,
        tokenizer.sep_id,
        tokenizer.image_token_ids[2],
        tokenizer.eos_id,
        tokenizer.pad_id,
    ]
    assert tokenizer.decode_text(padded) == text


def test_tokenizer_grid_round_trip(tokenizer):
    grid = grid_from_rows("rgby", "wop.", "....", "r..r")
    ids = tokenizer.encode_grid(grid)
    assert len(ids) == 16 and all(tokenizer.is_image_token(i) for i in ids)
    assert ids[:2] == [tokenizer.image_token_ids[1], tokenizer.image_token_ids[2]]
    np.testing.assert_array_equal(tokenizer.decode_grid(ids, 4), grid)


def test_tokenizer_decode_grid_rejects_bad_ids(tokenizer):
    ids = tokenizer.encode_grid(make_grid(4))
    with pytest.raises(ValueError, match="15"):
        tokenizer.decode_grid(ids[:-1], 4)
    word_id = tokenizer.encode_text("red")[0]
    with pytest.raises(ValueError, match=str(word_id)):
        tokenizer.decode_grid([*ids[:-1], word_id], 4)


def test_tokenizer_rejects_unknown_words_and_empty_text(tokenizer):
    with pytest.raises(ValueError, match="'unicorn'"):
        tokenizer.encode_text("the colour of unicorn is")
    with pytest.raises(ValueError, match="'Grass'"):
        tokenizer.encode_text("what colour is Grass")
    with pytest.raises(ValueError, match="'<bos>'"):
        tokenizer.encode_text("<bos> red")
    for empty in ("", "  \n"):
        with pytest.raises(ValueError, match="empty"):
            tokenizer.encode_text(empty)


def test_tokenizer_save_load_round_trip(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "tok")
    assert path.name == "tokenizer.json"
    loaded = WordTokenizer.load(tmp_path / "tok")
    assert loaded == tokenizer
    assert loaded.vocab_size == tokenizer.vocab_size
    assert [loaded.id_to_token(i) for i in range(loaded.vocab_size)] == [
        tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)
    ]
    text = "two plus one red cells in the top row"
    assert loaded.encode_text(text) == tokenizer.encode_text(text)


def test_vocabulary_is_complete_and_sequences_are_short(splits, tokenizer):
    longest = 0
    for examples in splits.values():
        for example in examples:
            ids = tokenizer.encode_example(example)
            assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
            assert len(example.prompt_text.split()) <= 12, example.prompt_text
            longest = max(longest, len(ids))
    assert longest < MAX_ENCODED_LENGTH


def test_vocabulary_covers_other_grid_sizes():
    for size in (2, 3, 8):
        tokenizer = WordTokenizer.for_world(WorldConfig(grid_size=size))
        for task, category in ALL_TASK_CATEGORIES:
            for example in generate(task, category, 30, seed=0, grid_size=size):
                ids = tokenizer.encode_example(example)  # raises on an unknown word
                assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
                assert all(0 <= i < tokenizer.vocab_size for i in ids)


# ------------------------------------------------- long text answers: caption, reasoning

LONG_TEXT_CATEGORIES = [
    ("caption", "caption"),
    *(("text_reasoning", c) for c in TEXT_REASONING_CATEGORIES),
]


def test_caption_is_the_word_twin_of_the_image_tokens(tokenizer):
    grid = grid_from_rows("rgby", "wop.", "....", "r..r")
    assert caption_words(grid) == (
        "red green blue yellow white orange purple black "
        "black black black black red black black red"
    )
    for example in generate("caption", "caption", 50, seed=0):
        assert example.prompt_text == "read the image"
        words = example.response_text.split()
        image_tokens = tokenizer.encode_grid(example.prompt_image)
        assert len(words) == len(image_tokens) == 16
        # word i names the colour of image token i: "<img_red>" <-> "red"
        assert [f"<img_{w}>" for w in words] == [tokenizer.id_to_token(i) for i in image_tokens]
    for size in (2, 3, 6):
        for example in generate("caption", "caption", 10, seed=size, grid_size=size):
            assert len(example.response_text.split()) == size * size


def test_text_reasoning_examples_by_hand():
    # 448 deductive prompts (16 objects x 28 places): 3000 draws meet the hand-made ones
    deductive = generate("text_reasoning", "text_deductive", 3000, seed=0)
    abductive = generate("text_reasoning", "text_abductive", 300, seed=0)
    by_prompt = {e.prompt_text: e.response_text for e in deductive + abductive}
    hand_made = {
        "describe the colour of grass in the top row": "grass is green so the top row is green",
        "describe the colour of sky in cell two three": "sky is blue so cell two three is blue",
        "describe two plus one red cells in the top row": (
            "two plus one is three so three cells in the top row are red"
        ),
        "describe two minus one red cells in the top row": (
            "two minus one is one so one cell in the top row is red"
        ),
    }
    for prompt, answer in hand_made.items():
        example = Example(
            "text_reasoning",
            "text_abductive" if "plus" in prompt or "minus" in prompt else "text_deductive",
            prompt,
            response_text=answer,
        )
        assert solve_text_reasoning(example, 4) == answer  # the test's solver, by hand
        if example.category == "text_deductive":
            assert by_prompt[prompt] == answer  # the generator, by hand
    # answers state the fact, then what is drawn; never one word
    assert all(len(e.response_text.split()) >= 8 for e in deductive + abductive)
    assert {e.meta["count"] == 1 for e in abductive} == {True, False}  # both number forms


def _drawn_by_answer(answer: str, size: int) -> np.ndarray:
    """The grid a text-reasoning answer says is drawn (the words after "so")."""
    words = answer.split()
    clause = words[words.index("so") + 1 :]
    colour = clause[-1]
    assert clause[-2] in ("is", "are")
    grid = np.zeros((size, size), dtype=np.int64)
    if clause[0] in NUMBER_WORDS and clause[1] in ("cell", "cells"):
        count = WORD_VALUE[clause[0]]
        paint(grid, solve_place(clause[3:-2], size)[:count], [colour])
    else:
        paint(grid, solve_place(clause[:-2], size), [colour])
    return grid


@pytest.mark.parametrize("size", [4, 3])
def test_text_reasoning_answers_state_what_the_t2i_twin_draws(size: int):
    # "describe P" -> answer; the t2i prompt P draws exactly what the answer says.
    for category in TEXT_REASONING_CATEGORIES:
        for example in generate("text_reasoning", category, 100, seed=1, grid_size=size):
            twin_prompt = example.prompt_text.removeprefix("describe ")
            twin_category = category.removeprefix("text_")
            twin = Example("t2i", twin_category, twin_prompt, response_image=make_grid(size))
            drawn = solve_drawing(twin, size)
            np.testing.assert_array_equal(_drawn_by_answer(example.response_text, size), drawn)


@pytest.mark.parametrize(("task", "category"), LONG_TEXT_CATEGORIES)
def test_long_answers_are_scored_word_by_word(task: str, category: str):
    vocabulary = world_vocabulary(4)
    for example in generate(task, category, 20, seed=3):
        reference = example.response_text
        words = reference.split()
        assert score_example(example, predicted_text=reference)
        assert score_example(example, predicted_text="  " + reference.upper().replace(" ", "  "))
        for i, word in enumerate(words):
            other = next(w for w in vocabulary if w != word)
            wrong = " ".join([*words[:i], other, *words[i + 1 :]])
            assert not score_example(example, predicted_text=wrong), (i, wrong)
        assert not score_example(example, predicted_text=" ".join(words[:-1]))
        assert not score_example(example, predicted_text=" ".join(words[1:]))
        assert not score_example(example, predicted_text=reference + " red")
        assert not score_example(example, predicted_text=words[0])
        assert not score_example(example, predicted_text=None)


def test_long_text_tasks_are_in_the_mix_and_understanding_keeps_its_share():
    shares = {(task, category): share for task, category, share in TRAINING_MIX}
    for key in LONG_TEXT_CATEGORIES:
        assert 0 < shares[key] <= 0.05, key
    understanding = sum(s for (task, _), s in shares.items() if task == "understanding")
    assert understanding >= 0.5
    assert sum(shares.values()) == pytest.approx(1.0)


def test_text_reasoning_uses_every_object_and_no_drawing_names_a_heldout_one(splits, config):
    objects = object_split(config)
    deductive = [e for e in splits["pretrain"] if e.category == "text_deductive"]
    assert {e.meta["object"] for e in deductive} == set(OBJECTS)  # held-out ones included
    assert {o for e in deductive for o in _mentioned_objects(e)} == set(OBJECTS)
    heldout = set(objects.heldout)
    for name in ("pretrain", "finetune", "eval"):
        for example in splits[name]:
            if example.task in DRAWING_TASKS:
                assert not _mentioned_objects(example) & heldout, (name, example.prompt_text)
    # no prompt asks for both a grid and words
    drawing = {e.prompt_text for n in ("pretrain", "eval") for e in splits[n] if e.task == "t2i"}
    wording = {e.prompt_text for n in ("pretrain", "eval") for e in splits[n] if e.task != "t2i"}
    assert drawing.isdisjoint(wording)


def _hand_count(example: Example, grid_size: int) -> int:
    """1 bos + prompt words + (2 + G*G for an image prompt) + 1 sep + answer + 1 eos, where
    the answer is its words, or <boi> G*G <eoi> for a grid."""
    image = grid_size * grid_size
    length = 1 + len(example.prompt_text.split()) + 1 + 1
    if example.prompt_image is not None:
        length += 2 + image
    if example.response_image is not None:
        length += 2 + image
    else:
        length += len(example.response_text.split())
    return length


def test_every_task_category_fits_the_toy_models_positions(splits, tokenizer):
    from unifyreg.adapters.toy import ToyModelConfig

    max_positions = ToyModelConfig().max_positions
    assert max_positions == 64
    longest: dict[tuple[str, str], int] = {}
    samples = [e for t, c in ALL_TASK_CATEGORIES for e in generate(t, c, 400, seed=11)]
    for example in [*samples, *(e for split in splits.values() for e in split)]:
        length = _hand_count(example, 4)
        assert len(tokenizer.encode_example(example)) == length, example.prompt_text
        key = (example.task, example.category)
        longest[key] = max(longest.get(key, 0), length)
    assert set(longest) == set(ALL_TASK_CATEGORIES)
    assert max(longest.values()) <= max_positions, longest
    # by hand: caption 1 + 3 + 18 + 1 + 16 + 1; "describe the colour of X in the top row"
    # -> "X is C so the top row is C": 1 + 9 + 1 + 9 + 1; "describe a plus b C cells in
    # the top row" -> "a plus b is n so n cells in the top row are C": 1 + 10 + 1 + 14 + 1
    assert longest[("caption", "caption")] == 40
    assert longest[("text_reasoning", "text_deductive")] == 21
    assert longest[("text_reasoning", "text_abductive")] == 27
    assert longest[("t2i", "direct")] == 1 + 7 + 1 + 18 + 1  # "four red cells in the top row"


# -------------------------------------------------------------------------- evaluation


class _ReferenceAdapter:
    """Answers with the references, cut as greedy decoding cuts: at most max_new_tokens
    tokens, a text answer being its words then <eos>. ``extra`` words are said after the
    reference (a model that does not stop); ``wrong_tasks`` get a wrong first word."""

    def __init__(self, extra: tuple[str, ...] = (), wrong_tasks: tuple[str, ...] = ()):
        self.extra = list(extra)
        self.wrong_tasks = wrong_tasks
        self.budgets: dict[tuple[str, str], set[int]] = {}

    def generate_images(self, examples, batch_size=256):
        return [e.response_image for e in examples]

    def generate_text(self, examples, max_new_tokens=8, batch_size=256):
        replies = []
        for e in examples:
            self.budgets.setdefault((e.task, e.category), set()).add(max_new_tokens)
            words = [*e.response_text.split(), *self.extra]
            if e.task in self.wrong_tasks:
                words[0] = "zero" if words[0] != "zero" else "one"
            replies.append(" ".join(words[:max_new_tokens]))
        return replies


def test_evaluation_gives_long_answers_room_and_reports_new_headlines():
    built = build_splits(WorldConfig(seed=2, **SMALL))
    chosen = {"eval": built["eval"], "heldout": built["heldout"]}
    adapter = _ReferenceAdapter()
    results = evaluate_examples(adapter, chosen)
    assert (
        set(results["headline"])
        == set(HEADLINE_GROUPS)
        == {
            "t2i_direct",
            "understanding",
            "text_facts",
            "t2i_reasoning",
            "transfer",
            "caption",
            "text_reasoning",
        }
    )
    assert all(value == 1.0 for value in results["headline"].values()), results["headline"]
    assert adapter.budgets[("caption", "caption")] == {17}  # 16 words + <eos>
    assert adapter.budgets[("understanding", "attribute")] == {MIN_TEXT_STEPS}
    assert max(adapter.budgets[("text_reasoning", "text_abductive")]) >= 14
    assert "eval/caption/caption" in results["by_category"]
    assert "| caption |" in accuracy_table(results)
    # An answer that goes on after the reference is wrong, however long the reference.
    talkative = evaluate_examples(_ReferenceAdapter(extra=("red",)), chosen)["headline"]
    for name in ("understanding", "text_facts", "caption", "text_reasoning"):
        assert talkative[name] == 0.0, name
    assert talkative["t2i_direct"] == talkative["transfer"] == 1.0


def test_caption_and_text_reasoning_headlines_are_their_own():
    examples = build_splits(WorldConfig(seed=2, **SMALL))["eval"]
    wrong_captions = _ReferenceAdapter(wrong_tasks=("caption",))
    headline = evaluate_examples(wrong_captions, {"eval": examples})["headline"]
    assert headline["caption"] == 0.0
    assert headline["understanding"] == headline["text_facts"] == headline["text_reasoning"] == 1.0
    wrong_reasoning = _ReferenceAdapter(wrong_tasks=("text_reasoning",))
    headline = evaluate_examples(wrong_reasoning, {"eval": examples})["headline"]
    assert headline["text_reasoning"] == 0.0
    assert headline["text_facts"] == headline["caption"] == 1.0
    assert text_step_budget(examples)[("text", "knowledge")] == MIN_TEXT_STEPS
