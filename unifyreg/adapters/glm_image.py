"""Adapter for GLM-Image's autoregressive generator (``GlmImageForConditionalGeneration``):
text and image prompts in, image tokens out; it has no text head.

GLM-Image draws an image in two stages: this model writes "prior" image tokens, and a
diffusion transformer (diffusers' ``GlmImagePipeline``) turns them into pixels. The adapter
covers the first stage, whose image tokens are the VQ ids of GLM-Image's own vision
tokenizer (a ViT, ``get_image_features``, quantised by ``vqmodel``: ``get_image_tokens``);
its ``lm_head`` covers only the vision vocabulary, so it **produces no text responses**.

Sequence layout (one example, right-padded in training batches), as the processor's
``prepare_inputs_layout`` writes it:

- t2i:  ``prefix prompt suffix <sop>H W<eop><sop>h w<eop> <start> preview grid, image grid <end>``
- edit: ``prefix <start> source grid <end> after_image prompt suffix <sop>H W<eop> <start>
  image grid <end>``

``<start>``/``<end>`` are the vision ids ``image_start_token_id`` / ``image_end_token_id``;
``H x W`` is the image's token grid and ``h x w`` the preview grid GLM-Image generates first
in t2i (``int(sqrt(H/W) * 16) x int(sqrt(W/H) * 16)``). A source or response image's grid is
what the image processor gives it (its resize, then the ViT's patches); the preview grid is
the response image resized to ``h x w`` patches. Generation draws the preview (t2i) and then
a :attr:`GlmImageAdapter.generation_grid` image.

Positions are GLM-Image's 3-D M-RoPE ids (``get_rope_index``, continued for the generated
grids as its decode rule does): text advances one position per token on all three axes; a
grid starting at position ``p`` takes ``t = p``, ``h = p + row``, ``w = p + column`` and
advances the running position by ``max(rows, columns)``. Each batch carries them as
``position_t``, ``position_h``, ``position_w`` ``[B, S]``.

Roles: template text, the ``<sop>..<eop>`` shape text, ``<start>`` and ``<end>`` are SPECIAL;
prompt words TEXT_PROMPT; a source image's grid IMAGE_PROMPT; the preview and image grids of
a response IMAGE_RESPONSE. An example with a text response keeps its prompt (so understanding
examples still give image prompts to the probe) and leaves the response out with a warning:
the probe's ``response/text`` quantity and the scores that need it are then left out, with
the probe's usual warning. Hidden states: the outputs of ``model.language_model.layers``.

Losses: the image loss is next-token cross-entropy of ``lm_head`` (the vision vocabulary)
over the preview and image grids; there is no text loss. The stock ``forward(labels=...)``
reshapes the vision-vocabulary logits with the full vocabulary size and fails, so the
adapter computes its own. Generation is greedy over the VQ codes; images come back as
:class:`unifyreg.images.ImageCodes` (image grid, with the preview), since pixels need the
diffusion stage.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from transformers import GlmImageConfig, GlmImageForConditionalGeneration, GlmImageProcessor
from transformers.models.glm_image.image_processing_pil_glm_image import (
    GlmImageImageProcessorPil,
)

from unifyreg.adapters.base import TARGET_IMAGE, TARGET_NONE
from unifyreg.adapters.hf_common import (
    PromptTemplate,
    TokenRow,
    TransformersAdapter,
    byte_level_tokenizer,
)
from unifyreg.images import ImageCodes, as_rgb_image
from unifyreg.roles import Role

__all__ = ["GlmImageAdapter", "preview_grid", "save_tiny_glm_image"]

POSITION_FIELDS = ("position_t", "position_h", "position_w")
#: Warned once per process when an example's text response is left out.
TEXT_RESPONSE_WARNING = (
    "the glm_image adapter leaves text responses out: GLM-Image generates image tokens only, "
    "so response/text is not measured (its scores are left out) and such examples add no "
    "training loss; their prompts are kept"
)


def preview_grid(rows: int, columns: int) -> tuple[int, int]:
    """GLM-Image's preview grid for an ``rows x columns`` token grid (the processor's
    ``_get_target_shape``): ``(int(sqrt(r / c) * 16), int(sqrt(c / r) * 16))``."""
    ratio = rows / columns
    return int(math.sqrt(ratio) * 16), int(math.sqrt(1 / ratio) * 16)


@dataclass
class _GlmRow(TokenRow):
    """A :class:`TokenRow` that numbers GLM-Image's 3-D positions as it grows."""

    cursor: int = 0

    def append(self, ids, role, target=TARGET_NONE, **extras) -> None:  # type: ignore[override]
        """Text positions: one step per token on all three axes."""
        if "position_t" not in extras:
            steps = list(range(self.cursor, self.cursor + len(ids)))
            self.cursor += len(ids)
            extras = {**extras, "position_t": steps, "position_h": steps, "position_w": steps}
        super().append(ids, role, target, **extras)

    def append_grid(self, codes: Tensor, role: Role, target: int) -> None:
        """A ``[rows, columns]`` grid of vision ids at the running position (module docstring)."""
        rows, columns = codes.shape
        start = self.cursor
        super().append(
            codes.reshape(-1).tolist(),
            role,
            target,
            position_t=[start] * (rows * columns),
            position_h=[start + r for r in range(rows) for _ in range(columns)],
            position_w=[start + c for _ in range(rows) for c in range(columns)],
        )
        self.cursor += max(rows, columns)


