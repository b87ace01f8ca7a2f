"""The built-in toy UMM: a small Llama-style decoder over one shared text+image vocabulary.

Sequence layout (one example, right-padded in training batches):

- text / understanding: ``<bos> prompt [<boi> image-prompt <eoi>] <sep> answer <eos>``
- t2i / transfer:       ``<bos> prompt <sep> <boi> image-response <eoi> <eos>``

The question comes before the image it is about (layout version 2): every image token can
then attend to the question, so a small model learns to read single cells (measured with
the default pretrain config: understanding 100% with this layout against 47-65% with the
image first; see the README's toy-model section). Changing the layout changes
:data:`LAYOUT_VERSION`, which is part of the toy-base cache key.

Roles: ``<bos> <sep> <boi> <eoi> <eos>`` are SPECIAL; prompt words TEXT_PROMPT; prompt
image tokens IMAGE_PROMPT; answer words TEXT_RESPONSE; generated grid tokens
IMAGE_RESPONSE. Image generation is next-token prediction over image tokens (as Emu3).

Losses (teacher-forced, next-token cross-entropy over the full vocabulary): the text loss
covers the answer words and the ``<eos>`` that ends them (generation must learn to stop);
the image loss covers the G*G grid tokens. Generation is greedy: text is restricted to
words and ``<eos>``; images get ``<boi>`` forced and exactly G*G tokens restricted to the
image vocabulary, so every generated image parses into a grid.
"""

from __future__ import annotations

import json
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
    cache_argument,
    output_cache,
)
from unifyreg.roles import Role
from unifyreg.toy.model import ToyModelConfig
from unifyreg.toy.tokenizer import WordTokenizer
from unifyreg.toy.world import Grid, parse_image

__all__ = ["ADAPTER_FILE", "ToyAdapter"]

