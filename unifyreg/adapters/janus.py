"""Adapter for Janus / Janus-Pro (``JanusForConditionalGeneration``): two image paths.

Sequence layout (one example, right-padded in training batches):

- text / understanding: ``<bos> prefix [<boi> N x <image> <eoi> after_image] prompt suffix
  answer <eos>``
- t2i / transfer:       ``<bos> prefix prompt suffix <boi> N x <image> <eoi> <eos>``

with Janus-Pro's chat template by default (``"<|User|>: " ... "\\n\\n<|Assistant|>:"``) and
N = ``vision_config.num_image_tokens`` (576 for Janus-Pro). The two kinds of image
positions hold the ``<image>`` placeholder id and are filled from explicit masks:

- ``understanding_image_mask`` [B, S]: the SigLIP vision encoder + aligner features of the
  row's ``pixel_values`` [B, 3, H, W] (zeros for rows without a prompt image);
- ``generation_image_mask`` [B, S]: ``prepare_embeddings_for_image_generation`` of the
  generation VQ codes in ``generation_image_codes`` [B, S] (the VQ-VAE encoding of the
  response image, raster order; 0 elsewhere).

Roles: ``<bos>``, template text, ``<boi>``, ``<eoi>`` and ``<eos>`` are SPECIAL; prompt words
TEXT_PROMPT; the N understanding positions IMAGE_PROMPT; answer tokens TEXT_RESPONSE; the
N generation positions IMAGE_RESPONSE.

Losses (teacher-forced): the text loss is next-token cross-entropy through ``lm_head`` over
the answer tokens and their ``<eos>``; the image loss is cross-entropy of
``generation_head`` (on the hidden state one position earlier) against each of the N VQ
codes, as Janus trains generation. ``keep_logits`` returns the ``lm_head`` (text vocabulary)
logits. Generation is greedy: text stops at ``<eos>``; images
get ``<boi>`` forced, then N codes from ``generation_head`` (no classifier-free guidance),
decoded by the VQ-VAE decoder into PIL images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from transformers import JanusConfig, JanusForConditionalGeneration, JanusProcessor
from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

from unifyreg.adapters.base import TARGET_IMAGE, TARGET_NONE
from unifyreg.adapters.hf_common import (
    PromptTemplate,
    TokenRow,
    TransformersAdapter,
    byte_level_tokenizer,
    pixels_to_pil,
)
from unifyreg.roles import Role

__all__ = ["JanusAdapter", "save_tiny_janus"]


class JanusAdapter(TransformersAdapter):
    """Adapter for Janus / Janus-Pro checkpoints (see the module docstring for the layout).

    Example::

        adapter = JanusAdapter.load("/models/Janus-Pro-1B", dtype="bfloat16")
        out = adapter.forward(adapter.encode(read_manifest("probe.jsonl").examples[:4]))
    """

    name = "janus"

    model_class = JanusForConditionalGeneration
    model_type = "janus"
    language_model_path = "model.language_model"
    extra_fields = ("understanding_image_mask", "generation_image_mask", "generation_image_codes")
    default_template = PromptTemplate(
        prefix="<|User|>: ", after_image="\n", suffix="\n\n<|Assistant|>:", response_lead=" "
    )

    def __init__(
        self,
        model: JanusForConditionalGeneration,
        processor: JanusProcessor,
        template: PromptTemplate | None = None,
    ):
        super().__init__(model, processor, template)
        config = self.base_model.config
        self.num_image_tokens = int(config.vision_config.num_image_tokens)
        grid = int(config.vq_config.num_patches)
        if processor.num_image_tokens != self.num_image_tokens or grid * grid != (
            self.num_image_tokens
        ):
            raise ValueError(
                f"inconsistent Janus checkpoint: processor.num_image_tokens="
                f"{processor.num_image_tokens}, vision_config.num_image_tokens="
                f"{self.num_image_tokens}, VQ grid {grid}x{grid}"
            )
        self.image_token_id = int(config.image_token_id)
        self.boi_id = int(self.tokenizer.convert_tokens_to_ids(processor.image_start_token))
        self.eoi_id = int(self.tokenizer.convert_tokens_to_ids(processor.image_end_token))
        size = processor.image_processor.size
        self._pixel_shape = (3, int(size["height"]), int(size["width"]))

    @property
    def vqmodel(self) -> Any:
        """The generation VQ-VAE (image pixels <-> generation codes)."""
        return self.base_model.model.vqmodel

    # ------------------------------------------------------------------ encoding

    def _blank_row_tensors(self) -> dict[str, Tensor]:
        return {"pixel_values": torch.zeros(self._pixel_shape)}

    def pixel_values(self, image: Image.Image) -> Tensor:
        """``[3, H, W]`` pixels of an image from the image processor (resize, pad, normalise)."""
        inputs = self.processor.image_processor(image.convert("RGB"), return_tensors="pt")
        return inputs["pixel_values"][0].float()

    def image_codes(self, image: Image.Image) -> Tensor:
        """Generation VQ codes ``[N]`` (raster order) of an image."""
        pixels = self.pixel_values(image)[None].to(self.device, self.vqmodel.dtype)
        with torch.no_grad():
            encoded = self.vqmodel.encode(pixels, return_dict=True)
        return encoded.image_tokens.view(-1).long().cpu()

    def _append_image_prompt(self, row: TokenRow, image: Image.Image) -> None:
        n = self.num_image_tokens
        row.row_tensors["pixel_values"] = self.pixel_values(image)
        row.append([self.boi_id], Role.SPECIAL)
        row.append([self.image_token_id] * n, Role.IMAGE_PROMPT, understanding_image_mask=[1] * n)
        row.append([self.eoi_id], Role.SPECIAL)

    def _append_image_response(self, row: TokenRow, image: Image.Image) -> None:
        codes = self.image_codes(image).tolist()
        n = len(codes)
        row.append([self.boi_id], Role.SPECIAL)
        row.append(
            [self.image_token_id] * n,
            Role.IMAGE_RESPONSE,
            TARGET_IMAGE,
            generation_image_mask=[1] * n,
            generation_image_codes=codes,
        )
        row.append([self.eoi_id, self.eos_id], Role.SPECIAL)

    # ------------------------------------------------------------------ forward

    def input_embeddings(self, batch: dict[str, Tensor]) -> Tensor:
        """Token embeddings, with vision features at ``understanding_image_mask`` and
        generation embeddings of ``generation_image_codes`` at ``generation_image_mask``."""
        device = self.device
        embeds = self.embed_tokens(batch["input_ids"].to(device))
        understanding = batch["understanding_image_mask"].to(device).bool()
        if bool(understanding.any()):
            with_image = understanding.any(dim=1)
            pixels = batch["pixel_values"].to(device)[with_image]
            features = self.base_model.model.get_image_features(
                pixels.to(embeds.dtype), return_dict=True
            ).pooler_output
            if understanding.sum() != features.shape[0] * features.shape[1]:
                raise ValueError(
                    f"{int(understanding.sum())} understanding image positions, but "
                    f"{features.shape[0]} images x {features.shape[1]} features"
                )
            embeds = embeds.masked_scatter(understanding[..., None], features.to(embeds.dtype))
        generation = batch["generation_image_mask"].to(device).bool()
        if bool(generation.any()):
            codes = batch["generation_image_codes"].to(device)[generation]
            image_embeds = self.base_model.prepare_embeddings_for_image_generation(codes)
            embeds = embeds.masked_scatter(generation[..., None], image_embeds.to(embeds.dtype))
        return embeds

    def _image_logits(
        self, hidden: Tensor, batch: dict[str, Tensor], positions: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``generation_head`` on the predicting states, labels the generation VQ codes."""
        b, t = positions.unbind(-1)
        logits = self.base_model.model.generation_head(hidden)
        return logits, batch["generation_image_codes"].to(hidden.device)[b, t]

    # ------------------------------------------------------------------ generation

    def generate_image_codes(self, examples: Sequence[Any], batch_size: int = 4) -> list[Tensor]:
        """Greedy generation codes ``[N]`` per prompt (``<boi>`` forced, ``generation_head``)."""

        def choose(step: int, hidden: Tensor) -> Tensor:
            return self.base_model.model.generation_head(hidden).float().argmax(-1)

        def embed(ids: Tensor) -> Tensor:
            return self.base_model.prepare_embeddings_for_image_generation(ids[:, None])

        with torch.no_grad():
            prompts = []
            for example in examples:
                prompt = self._prompt_row(example)
                prompt.append([self.boi_id], Role.SPECIAL, TARGET_NONE)
                prompts.append(prompt)
        tokens = self._greedy(prompts, self.num_image_tokens, choose, embed, None, batch_size)
        return list(torch.tensor(tokens, dtype=torch.long))

    def generate_images(self, examples: Sequence[Any], batch_size: int = 4) -> list[Image.Image]:
        """Greedy images: :meth:`generate_image_codes` decoded by the VQ-VAE decoder."""
        images = []
        for codes in self.generate_image_codes(examples, batch_size=batch_size):
            with torch.no_grad():
                pixels = self.vqmodel.decode(codes[None].to(self.device))
            images.append(pixels_to_pil(pixels[0], self.processor.image_processor))
        return images


