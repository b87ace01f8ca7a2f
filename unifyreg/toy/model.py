"""Size of the toy decoder and the version of its sequence layout (no model code here:
the decoder itself is built by :mod:`unifyreg.adapters.toy`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["LAYOUT_VERSION", "ToyModelConfig"]

#: Version of the toy adapter's sequence layout and vocabulary (3: the ``<mask>`` special
#: token); part of the toy-base cache key, so a base built with another is never reused.
LAYOUT_VERSION = 3


@dataclass
class ToyModelConfig:
    """Size of the toy decoder (a ``transformers`` ``LlamaConfig`` underneath)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 64

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be an integer >= 1, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_heads ({self.num_heads})"
            )
        if not isinstance(self.max_positions, int) or self.max_positions < 8:
            raise ValueError(
                f"model.max_positions must be an integer >= 8, got {self.max_positions!r}"
            )

    def llama_config(self, vocab_size: int, tokenizer: Any) -> Any:
        """The ``transformers.LlamaConfig`` of this size over ``tokenizer``'s vocabulary."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            max_position_embeddings=self.max_positions,
            pad_token_id=tokenizer.pad_id,
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
            tie_word_embeddings=False,
        )
