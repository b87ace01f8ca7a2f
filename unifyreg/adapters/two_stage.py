"""Two-stage models: a multimodal LLM conditions a separate diffusion transformer.

A two-stage model reads images and writes text with a ``transformers`` multimodal LLM
(``Qwen2_5_VLForConditionalGeneration``), and draws images with a diffusion transformer
(the *denoiser*) that takes the LLM's last hidden states of the prompt as its
conditioning, on the latents of a VAE, by flow matching. The adapter loads the parts
from a local diffusers-style pipeline folder (``model_index.json`` with ``text_encoder/``
or ``mllm/``, ``tokenizer/`` or the tokenizer of ``processor/``, ``transformer/``,
``vae/``, ``scheduler/``; ``processor/`` optional: its image processor, else Qwen2-VL's
defaults), and holds them in one module (:class:`TwoStageModel`) that LoRA wraps and
Lightning trains.

Native: **Qwen-Image** and **Qwen-Image-Edit** (``QwenImageTransformer2DModel``,
``AutoencoderKLQwenImage``, ``FlowMatchEulerDiscreteScheduler``; :class:`QwenImageDenoiser`).
Other denoisers come in through the same adapter with the user's transformer class and a
:class:`Denoiser` that says how to run and read it (``TwoStageAdapter.load(dir,
transformer_class=..., denoiser=...)``): OmniGen2, whose ``OmniGen2Transformer2DModel`` is
not in diffusers (README, "Two-stage models"). :class:`Lumina2Denoiser` runs diffusers'
``Lumina2Transformer2DModel``, whose blocks have OmniGen2's layout, the same way.

**Sequences.** Every example is one row of the LLM in Qwen's chat format:
``<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n [<|vision_start|> image pads
<|vision_end|>] {prompt}<|im_end|>\\n [<|im_start|>assistant\\n [response <|im_end|>]]``. The
system text depends on the example: Qwen-Image's drawing instruction for text-to-image,
its edit instruction when an image prompt comes with an image response (the LLM sees the
source image), the plain chat system otherwise (understanding, text). Roles: scaffolding
SPECIAL, prompt words TEXT_PROMPT, the image's pad tokens IMAGE_PROMPT, the answer
TEXT_RESPONSE (its words and the closing ``<|im_end|>`` are the text targets, scored by the
LLM's own ``lm_head``, next token).

An example with an image response is also a row of the denoiser. Its conditioning is the
LLM's last hidden state (after the final norm, ``hidden_states[-1]`` as the pipelines
take it) of every prompt token after the system part (Qwen-Image drops those 34 / 64
tokens; ``template.drop_system``), padded per batch with a mask. The denoiser's sequence
is what its blocks read; for Qwen-Image's double-stream blocks, which return ``(text,
image)``, it is both streams concatenated per layer (``[conditioning; target latents;
source-image latents]``, equal widths inside the DiT). Its roles: the conditioning keeps
the LLM's roles (TEXT_PROMPT, IMAGE_PROMPT, SPECIAL; PAD for padding), the target
latents' tokens are IMAGE_RESPONSE and an edit's source latents IMAGE_PROMPT. Batches
carry them as ``denoiser_roles`` (:meth:`TwoStageAdapter.generation_roles`).

**Hidden states: two stacks.** The primary stack is the LLM's decoder layers
(``mllm.model.language_model.layers``; ``probe.final_norm`` swaps the last one for its
final norm), serving ``encoding/text``, ``encoding/image`` and ``response/text``. The
denoiser's blocks are a second stack (``ForwardOutput.extra_stacks``, name ``denoiser``,
depth = its number of blocks, rows = the batch's image rows) serving ``response/image``:
the proxy ``H(R | P)`` with R = the target latents' tokens and P = the conditioning (and
source-image) tokens, inside the denoiser, where the image is made. The LLM never holds
the image response. Layers asked for name the LLM's layers; the denoiser is read at the
same depth fractions (:func:`unifyreg.adapters.base.fraction_layers`), all of its layers
when all are asked for. Its last layer is always its last block's output (its final norm
is modulated by the time and reads the image stream only).

**Losses.** Text: next-token cross-entropy of ``lm_head`` over the text targets. Image:
flow matching (:mod:`unifyreg.adapters.continuous`), the denoiser's own convention
(Qwen-Image: ``x_t = (1 - sigma) x_0 + sigma eps``, target ``eps - x_0``, ``timestep =
sigma``) on the VAE's normalised latents (``(z - latents_mean) / latents_std``; the mode of
the posterior, so a batch is deterministic), packed into the denoiser's 2 x 2 patch tokens;
the mean squared error over every element of the scored tokens, counted in tokens
(``image_loss_kind = "mse"``). The noise level of each row is the batch's ``timesteps``
(training: drawn from ``schedule`` by :meth:`TwoStageAdapter.training_batch`, uniform by
default as Qwen-Image's LoRA script; the probe: ``probe.timestep``; otherwise 0.5) and its
noise is seeded by ``noise_seeds`` (``encode``: a stable hash of the example). With
``masked_positions`` (over ``denoiser_roles``: the continuous ``L_ctx``) only the masked
latent tokens are scored, and their inputs (the first block's input) are what the
embedding hook puts there: the learned mask latent.

**Generation.** Text: greedy from the LLM (``generate``). Images: the flow ODE from
seeded noise with the pipeline's scheduler (its sigmas and shift; ``num_inference_steps``),
no classifier-free guidance, decoded by the VAE; returns RGB PIL images.

Images are resized to ``image_size`` (height, width: multiples of 16 for Qwen-Image), all
the same size, so the latents of a batch stack; aspect ratio is not kept.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from unifyreg.adapters.base import (
    FINAL_NORM_DEFAULT,
    TARGET_NONE,
    TARGET_TEXT,
    Adapter,
    EmbeddingHook,
    ForwardOutput,
    HiddenStack,
    LayerStack,
    capture_hidden_states,
    fraction_layers,
)
from unifyreg.adapters.continuous import (
    DEFAULT_PROBE_TIMESTEP,
    FLOW_CONVENTIONS,
    FlowConvention,
    FlowSchedule,
    example_seed,
    flow_mse,
    flow_training_batch,
    seeded_noise,
)
from unifyreg.adapters.hf_common import (
    LORA_PROJECTIONS,
    TokenRow,
    append_text_spans,
    byte_level_tokenizer,
    resolve_dtype,
)
from unifyreg.images import as_rgb_image
from unifyreg.roles import Role

__all__ = [
    "CHAT_SYSTEM",
    "QWEN_IMAGE_EDIT_SYSTEM",
    "QWEN_IMAGE_T2I_SYSTEM",
    "SETTINGS_FILE",
    "Denoiser",
    "LatentCodec",
    "Lumina2Denoiser",
    "NATIVE_DENOISERS",
    "QwenImageDenoiser",
    "TwoStageAdapter",
    "TwoStageModel",
    "TwoStageTemplate",
    "pack_latents",
    "save_tiny_two_stage",
    "unpack_latents",
]

#: unifyreg's own settings inside the pipeline folder (optional).
SETTINGS_FILE = "unifyreg_adapter.json"
#: Qwen-Image's system text for text-to-image (``QwenImagePipeline``'s template).
QWEN_IMAGE_T2I_SYSTEM = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:"
)
#: Qwen-Image-Edit's system text (``QwenImageEditPipeline``'s template, as recalled; set
#: ``template.edit_system`` to the checkpoint's own if it differs).
QWEN_IMAGE_EDIT_SYSTEM = (
    "Describe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the "
    "image. Generate a new image that meets the user's requirements while maintaining "
    "consistency with the original input where appropriate."
)
#: Qwen2.5-VL's default chat system text (understanding and text examples).
CHAT_SYSTEM = "You are a helpful assistant."
#: The chat scaffolding's special tokens (Qwen2 vocabulary).
CHAT_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
)
#: Batch keys of the LLM's sequence (trimmed with it when rows are selected).
LLM_KEYS = ("input_ids", "attention_mask", "roles", "target_kind")
#: Component folder names a pipeline may use for the multimodal LLM.
MLLM_COMPONENTS = ("text_encoder", "mllm")


@dataclass(frozen=True)
class TwoStageTemplate:
    """The chat format around an example (module docstring).

    ``t2i_system`` / ``edit_system`` / ``chat_system``: the system text of text-to-image,
    edit (image prompt + image response) and understanding/text rows; ``drop_system``: the
    denoiser's conditioning leaves the system part out (Qwen-Image: true; OmniGen2: false);
    ``assistant_header``: image rows end with ``<|im_start|>assistant\\n`` (Qwen-Image: true;
    OmniGen2, ``add_generation_prompt=False``: false); ``edit_image_in_prompt``: the LLM sees
    an edit's source image (Qwen-Image-Edit: true; OmniGen2 gives it to the denoiser only).
    """

    t2i_system: str = QWEN_IMAGE_T2I_SYSTEM
    edit_system: str = QWEN_IMAGE_EDIT_SYSTEM
    chat_system: str = CHAT_SYSTEM
    drop_system: bool = True
    assistant_header: bool = True
    edit_image_in_prompt: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TwoStageTemplate:
        """Inverse of ``dataclasses.asdict``; unknown keys raise ValueError naming them."""
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown template field(s) {unknown}")
        return cls(**data)


# ---------------------------------------------------------------------- denoisers


def pack_latents(latents: Tensor, patch: int = 2) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), C p p]``: ``p x p`` patches in raster order,
    channel-major inside a patch (Qwen-Image's ``_pack_latents``)."""
    b, c, h, w = latents.shape
    if h % patch or w % patch:
        raise ValueError(f"latent size {h}x{w} is not a multiple of the patch size {patch}")
    x = latents.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack_latents(tokens: Tensor, height: int, width: int, patch: int = 2) -> Tensor:
    """Inverse of :func:`pack_latents` for a latent grid of ``height x width``."""
    b, _, d = tokens.shape
    c = d // (patch * patch)
    x = tokens.view(b, height // patch, width // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


class Denoiser:
    """How the adapter runs and reads one family's diffusion transformer.

    Subclass for a transformer diffusers does not have (OmniGen2's): set ``flow`` (its
    :class:`~unifyreg.adapters.continuous.FlowConvention`), ``blocks`` (the dotted path of
    its block list inside the transformer) and ``lora_projections`` (the final names of
    the blocks' linear layers LoRA adapts), and implement :meth:`predict`; override
    :meth:`block_input` / :meth:`replace_block_input` / :meth:`block_output` when a block
    does not read and return one ``[B, S, d]`` tensor, and :meth:`sequence_roles` when the
    blocks' sequence is not ``[conditioning (padded); target tokens; source tokens]``.
    Latents are ``[B, C, H, W]`` (normalised), tokens :func:`pack_latents` of them.
    """

    name = "denoiser"
    flow: FlowConvention = FLOW_CONVENTIONS["qwen_image"]
    blocks: str = "transformer_blocks"
    patch: int = 2
    lora_projections: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    def width(self, transformer: nn.Module) -> int:
        """Width of the blocks' hidden states (``inner_dim``)."""
        config = transformer.config
        return int(config.num_attention_heads * config.attention_head_dim)

    def predict(
        self,
        transformer: nn.Module,
        tokens: Tensor,
        condition: Tensor | None,
        prompt: Tensor,
        prompt_mask: Tensor,
        time: Tensor,
        grid: tuple[int, int],
    ) -> Tensor:
        """The transformer's output ``[b, N, c]`` for the noisy target tokens ``[b, N, c]``
        (``grid``: the latent height and width), the packed source latents of an edit
        ``[b, N_c, c]`` (or None), the prompt embeddings ``[b, L, D]`` with their mask
        ``[b, L]`` (1 = valid) and the model time ``[b]`` (``flow.model_time``)."""
        raise NotImplementedError

    def sequence_roles(self, prompt_roles: Tensor, n_target: int, n_condition: int) -> Tensor:
        """``[b, S]`` roles of the blocks' sequence, from the conditioning's roles ``[b, L]``
        (PAD where padded): default ``[conditioning; target (IMAGE_RESPONSE); source
        (IMAGE_PROMPT)]``."""
        b = prompt_roles.shape[0]
        target = torch.full((b, n_target), int(Role.IMAGE_RESPONSE), dtype=torch.long)
        source = torch.full((b, n_condition), int(Role.IMAGE_PROMPT), dtype=torch.long)
        return torch.cat([prompt_roles.long(), target, source], dim=1)

    def block_input(self, args: tuple, kwargs: dict) -> Tensor:
        """The ``[b, S, d]`` sequence a block reads (default: its first argument)."""
        if args and isinstance(args[0], Tensor):
            return args[0]
        return kwargs["hidden_states"]

    def replace_block_input(self, args: tuple, kwargs: dict, value: Tensor) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with the block's sequence replaced by ``value``."""
        if args and isinstance(args[0], Tensor):
            return (value, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": value}

    def block_output(self, output: Any) -> Tensor:
        """The ``[b, S, d]`` sequence a block returns (default: the tensor or its first)."""
        return output[0] if isinstance(output, (tuple, list)) else output


class QwenImageDenoiser(Denoiser):
    """diffusers' ``QwenImageTransformer2DModel`` (Qwen-Image, Qwen-Image-Edit).

    Double-stream blocks: each reads ``hidden_states`` (image) and
    ``encoder_hidden_states`` (text) and returns ``(text, image)``; the sequence read here is
    ``[text; image]`` (equal widths). ``img_shapes`` per row: ``[(1, H/2, W/2)]`` plus the
    source image's for an edit, whose tokens follow the target's (the output keeps the
    target's). Time: sigma (1 = noise), ``x_t = (1 - sigma) x_0 + sigma eps``, target
    ``eps - x_0``. LoRA: the joint attention's image and text projections.
    """

    name = "qwen_image"
    flow = FLOW_CONVENTIONS["qwen_image"]
    blocks = "transformer_blocks"
    lora_projections = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    )

    def predict(self, transformer, tokens, condition, prompt, prompt_mask, time, grid):
        h, w = grid[0] // self.patch, grid[1] // self.patch
        shapes = [(1, h, w)]
        hidden = tokens
        if condition is not None:
            hidden = torch.cat([tokens, condition], dim=1)
            shapes.append((1, h, w))  # source images are resized to the target's size
        out = transformer(
            hidden_states=hidden,
            encoder_hidden_states=prompt,
            encoder_hidden_states_mask=prompt_mask,
            timestep=time,
            img_shapes=[shapes] * tokens.shape[0],
            return_dict=False,
        )[0]
        return out[:, : tokens.shape[1]]

    def block_input(self, args, kwargs):
        image = args[0] if args else kwargs["hidden_states"]
        text = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
        return torch.cat([text, image], dim=1)

    def replace_block_input(self, args, kwargs, value):
        text_len = (args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]).shape[1]
        text, image = value[:, :text_len], value[:, text_len:]
        if len(args) > 1:
            return (image, text, *args[2:]), kwargs
        if args:
            return (image, *args[1:]), {**kwargs, "encoder_hidden_states": text}
        return args, {**kwargs, "hidden_states": image, "encoder_hidden_states": text}

    def block_output(self, output):
        text, image = output
        return torch.cat([text, image], dim=1)