def save_tiny_janus(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Janus checkpoint (2 LM layers, d=32, 16-pixel images -> 16 image
    tokens, a byte-level tokenizer) that :meth:`JanusAdapter.load` reads; for tests."""
    special = [
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        "<｜▁pad▁｜>",
        "<image_placeholder>",
        "<begin_of_image>",
        "<end_of_image>",
    ]
    tokenizer = byte_level_tokenizer(
        special,
        bos_token=special[0],
        eos_token=special[1],
        pad_token=special[2],
        extra_special_tokens={
            "image_token": "<image_placeholder>",
            "boi_token": "<begin_of_image>",
            "eoi_token": "<end_of_image>",
        },
    )
    image_processor = JanusImageProcessorPil(
        size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3, min_size=4
    )
    processor = JanusProcessor(image_processor, tokenizer, num_image_tokens=16)
    config = JanusConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 4,
            "projection_dim": 32,
            "mlp_ratio": 2.0,
            "num_image_tokens": 16,
        },
        vq_config={
            "embed_dim": 8,
            "num_embeddings": 32,
            "latent_channels": 32,
            "base_channels": 32,  # the VQ-VAE's GroupNorms need multiples of 32
            "channel_multiplier": [1, 1, 1],  # 4x downsampling: 16 pixels -> 4x4 codes
            "num_res_blocks": 1,
            "projection_dim": 32,
            "image_token_embed_dim": 32,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"),
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(config).eval()
    JanusAdapter(model, processor).save(directory)
    return Path(directory)
