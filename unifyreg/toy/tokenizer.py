"""A word-level tokenizer over the synthetic world's fixed vocabulary, with image tokens.

Ids are laid out as: the seven specials (``<pad>`` = 0, ``<bos>``, ``<eos>``, ``<boi>``,
``<eoi>``, ``<sep>``, ``<mask>``: the input of a masked image position under the
``contextual`` objective), then one image token per palette colour (``<img_black>`` ...,
index = colour), then the words, sorted. Text and images therefore share one vocabulary,
and an image is its cells' tokens in raster order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unifyreg.toy.tasks import Example, world_vocabulary
from unifyreg.toy.world import PALETTE, Grid, as_grid, check_grid_size

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<sep>", "<mask>")
"""Special tokens, at ids 0..6 in this order."""

TOKENIZER_FILE = "tokenizer.json"
"""File name :meth:`WordTokenizer.save` writes inside its directory."""


def image_token_name(colour: int) -> str:
    """Return the token string of colour index ``colour`` ("<img_red>"; "<img_9>" past PALETTE)."""
    return f"<img_{PALETTE[colour]}>" if colour < len(PALETTE) else f"<img_{colour}>"


class WordTokenizer:
    """Maps whitespace-separated words, specials and image tokens to ids and back.

    ``words`` is the text vocabulary (deduplicated and sorted, so the same set gives the
    same ids); ``num_colours`` image tokens follow the specials. Encoding an unknown word
    raises ValueError naming it.
    """

    def __init__(self, words: Iterable[str], num_colours: int = len(PALETTE)) -> None:
        if isinstance(num_colours, bool) or not isinstance(num_colours, int) or num_colours < 2:
            raise ValueError(f"num_colours must be an int >= 2, got {num_colours!r}")
        unique_words = sorted(set(words))
        image_tokens = [image_token_name(i) for i in range(num_colours)]
        reserved = set(SPECIAL_TOKENS) | set(image_tokens)
        for word in unique_words:
            if not isinstance(word, str) or not word or word.split() != [word]:
                raise ValueError(f"vocabulary word {word!r} must be non-empty without whitespace")
            if word in reserved:
                raise ValueError(f"vocabulary word {word!r} collides with a special token")
        if not unique_words:
            raise ValueError("words must not be empty")
        self._num_colours = num_colours
        self._words = tuple(unique_words)
        self._tokens: tuple[str, ...] = (*SPECIAL_TOKENS, *image_tokens, *unique_words)
        self._ids = {token: index for index, token in enumerate(self._tokens)}
        self._first_image_id = len(SPECIAL_TOKENS)
        self._first_word_id = self._first_image_id + num_colours

    @classmethod
    def for_world(cls, world_config: Any = None) -> WordTokenizer:
        """Build the tokenizer of a world: every word any generator can emit for its grid size.

        ``world_config`` is a :class:`~unifyreg.toy.splits.WorldConfig` (or anything with a
        ``grid_size``); None means the default 4x4 world.
        """
        grid_size = 4 if world_config is None else world_config.grid_size
        return cls(world_vocabulary(grid_size), num_colours=len(PALETTE))

    # ------------------------------------------------------------------ ids and sizes

    @property
    def vocab_size(self) -> int:
        """Number of ids (specials + image tokens + words)."""
        return len(self._tokens)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def words(self) -> tuple[str, ...]:
        """The text vocabulary, sorted."""
        return self._words

    @property
    def num_colours(self) -> int:
        """Number of image tokens (one per colour index)."""
        return self._num_colours

    @property
    def pad_id(self) -> int:
        """Id of ``<pad>`` (0)."""
        return 0

    @property
    def bos_id(self) -> int:
        """Id of ``<bos>``."""
        return 1

    @property
    def eos_id(self) -> int:
        """Id of ``<eos>``."""
        return 2

    @property
    def boi_id(self) -> int:
        """Id of ``<boi>`` (begin of image)."""
        return 3

    @property
    def eoi_id(self) -> int:
        """Id of ``<eoi>`` (end of image)."""
        return 4

    @property
    def sep_id(self) -> int:
        """Id of ``<sep>`` (prompt / response separator)."""
        return 5

    @property
    def mask_id(self) -> int:
        """Id of ``<mask>`` (a masked image position's input, contextual objective)."""
        return 6

    @property
    def special_ids(self) -> list[int]:
        """Ids of the seven special tokens."""
        return list(range(len(SPECIAL_TOKENS)))

    @property
    def image_token_ids(self) -> list[int]:
        """Id of each colour's image token; list index = colour index."""
        return list(range(self._first_image_id, self._first_word_id))

    def is_image_token(self, token_id: int) -> bool:
        """True iff ``token_id`` is an image token."""
        return self._first_image_id <= int(token_id) < self._first_word_id

    def is_special(self, token_id: int) -> bool:
        """True iff ``token_id`` is one of the seven special tokens."""
        return 0 <= int(token_id) < self._first_image_id

    def token_to_id(self, token: str) -> int:
        """Id of a token string (word, special or image token); ValueError if unknown."""
        try:
            return self._ids[token]
        except KeyError:
            raise ValueError(f"unknown token {token!r}") from None

    def id_to_token(self, token_id: int) -> str:
        """Token string of ``token_id``; ValueError if out of range."""
        index = int(token_id)
        if not 0 <= index < self.vocab_size:
            raise ValueError(f"token id {index} is outside [0, {self.vocab_size})")
        return self._tokens[index]

    # ------------------------------------------------------------------ text

    def encode_text(self, text: str) -> list[int]:
        """Ids of the whitespace-separated words of ``text`` (no specials added).

        Raises ValueError on empty text or a word outside the vocabulary (naming it).
        """
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        words = text.split()
        if not words:
            raise ValueError(f"cannot encode empty text {text!r}")
        ids = []
        for word in words:
            index = self._ids.get(word)
            if index is None or index < self._first_word_id:
                raise ValueError(f"unknown word {word!r} (not in the world's vocabulary)")
            ids.append(index)
        return ids

    def decode_text(self, ids: Iterable[int]) -> str:
        """Words of ``ids`` joined by single spaces; specials and image tokens are skipped."""
        words = []
        for token_id in ids:
            index = int(token_id)
            token = self.id_to_token(index)
            if index >= self._first_word_id:
                words.append(token)
        return " ".join(words)

    # ------------------------------------------------------------------ grids

    def encode_grid(self, grid: Grid) -> list[int]:
        """Image-token ids of ``grid``'s cells in raster order (row by row)."""
        cells = as_grid(grid, num_colours=self._num_colours)
        return [self._first_image_id + int(v) for v in cells.flatten()]

    def decode_grid(self, ids: Sequence[int], grid_size: int) -> Grid:
        """Inverse of :meth:`encode_grid`.

        Raises ValueError if there are not exactly ``grid_size ** 2`` ids or one is not an
        image token.
        """
        size = check_grid_size(grid_size)
        values = [int(i) for i in ids]
        if len(values) != size * size:
            raise ValueError(f"expected {size * size} image tokens, got {len(values)}")
        for index in values:
            if not self.is_image_token(index):
                raise ValueError(f"token id {index} is not an image token")
        cells = np.asarray(values, dtype=np.int64) - self._first_image_id
        return cells.reshape(size, size)

    # ------------------------------------------------------------------ examples

    def encode_example(self, example: Example) -> list[int]:
        """Reference sequence layout of a whole example (also used to bound lengths).

        - text: ``<bos> prompt <sep> answer <eos>``
        - understanding: ``<bos> question <boi> image <eoi> <sep> answer <eos>``
        - t2i / transfer: ``<bos> prompt <sep> <boi> image <eoi> <eos>``

        The question comes before the image on purpose: a causal model then reads every
        image token already knowing what is asked, the same direction as drawing (prompt
        before cells). In one measured run of a 4-layer, d=128 decoder with learned
        absolute positions, trained on understanding only at the same budget, cell
        look-ups reached about 35% with the image first and 100% with the question first.
        Model adapters may lay sequences out differently.
        """
        ids = [self.bos_id, *self.encode_text(example.prompt_text)]
        if example.prompt_image is not None:
            ids += [self.boi_id, *self.encode_grid(example.prompt_image), self.eoi_id]
        ids.append(self.sep_id)
        if example.response_image is not None:
            ids += [self.boi_id, *self.encode_grid(example.response_image), self.eoi_id]
        else:
            assert example.response_text is not None
            ids += self.encode_text(example.response_text)
        return [*ids, self.eos_id]

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` into ``directory`` (created if needed); return its path."""
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        path = target / TOKENIZER_FILE
        payload = {
            "type": "WordTokenizer",
            "num_colours": self._num_colours,
            "words": list(self._words),
            "tokens": list(self._tokens),
        }
        path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> WordTokenizer:
        """Read a tokenizer written by :meth:`save`; ValueError if the file is inconsistent."""
        path = Path(directory) / TOKENIZER_FILE
        payload = json.loads(path.read_text(encoding="utf-8"))
        tokenizer = cls(payload["words"], num_colours=int(payload["num_colours"]))
        if list(tokenizer._tokens) != payload.get("tokens", list(tokenizer._tokens)):
            raise ValueError(f"{path} lists tokens in an order this tokenizer would not build")
        return tokenizer

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WordTokenizer):
            return NotImplemented
        return self._tokens == other._tokens

    def __hash__(self) -> int:
        return hash(self._tokens)

    def __repr__(self) -> str:
        return (
            f"WordTokenizer(vocab_size={self.vocab_size}, words={len(self._words)}, "
            f"num_colours={self._num_colours})"
        )