class Lumina2Denoiser(Denoiser):
    """diffusers' ``Lumina2Transformer2DModel``: single-stream joint blocks (``layers``) over
    ``[caption_i; image]`` per row, padded at the end, whose layout OmniGen2's blocks share.

    The sequence read here is the joint blocks' input (after the context and noise
    refiners). Time ``1 - t`` (1 = data), target ``x_0 - eps`` (the pipeline negates the
    output before its Euler step). No source images (OmniGen2 adds its reference images
    with modules Lumina2 lacks). Also the worked example of a user :class:`Denoiser`.
    """

    name = "lumina2"
    flow = FLOW_CONVENTIONS["lumina2"]
    blocks = "layers"
    lora_projections = ("to_q", "to_k", "to_v", "to_out.0")

    def width(self, transformer):
        return int(transformer.config.hidden_size)

    def predict(self, transformer, tokens, condition, prompt, prompt_mask, time, grid):
        if condition is not None:
            raise ValueError("the lumina2 denoiser takes no source images")
        latents = unpack_latents(tokens, grid[0], grid[1], self.patch)
        out = transformer(
            hidden_states=latents,
            timestep=time,
            encoder_hidden_states=prompt,
            encoder_attention_mask=prompt_mask.bool(),
            return_dict=False,
        )[0]
        return pack_latents(out, self.patch)

    def sequence_roles(self, prompt_roles, n_target, n_condition):
        b, length = prompt_roles.shape
        out = torch.zeros((b, length + n_target), dtype=torch.long)  # PAD
        for i in range(b):
            kept = prompt_roles[i][prompt_roles[i] != int(Role.PAD)]
            out[i, : kept.numel()] = kept
            out[i, kept.numel() : kept.numel() + n_target] = int(Role.IMAGE_RESPONSE)
        return out


