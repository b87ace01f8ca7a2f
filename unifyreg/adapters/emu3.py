"""Adapter for Emu3 (``Emu3ForConditionalGeneration``): VQ image tokens in the vocabulary.

Sequence layout (one example, right-padded in training batches):

- text / understanding: ``<bos> prefix [image-block] prompt suffix answer <eos>``
- t2i / transfer:       ``<bos> prefix prompt suffix image-block <eos>``

with the default template ``"You are a helpful assistant. USER: " ... " ASSISTANT:"``
(Emu3-Chat's format; pass another :class:`PromptTemplate` for Emu3-Gen prompts) and the
model's own image block ``<|image start|> h*w <|image token|> row_1 <eol> ... row_h <eol>
<|extra_201|> <|image end|>``, where each row holds the ``w`` visual tokens of the image's
VQ codes (the VQ-VAE encodes the image processor's pixels; codes map to vocabulary ids).

Roles: ``<bos>``, template text, the image block's header, ``<eol>`` and closing tokens,
and ``<eos>`` are SPECIAL; prompt words TEXT_PROMPT; visual tokens of a prompt image
IMAGE_PROMPT (h*w of them); answer tokens TEXT_RESPONSE; visual tokens of a response
image IMAGE_RESPONSE.

Losses (teacher-forced next-token cross-entropy over the full vocabulary through
``lm_head``, as Emu3 trains): the text loss covers the answer tokens and their ``<eos>``;
the image loss covers the h*w visual tokens (row ends are layout, forced in generation).
Generation is greedy: text bans visual tokens and stops at ``<eos>``; images get the header
for :attr:`Emu3Adapter.generation_grid` forced, then visual tokens only, with ``<eol>``
forced at each row end, and are decoded by the VQ-VAE decoder into PIL images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3Processor
from transformers.models.emu3.image_processing_emu3 import Emu3ImageProcessor

from unifyreg.adapters.base import TARGET_IMAGE, TARGET_NONE
from unifyreg.adapters.hf_common import (
    PromptTemplate,
    TokenRow,
    TransformersAdapter,
    byte_level_tokenizer,
    pixels_to_pil,
)
from unifyreg.roles import Role

__all__ = ["Emu3Adapter", "save_tiny_emu3"]


class Emu3Adapter(TransformersAdapter):
    """Adapter for Emu3 checkpoints (see the module docstring for the layout).

    ``generation_grid`` is the (rows, columns) of VQ tokens of a generated image; by
    default the processor's own generation size (``ratio`` and ``image_area``).

    Example::

        adapter = Emu3Adapter.load("/models/Emu3-Chat-hf", dtype="bfloat16")
        out = adapter.forward(adapter.encode(read_manifest("probe.jsonl").examples[:4]))
    """

    name = "emu3"

    model_class = Emu3ForConditionalGeneration
    model_type = "emu3"
    language_model_path = "model.text_model"
    default_template = PromptTemplate(
        prefix="You are a helpful assistant. USER: ", suffix=" ASSISTANT:", response_lead=" "
    )

    def __init__(
        self,
        model: Emu3ForConditionalGeneration,
        processor: Emu3Processor,
        template: PromptTemplate | None = None,
        generation_grid: Sequence[int] | None = None,
    ):
        super().__init__(model, processor, template)
        mapping = self.base_model.model.vocabulary_mapping
        self.eol_id = int(mapping.eol_token_id)
        self._img2bpe = mapping.img2bpe_mapping_tensor.long()
        self._bpe2img = mapping.bpe2img_mapping_tensor.long()
        vocab = self.lm_head.out_features
        self._visual = torch.zeros(vocab, dtype=torch.bool)
        self._visual[torch.tensor(mapping.image_tokens)] = True
        if generation_grid is None:
            generation_grid = processor.calculate_generate_size(
                processor.ratio, processor.image_area, self.vqmodel.spatial_scale_factor
            )
        rows, columns = (int(n) for n in generation_grid)
        if rows < 1 or columns < 1:
            raise ValueError(f"generation_grid must be two integers >= 1, got {generation_grid}")
        self.generation_grid = (rows, columns)

    @property
    def vqmodel(self) -> Any:
        """The VQ-VAE (image pixels <-> VQ codes)."""
        return self.base_model.model.vqmodel

    def adapter_settings(self) -> dict[str, Any]:
        """The template and :attr:`generation_grid` (read back by :meth:`load`)."""
        return {**super().adapter_settings(), "generation_grid": list(self.generation_grid)}

    # ------------------------------------------------------------------ encoding

    def image_codes(self, image: Image.Image) -> Tensor:
        """VQ codes ``[h, w]`` of an image (the image processor's resize, then the VQ encoder)."""
        inputs = self.processor.image_processor(image.convert("RGB"), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device)
        with torch.no_grad():
            encoded = self.vqmodel.encode(pixels, inputs["image_sizes"], return_dict=True)
        return encoded.image_tokens[0].long().cpu()

    def _header(self, rows: int, columns: int) -> str:
        processor = self.processor
        return f"{processor.image_start_token}{rows}*{columns}{processor.fake_token_around_image}"

    def _append_image(self, row: TokenRow, image: Image.Image, role: Role, target: int) -> None:
        codes = self.image_codes(image)
        rows, columns = codes.shape
        self._append_text(row, [(self._header(rows, columns), Role.SPECIAL, TARGET_NONE)])
        for line in self._img2bpe[codes].tolist():
            row.append(line, role, target)
            row.append([self.eol_id], Role.SPECIAL)
        closing = [self.processor.eof_token, self.processor.image_end_token]
        row.append(self.tokenizer.convert_tokens_to_ids(closing), Role.SPECIAL)

    def _append_image_prompt(self, row: TokenRow, image: Image.Image) -> None:
        self._append_image(row, image, Role.IMAGE_PROMPT, TARGET_NONE)

    def _append_image_response(self, row: TokenRow, image: Image.Image) -> None:
        self._append_image(row, image, Role.IMAGE_RESPONSE, TARGET_IMAGE)
        row.append([self.eos_id], Role.SPECIAL)

    # ------------------------------------------------------------------ generation

    def _banned_in_text(self) -> Tensor:
        return self._visual

    def generate_image_codes(self, examples: Sequence[Any], batch_size: int = 4) -> list[Tensor]:
        """Greedy VQ codes ``[rows, columns]`` (:attr:`generation_grid`) for each prompt."""
        rows, columns = self.generation_grid
        banned = (~self._visual).to(self.device)
        eol = torch.tensor(self.eol_id, device=self.device)

        def choose(step: int, hidden: Tensor) -> Tensor:
            if step % (columns + 1) == columns:
                return eol.expand(hidden.shape[0])
            logits = self.lm_head(hidden).float()
            return logits.masked_fill(banned, float("-inf")).argmax(-1)

        with torch.no_grad():
            prompts = []
            for example in examples:
                prompt = self._prompt_row(example)
                self._append_text(prompt, [(self._header(rows, columns), Role.SPECIAL, 0)])
                prompts.append(prompt)
        steps = rows * (columns + 1)
        tokens = self._greedy(prompts, steps, choose, self._embed_ids, None, batch_size)
        grids = torch.tensor(tokens, dtype=torch.long).view(-1, rows, columns + 1)[..., :columns]
        return list(self._bpe2img[grids])

    def generate_images(self, examples: Sequence[Any], batch_size: int = 4) -> list[Image.Image]:
        """Greedy images: :meth:`generate_image_codes` decoded by the VQ-VAE decoder."""
        images = []
        for codes in self.generate_image_codes(examples, batch_size=batch_size):
            with torch.no_grad():
                pixels = self.vqmodel.decode(codes[None].to(self.device))
            images.append(pixels_to_pil(pixels[0], self.processor.image_processor))
        return images


def save_tiny_emu3(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Emu3 checkpoint (2 layers, d=32, 4x4-token 32-pixel images,
    a byte-level tokenizer) that :meth:`Emu3Adapter.load` reads; for tests and smoke runs."""
    codebook = 32
    special = [
        "<|endoftext|>",
        "<|extra_203|>",
        "<|extra_204|>",
        "<image>",
        "<|image start|>",
        "<|image end|>",
        "<|image token|>",
        "<|extra_200|>",
        "<|extra_201|>",
    ]
    visual = [f"<|visual token{index:06d}|>" for index in range(codebook)]
    tokenizer = byte_level_tokenizer(
        special + visual,
        bos_token="<|extra_203|>",
        eos_token="<|extra_204|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<image>",
            "boi_token": "<|image start|>",
            "eoi_token": "<|image end|>",
            "image_wrapper_token": "<|image token|>",
            "eof_token": "<|extra_201|>",
        },
    )
    image_processor = Emu3ImageProcessor(min_pixels=32 * 32, max_pixels=32 * 32, spatial_factor=8)
    processor = Emu3Processor(image_processor, tokenizer)
    config = Emu3Config(
        vq_config={
            "codebook_size": codebook,
            "embed_dim": 4,
            "latent_channels": 4,
            "base_channels": 32,  # the VQ-VAE's GroupNorms need multiples of 32
            "channel_multiplier": [1, 1, 1, 1],  # 8x downsampling, as the processor assumes
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "hidden_size": 32,
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "attention_dropout": 0.0,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vocabulary_map={
            token: tokenizer.convert_tokens_to_ids(token) for token in special + visual
        },
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Emu3ForConditionalGeneration(config).eval()
    Emu3Adapter(model, processor, generation_grid=(4, 4)).save(directory)
    return Path(directory)