ADAPTER_FILE = "unifyreg_toy.json"


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
    default_lora_targets = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )

    def __init__(self, model: LlamaForCausalLM, tokenizer: WordTokenizer, grid_size: int):
        if model.config.vocab_size != tokenizer.vocab_size:
            raise ValueError(
                f"model vocabulary ({model.config.vocab_size}) does not match the tokenizer "
                f"({tokenizer.vocab_size})"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.grid_size = int(grid_size)
        self.max_positions = int(model.config.max_position_embeddings)
        vocab = tokenizer.vocab_size
        self._image_only = torch.zeros(vocab, dtype=torch.bool)
        self._image_only[tokenizer.image_token_ids] = True
        self._text_only = torch.zeros(vocab, dtype=torch.bool)
        self._text_only[len(tokenizer.special_ids) + tokenizer.num_colours :] = True
        self._text_only[tokenizer.eos_id] = True

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        tokenizer: WordTokenizer,
        grid_size: int,
        model_config: ToyModelConfig | None = None,
        seed: int = 0,
    ) -> ToyAdapter:
        """A freshly initialised toy model (random weights from ``seed``)."""
        model_config = model_config or ToyModelConfig()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(model_config.llama_config(tokenizer.vocab_size, tokenizer))
        return cls(model, tokenizer, grid_size)

    def save(self, directory: str | Path) -> None:
        """``save_pretrained`` (safetensors) + ``tokenizer.json`` + the grid size."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save(directory)
        (directory / ADAPTER_FILE).write_text(json.dumps({"grid_size": self.grid_size}))

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
        return cls(model, tokenizer, meta["grid_size"])

    # ------------------------------------------------------------------ encoding

    def _grid_tokens(self, image: Any) -> list[int]:
        """Image tokens of a grid, or of a PIL image of a grid (manifests), read back exactly."""
        if isinstance(image, Image.Image):
            image = parse_image(np.asarray(image.convert("RGB")), self.grid_size)
        return self.tokenizer.encode_grid(image)

    def _prompt_part(self, example: Any) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        words = tok.encode_text(example.prompt_text)
        ids, roles = [tok.bos_id, *words], [Role.SPECIAL, *[Role.TEXT_PROMPT] * len(words)]
        if example.prompt_image is not None:
            grid = self._grid_tokens(example.prompt_image)
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
            grid = self._grid_tokens(example.response_image)
            ids += [tok.boi_id, *grid, tok.eoi_id, tok.eos_id]
            roles += [Role.SPECIAL, *[Role.IMAGE_RESPONSE] * len(grid), Role.SPECIAL, Role.SPECIAL]
            targets += [TARGET_NONE, *[TARGET_IMAGE] * len(grid), TARGET_NONE, TARGET_NONE]
        elif example.response_text is not None:
            words = tok.encode_text(example.response_text)
            ids += [*words, tok.eos_id]
            roles += [*[Role.TEXT_RESPONSE] * len(words), Role.SPECIAL]
            targets += [TARGET_TEXT] * (len(words) + 1)
        return ids, [int(r) for r in roles], targets

    def encode(self, examples: Sequence[Any]) -> dict[str, Tensor]:
        """Right-padded batch: ``input_ids``, ``attention_mask``, ``roles``, ``target_kind``."""
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
        return batch

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
    ) -> ForwardOutput:
        """Teacher-forced forward pass; see :meth:`Adapter.forward` for the contract."""
        device = self.device
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        embeds = self.input_embeddings(batch)
        if embedding_hook is not None:
            embeds = embedding_hook(embeds, batch)
        chosen = self.resolve_layers(layers)
        with self.capture(chosen, output_hidden_states, final_norm) as captured:
            out = self.model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        logits = out.logits
        # Position t predicts token t + 1; a target's kind is stored at its own position.
        token_losses = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none"
        )
        kinds = batch["target_kind"].to(device)[:, 1:]
        text_mask, image_mask = kinds == TARGET_TEXT, kinds == TARGET_IMAGE
        text_tokens, image_tokens = text_mask.sum(), image_mask.sum()
        text_loss = (token_losses * text_mask).sum() / text_tokens.clamp_min(1)
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
        )

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def _greedy(
        self,
        prompts: list[list[int]],
        steps: int,
        allowed: Tensor,
        stop_id: int | None,
        batch_size: int,
    ) -> list[list[int]]:
        """Greedy decoding of ``steps`` tokens restricted to ``allowed`` (left-padded)."""
        was_training = self.model.training
        self.model.eval()
        device = self.device
        banned = ~allowed.to(device)
        results: list[list[int]] = []
        try:
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                width = max(len(p) for p in chunk)
                if width + steps > self.max_positions:
                    raise ValueError(
                        f"a prompt of {width} tokens plus {steps} new tokens exceeds the "
                        f"model's {self.max_positions} positions"
                    )
                ids = torch.full((len(chunk), width), self.tokenizer.pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for b, prompt in enumerate(chunk):
                    ids[b, width - len(prompt) :] = torch.tensor(prompt)
                    mask[b, width - len(prompt) :] = 1
                ids, mask = ids.to(device), mask.to(device)
                finished = torch.zeros(len(chunk), dtype=torch.bool, device=device)
                generated = []
                positions = (mask.cumsum(-1) - 1).clamp_min(0)
                cache = None
                for _ in range(steps):
                    # The first call reads the whole prompt; later calls feed only the new
                    # token and reuse the keys and values of the earlier positions.
                    out = self.model(
                        input_ids=ids,
                        attention_mask=mask,
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

    def generate_text(
        self, examples: Sequence[Any], max_new_tokens: int = 8, batch_size: int = 256
    ) -> list[str]:
        """Greedy answers (words until ``<eos>``, at most ``max_new_tokens``)."""
        prompts = [self._prompt_part(example)[0] for example in examples]
        rows = self._greedy(
            prompts, max_new_tokens, self._text_only, self.tokenizer.eos_id, batch_size
        )
        return [self.tokenizer.decode_text(row) for row in rows]

    def generate_images(self, examples: Sequence[Any], batch_size: int = 256) -> list[Grid]:
        """Greedy grids: ``<boi>`` forced, then exactly G*G image tokens."""
        prompts = [self._prompt_part(example)[0] + [self.tokenizer.boi_id] for example in examples]
        cells = self.grid_size**2
        rows = self._greedy(prompts, cells, self._image_only, None, batch_size)
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
