"""Exact-match evaluation of a toy model on the world's splits.

Each example is answered by greedy generation through the adapter (a grid for ``t2i`` and
``transfer``, words for every other task) and scored by
:func:`unifyreg.toy.tasks.score_example` (exact: every cell, or every word in order).
Text answers may run to :func:`text_step_budget` new tokens: at least
:data:`MIN_TEXT_STEPS`, and one more than the longest reference answer of their
(task, category), so a 16-word caption is not cut short and an answer that does not
stop after the reference's last word is wrong. Accuracies are reported per (split,
task, category), per (split, task) and as the headline figures:

- ``t2i_direct``: direct text-to-image (exact grids), split ``eval``;
- ``understanding``: image question answering (one word), split ``eval``;
- ``text_facts``: text-only knowledge and arithmetic, split ``eval``;
- ``t2i_reasoning``: t2i composition/deductive/inductive/abductive, split ``eval``;
- ``transfer``: held-out reasoning transfer (split ``heldout``);
- ``caption``: the grid read out in words, every word right, split ``eval``;
- ``text_reasoning``: multi-word text reasoning (text_deductive/text_abductive), the
  whole answer right, split ``eval``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from unifyreg.toy.tasks import Example, score_example

__all__ = [
    "HEADLINE_GROUPS",
    "MIN_TEXT_STEPS",
    "accuracy_table",
    "evaluate_examples",
    "headline_accuracies",
    "text_step_budget",
]

MIN_TEXT_STEPS = 8
"""Fewest new tokens a text answer may take (the adapters' own default)."""


def text_step_budget(examples: Iterable[Any]) -> dict[tuple[str, str], int]:
    """``(task, category) -> max new tokens`` for greedy text answers to ``examples``:
    ``max(MIN_TEXT_STEPS, longest reference answer in words + 1)`` per group (the extra
    step is the ``<eos>``). Examples without a reference text count as one word."""
    budget: dict[tuple[str, str], int] = {}
    for example in examples:
        words = len((example.response_text or "x").split())
        key = (example.task, example.category)
        budget[key] = max(budget.get(key, MIN_TEXT_STEPS), words + 1)
    return budget


def _generate_answers(adapter: Any, texts: Sequence[Example], batch_size: int) -> list[str]:
    """Greedy text answers to ``texts`` in their order, one adapter call per step budget
    (examples of equal budget share batches)."""
    budget = text_step_budget(texts)
    by_steps: dict[int, list[int]] = defaultdict(list)
    for index, example in enumerate(texts):
        by_steps[budget[(example.task, example.category)]].append(index)
    answers: list[str] = [""] * len(texts)
    for steps, indices in sorted(by_steps.items()):
        chunk = [texts[i] for i in indices]
        replies = adapter.generate_text(chunk, max_new_tokens=steps, batch_size=batch_size)
        for index, reply in zip(indices, replies, strict=True):
            answers[index] = reply
    return answers


def evaluate_examples(
    adapter: Any, splits: Mapping[str, Sequence[Example]], batch_size: int = 256
) -> dict[str, Any]:
    """Score ``adapter`` on each named split -> ``{"by_category", "by_task", "headline"}``.

    ``by_category["split/task/category"] = {"accuracy", "correct", "count"}``; ``by_task``
    likewise per ``"split/task"``; ``headline`` maps the names in the module docstring to
    accuracies (only those whose split was evaluated).
    """
    per_category: dict[str, list[bool]] = defaultdict(list)
    for split, examples in splits.items():
        images = [e for e in examples if e.answers_with_image]
        texts = [e for e in examples if not e.answers_with_image]
        grids = adapter.generate_images(images, batch_size=batch_size) if images else []
        answers = _generate_answers(adapter, texts, batch_size) if texts else []
        for example, grid in zip(images, grids, strict=True):
            key = f"{split}/{example.task}/{example.category}"
            per_category[key].append(score_example(example, predicted_grid=grid))
        for example, answer in zip(texts, answers, strict=True):
            key = f"{split}/{example.task}/{example.category}"
            per_category[key].append(score_example(example, predicted_text=answer))
    per_task: dict[str, list[bool]] = defaultdict(list)
    for key, hits in per_category.items():
        per_task[key.rsplit("/", 1)[0]].extend(hits)
    return {
        "by_category": {k: _summary(v) for k, v in sorted(per_category.items())},
        "by_task": {k: _summary(v) for k, v in sorted(per_task.items())},
        "headline": headline_accuracies(per_category),
    }


def _summary(hits: list[bool]) -> dict[str, float]:
    correct = sum(hits)
    return {"accuracy": correct / len(hits), "correct": correct, "count": len(hits)}


HEADLINE_GROUPS = {
    "t2i_direct": ("eval/t2i/direct",),
    "understanding": ("eval/understanding/",),
    "text_facts": ("eval/text/",),
    "t2i_reasoning": (
        "eval/t2i/composition",
        "eval/t2i/deductive",
        "eval/t2i/inductive",
        "eval/t2i/abductive",
    ),
    "transfer": ("heldout/",),
    "caption": ("eval/caption/",),
    "text_reasoning": ("eval/text_reasoning/",),
}
"""Headline name -> the ``split/task/category`` key prefixes whose hits it pools."""


def headline_accuracies(per_category: Mapping[str, Iterable[bool]]) -> dict[str, float]:
    """Pool per-category hits into the headline accuracies (prefix match on the keys)."""
    result = {}
    for name, prefixes in HEADLINE_GROUPS.items():
        hits = [h for key, v in per_category.items() if key.startswith(prefixes) for h in v]
        if hits:
            result[name] = sum(hits) / len(hits)
    return result


def accuracy_table(results: Mapping[str, Any]) -> str:
    """Markdown table of per-category accuracies, then the headline figures."""
    lines = ["| split/task/category | accuracy | correct / count |", "|---|---|---|"]
    for key, row in results["by_category"].items():
        lines.append(f"| {key} | {row['accuracy']:.3f} | {row['correct']} / {row['count']} |")
    lines += ["", "| headline | accuracy |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in results["headline"].items()]
    return "\n".join(lines)