#: Denoisers diffusers ships, by the transformer's class name in ``model_index.json``.
NATIVE_DENOISERS: dict[str, type[Denoiser]] = {
    "QwenImageTransformer2DModel": QwenImageDenoiser,
}


# ---------------------------------------------------------------------- the VAE


class LatentCodec:
    """The VAE between pixels ``[B, 3, H, W]`` in ``[-1, 1]`` and normalised latents
    ``[B, C, H/f, W/f]``: ``AutoencoderKLQwenImage`` (a causal video VAE: one frame,
    ``(z - latents_mean) / latents_std``) or an ``AutoencoderKL`` (FLUX's, OmniGen2's:
    ``(z - shift_factor) * scaling_factor``). Encoding takes the posterior's mode."""

    def __init__(self, vae: nn.Module) -> None:
        self.vae = vae
        config = vae.config
        self.video = hasattr(config, "latents_mean") and hasattr(config, "temperal_downsample")
        if self.video:
            self.factor = 2 ** len(config.temperal_downsample)
            self.channels = int(config.z_dim)
        else:
            self.factor = 2 ** (len(config.block_out_channels) - 1)
            self.channels = int(config.latent_channels)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        config = self.vae.config
        if self.video:
            mean = torch.tensor(config.latents_mean, dtype=like.dtype, device=like.device)
            std = torch.tensor(config.latents_std, dtype=like.dtype, device=like.device)
            return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        shift = float(getattr(config, "shift_factor", None) or 0.0)
        scale = float(getattr(config, "scaling_factor", None) or 1.0)
        return like.new_tensor(shift).view(1, 1, 1, 1), like.new_tensor(1 / scale).view(1, 1, 1, 1)

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Normalised latents of ``pixels`` (the posterior's mode)."""
        pixels = pixels.to(self.vae.device, self.vae.dtype)
        if self.video:
            z = self.vae.encode(pixels[:, :, None]).latent_dist.mode()[:, :, 0]
        else:
            z = self.vae.encode(pixels).latent_dist.mode()
        mean, std = self._stats(z)
        return (z - mean) / std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Pixels in ``[-1, 1]`` of normalised latents."""
        latents = latents.to(self.vae.device, self.vae.dtype)
        mean, std = self._stats(latents)
        z = latents * std + mean
        if self.video:
            return self.vae.decode(z[:, :, None]).sample[:, :, 0].clamp(-1, 1)
        return self.vae.decode(z).sample.clamp(-1, 1)


# ---------------------------------------------------------------------- the model


class TwoStageModel(nn.Module):
    """The pipeline's trained parts as one module: ``mllm`` (the multimodal LLM),
    ``transformer`` (the denoiser) and ``vae`` (frozen: no gradient)."""

    def __init__(self, mllm: nn.Module, transformer: nn.Module, vae: nn.Module) -> None:
        super().__init__()
        self.mllm = mllm
        self.transformer = transformer
        self.vae = vae
        self.vae.requires_grad_(False)


@dataclass
class _Row:
    """One example as the adapter encodes it: the LLM row, its image, and what the
    denoiser needs (its conditioning starts at ``condition_start`` of the LLM row)."""

    tokens: TokenRow
    pixel_values: Tensor | None = None
    image_grid: Tensor | None = None
    condition_start: int = -1  # -1: not an image row
    response_image: Image.Image | None = None
    source_image: Image.Image | None = None
    seed: int = 0


def _pil_to_pixels(image: Image.Image, size: tuple[int, int]) -> Tensor:
    """``[3, H, W]`` in ``[-1, 1]`` of ``image`` resized (bicubic) to ``size`` (height, width)."""
    resized = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
    array = np.asarray(resized, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def _pixels_to_pil(pixels: Tensor) -> Image.Image:
    array = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), mode="RGB")


class TwoStageAdapter(Adapter):
    """A multimodal LLM + a diffusion transformer + VAE + scheduler (module docstring).

    Example::

        adapter = TwoStageAdapter.load("Qwen-Image")            # a local pipeline folder
        result = run_probe(adapter, probe_examples, ProbeConfig())
        # OmniGen2 (its transformer class is not in diffusers):
        adapter = TwoStageAdapter.load("OmniGen2", transformer_class=OmniGen2Transformer2DModel,
                                       denoiser=MyOmniGen2Denoiser(), template=OMNIGEN2)
    """

    name = "two_stage"
    image_objective = "flow"
    supports_masked_prediction = True
    layer_stack = LayerStack("mllm.model.language_model.layers", "mllm.model.language_model.norm")

    def __init__(
        self,
        model: TwoStageModel,
        tokenizer: Any,
        image_processor: Any,
        scheduler: Any,
        denoiser: Denoiser,
        *,
        template: TwoStageTemplate | dict[str, Any] | None = None,
        image_size: Sequence[int] = (512, 512),
        schedule: FlowSchedule | dict[str, Any] | None = None,
        num_inference_steps: int = 50,
        components: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.scheduler = scheduler
        self.denoiser = denoiser
        if isinstance(template, dict):
            template = TwoStageTemplate.from_dict(template)
        self.template = template or TwoStageTemplate()
        self.schedule = (
            schedule if isinstance(schedule, FlowSchedule) else FlowSchedule.from_dict(schedule)
        )
        if isinstance(num_inference_steps, bool) or int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps!r}")
        self.num_inference_steps = int(num_inference_steps)
        self.codec = LatentCodec(model.vae)
        self.image_size = tuple(int(v) for v in image_size)
        step = self.codec.factor * denoiser.patch
        if len(self.image_size) != 2 or any(v < step or v % step for v in self.image_size):
            raise ValueError(
                f"image_size must be [height, width], multiples of {step} (the VAE's factor "
                f"{self.codec.factor} times the patch size {denoiser.patch}), got {image_size!r}"
            )
        #: Folder names of the loaded components (``save`` writes the same layout).
        self.components = dict(components or {})
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in CHAT_TOKENS}
        unknown = sorted(t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id)
        if unknown:
            raise ValueError(f"the tokenizer lacks the chat tokens {unknown}")
        self.token_ids = ids
        config = self.mllm.config
        self.image_token_id = int(config.image_token_id)
        if self.image_token_id != ids["<|image_pad|>"]:
            raise ValueError("the MLLM's image_token_id is not the tokenizer's <|image_pad|>")
        self.max_positions = int(self.text_config.max_position_embeddings)
        self.default_lora_targets = self.lora_target_module_names()

    # ------------------------------------------------------------------ parts

    @property
    def parts(self) -> TwoStageModel:
        """The :class:`TwoStageModel` under any peft wrapper."""
        return self.base_model  # type: ignore[return-value]

    @property
    def mllm(self) -> nn.Module:
        """The multimodal LLM (``Qwen2_5_VLForConditionalGeneration``)."""
        return self.parts.mllm

    @property
    def transformer(self) -> nn.Module:
        """The denoiser (the pipeline's diffusion transformer)."""
        return self.parts.transformer

    @property
    def text_config(self) -> Any:
        """The LLM's text config (vocabulary, width, depth, positions)."""
        return self.mllm.config.get_text_config()

    @property
    def hidden_size(self) -> int:
        """Width of the LLM's hidden states."""
        return int(self.text_config.hidden_size)

    @property
    def mask_width(self) -> int:
        """Width of the denoiser's sequence (the learned mask latent of ``L_ctx``)."""
        return self.denoiser.width(self.transformer)

    @property
    def denoiser_depth(self) -> int:
        """The denoiser's number of blocks."""
        return len(self.denoiser_stack.modules(self.parts)[0])

    @property
    def denoiser_stack(self) -> LayerStack:
        """The denoiser's blocks as a :class:`LayerStack` (no final norm)."""
        return LayerStack(
            f"transformer.{self.denoiser.blocks}",
            "",
            self.denoiser.block_output,
            self.denoiser.block_input,
        )

    def lora_target_module_names(self) -> tuple[str, ...]:
        """Full names of the LLM layers' projections (q/k/v/o/gate/up/down) and of the
        denoiser blocks' :attr:`Denoiser.lora_projections` (linear layers only)."""
        llm = "mllm.model.language_model.layers."
        blocks = f"transformer.{self.denoiser.blocks}."
        names = []
        for name, module in self.parts.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if name.startswith(llm) and name.rsplit(".", 1)[-1] in LORA_PROJECTIONS:
                names.append(name)
            elif name.startswith(blocks) and any(
                name.endswith("." + p) for p in self.denoiser.lora_projections
            ):
                names.append(name)
        return tuple(names)

    def generation_roles(self, batch: dict[str, Tensor]) -> Tensor:
        """``denoiser_roles``: the roles of the denoiser's sequence (module docstring)."""
        return batch["denoiser_roles"]

    def select_rows(self, batch: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
        """Rows of every per-row tensor; the LLM's sequence trimmed to the longest kept row
        (the denoiser's and the images' tensors are only indexed)."""
        size = batch["roles"].shape[0]
        if rows.numel() == size:
            return batch
        width = int(batch["attention_mask"][rows].sum(dim=1).max())
        out = {}
        for name, value in batch.items():
            if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == size:
                value = value[rows]
                if name in LLM_KEYS:
                    value = value[:, :width]
            out[name] = value
        return out

    # ------------------------------------------------------------------ encoding

    def _text(self, row: TokenRow, spans: Sequence[tuple[str, Role, int]]) -> None:
        append_text_spans(self.tokenizer, row, spans)

    def _image_tokens(self, image: Image.Image) -> tuple[Tensor, Tensor, int]:
        """``(pixel_values [P, D], grid [3], number of merged tokens)`` of an image prompt."""
        inputs = self.image_processor(images=[image], return_tensors="pt")
        grid = inputs["image_grid_thw"][0].long()
        merge = int(self.mllm.config.vision_config.spatial_merge_size)
        return inputs["pixel_values"], grid, int(grid.prod()) // (merge * merge)

    def _row(self, example: Any, with_response: bool = True) -> _Row:
        """The LLM row of one example (module docstring) and its denoiser inputs."""
        prompt_image = example.prompt_image
        response_image = getattr(example, "response_image", None)
        makes_image = (
            response_image is not None
            or not with_response
            and getattr(example, "answers_with_image", False)
        )
        if prompt_image is not None:
            prompt_image = as_rgb_image(prompt_image, "prompt_image")
        if makes_image:
            system = self.template.edit_system if prompt_image is not None else None
            system = system or self.template.t2i_system
        else:
            system = self.template.chat_system
        row = TokenRow()
        self._text(row, [(f"<|im_start|>system\n{system}<|im_end|>\n", Role.SPECIAL, TARGET_NONE)])
        start = len(row) if (makes_image and self.template.drop_system) else 0
        self._text(row, [("<|im_start|>user\n", Role.SPECIAL, TARGET_NONE)])
        out = _Row(row, seed=example_seed(example))
        show_image = prompt_image is not None and (
            not makes_image or self.template.edit_image_in_prompt
        )
        if show_image:
            pixels, grid, count = self._image_tokens(prompt_image)
            ids = self.token_ids
            row.append([ids["<|vision_start|>"]], Role.SPECIAL)
            row.append([self.image_token_id] * count, Role.IMAGE_PROMPT)
            row.append([ids["<|vision_end|>"]], Role.SPECIAL)
            out.pixel_values, out.image_grid = pixels, grid
        header = not makes_image or self.template.assistant_header
        self._text(
            row,
            [
                (example.prompt_text, Role.TEXT_PROMPT, TARGET_NONE),
                ("<|im_end|>\n", Role.SPECIAL, TARGET_NONE),
                ("<|im_start|>assistant\n" if header else "", Role.SPECIAL, TARGET_NONE),
            ],
        )
        if makes_image:
            out.condition_start = start
            out.response_image = (
                as_rgb_image(response_image, "response_image")
                if response_image is not None
                else None
            )
            out.source_image = prompt_image
        elif with_response and example.response_text is not None:
            self._text(row, [(example.response_text, Role.TEXT_RESPONSE, TARGET_TEXT)])
            row.append([self.token_ids["<|im_end|>"]], Role.SPECIAL, TARGET_TEXT)
        if len(row) > self.max_positions:
            raise ValueError(f"has {len(row)} tokens; the model allows {self.max_positions}")
        return out

    def _collate(self, rows: Sequence[_Row], padding_side: str = "right") -> dict[str, Tensor]:
        """Rows -> a batch (module docstring; right-padded, or left for generation)."""
        if not rows:
            raise ValueError("cannot encode an empty list of examples")
        size, length = len(rows), max(len(r.tokens) for r in rows)
        pad = self.token_ids["<|endoftext|>"]
        batch: dict[str, Tensor] = {
            "input_ids": torch.full((size, length), pad, dtype=torch.long),
            "attention_mask": torch.zeros((size, length), dtype=torch.long),
            "roles": torch.full((size, length), int(Role.PAD), dtype=torch.long),
            "target_kind": torch.zeros((size, length), dtype=torch.long),
            "has_image": torch.tensor([r.condition_start >= 0 for r in rows]),
            "noise_seeds": torch.tensor([r.seed for r in rows], dtype=torch.long),
        }
        offsets = []
        for b, r in enumerate(rows):
            n = len(r.tokens)
            offset = 0 if padding_side == "right" else length - n
            offsets.append(offset)
            span = slice(offset, offset + n)
            batch["input_ids"][b, span] = torch.tensor(r.tokens.ids)
            batch["attention_mask"][b, span] = 1
            batch["roles"][b, span] = torch.tensor(r.tokens.roles)
            batch["target_kind"][b, span] = torch.tensor(r.tokens.targets)
        if any(r.pixel_values is not None for r in rows):
            patches = max(r.pixel_values.shape[0] for r in rows if r.pixel_values is not None)
            width = next(r.pixel_values.shape[1] for r in rows if r.pixel_values is not None)
            batch["pixel_values"] = torch.zeros((size, patches, width))
            batch["image_grid_thw"] = torch.zeros((size, 3), dtype=torch.long)
            for b, r in enumerate(rows):
                if r.pixel_values is not None:
                    batch["pixel_values"][b, : r.pixel_values.shape[0]] = r.pixel_values
                    batch["image_grid_thw"][b] = r.image_grid
        image_rows = [b for b, r in enumerate(rows) if r.condition_start >= 0]
        lengths = [len(rows[b].tokens) - rows[b].condition_start for b in image_rows]
        cond_len = max(lengths, default=0)
        positions = torch.zeros((size, cond_len), dtype=torch.long)
        prompt_roles = torch.zeros((size, cond_len), dtype=torch.long)
        for b, n in zip(image_rows, lengths, strict=True):
            start = offsets[b] + rows[b].condition_start
            positions[b, :n] = torch.arange(start, start + n)
            prompt_roles[b, :n] = torch.tensor(rows[b].tokens.roles[rows[b].condition_start :])
        batch["condition_positions"] = positions
        batch["condition_mask"] = (prompt_roles != int(Role.PAD)).long()
        h, w = (v // self.codec.factor for v in self.image_size)
        n_target = (h // self.denoiser.patch) * (w // self.denoiser.patch)
        has_source = [r.source_image is not None and r.condition_start >= 0 for r in rows]
        sequences = [
            self.denoiser.sequence_roles(
                prompt_roles[b : b + 1], n_target, n_target if has_source[b] else 0
            )[0]
            if b in image_rows
            else torch.zeros(0, dtype=torch.long)
            for b in range(size)
        ]
        longest = max(len(q) for q in sequences)
        denoiser_roles = torch.zeros((size, longest), dtype=torch.long)  # PAD
        for b, sequence in enumerate(sequences):
            denoiser_roles[b, : len(sequence)] = sequence
        batch["denoiser_roles"] = denoiser_roles
        if any(has_source):
            batch["has_source"] = torch.tensor(has_source)
            batch["source_latents"] = self._latents(rows, "source_image", (h, w))
        if any(r.response_image is not None for r in rows):
            batch["latents"] = self._latents(rows, "response_image", (h, w))
        return batch

    def _latents(self, rows: Sequence[_Row], field: str, grid: tuple[int, int]) -> Tensor:
        """``[B, C, h, w]`` normalised latents of each row's ``field`` image (0 elsewhere)."""
        out = torch.zeros((len(rows), self.codec.channels, *grid))
        which = [b for b, r in enumerate(rows) if getattr(r, field) is not None]
        if which:
            pixels = torch.stack(
                [_pil_to_pixels(getattr(rows[b], field), self.image_size) for b in which]
            )
            out[which] = self.codec.encode(pixels).float().cpu()
        return out

    def encode(self, examples: Sequence[Any]) -> dict[str, Tensor]:
        """Right-padded batch (module docstring): the LLM's ``input_ids``,
        ``attention_mask``, ``roles``, ``target_kind`` (+ ``pixel_values`` ``[B, P, D]`` and
        ``image_grid_thw`` ``[B, 3]`` when a row has an image prompt); the denoiser's
        ``has_image``, ``condition_positions`` and ``condition_mask`` ``[B, L]`` (the
        conditioning's LLM positions and validity), ``denoiser_roles``, ``latents``
        ``[B, C, h, w]`` (+ ``has_source``, ``source_latents`` for edits) and
        ``noise_seeds`` (a stable hash of each example)."""
        if len(examples) == 0:
            raise ValueError("cannot encode an empty list of examples")
        rows = []
        with torch.no_grad():
            for index, example in enumerate(examples):
                try:
                    rows.append(self._row(example))
                except ValueError as error:
                    raise ValueError(
                        f"example {index} ({example.prompt_text!r}): {error}"
                    ) from None
        return self._collate(rows)

    def training_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The flow-matching objective's draws: a noise level per row from ``schedule``
        (``timesteps``) and fresh noise seeds (``noise_seeds``), from the global torch
        generator (which checkpoints save)."""
        return flow_training_batch(batch, self.schedule)

    # ------------------------------------------------------------------ forward

    def _llm_inputs(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Keywords of ``mllm.model``: ids, mask, M-RoPE positions, the image prompts'
        pixels (rows' patches concatenated)."""
        device = self.device
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        inputs: dict[str, Tensor] = {"input_ids": ids, "attention_mask": mask}
        grids = batch.get("image_grid_thw")
        rows = [] if grids is None else torch.nonzero(grids.prod(dim=1) > 0).flatten().tolist()
        if rows:
            grid = grids[rows].to(device)
            pixels = [batch["pixel_values"][b, : int(grids[b].prod())] for b in rows]
            visual = self.mllm.model.visual
            inputs["pixel_values"] = torch.cat(pixels).to(device, visual.dtype)
            inputs["image_grid_thw"] = grid
            kinds = (ids == self.image_token_id).int()
            inputs["position_ids"], _ = self.mllm.model.get_rope_index(
                ids, kinds, grid, attention_mask=mask
            )
        else:
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            inputs["position_ids"] = positions[None].expand(3, -1, -1)
        return inputs

    @contextmanager
    def _denoiser_input_hook(
        self,
        hook: EmbeddingHook | None,
        batch: dict[str, Tensor],
        rows: Tensor,
    ) -> Iterator[None]:
        """Apply ``hook`` to the denoiser's first-block input for ``rows`` of the batch: the
        group's ``[b, S_g, d]`` sequence is placed into a ``[B, S_d, d]`` batch of the
        denoiser's sequence (the layout of ``denoiser_roles``), hooked, and read back."""
        if hook is None:
            yield
            return
        first = self.denoiser_stack.modules(self.parts)[0][0]
        size, length = batch["denoiser_roles"].shape

        def before(_module, args, kwargs):
            seq = self.denoiser.block_input(args, kwargs)
            if seq.shape[1] > length:
                raise ValueError("the denoiser's sequence is longer than denoiser_roles")
            where = rows.to(seq.device)
            padded = F.pad(seq, (0, 0, 0, length - seq.shape[1]))
            full = seq.new_zeros((size, length, seq.shape[-1])).index_put((where,), padded)
            full = hook(full, batch)
            return self.denoiser.replace_block_input(args, kwargs, full[where, : seq.shape[1]])

        handle = first.register_forward_pre_hook(before, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def forward(
        self,
        batch: dict[str, Tensor],
        output_hidden_states: bool = True,
        layers: Sequence[int] | None = None,
        keep_logits: bool = False,
        embedding_hook: EmbeddingHook | None = None,
        final_norm: bool = FINAL_NORM_DEFAULT,
    ) -> ForwardOutput:
        """Teacher-forced LLM pass (text loss, the primary stack) and, for the image rows,
        one flow-matching denoiser pass per group of rows with and without a source image
        (image loss, the ``denoiser`` stack); module docstring. ``embedding_hook`` acts on
        the denoiser's first-block input (``[B, S_d, d]``, the layout of
        ``denoiser_roles``), as ``masked_positions`` index it."""
        device = self.device
        chosen = self.resolve_layers(layers)
        masked = batch.get("masked_positions")
        if masked is not None and embedding_hook is None:
            raise ValueError(
                "the batch asks for masked prediction (masked_positions), but the two_stage "
                "denoiser has no mask latent of its own: pass an embedding_hook that replaces "
                "the masked inputs"
            )
        with self.capture(chosen, output_hidden_states, final_norm) as captured:
            llm = self.mllm.model(**self._llm_inputs(batch), use_cache=False)
        final = llm.last_hidden_state
        lm_head = self.mllm.lm_head
        kinds = batch["target_kind"].to(device).clone()
        kinds[:, 0] = TARGET_NONE
        b, t = torch.nonzero(kinds == TARGET_TEXT).unbind(-1)
        text_logits = lm_head(final[b, t - 1]).float()
        text_labels = batch["input_ids"].to(device)[b, t]
        text_tokens = torch.tensor(text_labels.numel(), device=device)
        text_loss = (
            F.cross_entropy(text_logits, text_labels) if text_labels.numel() else text_logits.sum()
        )
        den_depth = self.denoiser_depth
        den_layers = (
            tuple(range(den_depth + 1))
            if layers is None
            else fraction_layers(chosen, self.num_layers, den_depth)
        )
        rows = torch.nonzero(batch["has_image"].to(device)).flatten()
        image_loss, image_tokens, states = self._denoise(
            batch, final, rows, den_layers, output_hidden_states, embedding_hook, masked
        )
        den_roles = batch["denoiser_roles"].to(device)[rows]
        stack = HiddenStack(
            "denoiser", den_layers, states, den_roles, den_depth, ("response/image",), rows=rows
        )
        return ForwardOutput(
            hidden_states=captured.states() if captured is not None else None,
            layers=chosen,
            roles=batch["roles"].to(device),
            text_loss=text_loss,
            text_tokens=text_tokens,
            image_loss=image_loss,
            image_tokens=image_tokens,
            logits=lm_head(final) if keep_logits else None,
            image_loss_kind="mse",
            depth=self.num_layers,
            stack_name="mllm",
            extra_stacks=[stack],
        )

    def prompt_embeddings(self, batch: dict[str, Tensor], final: Tensor, rows: Tensor):
        """``(embeddings [b, L, D], mask [b, L])``: the LLM's last hidden states ``final`` of
        the conditioning tokens of ``rows`` (zeros where padded)."""
        device = final.device
        positions = batch["condition_positions"].to(device)[rows]
        mask = batch["condition_mask"].to(device)[rows].long()
        gathered = final[rows[:, None], positions]
        return gathered * mask[..., None].to(gathered.dtype), mask

    def _denoise(self, batch, final, rows, den_layers, want_states, hook, masked):
        """Image loss, its count and the denoiser's hidden states (per layer ``[b, S_d,
        d]``) of the image ``rows``."""
        device = final.device
        width = self.mask_width
        length = batch["denoiser_roles"].shape[1]
        empty_states = (
            [final.new_zeros((0, length, width)) for _ in den_layers] if want_states else None
        )
        if rows.numel() == 0:
            return final.sum() * 0.0, torch.tensor(0, device=device), empty_states
        dtype = self.transformer.dtype
        prompt, prompt_mask = self.prompt_embeddings(batch, final, rows)
        x0 = batch["latents"].to(device)[rows].float()
        noise = seeded_noise(batch["noise_seeds"][rows.cpu()], x0.shape[1:], device=device)
        levels = batch.get("timesteps")
        if levels is None:
            levels = torch.full((len(batch["roles"]),), DEFAULT_PROBE_TIMESTEP)
        levels = levels.to(device).float()[rows]
        flow = self.denoiser.flow
        tokens = pack_latents(flow.noisy(x0, noise, levels), self.denoiser.patch)
        target = pack_latents(flow.target_of(x0, noise), self.denoiser.patch)
        source = batch.get("has_source")
        has_source = (
            source.to(device)[rows] if source is not None else torch.zeros_like(rows).bool()
        )
        grid = tuple(x0.shape[-2:])
        predictions, group_states, order = [], [], []
        for flag in (False, True):
            group = torch.nonzero(has_source == flag).flatten()
            if group.numel() == 0:
                continue
            condition = None
            if flag:
                source_latents = batch["source_latents"].to(device)[rows[group]].float()
                condition = pack_latents(source_latents, self.denoiser.patch).to(dtype)
            with (
                self._denoiser_input_hook(hook, batch, rows[group].to(batch["roles"].device)),
                capture_hidden_states(
                    self.parts, self.denoiser_stack, den_layers if want_states else []
                ) as captured,
            ):
                prediction = self.denoiser.predict(
                    self.transformer,
                    tokens[group].to(dtype),
                    condition,
                    prompt[group].to(dtype),
                    prompt_mask[group],
                    flow.model_time(levels[group]).to(dtype),
                    grid,
                )
            predictions.append(prediction)
            order.append(group)
            if want_states:
                group_states.append(
                    [F.pad(s, (0, 0, 0, length - s.shape[1])) for s in captured.states()]
                )
        inverse = torch.argsort(torch.cat(order))
        prediction = torch.cat(predictions)[inverse]
        scored = None
        if masked is not None:
            is_target = batch["denoiser_roles"].to(device)[rows] == int(Role.IMAGE_RESPONSE)
            scored = masked.to(device).bool()[rows][is_target].view(rows.numel(), -1)
        loss, count = flow_mse(prediction, target, scored)
        states = None
        if want_states:
            states = [
                torch.cat([g[i] for g in group_states])[inverse] for i in range(len(den_layers))
            ]
        return loss, count, states

    def input_embeddings(self, batch: dict[str, Tensor]) -> Tensor:
        """Hidden state 0 of the LLM (its first layer's input: token and image features)."""
        out = self.forward(batch, layers=[0])
        return out.hidden_layers[0]  # type: ignore[index]

    # ------------------------------------------------------------------ generation

    def generate_text(
        self, examples: Sequence[Any], max_new_tokens: int = 8, batch_size: int = 8
    ) -> list[str]:
        """Greedy answers of the LLM (``generate``, until ``<|im_end|>``)."""
        answers: list[str] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                with torch.no_grad():
                    rows = [self._row(e, with_response=False) for e in chunk]
                    batch = self._collate(rows, padding_side="left")
                    inputs = self._llm_inputs(batch)
                    inputs.pop("position_ids")
                    inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.image_token_id).int()
                    out = self.mllm.generate(
                        **inputs,
                        max_new_tokens=max_new_tokens,
                        do_sample=False,
                        eos_token_id=self.token_ids["<|im_end|>"],
                        pad_token_id=self.token_ids["<|endoftext|>"],
                    )
                new = out[:, batch["input_ids"].shape[1] :]
                answers += [
                    self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new
                ]
        finally:
            self.model.train(was_training)
        return answers

    def generate_images(self, examples: Sequence[Any], batch_size: int = 4) -> list[Image.Image]:
        """Images for the examples' prompts (an image prompt is the source of an edit): the
        flow ODE from noise seeded per example (Euler steps on the scheduler's sigmas for
        ``num_inference_steps``, the pipeline's shift), no guidance, decoded by the VAE."""
        from types import SimpleNamespace

        wanted = [SimpleNamespace(**_fields(e), answers_with_image=True) for e in examples]
        images: list[Image.Image | None] = [None] * len(wanted)
        was_training = self.model.training
        self.model.eval()
        try:
            for edits in (False, True):  # text-to-image and edits run apart
                group = [i for i, e in enumerate(wanted) if (e.prompt_image is not None) == edits]
                for start in range(0, len(group), batch_size):
                    chunk = group[start : start + batch_size]
                    drawn = self._draw([wanted[i] for i in chunk])
                    for i, image in zip(chunk, drawn, strict=True):
                        images[i] = image
        finally:
            self.model.train(was_training)
        return images  # type: ignore[return-value]

    @torch.no_grad()
    def _draw(self, examples: Sequence[Any]) -> list[Image.Image]:
        """:meth:`generate_images` for one batch of prompts of one kind."""
        device = self.device
        flow = self.denoiser.flow
        h, w = (v // self.codec.factor for v in self.image_size)
        batch = self._collate([self._row(e, with_response=False) for e in examples])
        final = self.mllm.model(**self._llm_inputs(batch), use_cache=False).last_hidden_state
        prompt, mask = self.prompt_embeddings(
            batch, final, torch.arange(len(examples), device=device)
        )
        latents = seeded_noise(batch["noise_seeds"], (self.codec.channels, h, w), device=device)
        tokens = pack_latents(latents, self.denoiser.patch)
        dtype = self.transformer.dtype
        condition = None
        if "source_latents" in batch:
            condition = pack_latents(batch["source_latents"].to(device), self.denoiser.patch)
            condition = condition.to(dtype)
        sigmas = self._sigmas(tokens.shape[1]).to(device)
        for sigma, following in zip(sigmas[:-1], sigmas[1:], strict=True):
            out = self.denoiser.predict(
                self.transformer,
                tokens.to(dtype),
                condition,
                prompt.to(dtype),
                mask,
                flow.model_time(sigma.expand(len(examples))).to(dtype),
                (h, w),
            )
            tokens = tokens + (following - sigma) * flow.velocity(out.float())
        pixels = self.codec.decode(unpack_latents(tokens, h, w, self.denoiser.patch))
        return [_pixels_to_pil(p) for p in pixels]

    def _sigmas(self, image_tokens: int) -> Tensor:
        """Noise levels of the sampling steps, ending at 0: the scheduler's own (its shift,
        dynamic with the image's token count when it asks for that)."""
        scheduler = copy.deepcopy(self.scheduler)
        steps = self.num_inference_steps
        sigmas = np.linspace(1.0, 1 / steps, steps).tolist()
        config = scheduler.config
        kwargs: dict[str, Any] = {"sigmas": sigmas}
        if getattr(config, "use_dynamic_shifting", False):
            from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

            kwargs["mu"] = calculate_shift(
                image_tokens,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
        scheduler.set_timesteps(**kwargs)
        return scheduler.sigmas.float()

    # ------------------------------------------------------------------ files

    def adapter_settings(self) -> dict[str, Any]:
        """unifyreg's own settings, saved as :data:`SETTINGS_FILE` (JSON-serialisable)."""
        return {
            "adapter": self.name,
            "template": asdict(self.template),
            "image_size": list(self.image_size),
            "schedule": asdict(self.schedule),
            "num_inference_steps": self.num_inference_steps,
        }

    def save(self, directory: str | Path) -> None:
        """A diffusers-style pipeline folder: each part's ``save_pretrained`` under the
        component names it was loaded from, ``model_index.json`` and :data:`SETTINGS_FILE`."""
        import diffusers

        if self.base_model is not self.model:
            raise ValueError(
                "the model is wrapped by peft: merge the LoRA weights first "
                "(adapter.model = adapter.model.merge_and_unload()) and save again"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = {
            "mllm": "text_encoder",
            "tokenizer": "tokenizer",
            "transformer": "transformer",
            "vae": "vae",
            "scheduler": "scheduler",
            "processor": "processor",
            **self.components,
        }
        parts = {
            "mllm": self.parts.mllm,
            "tokenizer": self.tokenizer,
            "transformer": self.parts.transformer,
            "vae": self.parts.vae,
            "scheduler": self.scheduler,
            "processor": self.image_processor,
        }
        index: dict[str, Any] = {
            "_class_name": self.components.get("_class_name", "QwenImagePipeline"),
            "_diffusers_version": diffusers.__version__,
        }
        for role, part in parts.items():
            if role == "processor" and "processor" not in self.components:
                continue
            part.save_pretrained(directory / names[role])
            library = type(part).__module__.split(".")[0]
            index[names[role]] = [library, type(part).__name__]
        (directory / "model_index.json").write_text(json.dumps(index, indent=2))
        (directory / SETTINGS_FILE).write_text(json.dumps(self.adapter_settings()))

    @classmethod
    def load(
        cls,
        directory: str | Path,
        dtype: str | torch.dtype = "float32",
        trust_remote_code: bool = False,
        transformer_class: type[nn.Module] | None = None,
        denoiser: Denoiser | None = None,
        **settings: Any,
    ) -> TwoStageAdapter:
        """Load a pipeline folder (module docstring), never from a hub.

        ``transformer_class`` (with ``denoiser``) loads a transformer diffusers does not
        have (OmniGen2's); otherwise the class ``model_index.json`` names must be a native
        one (:data:`NATIVE_DENOISERS`). ``settings`` override those of :data:`SETTINGS_FILE`
        (``template``, ``image_size``, ``schedule``, ``num_inference_steps``;
        ``vision_min_pixels`` / ``vision_max_pixels`` for the image processor when the
        folder has no ``processor/``). ``trust_remote_code`` is ignored with a warning.
        """
        import warnings

        import diffusers
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        if trust_remote_code:
            warnings.warn(
                f"trust_remote_code=True is ignored by the {cls.name!r} adapter: it loads "
                "native transformers/diffusers classes (or the transformer_class you pass), "
                f"and no code from {str(directory)!r} is executed",
                UserWarning,
                stacklevel=2,
            )
        root = Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(
                f"model directory {str(root)!r} does not exist (the two_stage adapter loads "
                "local pipeline folders only; download the weights there first)"
            )
        index_file = root / "model_index.json"
        if not index_file.is_file():
            raise FileNotFoundError(
                f"{str(root)!r} is not a diffusers-style pipeline folder: no model_index.json"
            )
        index = json.loads(index_file.read_text())
        saved: dict[str, Any] = {}
        if (root / SETTINGS_FILE).is_file():
            saved = json.loads((root / SETTINGS_FILE).read_text())
            if saved.get("adapter", cls.name) != cls.name:
                raise ValueError(f"{root} was saved by the {saved['adapter']!r} adapter")
        saved.pop("adapter", None)
        saved.update(settings)

        def folder(*names: str) -> str:
            for name in names:
                if name in index and (root / name).is_dir():
                    return name
            raise FileNotFoundError(
                f"{str(root)!r} has none of the components {list(names)} (model_index.json "
                f"lists {sorted(k for k in index if not k.startswith('_'))})"
            )

        torch_dtype = resolve_dtype(dtype)
        mllm_name = folder(*MLLM_COMPONENTS)
        transformer_name, vae_name = folder("transformer"), folder("vae")
        scheduler_name = folder("scheduler")
        library, class_name = index[transformer_name][:2]
        if transformer_class is None:
            native = NATIVE_DENOISERS.get(class_name)
            if native is None or library != "diffusers":
                raise ValueError(
                    f"the transformer of {str(root)!r} is {library}.{class_name}, which "
                    "diffusers does not ship: pass transformer_class=<its class> and "
                    "denoiser=<a Denoiser for it> (README, 'Two-stage models')"
                )
            transformer_class, denoiser = getattr(diffusers, class_name), denoiser or native()
        elif denoiser is None:
            raise ValueError("transformer_class needs a denoiser=Denoiser(...) that runs it")
        mllm = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            root / mllm_name, dtype=torch_dtype, local_files_only=True
        )
        transformer = transformer_class.from_pretrained(
            root, subfolder=transformer_name, torch_dtype=torch_dtype, local_files_only=True
        )
        vae_class = getattr(diffusers, index[vae_name][1])
        vae = vae_class.from_pretrained(root, subfolder=vae_name, local_files_only=True)
        scheduler_class = getattr(diffusers, index[scheduler_name][1], None)
        if scheduler_class is None:
            scheduler_class = diffusers.FlowMatchEulerDiscreteScheduler
        scheduler = scheduler_class.from_pretrained(root, subfolder=scheduler_name)
        processor_dir = root / "processor"
        tokenizer_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else processor_dir
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        vision = {k: saved.pop(k) for k in ("vision_min_pixels", "vision_max_pixels") if k in saved}
        if (processor_dir / "preprocessor_config.json").is_file():
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(processor_dir)
        else:
            image_processor = Qwen2VLImageProcessorPil(
                min_pixels=vision.get("vision_min_pixels", 56 * 56),
                max_pixels=vision.get("vision_max_pixels", 28 * 28 * 1280),
            )
        components = {
            "_class_name": index.get("_class_name", ""),
            "mllm": mllm_name,
            "tokenizer": "tokenizer" if tokenizer_dir.name == "tokenizer" else "processor",
        }
        if processor_dir.is_dir():
            components["processor"] = "processor"
        for module in (mllm, transformer, vae):
            module.eval()
        model = TwoStageModel(mllm, transformer, vae)
        return cls(
            model, tokenizer, image_processor, scheduler, denoiser, components=components, **saved
        )


def _fields(example: Any) -> dict[str, Any]:
    """The example attributes the adapter reads (for a copy that asks for an image)."""
    return {
        name: getattr(example, name, None)
        for name in ("prompt_text", "prompt_image", "response_text", "response_image", "category")
    }


# ---------------------------------------------------------------------- tiny checkpoints


def _tiny_parts(seed: int, layers: int, denoiser_layers: int):
    """Tiny random Qwen2.5-VL, Qwen-Image transformer, VAE, scheduler and tokenizer."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer(CHAT_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in CHAT_TOKENS}
    special = {
        "bos_token_id": None,
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            **special,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            fullatt_block_indexes=[0],
            window_size=112,
        ),
        image_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        **special,
    )
    mllm = Qwen2_5_VLForConditionalGeneration(config).eval()
    mllm.generation_config.bos_token_id = None
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=denoiser_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    vae = AutoencoderKLQwenImage(
        base_dim=16,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 2.0, 1.0, 0.5],
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        time_shift_type="exponential",
    )
    return tokenizer, mllm, transformer, vae, scheduler


#: unifyreg settings of the tiny checkpoints: 32 x 32 images (4 x 4 latents, 4 tokens),
#: small vision inputs, two sampling steps.
TINY_SETTINGS = {
    "image_size": [32, 32],
    "num_inference_steps": 2,
    "vision_min_pixels": 28 * 28,
    "vision_max_pixels": 56 * 56,
}


def save_tiny_two_stage(
    directory: str | Path,
    seed: int = 0,
    edit: bool = False,
    layers: int = 2,
    denoiser_layers: int = 4,
) -> Path:
    """Write a tiny random Qwen-Image pipeline folder with diffusers' own
    ``QwenImagePipeline.save_pretrained`` (``QwenImageEditPipeline`` with ``edit``, whose
    ``processor/`` holds a Qwen2-VL image processor) and :data:`SETTINGS_FILE`; returns it.
    The LLM has ``layers`` layers and the denoiser ``denoiser_layers`` blocks (different
    depths by default, as in the real models)."""
    from diffusers import QwenImageEditPipeline, QwenImagePipeline
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    directory = Path(directory)
    tokenizer, mllm, transformer, vae, scheduler = _tiny_parts(seed, layers, denoiser_layers)
    parts = dict(
        scheduler=scheduler,
        vae=vae,
        text_encoder=mllm,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    if edit:
        # Qwen2VLProcessor needs a video processor (torchvision); the image processor alone
        # is what the adapter reads from processor/.
        processor = Qwen2VLImageProcessorPil(
            min_pixels=TINY_SETTINGS["vision_min_pixels"],
            max_pixels=TINY_SETTINGS["vision_max_pixels"],
        )
        pipeline = QwenImageEditPipeline(processor=processor, **parts)
    else:
        pipeline = QwenImagePipeline(**parts)
    pipeline.save_pretrained(directory)
    (directory / SETTINGS_FILE).write_text(json.dumps({"adapter": "two_stage", **TINY_SETTINGS}))
    return directory