class GlmImageAdapter(TransformersAdapter):
    """Adapter for GLM-Image's AR generator (see the module docstring).

    ``generation_grid``: the (rows, columns) image-token grid of generated images (default:
    the processor's default target size, 1152 x 768 pixels -> 36 x 24 tokens).

    Example::

        adapter = GlmImageAdapter.load("/models/GLM-Image/vision_language_encoder")
        out = adapter.forward(adapter.encode(read_manifest("probe.jsonl").examples[:4]))
    """

    name = "glm_image"

    model_class = GlmImageForConditionalGeneration
    model_type = "glm_image"
    language_model_path = "model.language_model"
    lora_projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
    extra_fields = POSITION_FIELDS

    def __init__(
        self,
        model: GlmImageForConditionalGeneration,
        processor: Any,
        template: PromptTemplate | None = None,
        generation_grid: Sequence[int] | None = None,
    ):
        super().__init__(model, processor, template)
        config = self.base_model.config
        self.image_start_id = int(config.image_start_token_id)
        self.image_end_id = int(config.image_end_token_id)
        self.num_codes = int(config.vq_config.num_embeddings)
        self.grid_bos = str(self.tokenizer.grid_bos_token)
        self.grid_eos = str(self.tokenizer.grid_eos_token)
        self.patch_size = int(processor.image_processor.patch_size)
        if generation_grid is None:
            generation_grid = (processor.target_h // 32, processor.target_w // 32)
        rows, columns = (int(n) for n in generation_grid)
        if rows < 1 or columns < 1 or max(rows, columns) / min(rows, columns) > 4:
            raise ValueError(
                f"generation_grid must be two integers >= 1 with an aspect ratio <= 4, got "
                f"{generation_grid}"
            )
        self.generation_grid = (rows, columns)

    def adapter_settings(self) -> dict[str, Any]:
        """The template and :attr:`generation_grid` (read back by :meth:`load`)."""
        return {**super().adapter_settings(), "generation_grid": list(self.generation_grid)}

    # ------------------------------------------------------------------ images

    def _new_row(self) -> _GlmRow:
        return _GlmRow(extra_fields=self.extra_fields)

    def image_tokens(self, image: Image.Image, grid: Sequence[int] | None = None) -> Tensor:
        """``[rows, columns]`` vision ids of an image through GLM-Image's own tokenizer: the
        image processor's resize (or, with ``grid``, a resize to exactly ``grid`` patches),
        the ViT (``get_image_features``) and the VQ quantiser (``get_image_tokens``)."""
        image = image.convert("RGB")
        kwargs: dict[str, Any] = {}
        if grid is not None:
            size = (int(grid[1]) * self.patch_size, int(grid[0]) * self.patch_size)
            image = image.resize(size, Image.Resampling.BICUBIC)
            kwargs["do_resize"] = False
        inputs = self.processor.image_processor(image, return_tensors="pt", **kwargs)
        model = self.base_model.model
        pixels = inputs["pixel_values"].to(self.device, model.visual.dtype)
        grids = inputs["image_grid_thw"].to(self.device)
        with torch.no_grad():
            features = model.get_image_features(pixels, grids, return_dict=True).pooler_output
            ids = model.get_image_tokens(features)
        _, rows, columns = (int(n) for n in grids[0])
        return ids.reshape(rows, columns).long().cpu()

    def _response_grids(self, image: Any, preview: bool) -> tuple[Tensor | None, Tensor]:
        """(preview grid or None, image grid) of a response image (pixels or ImageCodes)."""
        if isinstance(image, ImageCodes):
            if image.codes.ndim != 2:
                raise ValueError("GLM-Image response codes must be a 2-D [rows, columns] grid")
            large = torch.as_tensor(image.codes)
            small = None if image.preview is None else torch.as_tensor(image.preview)
            if preview and (small is None or tuple(small.shape) != preview_grid(*large.shape)):
                raise ValueError(
                    f"a text-to-image response needs its {preview_grid(*large.shape)} preview "
                    "grid's codes as well (ImageCodes.preview)"
                )
            for grid in (large, small if preview else None):
                if grid is not None and int(grid.max()) >= self.num_codes:
                    raise ValueError(f"GLM-Image codes must lie in [0, {self.num_codes})")
            return (small if preview else None), large
        image = as_rgb_image(image, "response_image")
        large = self.image_tokens(image)
        return (self.image_tokens(image, preview_grid(*large.shape)) if preview else None), large

    # ------------------------------------------------------------------ encoding

    def _shape_text(self, grid: Sequence[int], preview: bool) -> str:
        rows, columns = grid
        text = f"{self.grid_bos}{rows} {columns}{self.grid_eos}"
        if preview:
            small_rows, small_columns = preview_grid(rows, columns)
            text += f"{self.grid_bos}{small_rows} {small_columns}{self.grid_eos}"
        return text

    def _prompt_row(self, example: Any, grid: Sequence[int] | None = None) -> TokenRow:
        """``prefix [<start> source <end> after_image] prompt suffix <sop>..<eop> <start>``
        for a response of ``grid`` tokens (default :attr:`generation_grid`)."""
        template = self.template
        row = self._new_row()
        if example.prompt_image is not None:
            source = self.image_tokens(as_rgb_image(example.prompt_image, "prompt_image"))
            self._append_text(row, [(template.prefix, Role.SPECIAL, TARGET_NONE)])
            row.append([self.image_start_id], Role.SPECIAL)
            row.append_grid(source, Role.IMAGE_PROMPT, TARGET_NONE)
            row.append([self.image_end_id], Role.SPECIAL)
            lead = template.after_image
        else:
            lead = template.prefix
        shape = self._shape_text(grid or self.generation_grid, example.prompt_image is None)
        self._append_text(
            row,
            [
                (lead, Role.SPECIAL, TARGET_NONE),
                (example.prompt_text, Role.TEXT_PROMPT, TARGET_NONE),
                (template.suffix, Role.SPECIAL, TARGET_NONE),
                (shape, Role.SPECIAL, TARGET_NONE),
            ],
        )
        row.append([self.image_start_id], Role.SPECIAL)
        return row

    def encode_example(self, example: Any) -> TokenRow:
        """The full sequence of one example (module docstring); a text response is left
        out with a warning."""
        if example.response_image is None:
            if example.response_text is not None:
                warnings.warn(TEXT_RESPONSE_WARNING, UserWarning, stacklevel=3)
            return self._prompt_row(example)
        t2i = example.prompt_image is None
        preview, large = self._response_grids(example.response_image, preview=t2i)
        row = self._prompt_row(example, grid=tuple(large.shape))
        if preview is not None:
            row.append_grid(preview, Role.IMAGE_RESPONSE, TARGET_IMAGE)
        row.append_grid(large, Role.IMAGE_RESPONSE, TARGET_IMAGE)
        row.append([self.image_end_id], Role.SPECIAL)
        return row

    def position_ids(self, batch: dict[str, Tensor]) -> Tensor:
        """``[3, B, S]`` (t, h, w) position ids of a batch."""
        return torch.stack([batch[name] for name in POSITION_FIELDS]).to(self.device)

    def _position_arguments(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"position_ids": self.position_ids(batch)}

    # ------------------------------------------------------------------ generation

    def _generation_positions(self, batch: dict[str, Tensor], mask: Tensor) -> Tensor:
        return self.position_ids(batch)

    def generate_image_codes(
        self, examples: Sequence[Any], batch_size: int = 4
    ) -> list[ImageCodes]:
        """Greedy image tokens for each prompt: (t2i) the preview grid, then the
        :attr:`generation_grid` image grid, each code the argmax of ``lm_head`` over the
        VQ codes, at GLM-Image's decode positions; as ``ImageCodes(image, preview)``."""
        results: list[Any] = [None] * len(examples)
        for t2i in (True, False):  # one layout per call: the decode pattern differs
            chosen = [i for i, e in enumerate(examples) if (e.prompt_image is None) == t2i]
            if chosen:
                codes = self._generate_grids([examples[i] for i in chosen], t2i, batch_size)
                for index, grid in zip(chosen, codes, strict=True):
                    results[index] = grid
        return results

    def _generate_grids(self, examples: Sequence[Any], t2i: bool, batch_size: int) -> list:
        rows, columns = self.generation_grid
        small = preview_grid(rows, columns) if t2i else None
        pattern_row = _GlmRow(extra_fields=POSITION_FIELDS)
        if small is not None:
            pattern_row.append_grid(torch.zeros(small, dtype=torch.long), Role.SPECIAL, 0)
        pattern_row.append_grid(torch.zeros(rows, columns, dtype=torch.long), Role.SPECIAL, 0)
        pattern = torch.tensor([pattern_row.extras[name] for name in POSITION_FIELDS])
        pattern = pattern.to(self.device)

        def next_positions(prompt_positions: Tensor, step: int) -> Tensor:
            return prompt_positions[..., -1:] + 1 + pattern[:, None, step : step + 1]

        def choose(step: int, hidden: Tensor) -> Tensor:
            return self.lm_head(hidden)[:, : self.num_codes].float().argmax(-1)

        with torch.no_grad():
            prompts = [self._prompt_row(example) for example in examples]
        steps = pattern.shape[1]
        tokens = self._greedy(
            prompts, steps, choose, self._embed_ids, None, batch_size, next_positions
        )
        out = []
        for row in tokens:
            codes = np.asarray(row, dtype=np.int64)
            offset = 0 if small is None else small[0] * small[1]
            preview = None if small is None else codes[:offset].reshape(small)
            out.append(ImageCodes(codes[offset:].reshape(rows, columns), preview=preview))
        return out

    def generate_images(self, examples: Sequence[Any], batch_size: int = 4) -> list[ImageCodes]:
        """:meth:`generate_image_codes` (pixels need GLM-Image's diffusion stage)."""
        return self.generate_image_codes(examples, batch_size=batch_size)

    def generate_text(
        self, examples: Sequence[Any], max_new_tokens: int = 8, batch_size: int = 16
    ) -> list[str]:
        """GLM-Image writes no text: empty answers, with a warning (a generated-response
        probe drops these examples)."""
        warnings.warn(TEXT_RESPONSE_WARNING, UserWarning, stacklevel=2)
        return [""] * len(examples)


#: Vision vocabulary, VQ codes and ids of the tiny checkpoint (codes 0..47, start 48, end 49).
TINY_VISION_VOCAB, TINY_CODES = 64, 48


def save_tiny_glm_image(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random GLM-Image AR model (2 layers, d=64, a 1-block ViT with 4-pixel
    patches, 48 VQ codes, a byte-level tokenizer with the vision tokens at ids 0..63) and its
    processor with ``save_pretrained``; :meth:`GlmImageAdapter.load` reads it. For tests."""
    vision_tokens = [f"<|dit_token_{i}|>" for i in range(TINY_VISION_VOCAB)]
    start, end = vision_tokens[TINY_CODES], vision_tokens[TINY_CODES + 1]
    tokenizer = byte_level_tokenizer(
        ["<|endoftext|>", "<sop>", "<eop>", "<|image|>"],
        first_tokens=vision_tokens,
        bos_token=start,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image|>",
            "grid_bos_token": "<sop>",
            "grid_eos_token": "<eop>",
        },
    )
    image_processor = GlmImageImageProcessorPil(
        patch_size=4,
        temporal_patch_size=1,
        merge_size=1,
        size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64},
    )
    template = (
        "{%- for m in messages -%}{%- for item in m.content -%}{%- if item.type == 'image' -%}"
        f"{start}<|image|>{end}"
        "{%- elif item.type == 'text' -%}{{ item.text }}{%- endif -%}{%- endfor -%}{%- endfor -%}"
    )
    processor = GlmImageProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template
    )
    config = GlmImageConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "vision_vocab_size": TINY_VISION_VOCAB,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": TINY_CODES + 1,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [2, 1, 1],  # head_dim 16 * 0.5 / 2 = 4
            },
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "num_heads": 2,
            "intermediate_size": 64,
            "patch_size": 4,
            "image_size": 32,
            "in_channels": 3,
            "spatial_merge_size": 1,
        },
        vq_config={
            "embed_dim": 16,
            "num_embeddings": TINY_CODES,
            "latent_channels": 32,
            "in_channels": 3,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"),
        image_start_token_id=TINY_CODES,
        image_end_token_id=TINY_CODES + 1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GlmImageForConditionalGeneration(config).eval()
    GlmImageAdapter(model, processor, generation_grid=(2, 2)).save(directory)
    return Path(directory)
