"""The synthetic world as an example source (:mod:`unifyreg.sources`, name ``toy``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from unifyreg.toy.splits import WorldConfig, build_splits

__all__ = ["TOY_SOURCE", "ToySource"]


def _world(context: Any) -> WorldConfig | None:
    """The world of a recipe's ``pretrain`` section (None: the default world)."""
    return getattr(context, "world", None)


class ToySource:
    """Training examples (the world's ``finetune`` split), the fixed probe sets (every
    ``probe/...`` split) and exact scoring (:func:`unifyreg.toy.evaluation.evaluate_examples`)."""

    def training_examples(self, context: Any = None) -> list:
        """The ``finetune`` split of the context's world."""
        return build_splits(_world(context))["finetune"]

    def probe_examples(self, context: Any = None) -> list:
        """Every ``probe/<modality>/<category>`` split, in order."""
        splits = build_splits(_world(context))
        return [e for name, split in splits.items() if name.startswith("probe/") for e in split]

    def variant(self, name: str, examples: Sequence[Any], seed: int = 0) -> tuple[list, dict]:
        """``(examples, adapter settings)`` of a training-data variant
        (:mod:`unifyreg.toy.variants`): ``reason_then_draw`` also makes the model write its
        reasoning before drawing (``reason_before_drawing``)."""
        from unifyreg.toy.variants import apply_variant

        settings = {"reason_before_drawing": True} if name == "reason_then_draw" else {}
        return apply_variant(name, examples, seed), settings

    def split_names(self, context: Any = None) -> tuple[str, ...]:
        """Every split the world has."""
        return tuple(build_splits(_world(context)))

    def evaluate(self, adapter: Any, split_names: Sequence[str], context: Any = None) -> dict:
        """Headline exact-match accuracies of ``adapter`` on the named splits."""
        from unifyreg.toy.evaluation import evaluate_examples

        splits = build_splits(_world(context))
        unknown = [name for name in split_names if name not in splits]
        if unknown:
            raise ValueError(f"unknown split(s) {unknown}; valid: {', '.join(sorted(splits))}")
        results = evaluate_examples(adapter, {name: splits[name] for name in split_names})
        return results["headline"]


#: The registered instance.
TOY_SOURCE = ToySource()
