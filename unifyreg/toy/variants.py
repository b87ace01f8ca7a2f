"""Variants of the toy world's training data for the ablation's comparison arms.

- ``reca``: reconstruction alignment, the peer post-training method behind BAGEL-RecA and
  Harmon-RecA (the model regenerates an image from its own understanding of it), in the
  toy's terms. Toy image prompts and responses share one vocabulary, so plain
  reconstruction ("image in, the same image out") is solved by copying tokens. Each
  reconstruction example therefore shows only a *partial view*: half of the cells of a
  drawing from the training data (seeded) are hidden as ``<mask>`` in the prompt image
  (``meta["hidden_cells"]``), and the response is the whole drawing. Drawings (rows,
  columns, patterns, filled counts) are structured, so the hidden cells follow from the
  visible ones and from reading the scene; random understanding scenes are never used
  (their hidden cells could not be inferred). One reconstruction example is added per
  drawing of the training data. Limit: RecA conditions generation on the understanding
  encoder's dense embedding of the image; here the condition is the partial token view
  itself, read by the same decoder.
- ``reason_then_draw``: chain-of-thought drawing, the upper anchor: every drawing example
  writes its reasoning in words before the image, in the words of its ``text_reasoning``
  twin (:func:`unifyreg.toy.tasks.drawing_reasoning`): deductive drawings state the fact
  they use and what is drawn (``"grass is green so the top row is green"``), abductive
  ones the sum and what is drawn; other drawings write nothing but must emit ``<boi>``
  themselves, so a model fine-tuned on this variant decides when to start drawing. (A
  first version stated the fact alone, ``"grass is green"``: the held-out facts came out
  right but the place was lost on the way to the grid.) With
  ``ToyAdapter.reason_before_drawing`` set, generation writes the words first and draws
  after them: the explicit text route to the image.

Each variant is a pure function of the examples (and a seed): the same data for every
seed of an arm, so arms differ only in what they are about.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from unifyreg.toy.tasks import (
    IMAGE_RESPONSE_TASKS,
    RECONSTRUCTION_PROMPT,
    Example,
    drawing_reasoning,
)

__all__ = ["VARIANTS", "apply_variant", "reason_then_draw", "reca"]


def reca(examples: Sequence[Example], seed: int = 0) -> list[Example]:
    """The examples plus one partial-view reconstruction per drawing (module docstring):
    half of the cells (rounded down) hidden, chosen by a generator seeded by ``seed``."""
    rng = random.Random(f"unifyreg-toy/reca/{seed}")
    out = list(examples)
    for example in examples:
        if example.task not in ("t2i", "transfer"):
            continue
        grid = example.response_image
        size = grid.shape[0]
        cells = [[r, c] for r in range(size) for c in range(size)]
        hidden = sorted(rng.sample(cells, len(cells) // 2))
        out.append(
            Example(
                "reconstruction",
                "reconstruction",
                RECONSTRUCTION_PROMPT,
                prompt_image=grid,
                response_image=grid,
                meta={"hidden_cells": hidden, "source": example.prompt_text},
            )
        )
    return out


def reason_then_draw(examples: Sequence[Example], seed: int = 0) -> list[Example]:
    """Every drawing example with its reasoning as ``response_text`` (module docstring):
    :func:`~unifyreg.toy.tasks.drawing_reasoning` (``""`` where there is nothing to state)."""
    out = []
    for example in examples:
        if example.task not in IMAGE_RESPONSE_TASKS or example.task == "reconstruction":
            out.append(example)
            continue
        reasoning = drawing_reasoning(example)
        out.append(
            Example(
                example.task,
                example.category,
                example.prompt_text,
                response_text=reasoning,
                response_image=example.response_image,
                meta=example.meta,
            )
        )
    return out


#: name -> variant, as ``finetune.data_variant`` names them ("" = the data as it is).
VARIANTS = {"reca": reca, "reason_then_draw": reason_then_draw}


def apply_variant(name: str, examples: Sequence[Example], seed: int = 0) -> list[Example]:
    """``examples`` under the named variant (``""``: unchanged); ValueError names the
    valid variants."""
    if not name:
        return list(examples)
    if name not in VARIANTS:
        raise ValueError(f"unknown data variant {name!r}; valid: {', '.join(VARIANTS)}")
    return VARIANTS[name](examples, seed)
