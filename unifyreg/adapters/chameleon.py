"""Adapter for Chameleon / Anole (``ChameleonForConditionalGeneration``): VQ tokens in the
vocabulary, image logits straight from ``lm_head``.

Sequence layout (one example, right-padded in training batches):

- text / understanding: ``<s> [<racm3:break> N image tokens <eoss>] prompt <sep> answer </s>``
- t2i / transfer:       ``<s> prompt <sep> <racm3:break> N image tokens <eoss> </s>``

``<sep>`` is Chameleon's chat separator ``<reserved08706>`` (what the processor appends in
chat mode); the N = ``processor.image_seq_length`` image tokens (1024 for Chameleon) are
the vocabulary ids of the VQ-VAE codes of the image processor's pixels.

Roles: ``<s>``, ``<sep>``, ``<racm3:break>``, ``<eoss>`` and ``</s>`` are SPECIAL; prompt words
TEXT_PROMPT; a prompt image's N tokens IMAGE_PROMPT; answer tokens TEXT_RESPONSE; a
response image's N tokens IMAGE_RESPONSE.

Losses (teacher-forced next-token cross-entropy over the full vocabulary): the stock
``forward`` sets the logits of every image token to the most negative float, so its loss is
``inf`` on image labels. Both losses here use ``lm_head`` on the final hidden states
directly (as Anole trains image generation): the text loss over the answer tokens and their
``</s>``, the image loss over the N image tokens. ``keep_logits`` returns these unmasked
logits. Generation is greedy: text bans image tokens (as the stock forward does) and stops
at ``</s>``; images get ``<racm3:break>`` forced, then N tokens restricted to the image
vocabulary (:meth:`ChameleonAdapter.generate_image_codes`).

Not available: :meth:`ChameleonAdapter.generate_images`. ``transformers``' Chameleon
VQ-VAE holds the encoder only; there is no decoder to turn generated codes into pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from transformers import (
    ChameleonConfig,
    ChameleonForConditionalGeneration,
    ChameleonProcessor,
)
from transformers.models.chameleon.image_processing_pil_chameleon import (
    ChameleonImageProcessorPil,
)

from unifyreg.adapters.base import TARGET_IMAGE, TARGET_NONE
from unifyreg.adapters.hf_common import (
    PromptTemplate,
    TokenRow,
    TransformersAdapter,
    byte_level_tokenizer,
)
from unifyreg.roles import Role

__all__ = ["ChameleonAdapter", "save_tiny_chameleon"]

#: Chameleon's chat separator (the tokenizer's ``sep_token``).
CHAMELEON_SEP = "<reserved08706>"


class ChameleonAdapter(TransformersAdapter):
    """Adapter for Chameleon and Anole checkpoints (see the module docstring for the layout).

    Example::

        adapter = ChameleonAdapter.load("/models/Anole-7b-hf", dtype="bfloat16")
        out = adapter.forward(adapter.encode(read_manifest("probe.jsonl").examples[:4]))
    """

    name = "chameleon"

    model_class = ChameleonForConditionalGeneration
    model_type = "chameleon"
    language_model_path = "model"
    default_template = PromptTemplate(suffix=CHAMELEON_SEP)

    def __init__(
        self,
        model: ChameleonForConditionalGeneration,
        processor: ChameleonProcessor,
        template: PromptTemplate | None = None,
    ):
        super().__init__(model, processor, template)
        mapping = self.base_model.model.vocabulary_mapping
        self.num_image_tokens = int(processor.image_seq_length)
        self.boi_id = int(processor.image_start_token_id)
        self.eoi_id = int(processor.image_end_token_id)
        self._img2bpe = mapping.img2bpe_mapping_tensor.long()
        bpe_ids = torch.tensor(sorted(mapping.bpe2img), dtype=torch.long)
        self._bpe2img = torch.zeros(int(bpe_ids.max()) + 1, dtype=torch.long)
        self._bpe2img[bpe_ids] = torch.tensor([mapping.bpe2img[int(i)] for i in bpe_ids])
        self._image_vocab = torch.zeros(self.lm_head.out_features, dtype=torch.bool)
        self._image_vocab[bpe_ids] = True

    @property
    def vqmodel(self) -> Any:
        """The VQ-VAE encoder (image pixels -> VQ codes; transformers has no decoder)."""
        return self.base_model.model.vqmodel

    # ------------------------------------------------------------------ encoding

    def image_codes(self, image: Image.Image) -> Tensor:
        """VQ codes ``[N]`` (raster order) of an image (processor resize + crop, VQ encoder)."""
        inputs = self.processor.image_processor(image.convert("RGB"), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.vqmodel.dtype)
        with torch.no_grad():
            codes = self.vqmodel.encode(pixels, return_dict=True).image_tokens.view(-1)
        if codes.numel() != self.num_image_tokens:
            raise ValueError(
                f"the VQ-VAE gave {codes.numel()} codes; the processor expects "
                f"image_seq_length={self.num_image_tokens}"
            )
        return codes.long().cpu()

    def _append_image(self, row: TokenRow, image: Image.Image, role: Role, target: int) -> None:
        row.append([self.boi_id], Role.SPECIAL)
        row.append(self._img2bpe[self.image_codes(image)].tolist(), role, target)
        row.append([self.eoi_id], Role.SPECIAL)

    def _append_image_prompt(self, row: TokenRow, image: Image.Image) -> None:
        self._append_image(row, image, Role.IMAGE_PROMPT, TARGET_NONE)

    def _append_image_response(self, row: TokenRow, image: Image.Image) -> None:
        self._append_image(row, image, Role.IMAGE_RESPONSE, TARGET_IMAGE)
        row.append([self.eos_id], Role.SPECIAL)

    # ------------------------------------------------------------------ generation

    def _banned_in_text(self) -> Tensor:
        return self._image_vocab

    def generate_image_codes(self, examples: Sequence[Any], batch_size: int = 4) -> list[Tensor]:
        """Greedy VQ codes ``[N]`` per prompt: ``<racm3:break>`` forced, then N tokens from
        ``lm_head`` restricted to the image vocabulary."""
        banned = (~self._image_vocab).to(self.device)

        def choose(step: int, hidden: Tensor) -> Tensor:
            logits = self.lm_head(hidden).float()
            return logits.masked_fill(banned, float("-inf")).argmax(-1)

        with torch.no_grad():
            prompts = []
            for example in examples:
                prompt = self._prompt_row(example)
                prompt.append([self.boi_id], Role.SPECIAL)
                prompts.append(prompt)
        tokens = self._greedy(
            prompts, self.num_image_tokens, choose, self._embed_ids, None, batch_size
        )
        return list(self._bpe2img[torch.tensor(tokens, dtype=torch.long)])

    def generate_images(self, examples: Sequence[Any], batch_size: int = 4) -> list[Any]:
        """Not available: raises NotImplementedError (no VQ decoder in ``transformers``)."""
        raise NotImplementedError(
            "Chameleon image generation cannot return pixels: transformers' ChameleonVQVAE "
            "has no decoder. Use generate_image_codes() for the greedy VQ codes."
        )


def save_tiny_chameleon(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Chameleon checkpoint (2 layers, d=32, 16-pixel images -> 16 image
    tokens, a byte-level tokenizer) that :meth:`ChameleonAdapter.load` reads; for tests."""
    codebook = 32
    special = ["<s>", "</s>", "<pad>", CHAMELEON_SEP, "<image>", "<racm3:break>", "<eoss>"]
    # Chameleon names image tokens IMGIMG + the code's digits as letters (0 -> A) + Z.
    image_tokens = [
        "IMGIMG" + "".join(chr(ord("A") + int(digit)) for digit in str(code)) + "Z"
        for code in range(codebook)
    ]
    tokenizer = byte_level_tokenizer(
        special + image_tokens,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        sep_token=CHAMELEON_SEP,
        extra_special_tokens={
            "image_token": "<image>",
            "boi_token": "<racm3:break>",
            "eoi_token": "<eoss>",
        },
    )
    image_processor = ChameleonImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    )
    processor = ChameleonProcessor(image_processor, tokenizer, image_seq_length=16)
    config = ChameleonConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        vq_config={
            "embed_dim": 8,
            "num_embeddings": codebook,
            "latent_channels": 8,
            "resolution": 16,
            "base_channels": 32,  # the VQ-VAE's GroupNorms need multiples of 32
            "channel_multiplier": [1, 1, 1],  # 4x downsampling: 16 pixels -> 4x4 codes
            "num_res_blocks": 1,
            "attn_resolutions": [],
        },
        vocabulary_map={
            token: tokenizer.convert_tokens_to_ids(token) for token in special + image_tokens
        },
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ChameleonForConditionalGeneration(config).eval()
    ChameleonAdapter(model, processor).save(directory)
    return Path(directory)
