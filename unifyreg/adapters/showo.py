"""Adapter for Show-o (1.3B): ``transformers`` ``PhiForCausalLM`` whose vocabulary is
extended by the image codebook and a mask token; images by masked-token prediction.

Vocabulary (Show-o's ``UniversalPrompting``): the text tokenizer (phi-1.5's) plus ``[PAD]``
and the nine tokens ``<|soi|> <|eoi|> <|sov|> <|eov|> <|t2i|> <|mmu|> <|t2v|> <|v2v|>
<|lvg|>``; then image code ``c`` is id ``len(tokenizer) + c``; the last id,
``vocab_size - 1``, is the mask token. ``<|endoftext|>`` is both ``<|sot|>`` and ``<|eot|>``.

Sequence formats (one example; right-padded in training batches):

- t2i (text prompt, image response): ``<|t2i|> <|sot|> prompt <|eot|> <|soi|> N codes <|eoi|>``
- mmu (image prompt, text response): ``<|mmu|> <|soi|> N codes <|eoi|> <|sot|> prefix prompt
  suffix answer <|eot|>`` (the template ``"USER: \\n" ... " ASSISTANT:"`` of Show-o's
  ``inference_mmu.py`` by default)
- lm (text only): ``<|sot|> prefix prompt suffix answer <|eot|>``

Show-o pads t2i text to 128 slots on the left; here the text is not padded: with rotary
positions, attention between real tokens depends only on their distance, which left
padding does not change, and padding is masked.

Omni-attention (Show-o's ``create_attention_mask_predict_next`` / ``..._for_mmu``): text is
causal; in t2i the span ``<|soi|> .. <|eoi|>`` attends to all of itself (image tokens are
bidirectional); in mmu the prefix ``<|mmu|> .. <|eoi|>`` does. Each batch carries this mask
as ``attention_mask_4d`` (float additive, the model dtype's minimum = blocked), built from
the per-position ``attention_block`` field (0 = causal only, 1 = inside the block).

Roles: task, ``<|sot|>``/``<|eot|>``, ``<|soi|>``/``<|eoi|>`` and template text are SPECIAL;
prompt words TEXT_PROMPT; a prompt image's N codes IMAGE_PROMPT; answer tokens (and their
``<|eot|>``, SPECIAL) TEXT_RESPONSE; a response image's N codes IMAGE_RESPONSE. Hidden
states: the outputs of ``model.layers`` (layer 0 = the input of the first layer).

Losses: text is next-token cross-entropy through ``lm_head`` over the answer tokens and
their ``<|eot|>``. Images are masked-token prediction: :meth:`ShowoAdapter.training_batch`
masks a share of each response image's codes, drawn per image as Show-o trains
(``t ~ U(0, 1)``, share ``max(schedule(t), min_masking_rate)``, at least one code;
``mask_schedule`` ``cosine`` ``cos(t pi / 2)``, ``linear`` ``1 - t`` or ``pow``
``1 - t^power``); the inputs there become the mask token, and the image loss is the
cross-entropy of ``lm_head`` (full vocabulary, no shift) at each masked position against
its code's id, over masked positions only (``image_tokens`` counts them; Show-o also
scores ``<|soi|>`` and ``<|eoi|>``, two trivial targets left out here). A batch without
``masked_positions`` (the probe's) scores no image target.

Image codes come from the user's image tokenizer (MAGVIT-v2 is in neither
``transformers`` nor ``diffusers``): an image may be :class:`unifyreg.images.ImageCodes`
(a manifest's ``image_codes`` / ``response_image_codes``), or the adapter holds an
``image_tokenizer`` with ``encode(images) -> codes [n, N]`` and
``decode(codes [n, N]) -> images``. Generation: text is greedy (image ids banned, stops
at ``<|eot|>``); images are MaskGIT-style (:meth:`ShowoAdapter.generate_image_codes`).

Show-o's released checkpoint (a folder with Show-o's ``config.json`` and one weights file
whose keys are ``showo.`` + a Phi key) loads through :func:`showo_state_dict_to_phi`;
see :meth:`ShowoAdapter.load`.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM

from unifyreg.adapters.base import TARGET_IMAGE, TARGET_NONE, TARGET_TEXT
from unifyreg.adapters.hf_common import (
    ADAPTER_SETTINGS_FILE,
    WEIGHT_FILES,
    PromptTemplate,
    TokenRow,
    TransformersAdapter,
    byte_level_tokenizer,
    resolve_dtype,
)
from unifyreg.images import ImageCodes, as_rgb_image
from unifyreg.roles import Role

__all__ = [
    "MASK_SCHEDULES",
    "SHOWO_PAD",
    "SHOWO_TOKENS",
    "ShowoAdapter",
    "block_attention_mask",
    "mask_schedule",
    "maskgit_mask_counts",
    "save_tiny_showo",
    "save_tiny_showo_release",
    "showo_state_dict_to_phi",
]

#: Show-o's added tokens, in the order ``UniversalPrompting`` adds them (after ``[PAD]``).
SHOWO_TOKENS = (
    "<|soi|>",
    "<|eoi|>",
    "<|sov|>",
    "<|eov|>",
    "<|t2i|>",
    "<|mmu|>",
    "<|t2v|>",
    "<|v2v|>",
    "<|lvg|>",
)
SHOWO_PAD = "[PAD]"
MASK_SCHEDULES = ("cosine", "linear", "pow")
#: Weight files of Show-o's released (diffusers-style) checkpoint, in the order looked for.
RELEASE_WEIGHT_FILES = (
    "pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "pytorch_model.bin",
    "diffusion_pytorch_model.bin",
)


def mask_schedule(name: str, ratio: Tensor, power: float = 2.0) -> Tensor:
    """Share of image tokens masked at ``ratio`` in [0, 1]: ``cosine`` ``cos(r pi / 2)``,
    ``linear`` ``1 - r``, ``pow`` ``1 - r^power`` (Show-o's ``get_mask_chedule``)."""
    if name == "cosine":
        return torch.cos(ratio * math.pi / 2)
    if name == "linear":
        return 1 - ratio
    if name == "pow":
        return 1 - ratio**power
    raise ValueError(f"mask_schedule must be one of {', '.join(MASK_SCHEDULES)}, got {name!r}")


def maskgit_mask_counts(
    num_tokens: int, timesteps: int, schedule: str = "cosine", power: float = 2.0
) -> list[int]:
    """Image positions still masked after each MaskGIT step but the last (which fills all):
    ``m_s = max(1, min(u_s - 1, floor(N * schedule((s + 1) / T))))`` with ``u_0 = N`` and
    ``u_{s+1} = m_s`` (Show-o's ``t2i_generate``)."""
    if num_tokens < 1 or timesteps < 1:
        raise ValueError(f"num_tokens and timesteps must be >= 1, got {num_tokens}, {timesteps}")
    counts, unknown = [], num_tokens
    for step in range(timesteps - 1):
        share = float(mask_schedule(schedule, torch.tensor((step + 1) / timesteps), power))
        unknown = max(1, min(unknown - 1, math.floor(num_tokens * share)))
        counts.append(unknown)
    return counts


def block_attention_mask(
    blocks: Tensor, attention_mask: Tensor, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``[B, 1, S, S]`` additive mask: causal, padding keys blocked, and every position of a
    block (``blocks[b, i] == k > 0``) attends to every position of the same block.
    0 = attend, ``finfo(dtype).min`` = blocked (finite: a row that sees nothing stays
    NaN-free)."""
    if blocks.shape != attention_mask.shape or blocks.dim() != 2:
        raise ValueError(
            f"blocks and attention_mask must both be [B, S], got {tuple(blocks.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    length = blocks.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=blocks.device).tril()
    same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] > 0)
    allowed = (causal[None] | same) & attention_mask.bool()[:, None, :]
    mask = torch.zeros((*blocks.shape, length), dtype=dtype, device=blocks.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def showo_state_dict_to_phi(
    state: Mapping[str, Tensor], expected: Sequence[str], source: str = "the checkpoint"
) -> dict[str, Tensor]:
    """Show-o's state dict -> ``PhiForCausalLM``'s: ``showo.<key>`` -> ``<key>``.

    ``mm_projector.*`` (the CLIP-ViT understanding variant) is dropped with a warning. A
    key the map does not know, a mapped key ``PhiForCausalLM`` lacks (``expected``), or an
    expected key the checkpoint lacks raises ValueError naming them (in Show-o's names).
    """
    mapped, unexpected, dropped = {}, [], []
    for key, value in state.items():
        if key.startswith("showo."):
            mapped[key.removeprefix("showo.")] = value
        elif key.startswith("mm_projector."):
            dropped.append(key)
        else:
            unexpected.append(key)
    wanted = set(expected)
    unexpected += [f"showo.{key}" for key in sorted(set(mapped) - wanted)]
    missing = [f"showo.{key}" for key in sorted(wanted - set(mapped))]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected key(s) {_some(sorted(unexpected))}")
        raise ValueError(f"{source} is not a Show-o checkpoint of this size: {'; '.join(parts)}")
    if dropped:
        warnings.warn(
            f"{source}: {len(dropped)} mm_projector.* weights (the CLIP-ViT understanding "
            "variant) are not used: the showo adapter reads images as MAGVIT-v2 codes",
            UserWarning,
            stacklevel=2,
        )
    return {key: mapped[key] for key in expected}


def _some(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


class ShowoAdapter(TransformersAdapter):
    """Adapter for Show-o (see the module docstring for formats, masks, roles, losses).

    ``image_tokenizer``: an object with ``encode(images) -> codes [n, N]`` and
    ``decode(codes [n, N]) -> images`` (None: images must arrive as
    :class:`~unifyreg.images.ImageCodes`). ``num_image_tokens`` N: codes per image (256
    for 256x256 Show-o). ``codebook_size``: default ``vocab_size - 1 - len(tokenizer)``.
    ``mask_schedule``, ``mask_schedule_power``, ``min_masking_rate``: the training mask.

    Example::

        adapter = ShowoAdapter.load("/models/show-o", phi_path="/models/phi-1_5",
                                    image_tokenizer=my_magvit)
        batch = adapter.training_batch(adapter.encode(examples))
        out = adapter.forward(batch)     # out.image_loss: masked-token cross-entropy
    """

    name = "showo"

    model_class = PhiForCausalLM
    model_type = "phi"
    language_model_path = "model"
    final_norm_name = "final_layernorm"
    lora_projections = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
    extra_fields = ("attention_block",)
    image_objective = "masked"
    default_template = PromptTemplate(prefix="USER: \n", suffix=" ASSISTANT:", response_lead=" ")

    def __init__(
        self,
        model: PhiForCausalLM,
        tokenizer: Any,
        template: PromptTemplate | None = None,
        image_tokenizer: Any = None,
        num_image_tokens: int = 256,
        codebook_size: int | None = None,
        mask_schedule: str = "cosine",
        mask_schedule_power: float = 2.0,
        min_masking_rate: float = 0.0,
    ):
        super().__init__(model, tokenizer, template)
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in (SHOWO_PAD, *SHOWO_TOKENS) if t not in vocab]
        if missing:
            raise ValueError(f"the Show-o tokenizer lacks the token(s) {missing}")
        ids = {token: int(vocab[token]) for token in SHOWO_TOKENS}
        self.soi_id, self.eoi_id = ids["<|soi|>"], ids["<|eoi|>"]
        self.t2i_id, self.mmu_id = ids["<|t2i|>"], ids["<|mmu|>"]
        self.sot_id = self.eot_id = self.eos_id
        vocab_size = int(self.lm_head.out_features)
        self.image_offset = len(self.tokenizer)
        self.mask_token_id = vocab_size - 1
        codebook = vocab_size - 1 - self.image_offset if codebook_size is None else codebook_size
        if codebook < 1 or self.image_offset + codebook > self.mask_token_id:
            raise ValueError(
                f"inconsistent Show-o vocabulary: {self.image_offset} text tokens + codebook "
                f"{codebook} + 1 mask token do not fit the model's {vocab_size} ids"
            )
        self.codebook_size = int(codebook)
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        self.num_image_tokens = int(num_image_tokens)
        if mask_schedule not in MASK_SCHEDULES:
            raise ValueError(
                f"mask_schedule must be one of {', '.join(MASK_SCHEDULES)}, got {mask_schedule!r}"
            )
        if not 0.0 <= min_masking_rate <= 1.0:
            raise ValueError(f"min_masking_rate must lie in [0, 1], got {min_masking_rate}")
        self.mask_schedule = mask_schedule
        self.mask_schedule_power = float(mask_schedule_power)
        self.min_masking_rate = float(min_masking_rate)
        self.image_tokenizer = image_tokenizer
        self._banned = torch.zeros(vocab_size, dtype=torch.bool)
        self._banned[self.image_offset :] = True
        self._banned[[int(vocab[t]) for t in (SHOWO_PAD, *SHOWO_TOKENS)]] = True

    def adapter_settings(self) -> dict[str, Any]:
        """Template, image-token count, codebook size and the training mask's settings."""
        return {
            **super().adapter_settings(),
            "num_image_tokens": self.num_image_tokens,
            "codebook_size": self.codebook_size,
            "mask_schedule": self.mask_schedule,
            "mask_schedule_power": self.mask_schedule_power,
            "min_masking_rate": self.min_masking_rate,
        }

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(  # type: ignore[override]
        cls,
        directory: str | Path,
        dtype: str | torch.dtype = "float32",
        trust_remote_code: bool = False,
        template: PromptTemplate | dict[str, Any] | None = None,
        image_tokenizer: Any = None,
        phi_path: str | Path | None = None,
        **settings: Any,
    ) -> ShowoAdapter:
        """Load a local Show-o checkpoint in either layout (never from a hub).

        - ``transformers`` layout (what :meth:`save` writes): ``config.json`` of model type
          ``phi``, its weights, the extended tokenizer and :data:`ADAPTER_SETTINGS_FILE`.
        - Show-o's released layout: Show-o's own ``config.json`` (``vocab_size``,
          ``codebook_size``, ``num_vq_tokens``, ...) and one weights file keyed
          ``showo.model.*`` / ``showo.lm_head.*`` (:func:`showo_state_dict_to_phi`). The
          backbone's ``PhiConfig`` and text tokenizer come from a local phi-1.5 folder:
          ``phi_path``, or ``"phi_path"`` in the folder's :data:`ADAPTER_SETTINGS_FILE`
          (relative to the folder); ``[PAD]`` and Show-o's nine tokens are added to the
          tokenizer in Show-o's order when absent. ``load(...).save(dir)`` converts.

        Further keyword ``settings`` override saved ones (see :class:`ShowoAdapter`).
        """
        if trust_remote_code:
            warnings.warn(
                "trust_remote_code=True is ignored by the 'showo' adapter: it loads "
                f"transformers' PhiForCausalLM, and no code from {str(directory)!r} is executed",
                UserWarning,
                stacklevel=2,
            )
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"model directory {str(directory)!r} does not exist (the showo adapter loads "
                "local directories only; download the weights there first)"
            )
        config_file = directory / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{str(directory)!r} is not a saved model: no config.json")
        config = json.loads(config_file.read_text())
        saved: dict[str, Any] = {}
        settings_file = directory / ADAPTER_SETTINGS_FILE
        if settings_file.is_file():
            saved = json.loads(settings_file.read_text())
            if saved.get("adapter", cls.name) != cls.name:
                raise ValueError(
                    f"{directory} was saved by the {saved['adapter']!r} adapter, not {cls.name!r}"
                )
        saved.pop("adapter", None)
        saved_phi = saved.pop("phi_path", None)
        torch_dtype = resolve_dtype(dtype)
        if config.get("model_type") == "phi":
            if not any((directory / name).is_file() for name in WEIGHT_FILES):
                raise FileNotFoundError(
                    f"{str(directory)!r} has a config.json but no weights "
                    f"(expected one of {', '.join(WEIGHT_FILES)})"
                )
            model = PhiForCausalLM.from_pretrained(
                directory, dtype=torch_dtype, local_files_only=True
            )
            tokenizer = _load_tokenizer(directory)
        elif config.get("_class_name") == "Showo" or {"codebook_size", "llm_vocab_size"} <= set(
            config
        ):
            phi = phi_path or (directory / saved_phi if saved_phi else None)
            if phi is None:
                raise FileNotFoundError(
                    f"{str(directory)!r} holds Show-o's released checkpoint; its Phi backbone "
                    f"config and text tokenizer come from a local phi-1.5 folder: pass "
                    f'phi_path=... or write {{"phi_path": "DIR"}} to {ADAPTER_SETTINGS_FILE} '
                    "in the checkpoint folder"
                )
            model, tokenizer = _load_release(directory, config, Path(phi), torch_dtype)
            saved.setdefault("num_image_tokens", int(config.get("num_vq_tokens", 256)))
            if "codebook_size" in config:
                saved.setdefault("codebook_size", int(config["codebook_size"]))
        else:
            raise ValueError(
                f"{str(directory)!r} holds a {config.get('model_type')!r} model; the showo "
                "adapter needs 'phi' (transformers layout) or Show-o's released checkpoint"
            )
        model.eval()
        if isinstance(template, dict):
            template = PromptTemplate.from_dict(template)
        if template is None and "template" in saved:
            template = PromptTemplate.from_dict(saved["template"])
        saved.pop("template", None)
        saved.update(settings)
        return cls(model, tokenizer, template=template, image_tokenizer=image_tokenizer, **saved)

    # ------------------------------------------------------------------ encoding

    def image_codes(self, image: Any) -> Tensor:
        """``[N]`` codes of an image: its :class:`~unifyreg.images.ImageCodes`, or the
        image tokenizer's ``encode``; ValueError for a wrong count or range."""
        if isinstance(image, ImageCodes):
            codes = torch.as_tensor(image.flat)
        elif self.image_tokenizer is not None:
            encoded = self.image_tokenizer.encode([as_rgb_image(image)])
            first = encoded[0]
            first = first.detach().cpu() if isinstance(first, Tensor) else np.asarray(first)
            codes = torch.as_tensor(first).reshape(-1)
        else:
            raise ValueError(
                "the showo adapter reads images as codes of Show-o's image tokenizer "
                "(MAGVIT-v2): give image_codes / response_image_codes (.npy) in the manifest, "
                "or load the adapter with image_tokenizer=..."
            )
        codes = codes.long()
        if codes.numel() != self.num_image_tokens:
            raise ValueError(
                f"an image has {codes.numel()} codes; this Show-o takes "
                f"{self.num_image_tokens} per image"
            )
        if int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size:
            raise ValueError(
                f"image codes must lie in [0, {self.codebook_size}), got "
                f"[{int(codes.min())}, {int(codes.max())}]"
            )
        return codes

    def _append_codes(self, row: TokenRow, codes: Tensor, role: Role, target: int) -> None:
        """``<|soi|> codes <|eoi|>`` inside attention block 1."""
        n = codes.numel()
        row.append([self.soi_id], Role.SPECIAL, attention_block=[1])
        ids = (codes + self.image_offset).tolist()
        row.append(ids, role, target, attention_block=[1] * n)
        row.append([self.eoi_id], Role.SPECIAL, attention_block=[1])

    def _t2i_prompt_row(self, prompt_text: str) -> TokenRow:
        """``<|t2i|> <|sot|> prompt <|eot|>`` (empty text: the unconditional prompt)."""
        row = self._new_row()
        row.append([self.t2i_id, self.sot_id], Role.SPECIAL)
        self._append_text(row, [(prompt_text, Role.TEXT_PROMPT, TARGET_NONE)])
        row.append([self.eot_id], Role.SPECIAL)
        return row

    def _prompt_row(self, example: Any) -> TokenRow:
        """The prompt of the example's format (module docstring): t2i when it answers with
        an image, else mmu (with an image prompt) or lm."""
        template = self.template
        if example.response_image is not None:
            if example.prompt_image is not None:
                raise ValueError("Show-o has no format for an image prompt with an image response")
            return self._t2i_prompt_row(example.prompt_text)
        row = self._new_row()
        if example.prompt_image is not None:
            row.append([self.mmu_id], Role.SPECIAL, attention_block=[1])
            codes = self.image_codes(example.prompt_image)
            self._append_codes(row, codes, Role.IMAGE_PROMPT, TARGET_NONE)
        row.append([self.sot_id], Role.SPECIAL)
        self._append_text(
            row,
            [
                (template.prefix, Role.SPECIAL, TARGET_NONE),
                (example.prompt_text, Role.TEXT_PROMPT, TARGET_NONE),
                (template.suffix, Role.SPECIAL, TARGET_NONE),
            ],
        )
        return row

    def encode_example(self, example: Any) -> TokenRow:
        """The full sequence of one example (prompt and reference response)."""
        row = self._prompt_row(example)
        if example.response_image is not None:
            codes = self.image_codes(example.response_image)
            self._append_codes(row, codes, Role.IMAGE_RESPONSE, TARGET_IMAGE)
        elif example.response_text is not None:
            self._append_text(
                row,
                [
                    (self.template.response_lead, Role.TEXT_RESPONSE, TARGET_TEXT),
                    (example.response_text, Role.TEXT_RESPONSE, TARGET_TEXT),
                ],
            )
            row.append([self.eot_id], Role.SPECIAL, TARGET_TEXT)
        return row

    def _collate(self, rows: Sequence[TokenRow], padding_side: str) -> dict[str, Tensor]:
        batch = super()._collate(rows, padding_side)
        batch["attention_mask_4d"] = block_attention_mask(
            batch["attention_block"], batch["attention_mask"], self.base_model.dtype
        )
        return batch

    def training_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch with ``masked_positions``: per row, a share ``max(schedule(t),
        min_masking_rate)`` of its image-response codes (``t ~ U(0, 1)``; rounded, at
        least one), a uniformly drawn subset (global torch generator: ``rand(B)`` for
        ``t``, then ``rand(B, S)`` for the subset). A batch that has them is unchanged."""
        if "masked_positions" in batch:
            return batch
        roles = batch["roles"]
        image = roles == int(Role.IMAGE_RESPONSE)
        size, length = roles.shape
        t = torch.rand(size)
        share = mask_schedule(self.mask_schedule, t, self.mask_schedule_power)
        share = share.clamp(min=self.min_masking_rate)
        counts = image.sum(dim=1).cpu()
        number = (counts * share).round().clamp(min=1)
        noise = torch.rand(size, length)
        noise = noise.masked_fill(~image.cpu(), 2.0)  # image positions rank first
        rank = noise.argsort(dim=1).argsort(dim=1)
        masked = image.cpu() & (rank < number[:, None])
        return {**batch, "masked_positions": masked.to(roles.device)}

    # ------------------------------------------------------------------ generation

    def _generation_attention_mask(self, batch: dict[str, Tensor], mask: Tensor) -> Tensor:
        return batch["attention_mask_4d"].to(mask.device)

    def _banned_in_text(self) -> Tensor:
        return self._banned

    @torch.no_grad()
    def generate_image_codes(
        self,
        examples: Sequence[Any],
        timesteps: int = 18,
        guidance_scale: float = 0.0,
        temperature: float = 0.0,
        seed: int = 0,
        batch_size: int = 4,
    ) -> list[Tensor]:
        """MaskGIT-style codes ``[N]`` for each example's text prompt (Show-o's
        ``t2i_generate``): all N image positions start masked; each of ``timesteps`` steps
        predicts every masked code (``lm_head`` over the codebook; ``guidance_scale`` g > 0:
        ``(1 + g) cond - g uncond`` with an empty prompt), keeps the known ones, and
        re-masks the :func:`maskgit_mask_counts` least confident (log-probability plus
        ``temperature * (1 - (s + 1) / T)`` Gumbel noise); the last step fills all.
        ``temperature = 0``: argmax codes, no noise (deterministic); > 0: codes sampled
        from the softmax with a generator seeded by ``seed``."""
        if timesteps < 1 or batch_size < 1:
            raise ValueError(
                f"timesteps and batch_size must be >= 1, got {timesteps}, {batch_size}"
            )
        was_training = self.model.training
        self.model.eval()
        generator = torch.Generator().manual_seed(seed)
        results: list[Tensor] = []
        try:
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                prompts = [e.prompt_text for e in chunk]
                if guidance_scale > 0:
                    prompts += [""] * len(chunk)
                results += self._maskgit(
                    prompts, len(chunk), timesteps, guidance_scale, temperature, generator
                )
        finally:
            self.model.train(was_training)
        return results

    def _maskgit(
        self,
        prompts: Sequence[str],
        count: int,
        timesteps: int,
        guidance_scale: float,
        temperature: float,
        generator: torch.Generator,
    ) -> list[Tensor]:
        n, k, device = self.num_image_tokens, self.codebook_size, self.device
        placeholder = torch.zeros(n, dtype=torch.long)
        rows = []
        for prompt in prompts:
            row = self._t2i_prompt_row(prompt)
            self._append_codes(row, placeholder, Role.IMAGE_RESPONSE, TARGET_NONE)
            rows.append(row)
        batch = self._collate(rows, "right")
        image = (batch["roles"] == int(Role.IMAGE_RESPONSE)).to(device)
        attention = batch["attention_mask_4d"].to(device)
        ids = batch["input_ids"].to(device)
        known = torch.full((count, n), -1, dtype=torch.long, device=device)
        counts = maskgit_mask_counts(n, timesteps, self.mask_schedule, self.mask_schedule_power)
        sampled = known
        for step in range(timesteps):
            current = known.repeat(len(prompts) // count, 1)
            ids = ids.masked_scatter(
                image,
                torch.where(current < 0, self.mask_token_id, current + self.image_offset),
            )
            hidden = self.language_model(
                inputs_embeds=self.embed_tokens(ids), attention_mask=attention, use_cache=False
            ).last_hidden_state
            logits = self.lm_head(hidden[image].view(len(prompts), n, -1)).float()
            logits = logits[..., self.image_offset : self.image_offset + k]
            if guidance_scale > 0:
                logits = (1 + guidance_scale) * logits[:count] - guidance_scale * logits[count:]
            log_probs = logits.log_softmax(dim=-1)
            if temperature > 0:
                flat = log_probs.exp().view(-1, k).cpu()
                draw = torch.multinomial(flat, 1, generator=generator).view(count, n)
                sampled = draw.to(device)
            else:
                sampled = log_probs.argmax(dim=-1)
            unknown = known < 0
            sampled = torch.where(unknown, sampled, known)
            if step == timesteps - 1:
                break
            confidence = log_probs.gather(-1, sampled[..., None]).squeeze(-1)
            if temperature > 0:
                uniform = torch.rand(confidence.shape, generator=generator).to(device)
                gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0)).clamp_min(1e-20))
                confidence = confidence + temperature * (1 - (step + 1) / timesteps) * gumbel
            confidence = confidence.masked_fill(~unknown, float("inf"))
            rank = confidence.argsort(dim=-1).argsort(dim=-1)
            known = torch.where(rank < counts[step], -1, sampled)
        return list(sampled.cpu())

    def generate_images(self, examples: Sequence[Any], **kwargs: Any) -> list[Any]:
        """:meth:`generate_image_codes` decoded by the image tokenizer, or as
        :class:`~unifyreg.images.ImageCodes` when the adapter has none."""
        codes = self.generate_image_codes(examples, **kwargs)
        if self.image_tokenizer is None:
            return [ImageCodes(c.numpy()) for c in codes]
        return list(self.image_tokenizer.decode(torch.stack(codes)))


def _load_tokenizer(directory: Path) -> Any:
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise FileNotFoundError(
            f"{str(directory)!r} holds a model but no usable tokenizer: {error}"
        ) from error


def _load_release(
    directory: Path, config: dict[str, Any], phi_path: Path, dtype: torch.dtype
) -> tuple[PhiForCausalLM, Any]:
    """Model and tokenizer from Show-o's released layout (see :meth:`ShowoAdapter.load`)."""
    if not (phi_path / "config.json").is_file():
        raise FileNotFoundError(f"phi_path {str(phi_path)!r} holds no config.json (phi-1.5's)")
    weights = next((directory / n for n in RELEASE_WEIGHT_FILES if (directory / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(
            f"{str(directory)!r} has Show-o's config.json but no weights "
            f"(expected one of {', '.join(RELEASE_WEIGHT_FILES)})"
        )
    tokenizer = _load_tokenizer(phi_path)
    if SHOWO_PAD not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"pad_token": SHOWO_PAD})
    else:
        tokenizer.pad_token = SHOWO_PAD
    tokenizer.add_tokens([t for t in SHOWO_TOKENS if t not in tokenizer.get_vocab()])
    if "llm_vocab_size" in config:
        expected = int(config["llm_vocab_size"]) + int(config.get("num_new_special_tokens", 10))
        if len(tokenizer) != expected:
            raise ValueError(
                f"the tokenizer of {str(phi_path)!r} has {len(tokenizer)} tokens with Show-o's; "
                f"the checkpoint expects llm_vocab_size + num_new_special_tokens = {expected}"
            )
    phi_config = PhiConfig.from_pretrained(phi_path, local_files_only=True)
    phi_config.vocab_size = int(config["vocab_size"])
    phi_config.pad_token_id = int(tokenizer.pad_token_id)
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(weights)
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # an older transformers: initialise, then overwrite
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = PhiForCausalLM(phi_config)
    expected_keys = list(model.state_dict())
    model.load_state_dict(showo_state_dict_to_phi(state, expected_keys, str(weights)))
    return model.to(dtype), tokenizer


# ---------------------------------------------------------------------- tiny checkpoints


def _tiny_phi_config(vocab_size: int, tokenizer: Any) -> PhiConfig:
    return PhiConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        partial_rotary_factor=0.5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_tokenizer(with_showo_tokens: bool) -> Any:
    extra = [SHOWO_PAD, *SHOWO_TOKENS] if with_showo_tokens else []
    named = {"pad_token": SHOWO_PAD} if with_showo_tokens else {}
    return byte_level_tokenizer(
        ["<|endoftext|>", *extra],
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        **named,
    )


#: Codebook size and image tokens of the tiny checkpoints (4x4 codes per image).
TINY_CODEBOOK, TINY_IMAGE_TOKENS = 32, 16


def save_tiny_showo(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Show-o (``PhiForCausalLM``, 2 layers, d=32, a byte-level
    tokenizer with Show-o's tokens, codebook 32, 16 codes per image) with
    ``save_pretrained``; :meth:`ShowoAdapter.load` reads it. For tests and smoke runs."""
    tokenizer = _tiny_tokenizer(with_showo_tokens=True)
    config = _tiny_phi_config(len(tokenizer) + TINY_CODEBOOK + 1, tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = PhiForCausalLM(config).eval()
    ShowoAdapter(model, tokenizer, num_image_tokens=TINY_IMAGE_TOKENS).save(directory)
    return Path(directory)


def save_tiny_showo_release(directory: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write a tiny random checkpoint in Show-o's *released* layout: ``directory/showo``
    (Show-o's ``config.json`` + ``pytorch_model.bin`` keyed ``showo.model.*`` /
    ``showo.lm_head.*``) and ``directory/phi`` (a ``PhiConfig`` and a text tokenizer
    without Show-o's tokens, as phi-1.5's). Returns ``(showo_dir, phi_dir)``."""
    directory = Path(directory)
    showo_dir, phi_dir = directory / "showo", directory / "phi"
    showo_dir.mkdir(parents=True, exist_ok=True)
    phi_dir.mkdir(parents=True, exist_ok=True)
    text_tokenizer = _tiny_tokenizer(with_showo_tokens=False)
    extended = len(text_tokenizer) + 1 + len(SHOWO_TOKENS)
    vocab_size = extended + TINY_CODEBOOK + 1
    tokenizer = _tiny_tokenizer(with_showo_tokens=True)
    config = _tiny_phi_config(vocab_size, tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = PhiForCausalLM(config).eval()
    state = {f"showo.{key}": value for key, value in model.state_dict().items()}
    torch.save(state, showo_dir / "pytorch_model.bin")
    showo_config = {
        "_class_name": "Showo",
        "w_clip_vit": False,
        "vocab_size": vocab_size,
        "llm_vocab_size": len(text_tokenizer),
        "llm_model_path": "microsoft/phi-1_5",
        "codebook_size": TINY_CODEBOOK,
        "num_vq_tokens": TINY_IMAGE_TOKENS,
        "num_new_special_tokens": 1 + len(SHOWO_TOKENS),
    }
    (showo_dir / "config.json").write_text(json.dumps(showo_config, indent=2))
    phi_config = _tiny_phi_config(320, text_tokenizer)  # phi-1.5 pads its vocabulary too
    phi_config.save_pretrained(phi_dir)
    text_tokenizer.save_pretrained(phi_dir)
    return showo_dir, phi_dir
