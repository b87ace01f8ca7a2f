"""The built-in toy UMM: a small Llama-style decoder over one shared text+image vocabulary.

Sequence layout (one example, right-padded in training batches):

- text / understanding: ``<bos> prompt [<boi> image-prompt <eoi>] <sep> answer <eos>``
- t2i / transfer:       ``<bos> prompt <sep> <boi> image-response <eoi> <eos>``
- reason, then draw:    ``<bos> prompt <sep> reasoning <boi> image-response <eoi> <eos>``
  (an example with both a text and an image response: the text is written first)

The question comes before the image it is about (layout version 2): every image token can
then attend to the question, so a small model learns to read single cells (measured with
the default pretrain config: understanding 100% with this layout against 47-65% with the
image first; see the README's toy-model section). Changing the layout or the vocabulary
changes :data:`~unifyreg.toy.model.LAYOUT_VERSION`, part of the toy-base cache key.

Roles: ``<bos> <sep> <boi> <eoi> <eos>`` are SPECIAL; prompt words TEXT_PROMPT; prompt
image tokens IMAGE_PROMPT; answer (and reasoning) words TEXT_RESPONSE; grid tokens of the
response IMAGE_RESPONSE. Cells listed in an example's ``meta["hidden_cells"]`` are fed as
``<mask>`` in a prompt image (a partial view).

Two image objectives (``objective``, saved with the model):

- ``ar`` (next-token, as Emu3): the image loss is next-token cross-entropy over the G*G
  grid tokens; generation is greedy, ``<boi>`` forced, then exactly G*G tokens from the
  image vocabulary;
- ``contextual`` (Harmon's mechanism, Show-o's discrete form): text stays causal, every
  token of an image attends to every token of its image (``attention_mask_4d``, omni
  attention); in training (:meth:`ToyAdapter.training_batch`) a fraction of each response
  image, drawn per example from MaskGIT's cosine schedule ``r = cos(pi/2 * u)``,
  ``u ~ U(0, 1)``, is replaced by ``<mask>`` and predicted from the prompt and the visible
  image tokens; the image loss is the cross-entropy at the masked positions only.
  Generation is MaskGIT's iterative parallel decoding: all G*G cells start as ``<mask>``;
  at step ``s`` of ``decode_steps`` (default 8) the most confident predictions are
  committed so that ``floor(G*G * cos(pi/2 * (s + 1) / K))`` cells stay masked: every cell
  is committed within K steps, from the image vocabulary, so every result parses.

The text loss covers the answer words and the ``<eos>`` that ends them (generation must
learn to stop), and in a reason-then-draw example the reasoning words and the ``<boi>``
that ends them. A batch with ``masked_positions`` (the seam's masked prediction: the
contextual objective, or the bidirectional contextual-prediction regularizer on any toy
model) scores the image at those positions only. Text generation is greedy, restricted
to words and ``<eos>``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from transformers import LlamaForCausalLM

from unifyreg.adapters.base import (
    FINAL_NORM_DEFAULT,
    TARGET_IMAGE,
    TARGET_NONE,
    TARGET_TEXT,
    Adapter,
    EmbeddingHook,
    ForwardOutput,
    LayerStack,
    PrefixRequest,
    PrefixStates,
    cache_argument,
    cosine_masked_positions,
    model_attention_mask,
    omni_attention_mask,
    output_cache,
)
from unifyreg.adapters.prefix import PrefixPass
from unifyreg.roles import Role
from unifyreg.toy.model import ToyModelConfig
from unifyreg.toy.tokenizer import WordTokenizer
from unifyreg.toy.world import Grid, parse_image

__all__ = [
    "ADAPTER_FILE",
    "DEFAULT_DECODE_STEPS",
    "MAX_REASONING_WORDS",
    "OBJECTIVES",
    "ToyAdapter",
    "maskgit_remaining",
]

ADAPTER_FILE = "unifyreg_toy.json"
#: The toy's image objectives (module docstring).
OBJECTIVES = ("ar", "contextual")
#: MaskGIT steps of contextual generation.
DEFAULT_DECODE_STEPS = 8
#: Words a reason-then-draw model may write before ``<boi>`` (the longest reasoning,
#: an abductive drawing's, has 14).
MAX_REASONING_WORDS = 16


def maskgit_remaining(cells: int, step: int, steps: int) -> int:
    """Cells still masked after step ``step`` (0-based) of ``steps``:
    ``floor(cells * cos(pi/2 * (step + 1) / steps))``; 0 after the last step."""
    if step >= steps - 1:
        return 0
    return int(math.floor(cells * math.cos(math.pi / 2 * (step + 1) / steps)))


class ToyAdapter(Adapter):
    """Adapter for the built-in toy decoder (see the module docstring for the layout).

    Example::

        from unifyreg.toy import WorldConfig, WordTokenizer, build_splits
        tokenizer = WordTokenizer.for_world(WorldConfig())
        adapter = ToyAdapter.create(tokenizer, grid_size=4, model_config=ToyModelConfig())
        batch = adapter.encode(build_splits()["pretrain"][:8])
        out = adapter.forward(batch)        # out.hidden_states: [L+1, 8, S, 128]
    """

    name = "toy"
    layer_stack = LayerStack(blocks="model.layers", final_norm="model.norm")
    save_merged_after_finetune = True
    supports_masked_prediction = True
    supports_prefix_reuse = True

    @property
    def image_objective(self) -> str:  # type: ignore[override]
        """``masked`` for the contextual objective, ``next_token`` for ``ar``."""
        return "masked" if self.objective == "contextual" else "next_token"

    default_lora_targets = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )

    def __init__(
        self,
        model: LlamaForCausalLM,
        tokenizer: WordTokenizer,
        grid_size: int,
        objective: str = "ar",
        decode_steps: int = DEFAULT_DECODE_STEPS,
        reason_before_drawing: bool = False,
    ):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if isinstance(decode_steps, bool) or not isinstance(decode_steps, int) or decode_steps < 1:
            raise ValueError(f"decode_steps must be an integer >= 1, got {decode_steps!r}")
        if model.config.vocab_size != tokenizer.vocab_size:
            raise ValueError(
                f"model vocabulary ({model.config.vocab_size}) does not match the tokenizer "
                f"({tokenizer.vocab_size})"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.grid_size = int(grid_size)
        self.objective = objective
        self.decode_steps = decode_steps
        #: Generate the reasoning in words first, then the image (reason-then-draw models).
        self.reason_before_drawing = bool(reason_before_drawing)
        self.max_positions = int(model.config.max_position_embeddings)
        vocab = tokenizer.vocab_size
        self._image_only = torch.zeros(vocab, dtype=torch.bool)
        self._image_only[tokenizer.image_token_ids] = True
        self._text_only = torch.zeros(vocab, dtype=torch.bool)
        self._text_only[len(tokenizer.special_ids) + tokenizer.num_colours :] = True
        self._text_only[tokenizer.eos_id] = True
        self._reasoning = self._text_only.clone()
        self._reasoning[tokenizer.eos_id] = False
        self._reasoning[tokenizer.boi_id] = True

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        tokenizer: WordTokenizer,
        grid_size: int,
        model_config: ToyModelConfig | None = None,
        seed: int = 0,
        objective: str = "ar",
        decode_steps: int = DEFAULT_DECODE_STEPS,
    ) -> ToyAdapter:
        """A freshly initialised toy model (random weights from ``seed``)."""
        model_config = model_config or ToyModelConfig()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(model_config.llama_config(tokenizer.vocab_size, tokenizer))
        return cls(model, tokenizer, grid_size, objective, decode_steps)

    def settings(self) -> dict[str, Any]:
        """What :meth:`save` writes next to the weights (read back by :meth:`load`)."""
        return {
            "grid_size": self.grid_size,
            "objective": self.objective,
            "decode_steps": self.decode_steps,
            "reason_before_drawing": self.reason_before_drawing,
        }

    def save(self, directory: str | Path) -> None:
        """``save_pretrained`` (safetensors) + ``tokenizer.json`` + :meth:`settings`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save(directory)
        (directory / ADAPTER_FILE).write_text(json.dumps(self.settings()))

    @classmethod
    def load(cls, directory: str | Path, **kwargs: Any) -> ToyAdapter:
        """Load a model saved by :meth:`save` from a local directory."""
        directory = Path(directory)
        if not (directory / ADAPTER_FILE).is_file():
            raise FileNotFoundError(
                f"{directory} is not a saved toy model (no {ADAPTER_FILE}); "
                "build one with `unifyreg pretrain-toy`"
            )
        meta = json.loads((directory / ADAPTER_FILE).read_text())
        tokenizer = WordTokenizer.load(directory)
        model = LlamaForCausalLM.from_pretrained(directory, local_files_only=True, **kwargs)
        return cls(
            model,
            tokenizer,
            meta["grid_size"],
            meta.get("objective", "ar"),
            meta.get("decode_steps", DEFAULT_DECODE_STEPS),
            meta.get("reason_before_drawing", False),
        )

    # ------------------------------------------------------------------ encoding

    def _grid_tokens(self, image: Any, hidden: Sequence[Sequence[int]] = ()) -> list[int]:
        """Image tokens of a grid, or of a PIL image of a grid (manifests), read back
        exactly; ``hidden`` (row, column) cells are ``<mask>``."""
        if isinstance(image, Image.Image):
            image = parse_image(np.asarray(image.convert("RGB")), self.grid_size)
        tokens = self.tokenizer.encode_grid(image)
        for r, c in hidden:
            tokens[int(r) * self.grid_size + int(c)] = self.tokenizer.mask_id
        return tokens

    def _prompt_part(self, example: Any) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        words = tok.encode_text(example.prompt_text)
        ids, roles = [tok.bos_id, *words], [Role.SPECIAL, *[Role.TEXT_PROMPT] * len(words)]
        if example.prompt_image is not None:
            hidden = (getattr(example, "meta", None) or {}).get("hidden_cells", ())
            grid = self._grid_tokens(example.prompt_image, hidden)
            ids += [tok.boi_id, *grid, tok.eoi_id]
            roles += [Role.SPECIAL, *[Role.IMAGE_PROMPT] * len(grid), Role.SPECIAL]
        ids.append(tok.sep_id)
        roles.append(Role.SPECIAL)
        return ids, roles

    def encode_example(self, example: Any) -> tuple[list[int], list[int], list[int]]:
        """(ids, roles, target kinds) of one example; see the module docstring."""
        tok = self.tokenizer
        ids, roles = self._prompt_part(example)
        targets = [TARGET_NONE] * len(ids)
        if example.response_image is not None:
            # <boi> is forced when drawing starts at once; after reasoning words the model
            # must write it itself (a text target).
            boi_target = TARGET_NONE
            if example.response_text is not None:
                # "" (reason_then_draw with nothing to state): <boi> alone is the text target.
                words = tok.encode_text(example.response_text) if example.response_text else []
                ids += words
                roles += [Role.TEXT_RESPONSE] * len(words)
                targets += [TARGET_TEXT] * len(words)
                boi_target = TARGET_TEXT
            grid = self._grid_tokens(example.response_image)
            ids += [tok.boi_id, *grid, tok.eoi_id, tok.eos_id]
            roles += [Role.SPECIAL, *[Role.IMAGE_RESPONSE] * len(grid), Role.SPECIAL, Role.SPECIAL]
            targets += [boi_target, *[TARGET_IMAGE] * len(grid), TARGET_NONE, TARGET_NONE]
        elif example.response_text is not None:
            words = tok.encode_text(example.response_text)
            ids += [*words, tok.eos_id]
            roles += [*[Role.TEXT_RESPONSE] * len(words), Role.SPECIAL]
            targets += [TARGET_TEXT] * (len(words) + 1)
        return ids, [int(r) for r in roles], targets

    def encode(self, examples: Sequence[Any]) -> dict[str, Tensor]:
        """Right-padded batch: ``input_ids``, ``attention_mask``, ``roles``, ``target_kind``,
        and for the ``contextual`` objective ``attention_mask_4d`` (omni attention)."""
        if len(examples) == 0:
            raise ValueError("cannot encode an empty list of examples")
        rows = []
        for index, example in enumerate(examples):
            try:
                ids, roles, targets = self.encode_example(example)
            except ValueError as error:
                raise ValueError(f"example {index} ({example.prompt_text!r}): {error}") from None
            if len(ids) > self.max_positions:
                raise ValueError(
                    f"example {index} ({example.prompt_text!r}) has {len(ids)} tokens; "
                    f"the model allows {self.max_positions} (model.max_positions)"
                )
            rows.append((ids, roles, targets))
        length = max(len(ids) for ids, _, _ in rows)
        batch = {
            "input_ids": torch.full((len(rows), length), self.tokenizer.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), length), dtype=torch.long),
            "roles": torch.full((len(rows), length), int(Role.PAD), dtype=torch.long),
            "target_kind": torch.zeros((len(rows), length), dtype=torch.long),
        }
        for b, (ids, roles, targets) in enumerate(rows):
            n = len(ids)
            batch["input_ids"][b, :n] = torch.tensor(ids)
            batch["attention_mask"][b, :n] = 1
            batch["roles"][b, :n] = torch.tensor(roles)
            batch["target_kind"][b, :n] = torch.tensor(targets)
        if self.objective == "contextual":
            batch["attention_mask_4d"] = omni_attention_mask(
                batch["roles"], batch["attention_mask"]
            )
        return batch

    def training_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The ``contextual`` objective: ``masked_positions`` drawn for every response image,
        a cosine-schedule share ``cos(pi/2 * u)`` of its cells (at least one), ``u ~ U(0, 1)``
        per example, with the global torch generator. ``ar``: the batch unchanged."""
        if self.objective != "contextual":
            return batch
        return {**batch, "masked_positions": cosine_masked_positions(batch["roles"])}

    # ------------------------------------------------------------------ forward

    def input_embeddings(self, batch: dict[str, Tensor]) -> Tensor:
        """``[B, S, d]`` token embeddings of the batch (hidden state 0)."""
        return self.model.get_input_embeddings()(batch["input_ids"].to(self.device))

    def forward(
        self,
        batch: dict[str, Tensor],
        output_hidden_states: bool = True,
        layers: Sequence[int] | None = None,
        keep_logits: bool = False,
        embedding_hook: EmbeddingHook | None = None,
        final_norm: bool = FINAL_NORM_DEFAULT,
        *,
        record_prefix: PrefixRequest | None = None,
        prefix: PrefixStates | None = None,
    ) -> ForwardOutput:
        """Teacher-forced forward pass; see :meth:`Adapter.forward` for the contract.

        ``record_prefix``: also return the keys and values it asks for
        (``ForwardOutput.prefix_states``). ``prefix``: ``batch`` holds the rows of a
        recorded prefix (same order) and only positions ``[prefix.length, S)`` run, attending
        to the prefix's keys and values (:mod:`unifyreg.adapters.prefix`); the losses then
        cover the targets after the prefix, ``logits`` the positions after it, and there
        are no hidden states.

        With ``masked_positions`` in the batch: those inputs are ``<mask>`` (before the
        embedding hook), image tokens attend within their image, and the image loss is the
        cross-entropy at the masked positions (same-position targets). A ``contextual``
        model without masked positions reports no image loss (0 over 0 tokens): with
        bidirectional image attention, next-token targets would be visible."""
        device = self.device
        input_ids = batch["input_ids"].to(device)
        masked = batch.get("masked_positions")
        embeds = self.input_embeddings(batch)
        if masked is not None:
            masked = masked.to(device)
            mask_embedding = self.model.get_input_embeddings().weight[self.tokenizer.mask_id]
            embeds = torch.where(masked[..., None], mask_embedding.to(embeds.dtype), embeds)
        if embedding_hook is not None:
            embeds = embedding_hook(embeds, batch)
        attention = model_attention_mask(batch, device, embeds.dtype)
        chosen = self.resolve_layers(layers)
        run = PrefixPass(self.model, record_prefix, prefix, output_hidden_states, layers)
        start = run.start
        embeds, attention, _ = run.cut(embeds, attention)
        input_ids = input_ids[:, start:]
        masked = None if masked is None else masked[:, start:]
        with self.capture(chosen, output_hidden_states and prefix is None, final_norm) as captured:
            out = self.model(inputs_embeds=embeds, attention_mask=attention, **run.model_kwargs())
        run.check(embeds.shape[1])
        logits = out.logits
        # Position t predicts token t + 1; a target's kind is stored at its own position.
        token_losses = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none"
        )
        kinds = batch["target_kind"].to(device)[:, start + 1 :]
        text_mask = kinds == TARGET_TEXT
        text_tokens = text_mask.sum()
        text_loss = (token_losses * text_mask).sum() / text_tokens.clamp_min(1)
        if masked is not None:
            image_tokens = masked.sum()
            image_losses = F.cross_entropy(
                logits[masked].float(), input_ids[masked], reduction="sum"
            )
            image_loss = image_losses / image_tokens.clamp_min(1)
        elif self.objective == "contextual":
            image_tokens = torch.zeros((), dtype=torch.long, device=device)
            image_loss = logits.new_zeros((), dtype=torch.float32)
        else:
            image_mask = kinds == TARGET_IMAGE
            image_tokens = image_mask.sum()
            image_loss = (token_losses * image_mask).sum() / image_tokens.clamp_min(1)
        return ForwardOutput(
            hidden_states=captured.states() if captured is not None else None,
            layers=chosen,
            roles=batch["roles"].to(device),
            text_loss=text_loss,
            text_tokens=text_tokens,
            image_loss=image_loss,
            image_tokens=image_tokens,
            logits=logits if keep_logits else None,
            prefix_states=run.states(self.num_layers),
        )

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def _greedy(
        self,
        prompts: list[tuple[list[int], list[int]]],
        steps: int,
        allowed: Tensor,
        stop_id: int | None,
        batch_size: int,
    ) -> list[list[int]]:
        """Greedy decoding of ``steps`` tokens restricted to ``allowed`` from left-padded
        ``(ids, roles)`` prompts, with a key/value cache; rows are cut at ``stop_id``. A
        ``contextual`` model reads its prompt with omni attention (image prompts
        bidirectional), as in training; the new tokens are causal."""
        was_training = self.model.training
        self.model.eval()
        device = self.device
        banned = ~allowed.to(device)
        results: list[list[int]] = []
        try:
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                width = max(len(ids) for ids, _ in chunk)
                if width + steps > self.max_positions:
                    raise ValueError(
                        f"a prompt of {width} tokens plus {steps} new tokens exceeds the "
                        f"model's {self.max_positions} positions"
                    )
                ids = torch.full((len(chunk), width), self.tokenizer.pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                roles = torch.full((len(chunk), width), int(Role.PAD), dtype=torch.long)
                for b, (prompt, prompt_roles) in enumerate(chunk):
                    ids[b, width - len(prompt) :] = torch.tensor(prompt)
                    mask[b, width - len(prompt) :] = 1
                    roles[b, width - len(prompt) :] = torch.tensor(prompt_roles)
                ids, mask, roles = ids.to(device), mask.to(device), roles.to(device)
                finished = torch.zeros(len(chunk), dtype=torch.bool, device=device)
                generated = []
                positions = (mask.cumsum(-1) - 1).clamp_min(0)
                cache = None
                first_mask = mask
                if self.objective == "contextual":
                    dtype = self.model.get_input_embeddings().weight.dtype
                    first_mask = omni_attention_mask(roles, mask, dtype)
                for step in range(steps):
                    # The first call reads the whole prompt; later calls feed only the new
                    # token and reuse the keys and values of the earlier positions.
                    out = self.model(
                        input_ids=ids,
                        attention_mask=first_mask if step == 0 else mask,
                        position_ids=positions,
                        use_cache=True,
                        **cache_argument(self.model, cache),
                    )
                    cache = output_cache(out)
                    logits = out.logits[:, -1]
                    next_ids = logits.masked_fill(banned, float("-inf")).argmax(-1)
                    generated.append(next_ids)
                    if stop_id is not None:
                        finished |= next_ids == stop_id
                    ids = next_ids[:, None]
                    mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
                    positions = positions[:, -1:] + 1
                    if stop_id is not None and bool(finished.all()):
                        break
                tokens = torch.stack(generated, dim=1).tolist()
                for row in tokens:
                    if stop_id is not None and stop_id in row:
                        row = row[: row.index(stop_id)]
                    results.append(row)
        finally:
            self.model.train(was_training)
        return results

    @torch.no_grad()
    def _maskgit(
        self, prefixes: list[tuple[list[int], list[int]]], batch_size: int
    ) -> tuple[list[list[int]], int]:
        """MaskGIT decoding (module docstring) after each ``(ids, roles)`` prefix (ending
        in ``<boi>``): ``(G*G image tokens per row, forward passes run per batch)``."""
        tok = self.tokenizer
        cells = self.grid_size**2
        was_training = self.model.training
        self.model.eval()
        device = self.device
        allowed = self._image_only.to(device)
        results: list[list[int]] = []
        passes = 0
        try:
            for start in range(0, len(prefixes), batch_size):
                chunk = prefixes[start : start + batch_size]
                rows = [
                    (
                        [*ids, *[tok.mask_id] * cells, tok.eoi_id],
                        [*roles, *[int(Role.IMAGE_RESPONSE)] * cells, int(Role.SPECIAL)],
                    )
                    for ids, roles in chunk
                ]
                width = max(len(ids) for ids, _ in rows)
                if width > self.max_positions:
                    raise ValueError(
                        f"a prompt plus an image of {width} tokens exceeds the model's "
                        f"{self.max_positions} positions"
                    )
                batch = len(rows)
                ids = torch.full((batch, width), tok.pad_id, dtype=torch.long)
                mask = torch.zeros((batch, width), dtype=torch.long)
                roles = torch.full((batch, width), int(Role.PAD), dtype=torch.long)
                offsets = []
                for b, (row_ids, row_roles) in enumerate(rows):
                    ids[b, : len(row_ids)] = torch.tensor(row_ids)
                    mask[b, : len(row_ids)] = 1
                    roles[b, : len(row_roles)] = torch.tensor(row_roles)
                    offsets.append(len(row_ids) - 1 - cells)
                ids, mask, roles = ids.to(device), mask.to(device), roles.to(device)
                where = torch.tensor(offsets, device=device)[:, None] + torch.arange(
                    cells, device=device
                )  # [b, cells] positions of the image
                dtype = self.model.get_input_embeddings().weight.dtype
                attention = omni_attention_mask(roles, mask, dtype)
                still = torch.ones(batch, cells, dtype=torch.bool, device=device)
                for step in range(self.decode_steps):
                    logits = self.model(input_ids=ids, attention_mask=attention).logits
                    passes += 1 if start == 0 else 0
                    image_logits = logits.gather(
                        1, where[..., None].expand(-1, -1, logits.shape[-1])
                    ).masked_fill(~allowed, float("-inf"))
                    probs = image_logits.float().softmax(-1)
                    confidence, choice = probs.max(-1)
                    confidence = confidence.masked_fill(~still, -1.0)  # committed: never again
                    keep_masked = maskgit_remaining(cells, step, self.decode_steps)
                    commit = still.sum(dim=1) - keep_masked  # [b] cells committed this step
                    order = confidence.argsort(dim=1, descending=True, stable=True)
                    rank = order.argsort(dim=1)
                    newly = still & (rank < commit[:, None])
                    current = ids.gather(1, where)
                    ids.scatter_(1, where, torch.where(newly, choice, current))
                    still &= ~newly
                    if not bool(still.any()):
                        break
                results.extend(ids.gather(1, where).tolist())
        finally:
            self.model.train(was_training)
        return results, passes

    def _reasoning_prefixes(
        self, examples: Sequence[Any], batch_size: int
    ) -> list[tuple[list[int], list[int]]]:
        """``(ids, roles)`` of each prompt followed by its image's ``<boi>``: after the
        model's own reasoning words (up to ``<boi>``, at most :data:`MAX_REASONING_WORDS`) when
        :attr:`reason_before_drawing`, else directly."""
        prompts = [self._prompt_part(example) for example in examples]
        boi = self.tokenizer.boi_id
        if not self.reason_before_drawing:
            return [(ids + [boi], roles + [int(Role.SPECIAL)]) for ids, roles in prompts]
        words = self._greedy(prompts, MAX_REASONING_WORDS, self._reasoning, boi, batch_size)
        return [
            (ids + row + [boi], roles + [int(Role.TEXT_RESPONSE)] * len(row) + [int(Role.SPECIAL)])
            for (ids, roles), row in zip(prompts, words, strict=True)
        ]

    def generate_text(
        self, examples: Sequence[Any], max_new_tokens: int = 8, batch_size: int = 256
    ) -> list[str]:
        """Greedy answers (words until ``<eos>``, at most ``max_new_tokens``)."""
        prompts = [self._prompt_part(example) for example in examples]
        rows = self._greedy(
            prompts, max_new_tokens, self._text_only, self.tokenizer.eos_id, batch_size
        )
        return [self.tokenizer.decode_text(row) for row in rows]

    def generate_reasoning(self, examples: Sequence[Any], batch_size: int = 256) -> list[str]:
        """The words a reason-then-draw model writes before drawing (up to ``<boi>``)."""
        prompts = [self._prompt_part(example) for example in examples]
        rows = self._greedy(
            prompts, MAX_REASONING_WORDS, self._reasoning, self.tokenizer.boi_id, batch_size
        )
        return [self.tokenizer.decode_text(row) for row in rows]

    def generate_images(self, examples: Sequence[Any], batch_size: int = 256) -> list[Grid]:
        """Grids of exactly G*G image tokens after ``<boi>`` (and, for a reason-then-draw
        model, after its own reasoning): greedy next-token (``ar``) or MaskGIT
        (``contextual``)."""
        prefixes = self._reasoning_prefixes(examples, batch_size)
        if self.objective == "contextual":
            rows, _ = self._maskgit(prefixes, batch_size)
        else:
            cells = self.grid_size**2
            rows = self._greedy(prefixes, cells, self._image_only, None, batch_size)
        return [self.tokenizer.decode_grid(row, self.grid_size) for row in rows]

    def model_config_dict(self) -> dict[str, Any]:
        """The toy size as a plain dict (for logs and cache keys)."""
        cfg = self.model.config
        return asdict(
            ToyModelConfig(
                hidden_size=cfg.hidden_size,
                num_layers=cfg.num_hidden_layers,
                num_heads=cfg.num_attention_heads,
                intermediate_size=cfg.intermediate_size,
                max_positions=cfg.max_position_embeddings,
            )
        )
