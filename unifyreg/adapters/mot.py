"""Mixture-of-transformers models: two experts per layer, one joint attention.

A mixture-of-transformers (MoT) layer has an *understanding* expert (its own norms,
attention projections and MLP) for text and image-prompt tokens, and a *generation* expert
(the ``*_moe_gen`` weights) for the noisy VAE latents of the image being made; both streams
meet in one attention over the whole sequence. The adapter runs diffusers'
``Cosmos3OmniTransformer`` (whose layers have exactly this layout: ``to_q/k/v``, ``to_out``,
``norm_q/k``, ``mlp`` for the understanding stream; ``add_q/k/v_proj``, ``to_add_out``,
``norm_added_q/k``, ``mlp_moe_gen`` for the generation stream; ``proj_in`` / ``proj_out``
between latents and the model width, ``time_embedder``), with transformers'
``SiglipVisionModel`` and an MLP connector reading image prompts, and diffusers'
``AutoencoderKL`` between pixels and latents, all held by :class:`MoTModel`.

Native: a folder of these parts (:func:`save_tiny_mot` writes one; ``transformer/`` by
diffusers' ``save_pretrained``). **BAGEL** and **BAGEL-RecA** load from their released
layout (``llm_config.json``, ``vit_config.json``, ``ema.safetensors`` or RecA's file, the
tokenizer, FLUX's VAE as ``ae.safetensors`` or ``vae/``) through :func:`bagel_key_map`
(:func:`load_bagel_state`; README, "Mixture-of-transformers models").

**Sequences** (BAGEL's packing, one example per row, right-padded). A row is a list of
*splits*, each with an attention mode:

- a text split ``<|im_start|> words <|im_end|>`` (``causal``): the prompt's words are
  TEXT_PROMPT, the markers SPECIAL; a text response is a second text split whose words are
  TEXT_RESPONSE and, with its closing ``<|im_end|>``, the text targets (next token);
- an image prompt ``<|vision_start|> ViT tokens <|vision_end|>`` (``full``: bidirectional
  inside the split, and seen by every later token), placed before the prompt's text, as
  BAGEL's understanding data do; its ViT tokens are IMAGE_PROMPT;
- an image response ``<|vision_start|> latent tokens <|vision_end|>`` (``noise``:
  bidirectional inside the split, hidden from every later token); its latent tokens are
  IMAGE_RESPONSE and form the generation stream, everything else the understanding stream.

:func:`mot_attention_mask` turns the splits into the additive ``[B, 1, S, S]`` mask
(BAGEL's ``prepare_attention_mask_per_sample``); a batch's own ``attention_mask_4d``
replaces it. :class:`MoTAttnProcessor` is the attention processor that runs it on
Cosmos3's packed attention, batched (diffusers' own processor packs one example, with
understanding causal and generation full).

**Positions.** RoPE positions as BAGEL's: one per text token, one shared by all tokens of
an image split (then +1). The latent tokens also get a 2-D position table
(``latent_pos_embed``, a frozen sine-cosine table indexed ``row * max_latent_size + col``)
when the model has one (BAGEL); without it (a native Cosmos3 folder) they get 3-axis RoPE
positions ``(p, p + row, p + col)`` (Qwen2-VL style; Cosmos3-Omni's own video positions,
with their temporal margin, are not reproduced). ViT tokens get SigLIP's position table and
the connector's ``vit_pos_embed`` at BAGEL's flattened ids ``row * side + col``.

**Hidden states.** One stack, the transformer's ``layers``: a layer returns ``(und, gen)``,
which the hooks scatter back into sequence order, so each ``[B, S, d]`` hidden state holds
both streams at their positions (text and ViT tokens from the understanding expert, latent
tokens from the generation expert). Layer 0 is the input embeddings; ``final_norm`` takes
``norm`` for the understanding positions and ``norm_moe_gen`` for the latents.

**Losses.** Text: next-token cross-entropy of ``lm_head`` over the understanding stream's
final states. Image: flow matching (:mod:`unifyreg.adapters.continuous`; BAGEL's
convention: ``x_t = (1 - t) x_0 + t eps``, target ``eps - x_0``, the time embedder given
``t``) on the VAE's normalised latents (``(z - shift_factor) * scaling_factor``, the
posterior's mode) patchified ``p x p`` (row-major patches, ``(p, q, c)`` inside one, as
BAGEL's ``patchify`` and Cosmos3's ``_patchify_and_pack_latents``), read from
``proj_out`` at the latent positions; the mean squared error over every element of the
scored tokens (``image_loss_kind = "mse"``). Noise levels: the batch's ``timesteps``
(training: ``schedule``, logit-normal as BAGEL's ``sigmoid(randn)``; the probe:
``probe.timestep``; else 0.5), noise seeded by ``noise_seeds``. ``masked_positions`` (the
continuous ``L_ctx``) score only the masked latents, whose inputs the embedding hook
replaces.

**Generation.** Text: greedy, the whole sequence recomputed per token (no key/value cache).
Images: Euler steps of the flow ODE from noise seeded per example over
``num_inference_steps`` (shifted by ``schedule.shift``), no guidance, decoded by the VAE.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
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
    LayerStack,
)
from unifyreg.adapters.continuous import (
    DEFAULT_PROBE_TIMESTEP,
    FlowConvention,
    FlowSchedule,
    example_seed,
    flow_mse,
    flow_training_batch,
    seeded_noise,
    shift_noise_levels,
)
from unifyreg.adapters.hf_common import (
    ADAPTER_SETTINGS_FILE,
    TokenRow,
    append_text_spans,
    byte_level_tokenizer,
    resolve_dtype,
)
from unifyreg.adapters.two_stage import LatentCodec, _pil_to_pixels, _pixels_to_pil
from unifyreg.images import as_rgb_image
from unifyreg.roles import Role

__all__ = [
    "BAGEL_FLOW",
    "FLUX_VAE_CONFIG",
    "MOT_TOKENS",
    "SETTINGS_FILE",
    "MLPConnector",
    "MoTAdapter",
    "MoTAttnProcessor",
    "MoTModel",
    "PositionTable",
    "bagel_key_map",
    "load_bagel_state",
    "mot_attention_mask",
    "patchify",
    "save_tiny_bagel",
    "ldm_vae_state",
    "save_tiny_mot",
    "tiny_bagel_state",
    "sincos_table",
    "unpatchify",
]

#: unifyreg's own settings inside the folder.
SETTINGS_FILE = ADAPTER_SETTINGS_FILE
#: The connector and the position tables of a native folder (safetensors).
EXTRAS_FILE = "mot_extras.safetensors"
#: Special tokens of the format (Qwen2 vocabulary; BAGEL's bos / eos / image markers).
MOT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
#: BAGEL's flow convention: noise level ``t`` (1 = noise), target ``eps - x_0``; the time
#: embedder sees ``t``: the adapter passes ``t / timestep_scale`` (Cosmos3's 0..1000 scale).
BAGEL_FLOW = FlowConvention("bagel", "noise_minus_data", "noise_level")
#: Attention modes of a split (``split_modes``): BAGEL's ``causal``, ``full``, ``noise``.
CAUSAL, FULL, NOISE = 0, 1, 2
#: Streams (``stream``): understanding, generation.
UND, GEN = 0, 1


# ---------------------------------------------------------------------- small parts


def sincos_table(side: int, dim: int) -> Tensor:
    """``[side * side, dim]`` 2-D sine-cosine table (MAE / DiT, BAGEL's ``PositionEmbedding``):
    row ``r * side + c`` is ``[e(c), e(r)]`` with ``e(x) = [sin(x w_k), cos(x w_k)]``,
    ``w_k = 10000^(-k / (dim / 4))``, ``k < dim / 4`` (the first half encodes the column)."""
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([encode(cols), encode(rows)], axis=1)).float()


class PositionTable(nn.Module):
    """A frozen position table (``pos_embed`` ``[side^2, dim]``, a buffer: no gradient);
    ``forward(ids)`` = ``pos_embed[ids]``."""

    def __init__(self, side: int, dim: int) -> None:
        super().__init__()
        self.side = int(side)
        self.register_buffer("pos_embed", sincos_table(side, dim))

    def forward(self, ids: Tensor) -> Tensor:
        return self.pos_embed[ids]


class MLPConnector(nn.Module):
    """``fc2(act(fc1(x)))``: ViT width -> model width (BAGEL's ``MLPconnector``)."""

    def __init__(self, in_dim: int, out_dim: int, act: str = "gelu_pytorch_tanh") -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        self.act_name = act
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def patchify(latents: Tensor, patch: int) -> Tensor:
    """``[B, C, h p, w p]`` -> ``[B, h w, p p C]``: row-major patches, ``(p, q, c)`` order
    inside a patch (BAGEL's ``chpwq -> hwpqc``)."""
    b, c, hh, ww = latents.shape
    if hh % patch or ww % patch:
        raise ValueError(f"latent size {hh}x{ww} is not a multiple of the patch size {patch}")
    x = latents.reshape(b, c, hh // patch, patch, ww // patch, patch)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, -1, patch * patch * c)


def unpatchify(tokens: Tensor, height: int, width: int, patch: int) -> Tensor:
    """Inverse of :func:`patchify` for latents of ``height x width``."""
    b, _, d = tokens.shape
    c = d // (patch * patch)
    x = tokens.reshape(b, height // patch, width // patch, patch, patch, c)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, height, width)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class MoTAttnProcessor:
    """Cosmos3's packed mixture-of-transformers attention, batched and masked.

    Called as Cosmos3's processors are (``attn, und_seq, gen_seq, rotary_emb``), with
    ``und_seq`` ``[B, S_u, d]``, ``gen_seq`` ``[B, S_g, d]`` and ``rotary_emb`` a 6-tuple
    ``(cos_u, sin_u, cos_g, sin_g, mask_u, mask_g)``: cos / sin ``[B, S_x, head_dim]`` per
    stream and the additive masks ``[B, 1, S_u, S_u + S_g]`` / ``[B, 1, S_g, S_u + S_g]`` of
    each stream's queries over the keys ``[und; gen]``. Projections, per-head norms and RoPE
    are Cosmos3's (each stream its own; the generation queries read the understanding keys
    through ``k_norm_und_for_gen`` when the model has it); one softmax attention per stream
    over both streams' keys and values (grouped-query); each stream's output projection.
    """

    def __call__(self, attn, und_seq: Tensor, gen_seq: Tensor, rotary_emb: tuple):
        cos_u, sin_u, cos_g, sin_g, mask_u, mask_g = rotary_emb
        heads, kv, dim = attn.num_attention_heads, attn.num_key_value_heads, attn.head_dim

        def split(x: Tensor, proj: nn.Module, n: int) -> Tensor:
            return proj(x).view(x.shape[0], x.shape[1], n, dim)

        def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
            cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
            return x * cos + _rotate_half(x) * sin

        q_u = attn.norm_q(split(und_seq, attn.to_q, heads))
        k_u = attn.norm_k(split(und_seq, attn.to_k, kv))
        v_u = split(und_seq, attn.to_v, kv)
        norm_for_gen = attn.k_norm_und_for_gen
        k_u_for_gen = norm_for_gen(k_u) if norm_for_gen is not None else k_u
        q_g = attn.norm_added_q(split(gen_seq, attn.add_q_proj, heads))
        k_g = attn.norm_added_k(split(gen_seq, attn.add_k_proj, kv))
        v_g = split(gen_seq, attn.add_v_proj, kv)
        q_u, k_u, k_u_for_gen = (rope(x, cos_u, sin_u) for x in (q_u, k_u, k_u_for_gen))
        q_g, k_g = rope(q_g, cos_g, sin_g), rope(k_g, cos_g, sin_g)
        values = torch.cat([v_u, v_g], dim=1).transpose(1, 2)

        def attend(q: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                keys.transpose(1, 2),
                values,
                attn_mask=mask.to(q.dtype),
                enable_gqa=heads != kv,
            )
            return out.transpose(1, 2).flatten(2)

        und_out = attn.to_out(attend(q_u, torch.cat([k_u, k_g], dim=1), mask_u))
        if gen_seq.shape[1] == 0:
            return und_out, attn.to_add_out(gen_seq.new_zeros((*gen_seq.shape[:2], heads * dim)))
        gen_out = attn.to_add_out(attend(q_g, torch.cat([k_u_for_gen, k_g], dim=1), mask_g))
        return und_out, gen_out


def mot_attention_mask(
    split_ids: Tensor,
    split_modes: Tensor,
    attention_mask: Tensor,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``[B, 1, S, S]`` additive mask of BAGEL's splits (0 = attend, ``finfo.min`` = blocked).

    Query ``i`` sees key ``j`` when ``j`` is a real token and either ``j <= i`` and ``j`` is
    not in another split's ``noise`` run (a noisy image is hidden from later tokens), or
    ``j`` is in ``i``'s own split and that split is ``full`` or ``noise`` (bidirectional
    inside an image). ``split_ids`` / ``split_modes`` ``[B, S]`` (:data:`CAUSAL`,
    :data:`FULL`, :data:`NOISE`)."""
    length = split_ids.shape[1]
    device = split_ids.device
    same = split_ids[:, :, None] == split_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None]
    hidden_noise = (split_modes == NOISE)[:, None, :] & ~same
    bidirectional = same & (split_modes != CAUSAL)[:, :, None]
    allowed = ((causal & ~hidden_noise) | bidirectional) & attention_mask.bool()[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


# ---------------------------------------------------------------------- the model


class MoTModel(nn.Module):
    """The trained parts as one module: ``transformer`` (``Cosmos3OmniTransformer``), ``vit``
    (``SiglipVisionModel``, or None: no image prompts), ``connector`` (:class:`MLPConnector`)
    and ``vit_pos_embed`` (:class:`PositionTable`) beside it, ``latent_pos_embed`` (a
    :class:`PositionTable`, or None: RoPE positions for latents) and ``vae`` (frozen). Every
    attention layer runs :class:`MoTAttnProcessor`. ``frozen_biases``: the output
    projections' biases are zero and frozen (a BAGEL checkpoint has none)."""

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        vit: nn.Module | None = None,
        connector: MLPConnector | None = None,
        vit_pos_embed: PositionTable | None = None,
        latent_pos_embed: PositionTable | None = None,
        frozen_biases: bool = False,
    ) -> None:
        super().__init__()
        if (vit is None) != (connector is None) or (vit is None) != (vit_pos_embed is None):
            raise ValueError("vit, connector and vit_pos_embed come together (or all None)")
        self.transformer = transformer
        self.vit = vit
        self.connector = connector
        self.vit_pos_embed = vit_pos_embed
        self.latent_pos_embed = latent_pos_embed
        self.vae = vae
        self.vae.requires_grad_(False)
        self.frozen_biases = bool(frozen_biases)
        processor = MoTAttnProcessor()
        for layer in transformer.layers:
            layer.self_attn.set_processor(processor)
            if frozen_biases:
                for proj in (layer.self_attn.to_out, layer.self_attn.to_add_out):
                    if proj.bias is not None:
                        proj.bias.requires_grad_(False)

    def extras_state(self) -> dict[str, Tensor]:
        """The connector's and the tables' tensors (what :data:`EXTRAS_FILE` holds)."""
        out = {}
        for name in ("connector", "vit_pos_embed", "latent_pos_embed"):
            module = getattr(self, name)
            if module is not None:
                out.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        return out


# ---------------------------------------------------------------------- BAGEL's layout


#: Per-layer renames, BAGEL (``language_model.model.layers.{i}.``) -> Cosmos3 (``layers.{i}.``).
_BAGEL_LAYER = {
    "self_attn.q_proj": "self_attn.to_q",
    "self_attn.k_proj": "self_attn.to_k",
    "self_attn.v_proj": "self_attn.to_v",
    "self_attn.o_proj": "self_attn.to_out",
    "self_attn.q_norm": "self_attn.norm_q",
    "self_attn.k_norm": "self_attn.norm_k",
    "self_attn.q_proj_moe_gen": "self_attn.add_q_proj",
    "self_attn.k_proj_moe_gen": "self_attn.add_k_proj",
    "self_attn.v_proj_moe_gen": "self_attn.add_v_proj",
    "self_attn.o_proj_moe_gen": "self_attn.to_add_out",
    "self_attn.q_norm_moe_gen": "self_attn.norm_added_q",
    "self_attn.k_norm_moe_gen": "self_attn.norm_added_k",
}
#: Top-level renames (exact keys).
_BAGEL_TOP = {
    "language_model.model.embed_tokens.weight": "transformer.embed_tokens.weight",
    "language_model.model.norm.weight": "transformer.norm.weight",
    "language_model.model.norm_moe_gen.weight": "transformer.norm_moe_gen.weight",
    "language_model.lm_head.weight": "transformer.lm_head.weight",
    "time_embedder.mlp.0.weight": "transformer.time_embedder.linear_1.weight",
    "time_embedder.mlp.0.bias": "transformer.time_embedder.linear_1.bias",
    "time_embedder.mlp.2.weight": "transformer.time_embedder.linear_2.weight",
    "time_embedder.mlp.2.bias": "transformer.time_embedder.linear_2.bias",
    "vae2llm.weight": "transformer.proj_in.weight",
    "vae2llm.bias": "transformer.proj_in.bias",
    "llm2vae.weight": "transformer.proj_out.weight",
    "llm2vae.bias": "transformer.proj_out.bias",
    "latent_pos_embed.pos_embed": "latent_pos_embed.pos_embed",
    "vit_pos_embed.pos_embed": "vit_pos_embed.pos_embed",
}
_LAYER_KEY = re.compile(r"^language_model\.model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
#: BAGEL's packed ViT stores its patch embedding as a linear layer over (p, q, c) pixels.
_VIT_PATCH = "vit_model.vision_model.embeddings.patch_embedding.weight"


def bagel_key_map(key: str) -> str | None:
    """The :class:`MoTModel` parameter a BAGEL checkpoint key loads into, or None when the
    key has no place (an unexpected key): ``language_model.model.layers.{i}.*`` ->
    ``transformer.layers.{i}.*`` (:data:`_BAGEL_LAYER` renames the attention; ``mlp``,
    ``mlp_moe_gen`` and the four layer norms keep their names), ``vit_model.vision_model.*``
    -> ``vit.*``, ``connector.*`` -> ``connector.*``, and the top-level keys of
    :data:`_BAGEL_TOP`."""
    if key in _BAGEL_TOP:
        return _BAGEL_TOP[key]
    match = _LAYER_KEY.match(key)
    if match:
        index, module, kind = match.groups()
        return f"transformer.layers.{index}.{_BAGEL_LAYER.get(module, module)}.{kind}"
    if key.startswith("vit_model.vision_model."):
        return "vit." + key[len("vit_model.vision_model.") :]
    if key.startswith("connector."):
        return key
    return None


def load_bagel_state(model: MoTModel, state: dict[str, Tensor]) -> None:
    """Load a BAGEL checkpoint's tensors (``ema.safetensors`` keys) into ``model`` through
    :func:`bagel_key_map`, strictly: a key with no place, a shape that differs, or a model
    tensor no key fills is a ValueError naming them. The patch embedding is reshaped from
    BAGEL's linear layout ``[D, p p 3]`` to SigLIP's convolution ``[D, 3, p, p]``; the output
    projections' biases (``to_out``, ``to_add_out``), which BAGEL does not have, are set to
    zero (and frozen by ``MoTModel(frozen_biases=True)``). BAGEL unties ``lm_head`` from the
    embedding whatever ``llm_config.json`` says, so both must be there. The VAE is not in the
    checkpoint."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("vae.")}
    unexpected, wrong, loaded, misshapen = [], [], {}, set()
    for key, value in state.items():
        target = bagel_key_map(key)
        if target is None or target not in own:
            unexpected.append(key)
            continue
        if key == _VIT_PATCH and value.dim() == 2:
            out, p = own[target].shape[0], own[target].shape[-1]
            value = value.reshape(out, p, p, -1).permute(0, 3, 1, 2)
        if tuple(value.shape) != tuple(own[target].shape):
            wrong.append(f"{key}: {tuple(value.shape)} (expected {tuple(own[target].shape)})")
            misshapen.add(target)
            continue
        loaded[target] = value
    zeros = [k for k in own if k.endswith(("self_attn.to_out.bias", "self_attn.to_add_out.bias"))]
    for key in zeros:
        loaded.setdefault(key, torch.zeros_like(own[key]))
    missing = sorted(k for k in own if k not in loaded and k not in misshapen)
    problems = []
    if unexpected:
        problems.append(f"unexpected key(s) {sorted(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch: {wrong}")
    if missing:
        names = [_bagel_name_of(k) for k in missing]
        problems.append(f"missing key(s) {names}")
    if problems:
        raise ValueError("the BAGEL checkpoint does not fit the model: " + "; ".join(problems))
    model.load_state_dict({**loaded, **{k: v for k, v in model.state_dict().items()
                                         if k.startswith("vae.")}}, strict=True)  # fmt: skip


def _bagel_name_of(target: str) -> str:
    """The BAGEL key that should have filled ``target`` (for error messages)."""
    for key, value in _BAGEL_TOP.items():
        if value == target:
            return key
    match = re.match(r"^transformer\.layers\.(\d+)\.(.+)\.(weight|bias)$", target)
    if match:
        index, module, kind = match.groups()
        back = {v: k for k, v in _BAGEL_LAYER.items()}.get(module, module)
        return f"language_model.model.layers.{index}.{back}.{kind}"
    if target.startswith("vit."):
        return "vit_model.vision_model." + target[4:]
    return target


def _rope_axes(head_dim: int) -> list[int]:
    """Cosmos3's three RoPE axis widths for ``head_dim`` (they sum to ``head_dim / 2``; with
    equal positions on the three axes the rotation is plain 1-D RoPE, as BAGEL's)."""
    half = head_dim // 2
    side = half // 4
    return [half - 2 * side, side, side]


def _safetensors_file(root: Path, name: str | None) -> Path:
    """The checkpoint file of a BAGEL folder: ``name``, else ``ema.safetensors``, else the
    only ``*.safetensors`` that is not the VAE's ``ae.safetensors`` (RecA's file)."""
    if name:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{str(root)!r} has no weights file {name!r}")
        return path
    if (root / "ema.safetensors").is_file():
        return root / "ema.safetensors"
    candidates = sorted(p for p in root.glob("*.safetensors") if p.name != "ae.safetensors")
    if len(candidates) != 1:
        raise FileNotFoundError(
            f"{str(root)!r}: no ema.safetensors, and {len(candidates)} other weight files "
            f"({[p.name for p in candidates]}): set weights_file"
        )
    return candidates[0]


#: FLUX.1's VAE (BAGEL's ``ae.safetensors``) as a diffusers ``AutoencoderKL`` config.
FLUX_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def _bagel_vae(root: Path, vae_config: dict[str, Any] | None) -> nn.Module:
    """The VAE of a BAGEL folder: a diffusers ``vae/`` folder when there is one, else BAGEL's
    ``ae.safetensors`` (FLUX's VAE in its original layout) converted by diffusers' own
    ``convert_ldm_vae_checkpoint`` into an ``AutoencoderKL`` of :data:`FLUX_VAE_CONFIG`
    (``vae_config`` overrides it), strictly: keys that do not fit are a ValueError."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    if (root / "vae").is_dir():
        return _vae_class(root / "vae").from_pretrained(root / "vae", local_files_only=True)
    ae = root / "ae.safetensors"
    if not ae.is_file():
        raise FileNotFoundError(
            f"{str(root)!r} has neither vae/ (a diffusers AutoencoderKL folder) nor BAGEL's "
            "ae.safetensors"
        )
    vae = AutoencoderKL(**{**FLUX_VAE_CONFIG, **(vae_config or {})})
    converted = convert_ldm_vae_checkpoint(load_file(ae), vae.config)
    missing, unexpected = vae.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{ae.name} does not fit the VAE config: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    return vae.eval()


def _build_bagel(
    root: Path, weights_file: str | None, vae_config: dict[str, Any] | None = None
) -> tuple[MoTModel, dict[str, Any]]:
    """A :class:`MoTModel` of a BAGEL folder (``llm_config.json``, ``vit_config.json``, the
    checkpoint, ``vae/`` or ``ae.safetensors``: :func:`_bagel_vae`), its weights loaded by
    :func:`load_bagel_state`; and the layout's facts (``weights_file``)."""
    from diffusers import Cosmos3OmniTransformer
    from safetensors.torch import load_file
    from transformers import SiglipVisionConfig, SiglipVisionModel

    llm = json.loads((root / "llm_config.json").read_text())
    vit_config = json.loads((root / "vit_config.json").read_text())
    path = _safetensors_file(root, weights_file)
    state = load_file(path)
    vae = _bagel_vae(root, vae_config)
    for needed in ("vae2llm.weight", "latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"):
        if needed not in state:
            raise ValueError(f"the BAGEL checkpoint {path.name} has no {needed!r}")
    hidden, heads = int(llm["hidden_size"]), int(llm["num_attention_heads"])
    head_dim = int(llm.get("head_dim") or hidden // heads)
    patch_dim = int(state["vae2llm.weight"].shape[1])
    channels = int(vae.config.latent_channels)
    patch = math.isqrt(patch_dim // channels)
    if patch * patch * channels != patch_dim:
        raise ValueError(f"vae2llm reads {patch_dim} features: not p*p*{channels}")
    transformer = Cosmos3OmniTransformer(
        attention_bias=True,
        head_dim=head_dim,
        hidden_size=hidden,
        intermediate_size=int(llm["intermediate_size"]),
        latent_channel=channels,
        latent_patch_size=patch,
        num_attention_heads=heads,
        num_hidden_layers=int(llm["num_hidden_layers"]),
        num_key_value_heads=int(llm.get("num_key_value_heads", heads)),
        patch_latent_dim=patch_dim,
        rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)),
        rope_theta=float(llm.get("rope_theta", 1e6)),
        vocab_size=int(llm["vocab_size"]),
        hidden_act=llm.get("hidden_act", "silu"),
        qk_norm_for_text=True,  # BAGEL sets qk_norm (and unties lm_head) in code
        rope_axes_dim=_rope_axes(head_dim),
    )
    fields = {k: v for k, v in vit_config.items() if not k.startswith(("_", "architectures"))}
    fields.pop("model_type", None)
    fields["num_hidden_layers"] = int(fields["num_hidden_layers"]) - 1  # BAGEL drops the last
    fields["vision_use_head"] = False
    vit = SiglipVisionModel(SiglipVisionConfig(**fields))
    side = math.isqrt(state["vit_pos_embed.pos_embed"].shape[0])
    latent_side = math.isqrt(state["latent_pos_embed.pos_embed"].shape[0])
    model = MoTModel(
        transformer,
        vae,
        vit,
        MLPConnector(int(vit.config.hidden_size), hidden, "gelu_pytorch_tanh"),
        PositionTable(side, hidden),
        PositionTable(latent_side, hidden),
        frozen_biases=True,
    )
    load_bagel_state(model, state)
    return model, {"weights_file": path.name}


# ---------------------------------------------------------------------- the adapter

#: Per-position integer fields of a row (beside ids, roles and targets).
_FIELDS = ("stream", "split", "mode", "pos", "pos_h", "pos_w")
#: Batch keys of the sequence (trimmed with it when rows are selected).
_SEQUENCE_KEYS = ("input_ids", "attention_mask", "roles", "target_kind", "stream",
                  "split_ids", "split_modes", "masked_positions")  # fmt: skip


@dataclass
class _Row:
    """One example as the adapter encodes it (module docstring)."""

    tokens: TokenRow
    prompt_image: Image.Image | None = None
    response_image: Image.Image | None = None
    seed: int = 0


class MoTAdapter(Adapter):
    """A mixture-of-transformers model (module docstring): Cosmos3-Omni's transformer with
    SigLIP and a VAE; BAGEL and BAGEL-RecA by key map.

    Example::

        adapter = MoTAdapter.load("BAGEL-7B-MoT")   # llm_config.json, ema.safetensors, vae/
        result = run_probe(adapter, probe_examples, ProbeConfig())
    """

    name = "mot"
    image_objective = "flow"
    supports_masked_prediction = True
    flow = BAGEL_FLOW

    def __init__(
        self,
        model: MoTModel,
        tokenizer: Any,
        *,
        image_size: Sequence[int] = (512, 512),
        vit_image_size: Sequence[int] = (378, 378),
        schedule: FlowSchedule | dict[str, Any] | None = None,
        num_inference_steps: int = 50,
        layout: str = "native",
        weights_file: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.layout = layout
        self.weights_file = weights_file
        self.schedule = (
            schedule
            if isinstance(schedule, FlowSchedule)
            else FlowSchedule.from_dict(schedule or {"sampling": "logit_normal"})
        )
        if isinstance(num_inference_steps, bool) or int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps!r}")
        self.num_inference_steps = int(num_inference_steps)
        self.codec = LatentCodec(model.vae)
        config = model.transformer.config
        self.patch = int(config.latent_patch_size)
        if self.codec.channels != int(config.latent_channel):
            raise ValueError(
                f"the VAE has {self.codec.channels} latent channels, the transformer reads "
                f"{config.latent_channel}"
            )
        self.image_size = tuple(int(v) for v in image_size)
        step = self.codec.factor * self.patch
        if len(self.image_size) != 2 or any(v < step or v % step for v in self.image_size):
            raise ValueError(
                f"image_size must be [height, width], multiples of {step} (the VAE's factor "
                f"{self.codec.factor} times the latent patch {self.patch}), got {image_size!r}"
            )
        self.vit_image_size = tuple(int(v) for v in vit_image_size)
        if model.vit is not None:
            vit_patch = int(model.vit.config.patch_size)
            side = int(model.vit.config.image_size) // vit_patch
            if len(self.vit_image_size) != 2 or any(
                v < vit_patch or v % vit_patch or v // vit_patch > side for v in self.vit_image_size
            ):
                raise ValueError(
                    f"vit_image_size must be [height, width], multiples of the ViT's patch "
                    f"{vit_patch}, at most {side * vit_patch}, got {vit_image_size!r}"
                )
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in MOT_TOKENS}
        unknown = sorted(t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id)
        if unknown:
            raise ValueError(f"the tokenizer lacks the tokens {unknown}")
        self.token_ids = ids
        self.layer_stack = LayerStack(
            "transformer.layers", "", self._sequence_output, self._sequence_input
        )
        self._streams: tuple[Tensor, Tensor, int] | None = None
        self.default_lora_targets = self.lora_target_module_names()

    # ------------------------------------------------------------------ parts

    @property
    def parts(self) -> MoTModel:
        """The :class:`MoTModel` under any peft wrapper."""
        return self.base_model  # type: ignore[return-value]

    @property
    def transformer(self) -> nn.Module:
        """The ``Cosmos3OmniTransformer``."""
        return self.parts.transformer

    @property
    def hidden_size(self) -> int:
        """Width of both streams."""
        return int(self.transformer.config.hidden_size)

    #: Final names of the layers' linear layers LoRA adapts: both experts' attention
    #: projections and MLPs.
    LORA_PROJECTIONS = (
        "self_attn.to_q", "self_attn.to_k", "self_attn.to_v", "self_attn.to_out",
        "self_attn.add_q_proj", "self_attn.add_k_proj", "self_attn.add_v_proj",
        "self_attn.to_add_out", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        "mlp_moe_gen.gate_proj", "mlp_moe_gen.up_proj", "mlp_moe_gen.down_proj",
    )  # fmt: skip

    def lora_target_module_names(self) -> tuple[str, ...]:
        """Full names of :attr:`LORA_PROJECTIONS` in every layer (linear layers only)."""
        names = []
        for name, module in self.parts.named_modules():
            if not isinstance(module, nn.Linear) or not name.startswith("transformer.layers."):
                continue
            if any(name.endswith("." + p) for p in self.LORA_PROJECTIONS):
                names.append(name)
        return tuple(names)

    def select_rows(self, batch: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
        """Rows of every per-row tensor; the sequence's fields (and ``position_ids``
        ``[B, 3, S]``, ``attention_mask_4d``) trimmed to the longest kept row."""
        size = batch["roles"].shape[0]
        if rows.numel() == size:
            return batch
        width = int(batch["attention_mask"][rows].sum(dim=1).max())
        out = {}
        for name, value in batch.items():
            if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == size:
                value = value[rows]
                if name in _SEQUENCE_KEYS:
                    value = value[:, :width]
                elif name == "position_ids":
                    value = value[:, :, :width]
                elif name == "attention_mask_4d":
                    value = value[:, :, :width, :width]
            out[name] = value
        return out

    # ------------------------------------------------------------------ encoding

    def _vit_grid(self) -> tuple[int, int]:
        patch = int(self.parts.vit.config.patch_size)
        return self.vit_image_size[0] // patch, self.vit_image_size[1] // patch

    def _latent_grid(self) -> tuple[int, int]:
        """``(h, w)``: the latent grid in patches."""
        step = self.codec.factor * self.patch
        return self.image_size[0] // step, self.image_size[1] // step

    def _row(self, example: Any, with_response: bool = True) -> _Row:
        """The row of one example (module docstring): image prompt split, prompt text split,
        then the response (text split, or the noisy image split)."""
        row = TokenRow(extra_fields=_FIELDS)
        state = {"split": 0, "pos": 0}
        ids = self.token_ids

        def close(mode: int, start: int, shared: bool) -> None:
            n = len(row) - start
            row.extras["split"][start:] = [state["split"]] * n
            row.extras["mode"][start:] = [mode] * n
            if shared:
                row.extras["pos"][start:] = [state["pos"]] * n
                state["pos"] += 1
            else:
                row.extras["pos"][start:] = list(range(state["pos"], state["pos"] + n))
                state["pos"] += n
            state["split"] += 1

        prompt_image = example.prompt_image
        response_image = getattr(example, "response_image", None)
        makes_image = response_image is not None or (
            not with_response and getattr(example, "answers_with_image", False)
        )
        out = _Row(row, seed=example_seed(example))
        if prompt_image is not None:
            if self.parts.vit is None:
                raise ValueError("has an image prompt, but this model has no vision encoder")
            out.prompt_image = as_rgb_image(prompt_image, "prompt_image")
            start = len(row)
            h, w = self._vit_grid()
            row.append([ids["<|vision_start|>"]], Role.SPECIAL)
            row.append([ids["<|endoftext|>"]] * (h * w), Role.IMAGE_PROMPT)
            row.append([ids["<|vision_end|>"]], Role.SPECIAL)
            close(FULL, start, shared=True)
        start = len(row)
        append_text_spans(
            self.tokenizer,
            row,
            [
                ("<|im_start|>", Role.SPECIAL, TARGET_NONE),
                (example.prompt_text, Role.TEXT_PROMPT, TARGET_NONE),
                ("<|im_end|>", Role.SPECIAL, TARGET_NONE),
            ],
        )
        close(CAUSAL, start, shared=False)
        if makes_image:
            if response_image is not None:
                out.response_image = as_rgb_image(response_image, "response_image")
            start = len(row)
            h, w = self._latent_grid()
            row.append([ids["<|vision_start|>"]], Role.SPECIAL)
            count = h * w
            row.append(
                [ids["<|endoftext|>"]] * count,
                Role.IMAGE_RESPONSE,
                stream=[GEN] * count,
                pos_h=[i // w for i in range(count)],
                pos_w=[i % w for i in range(count)],
            )
            row.append([ids["<|vision_end|>"]], Role.SPECIAL)
            close(NOISE, start, shared=True)
        elif with_response and example.response_text is not None:
            start = len(row)
            append_text_spans(
                self.tokenizer,
                row,
                [
                    ("<|im_start|>", Role.SPECIAL, TARGET_NONE),
                    (example.response_text, Role.TEXT_RESPONSE, TARGET_TEXT),
                ],
            )
            row.append([ids["<|im_end|>"]], Role.SPECIAL, TARGET_TEXT)
            close(CAUSAL, start, shared=False)
        return out

    def _collate(self, rows: Sequence[_Row]) -> dict[str, Tensor]:
        """Rows -> a right-padded batch (:meth:`encode`)."""
        if not rows:
            raise ValueError("cannot encode an empty list of examples")
        size, length = len(rows), max(len(r.tokens) for r in rows)
        pad = self.token_ids["<|endoftext|>"]
        batch: dict[str, Tensor] = {
            "input_ids": torch.full((size, length), pad, dtype=torch.long),
            "attention_mask": torch.zeros((size, length), dtype=torch.long),
            "roles": torch.full((size, length), int(Role.PAD), dtype=torch.long),
            "target_kind": torch.zeros((size, length), dtype=torch.long),
            "stream": torch.zeros((size, length), dtype=torch.long),
            "split_ids": torch.full((size, length), -1, dtype=torch.long),
            "split_modes": torch.zeros((size, length), dtype=torch.long),
            "position_ids": torch.zeros((size, 3, length), dtype=torch.long),
            "noise_seeds": torch.tensor([r.seed for r in rows], dtype=torch.long),
        }
        table = self.parts.latent_pos_embed is not None
        for b, r in enumerate(rows):
            n, t = len(r.tokens), r.tokens
            batch["input_ids"][b, :n] = torch.tensor(t.ids)
            batch["attention_mask"][b, :n] = 1
            batch["roles"][b, :n] = torch.tensor(t.roles)
            batch["target_kind"][b, :n] = torch.tensor(t.targets)
            batch["stream"][b, :n] = torch.tensor(t.extras["stream"])
            batch["split_ids"][b, :n] = torch.tensor(t.extras["split"])
            batch["split_modes"][b, :n] = torch.tensor(t.extras["mode"])
            pos = torch.tensor(t.extras["pos"])
            batch["position_ids"][b, :, :n] = pos
            if not table:  # 3-axis RoPE positions of the latents (module docstring)
                batch["position_ids"][b, 1, :n] += torch.tensor(t.extras["pos_h"])
                batch["position_ids"][b, 2, :n] += torch.tensor(t.extras["pos_w"])
        batch["has_image"] = torch.tensor([r.response_image is not None for r in rows])
        batch["has_prompt_image"] = torch.tensor([r.prompt_image is not None for r in rows])
        if bool(batch["has_prompt_image"].any()):
            pixels = torch.zeros((size, 3, *self.vit_image_size))
            for b, r in enumerate(rows):
                if r.prompt_image is not None:
                    pixels[b] = _pil_to_pixels(r.prompt_image, self.vit_image_size)
            batch["vit_pixels"] = pixels
        if bool(batch["has_image"].any()):
            h, w = (v // self.codec.factor for v in self.image_size)
            latents = torch.zeros((size, self.codec.channels, h, w))
            which = [b for b, r in enumerate(rows) if r.response_image is not None]
            pixels = torch.stack(
                [_pil_to_pixels(rows[b].response_image, self.image_size) for b in which]
            )
            latents[which] = self.codec.encode(pixels).float().cpu()
            batch["latents"] = latents
        return batch

    def encode(self, examples: Sequence[Any]) -> dict[str, Tensor]:
        """Right-padded batch (module docstring): ``input_ids``, ``attention_mask``,
        ``roles``, ``target_kind``, ``stream`` (0 understanding, 1 generation),
        ``split_ids`` / ``split_modes`` (BAGEL's splits and attention modes),
        ``position_ids`` ``[B, 3, S]`` (RoPE), ``has_prompt_image`` + ``vit_pixels``
        ``[B, 3, H_v, W_v]``, ``has_image`` + ``latents`` ``[B, C, h, w]`` (normalised VAE
        latents of the image responses) and ``noise_seeds`` (a stable hash per example)."""
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
        """The flow objective's draws: a noise level per row from ``schedule``
        (``timesteps``) and fresh ``noise_seeds``, from the global torch generator."""
        return flow_training_batch(batch, self.schedule)

    # ------------------------------------------------------------------ forward

    def vit_tokens(self, pixels: Tensor) -> Tensor:
        """``[b, N_v, d]`` image-prompt tokens of pixels ``[b, 3, H_v, W_v]`` in ``[-1, 1]``:
        SigLIP's patch embedding plus its position table at BAGEL's ids ``row * side +
        col``, its encoder and post-norm, the connector, plus ``vit_pos_embed`` at the same
        ids."""
        vit = self.parts.vit
        embeddings = vit.embeddings
        dtype = embeddings.patch_embedding.weight.dtype
        x = embeddings.patch_embedding(pixels.to(self.device, dtype)).flatten(2).transpose(1, 2)
        side = int(vit.config.image_size) // int(vit.config.patch_size)
        h, w = self._vit_grid()
        ids = (torch.arange(h)[:, None] * side + torch.arange(w)).flatten().to(x.device)
        x = x + embeddings.position_embedding(ids)
        x = vit.post_layernorm(vit.encoder(inputs_embeds=x).last_hidden_state)
        table = self.parts.vit_pos_embed
        ids = (torch.arange(h)[:, None] * table.side + torch.arange(w)).flatten().to(x.device)
        return self.parts.connector(x) + table(ids).to(x.dtype)

    def latent_tokens(self, noisy: Tensor, levels: Tensor) -> Tensor:
        """``[b, N, d]`` generation-stream inputs of noisy latents ``[b, C, h, w]`` at noise
        levels ``[b]``: ``proj_in(patchify(x_t)) + time_embedder(time_proj(t))`` (Cosmos3's
        time input ``1000 t`` times its ``timestep_scale``), plus ``latent_pos_embed`` at
        ``row * max_latent_size + col`` when the model has the table."""
        transformer = self.transformer
        tokens = transformer.proj_in(
            patchify(noisy, self.patch).to(transformer.proj_in.weight.dtype)
        )
        scale = float(transformer.config.timestep_scale)
        time = (self.flow.model_time(levels) * 1000.0 * scale).to(tokens.device)
        embedder = transformer.time_embedder
        frequencies = transformer.time_proj(time.float())
        tokens = (
            tokens
            + embedder(frequencies.to(embedder.linear_1.weight.dtype)).to(tokens.dtype)[:, None]
        )
        table = self.parts.latent_pos_embed
        if table is not None:
            h, w = self._latent_grid()
            ids = (torch.arange(h)[:, None] * table.side + torch.arange(w)).flatten()
            tokens = tokens + table(ids.to(tokens.device)).to(tokens.dtype)
        return tokens

    @staticmethod
    def _stream_index(flags: Tensor) -> tuple[Tensor, Tensor]:
        """``(index [B, n], valid [B, n])``: the positions where ``flags`` [B, S] hold, in
        order, padded with ``S`` (a dummy position); ``n`` the most per row."""
        length = flags.shape[1]
        counts = flags.sum(dim=1)
        n = int(counts.max()) if flags.numel() else 0
        order = torch.sort((~flags).to(torch.int8), dim=1, stable=True).indices[:, :n]
        valid = torch.arange(n, device=flags.device)[None] < counts[:, None]
        return torch.where(valid, order, torch.full_like(order, length)), valid

    def _sequence_output(self, output: Any) -> Tensor:
        """A layer's ``(und, gen)`` output scattered back into sequence order ``[B, S, d]``."""
        und, gen = output
        return self._scatter(und, gen)

    def _sequence_input(self, args: tuple, kwargs: dict) -> Tensor:
        und = args[0] if args else kwargs["und_seq"]
        gen = args[1] if len(args) > 1 else kwargs["gen_seq"]
        return self._scatter(und, gen)

    def _scatter(self, und: Tensor, gen: Tensor) -> Tensor:
        if self._streams is None:
            raise RuntimeError("the stream layout is only known inside MoTAdapter.forward")
        und_index, gen_index, length = self._streams
        out = und.new_zeros((und.shape[0], length + 1, und.shape[-1]))
        width = und.shape[-1]
        out = out.scatter(1, und_index[..., None].expand(-1, -1, width), und)
        if gen.shape[1]:
            out = out.scatter(1, gen_index[..., None].expand(-1, -1, width), gen)
        return out[:, :length]

    def _embed(self, batch: dict[str, Tensor], levels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(embeddings [B, S, d], x_0 [b, C, h, w], noise)`` of the batch (the last two
        of its image rows, empty when there are none)."""
        device = self.device
        transformer = self.transformer
        ids = batch["input_ids"].to(device)
        roles = batch["roles"].to(device)
        embeds = transformer.embed_tokens(ids)
        prompt_rows = torch.nonzero(batch["has_prompt_image"]).flatten()
        if prompt_rows.numel():
            tokens = self.vit_tokens(batch["vit_pixels"][prompt_rows])
            where = torch.nonzero(roles[prompt_rows.to(device)] == int(Role.IMAGE_PROMPT))
            embeds = embeds.index_put(
                (prompt_rows.to(device)[where[:, 0]], where[:, 1]),
                tokens.reshape(-1, tokens.shape[-1]).to(embeds.dtype),
            )
        image_rows = torch.nonzero(batch["has_image"]).flatten()
        x0 = noise = embeds.new_zeros((0,))
        if image_rows.numel():
            rows_levels = levels[image_rows.to(levels.device)].to(device)
            if "noisy_latents" in batch:  # sampling: x_t given
                noisy = batch["noisy_latents"][image_rows].to(device).float()
            else:
                x0 = batch["latents"][image_rows].to(device).float()
                noise = seeded_noise(batch["noise_seeds"][image_rows], x0.shape[1:], device=device)
                noisy = self.flow.noisy(x0, noise, rows_levels)
            tokens = self.latent_tokens(noisy, rows_levels)
            where = torch.nonzero(roles[image_rows.to(device)] == int(Role.IMAGE_RESPONSE))
            embeds = embeds.index_put(
                (image_rows.to(device)[where[:, 0]], where[:, 1]),
                tokens.reshape(-1, tokens.shape[-1]).to(embeds.dtype),
            )
        return embeds, x0, noise

    def forward(
        self,
        batch: dict[str, Tensor],
        output_hidden_states: bool = True,
        layers: Sequence[int] | None = None,
        keep_logits: bool = False,
        embedding_hook: EmbeddingHook | None = None,
        final_norm: bool = FINAL_NORM_DEFAULT,
    ) -> ForwardOutput:
        """Teacher-forced pass of both experts over the joint sequence (module docstring):
        the text loss, the flow loss of the image rows, the hidden states of both streams
        in sequence order. ``embedding_hook`` acts on the ``[B, S, d]`` input embeddings
        (masked latents: ``masked_positions`` index ``roles``)."""
        device = self.device
        chosen = self.resolve_layers(layers)
        masked = batch.get("masked_positions")
        if masked is not None and embedding_hook is None:
            raise ValueError(
                "the batch asks for masked prediction (masked_positions), but the mot "
                "adapter has no mask latent of its own: pass an embedding_hook"
            )
        final, states, x0, noise = self._run(
            batch, chosen if output_hidden_states else None, embedding_hook
        )
        if states is not None and final_norm and self.num_layers in chosen:
            states = list(states)
            states[chosen.index(self.num_layers)] = final
        transformer = self.transformer
        kinds = batch["target_kind"].to(device).clone()
        kinds[:, 0] = TARGET_NONE
        b, t = torch.nonzero(kinds == TARGET_TEXT).unbind(-1)
        lm_head = transformer.lm_head
        text_logits = lm_head(final[b, t - 1]).float()
        labels = batch["input_ids"].to(device)[b, t]
        text_tokens = torch.tensor(labels.numel(), device=device)
        text_loss = F.cross_entropy(text_logits, labels) if labels.numel() else text_logits.sum()
        image_loss, image_tokens = self._image_loss(batch, final, x0, noise, masked)
        return ForwardOutput(
            hidden_states=states,
            layers=chosen,
            roles=batch["roles"].to(device),
            text_loss=text_loss,
            text_tokens=text_tokens,
            image_loss=image_loss,
            image_tokens=image_tokens,
            logits=lm_head(final) if keep_logits else None,
            image_loss_kind="mse",
            depth=self.num_layers,
            stack_name="mot",
        )

    def _run(
        self,
        batch: dict[str, Tensor],
        layers: Sequence[int] | None,
        embedding_hook: EmbeddingHook | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...] | None, Tensor, Tensor]:
        """``(final states [B, S, d], hidden states of layers or None, x_0, noise)``: both
        experts over the joint sequence; the final states are ``norm`` / ``norm_moe_gen`` of
        the last layer's streams in sequence order."""
        device = self.device
        transformer = self.transformer
        size = batch["roles"].shape[0]
        levels = batch.get("timesteps")
        if levels is None:
            levels = torch.full((size,), DEFAULT_PROBE_TIMESTEP)
        levels = levels.float()
        embeds, x0, noise = self._embed(batch, levels)
        if embedding_hook is not None:
            embeds = embedding_hook(embeds, batch)
        valid = batch["attention_mask"].to(device).bool()
        stream = batch["stream"].to(device)
        und_index, _ = self._stream_index(valid & (stream == UND))
        gen_index, _ = self._stream_index(valid & (stream == GEN))
        length = embeds.shape[1]
        if "attention_mask_4d" in batch:
            allowed = batch["attention_mask_4d"].to(device)[:, 0] == 0
        else:
            allowed = mot_attention_mask(
                batch["split_ids"].to(device), batch["split_modes"].to(device), valid, torch.float32
            )[:, 0] == 0  # fmt: skip
        order = torch.cat([und_index, gen_index], dim=1)
        n = order.shape[1]
        padded = F.pad(allowed, (0, 1, 0, 1), value=False)
        joint = padded.gather(1, order[:, :, None].expand(-1, -1, length + 1))
        joint = joint.gather(2, order[:, None, :].expand(-1, n, -1))
        dtype = embeds.dtype
        mask = torch.zeros(joint.shape, dtype=dtype, device=device)
        mask = mask.masked_fill_(~joint, torch.finfo(dtype).min)[:, None]
        s_u = und_index.shape[1]
        positions = batch["position_ids"].to(device).transpose(0, 1)  # [3, B, S]
        cos, sin = transformer.rotary_emb(positions, device=device, dtype=dtype)
        cos, sin = F.pad(cos, (0, 0, 0, 1)), F.pad(sin, (0, 0, 0, 1))

        def take(x: Tensor, index: Tensor) -> Tensor:
            return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

        rotary = (take(cos, und_index), take(sin, und_index), take(cos, gen_index),
                  take(sin, gen_index), mask[:, :, :s_u], mask[:, :, s_u:])  # fmt: skip
        x = F.pad(embeds, (0, 0, 0, 1))
        und, gen = take(x, und_index), take(x, gen_index)
        self._streams = (und_index, gen_index, length)
        try:
            with self.capture(layers, layers is not None) as captured:
                for layer in transformer.layers:
                    und, gen = layer(und, gen, rotary)
            final = self._scatter(transformer.norm(und), transformer.norm_moe_gen(gen))
            states = captured.states() if captured is not None else None
        finally:
            self._streams = None
        return final, states, x0, noise

    def _image_loss(self, batch, final, x0, noise, masked) -> tuple[Tensor, Tensor]:
        """Flow MSE of ``proj_out`` at the latent positions of the image rows."""
        device = final.device
        rows = torch.nonzero(batch["has_image"]).flatten().to(device)
        if rows.numel() == 0:
            return final.sum() * 0.0, torch.tensor(0, device=device)
        roles = batch["roles"].to(device)[rows]
        where = roles == int(Role.IMAGE_RESPONSE)
        picked = final[rows][where].view(rows.numel(), -1, final.shape[-1])
        prediction = self.transformer.proj_out(picked)
        target = patchify(self.flow.target_of(x0, noise), self.patch)
        scored = None
        if masked is not None:
            scored = masked.to(device).bool()[rows][where].view(rows.numel(), -1)
        return flow_mse(prediction, target, scored)

    def input_embeddings(self, batch: dict[str, Tensor]) -> Tensor:
        """Hidden state 0: text embeddings, ViT tokens and latent tokens at their positions."""
        return self.forward(batch, layers=[0]).hidden_layers[0]  # type: ignore[index]

    # ------------------------------------------------------------------ generation

    def generate_text(
        self, examples: Sequence[Any], max_new_tokens: int = 8, batch_size: int = 8
    ) -> list[str]:
        """Greedy answers: a new text split ``<|im_start|> ...`` after the prompt, until
        ``<|im_end|>`` (the sequence recomputed per token)."""
        del batch_size  # one example at a time: rows grow by different amounts
        answers = []
        was_training = self.model.training
        self.model.eval()
        end = self.token_ids["<|im_end|>"]
        try:
            for example in examples:
                with torch.no_grad():
                    row = self._row(example, with_response=False)
                    tokens = row.tokens
                    split = max(tokens.extras["split"]) + 1
                    new: list[int] = []
                    for step in range(max_new_tokens + 1):
                        token = self.token_ids["<|im_start|>"] if step == 0 else new[-1]
                        if step and token == end:
                            break
                        position = max(tokens.extras["pos"]) + 1
                        tokens.append([token], Role.SPECIAL if step == 0 else Role.TEXT_RESPONSE,
                                      split=[split], pos=[position])  # fmt: skip
                        if step == max_new_tokens:
                            break
                        out = self.forward(
                            self._collate([row]), output_hidden_states=False, keep_logits=True
                        )
                        new.append(int(out.logits[0, -1].argmax()))
                text = [i for i in new if i != end]
                answers.append(self.tokenizer.decode(text, skip_special_tokens=True).strip())
        finally:
            self.model.train(was_training)
        return answers

    def generate_images(self, examples: Sequence[Any], batch_size: int = 4) -> list[Image.Image]:
        """Images for the examples' prompts: Euler steps of the flow ODE from noise seeded
        per example (noise levels ``1 .. 0`` in ``num_inference_steps`` steps, shifted by
        ``schedule.shift``), no guidance, decoded by the VAE; RGB PIL images."""
        from types import SimpleNamespace

        wanted = [
            SimpleNamespace(
                **{k: getattr(e, k, None) for k in ("prompt_text", "prompt_image", "category")},
                response_text=None,
                response_image=None,
                answers_with_image=True,
            )
            for e in examples
        ]
        images: list[Image.Image] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(wanted), batch_size):
                images += self._draw(wanted[start : start + batch_size])
        finally:
            self.model.train(was_training)
        return images

    @torch.no_grad()
    def _draw(self, examples: Sequence[Any]) -> list[Image.Image]:
        """:meth:`generate_images` for one batch."""
        device = self.device
        batch = self._collate([self._row(e, with_response=False) for e in examples])
        size = len(examples)
        h, w = (v // self.codec.factor for v in self.image_size)
        x = seeded_noise(batch["noise_seeds"], (self.codec.channels, h, w), device=device)
        batch["has_image"] = torch.ones(size, dtype=torch.bool)
        levels = torch.linspace(1.0, 0.0, self.num_inference_steps + 1)
        levels = shift_noise_levels(levels, self.schedule.shift)
        where = batch["roles"].to(device) == int(Role.IMAGE_RESPONSE)
        for level, following in zip(levels[:-1], levels[1:], strict=True):
            batch["noisy_latents"] = x
            batch["timesteps"] = level.expand(size)
            final, _, _, _ = self._run(batch, None)
            picked = final[where].view(size, -1, final.shape[-1])
            velocity = self.flow.velocity(self.transformer.proj_out(picked).float())
            x = x + (following - level) * unpatchify(velocity, h, w, self.patch)
        return [_pixels_to_pil(p) for p in self.codec.decode(x)]

    # ------------------------------------------------------------------ files

    def adapter_settings(self) -> dict[str, Any]:
        """unifyreg's own settings, saved as :data:`SETTINGS_FILE` (JSON-serialisable)."""
        return {
            "adapter": self.name,
            "image_size": list(self.image_size),
            "vit_image_size": list(self.vit_image_size),
            "schedule": asdict(self.schedule),
            "num_inference_steps": self.num_inference_steps,
        }

    def save(self, directory: str | Path) -> None:
        """A native folder (whatever the model was loaded from): ``transformer/`` and
        ``vae/`` by diffusers' ``save_pretrained``, ``vision/`` by transformers', the
        tokenizer in ``tokenizer/``, the connector and position tables in
        :data:`EXTRAS_FILE`, :data:`SETTINGS_FILE`."""
        from safetensors.torch import save_file

        if self.base_model is not self.model:
            raise ValueError(
                "the model is wrapped by peft: merge the LoRA weights first "
                "(adapter.model = adapter.model.merge_and_unload()) and save again"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        parts = self.parts
        parts.transformer.save_pretrained(directory / "transformer")
        parts.vae.save_pretrained(directory / "vae")
        if parts.vit is not None:
            parts.vit.save_pretrained(directory / "vision")
        self.tokenizer.save_pretrained(directory / "tokenizer")
        extras = {k: v.contiguous() for k, v in parts.extras_state().items()}
        meta = {"connector_act": parts.connector.act_name if parts.connector else ""}
        save_file(extras, str(directory / EXTRAS_FILE), metadata=meta)
        settings = {**self.adapter_settings(), "frozen_biases": parts.frozen_biases}
        (directory / SETTINGS_FILE).write_text(json.dumps(settings))

    @classmethod
    def load(
        cls,
        directory: str | Path,
        dtype: str | torch.dtype = "float32",
        trust_remote_code: bool = False,
        weights_file: str | None = None,
        **settings: Any,
    ) -> MoTAdapter:
        """Load a native folder (``transformer/``, ``vae/``, optional ``vision/``,
        ``tokenizer/``, :data:`EXTRAS_FILE`) or a BAGEL folder (``llm_config.json``,
        ``vit_config.json``, ``ema.safetensors`` or ``weights_file``, the tokenizer files,
        ``vae/``), never from a hub. ``settings`` override :data:`SETTINGS_FILE`'s
        (``image_size``, ``vit_image_size``, ``schedule``, ``num_inference_steps``).
        ``trust_remote_code`` is ignored with a warning."""
        import warnings

        from transformers import AutoTokenizer

        if trust_remote_code:
            warnings.warn(
                f"trust_remote_code=True is ignored by the {cls.name!r} adapter: it loads "
                "native transformers/diffusers classes, and no code from "
                f"{str(directory)!r} is executed",
                UserWarning,
                stacklevel=2,
            )
        root = Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(
                f"model directory {str(root)!r} does not exist (the mot adapter loads local "
                "folders only; download the weights there first)"
            )
        saved: dict[str, Any] = {}
        if (root / SETTINGS_FILE).is_file():
            saved = json.loads((root / SETTINGS_FILE).read_text())
            if saved.get("adapter", cls.name) != cls.name:
                raise ValueError(f"{root} was saved by the {saved['adapter']!r} adapter")
        saved.pop("adapter", None)
        frozen = bool(saved.pop("frozen_biases", False))
        saved.update(settings)
        weights_file = weights_file or saved.pop("weights_file", None)
        vae_config = saved.pop("vae_config", None)
        torch_dtype = resolve_dtype(dtype)
        if (root / "transformer").is_dir():
            model, tokenizer_dir, layout = _build_native(root, frozen), root / "tokenizer", "native"
            facts: dict[str, Any] = {}
        elif (root / "llm_config.json").is_file() and (root / "vit_config.json").is_file():
            model, facts = _build_bagel(root, weights_file, vae_config)
            tokenizer_dir, layout = root, "bagel"
        else:
            raise FileNotFoundError(
                f"{str(root)!r} is neither a mot folder (transformer/) nor a BAGEL folder "
                "(llm_config.json, vit_config.json, ema.safetensors)"
            )
        if torch_dtype != torch.float32:
            # Cosmos3 keeps its time embedder in float32; every other part takes the dtype.
            parts = [m for n, m in model.transformer.named_children() if n != "time_embedder"]
            for name in ("vit", "connector", "vit_pos_embed", "latent_pos_embed"):
                parts.append(getattr(model, name))
            for module in parts:
                if module is not None:
                    module.to(torch_dtype)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(model, tokenizer, layout=layout, **facts, **saved)


def _vae_class(folder: Path) -> type[nn.Module]:
    """The diffusers VAE class a ``vae/`` folder's ``config.json`` names (``AutoencoderKL``
    when it names none)."""
    import diffusers

    config = folder / "config.json"
    name = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
    cls = getattr(diffusers, name or "AutoencoderKL", None)
    if cls is None:
        raise ValueError(f"{folder}: diffusers has no VAE class {name!r}")
    return cls


def _build_native(root: Path, frozen_biases: bool) -> MoTModel:
    """A :class:`MoTModel` of a native folder (:meth:`MoTAdapter.save`'s layout)."""
    from diffusers import Cosmos3OmniTransformer
    from safetensors import safe_open
    from transformers import SiglipVisionModel

    transformer = Cosmos3OmniTransformer.from_pretrained(
        root, subfolder="transformer", local_files_only=True
    )
    vae = _vae_class(root / "vae").from_pretrained(root, subfolder="vae", local_files_only=True)
    vit = connector = vit_table = latent_table = None
    extras: dict[str, Tensor] = {}
    act = "gelu_pytorch_tanh"
    if (root / EXTRAS_FILE).is_file():
        with safe_open(str(root / EXTRAS_FILE), "pt") as handle:
            extras = {k: handle.get_tensor(k) for k in handle.keys()}
            act = (handle.metadata() or {}).get("connector_act") or act
    hidden = int(transformer.config.hidden_size)
    if (root / "vision").is_dir():
        vit = SiglipVisionModel.from_pretrained(root / "vision", local_files_only=True)
        for needed in ("connector.fc1.weight", "vit_pos_embed.pos_embed"):
            if needed not in extras:
                raise ValueError(f"{root / EXTRAS_FILE} has no {needed!r} (vision/ needs it)")
        connector = MLPConnector(int(extras["connector.fc1.weight"].shape[1]), hidden, act)
        vit_table = PositionTable(math.isqrt(extras["vit_pos_embed.pos_embed"].shape[0]), hidden)
    if "latent_pos_embed.pos_embed" in extras:
        latent_table = PositionTable(
            math.isqrt(extras["latent_pos_embed.pos_embed"].shape[0]), hidden
        )
    model = MoTModel(transformer, vae, vit, connector, vit_table, latent_table, frozen_biases)
    own = {k for k in model.extras_state()}
    if set(extras) != own:
        raise ValueError(
            f"{root / EXTRAS_FILE}: missing {sorted(own - set(extras))}, "
            f"unexpected {sorted(set(extras) - own)}"
        )
    model.load_state_dict({**model.state_dict(), **extras}, strict=True)
    return model


# ---------------------------------------------------------------------- tiny checkpoints

#: unifyreg settings of the tiny checkpoints: 32 x 32 images (4 x 4 latents, 2 x 2 patch
#: tokens), 16 x 16 image prompts (2 x 2 ViT tokens), two sampling steps.
TINY_SETTINGS = {
    "image_size": [32, 32],
    "vit_image_size": [16, 16],
    "num_inference_steps": 2,
}
#: Tiny widths: model 64 (4 heads of 16, 2 key/value heads), ViT 32 (patch 8, 4 x 4 table).
_TINY = {"hidden": 64, "heads": 4, "kv": 2, "head_dim": 16, "inter": 128, "vit": 32,
         "vit_patch": 8, "vit_side": 4, "latent_side": 8}  # fmt: skip


def _tiny_tokenizer() -> Any:
    return byte_level_tokenizer(MOT_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>")


def _tiny_vae() -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 8, 8],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,  # as FLUX's
        use_post_quant_conv=False,
    ).eval()


def _tiny_vit_config(layers: int) -> dict[str, Any]:
    return {
        "hidden_size": _TINY["vit"],
        "intermediate_size": 2 * _TINY["vit"],
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "image_size": _TINY["vit_patch"] * _TINY["vit_side"],
        "patch_size": _TINY["vit_patch"],
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    }


def save_tiny_mot(directory: str | Path, seed: int = 0, layers: int = 2) -> Path:
    """Write a tiny random native folder (:meth:`MoTAdapter.save`: a ``Cosmos3OmniTransformer``
    of ``layers`` layers saved by diffusers' ``save_pretrained``, a SigLIP ViT, an
    ``AutoencoderKL``, the connector; no latent position table, so latents get RoPE
    positions); returns it."""
    from diffusers import Cosmos3OmniTransformer
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    t = _TINY
    transformer = Cosmos3OmniTransformer(
        head_dim=t["head_dim"],
        hidden_size=t["hidden"],
        intermediate_size=t["inter"],
        latent_channel=4,
        latent_patch_size=2,
        num_attention_heads=t["heads"],
        num_hidden_layers=layers,
        num_key_value_heads=t["kv"],
        patch_latent_dim=16,
        vocab_size=len(tokenizer),
        rope_theta=1e6,
        rope_axes_dim=_rope_axes(t["head_dim"]),
    ).eval()
    with torch.no_grad():  # diffusers leaves proj_out at its random init; norms at one
        for name, param in transformer.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    config = SiglipVisionConfig(**_tiny_vit_config(1), vision_use_head=False)
    vit = SiglipVisionModel(config).eval()
    model = MoTModel(
        transformer,
        _tiny_vae(),
        vit,
        MLPConnector(t["vit"], t["hidden"]),
        PositionTable(t["vit_side"], t["hidden"]),
    )
    adapter = MoTAdapter(model, tokenizer, **TINY_SETTINGS)
    directory = Path(directory)
    adapter.save(directory)
    return directory


def tiny_bagel_state(seed: int = 0, layers: int = 2, vit_layers: int = 2) -> dict[str, Tensor]:
    """Random tensors under BAGEL's key names and shapes (``ema.safetensors``'s layout,
    written out here from BAGEL's modules, not from :func:`bagel_key_map`): a Qwen2
    mixture-of-transformers language model (q/k/v with biases, o without, per-head q/k
    norms, ``*_moe_gen`` twins of every attention projection, norm and MLP), the packed
    SigLIP (patch embedding in its linear layout, ``vit_layers - 1`` encoder layers: BAGEL
    drops the last), the connector, the time embedder, ``vae2llm`` / ``llm2vae`` and the two
    frozen position tables."""
    generator = torch.Generator().manual_seed(seed)
    t = _TINY
    d, hd, vocab, inter, dv = (
        t["hidden"],
        t["head_dim"],
        len(_tiny_tokenizer()),
        t["inter"],
        t["vit"],
    )
    q, kv = t["heads"] * hd, t["kv"] * hd
    shapes: dict[str, tuple[int, ...]] = {
        "language_model.model.embed_tokens.weight": (vocab, d),
        "language_model.model.norm.weight": (d,),
        "language_model.model.norm_moe_gen.weight": (d,),
        "language_model.lm_head.weight": (vocab, d),
        "time_embedder.mlp.0.weight": (d, 256),
        "time_embedder.mlp.0.bias": (d,),
        "time_embedder.mlp.2.weight": (d, d),
        "time_embedder.mlp.2.bias": (d,),
        "vae2llm.weight": (d, 16),
        "vae2llm.bias": (d,),
        "llm2vae.weight": (16, d),
        "llm2vae.bias": (16,),
        "connector.fc1.weight": (d, dv),
        "connector.fc1.bias": (d,),
        "connector.fc2.weight": (d, d),
        "connector.fc2.bias": (d,),
        "vit_model.vision_model.embeddings.patch_embedding.weight": (dv, 3 * t["vit_patch"] ** 2),
        "vit_model.vision_model.embeddings.patch_embedding.bias": (dv,),
        "vit_model.vision_model.embeddings.position_embedding.weight": (t["vit_side"] ** 2, dv),
        "vit_model.vision_model.post_layernorm.weight": (dv,),
        "vit_model.vision_model.post_layernorm.bias": (dv,),
    }
    for i in range(layers):
        pre = f"language_model.model.layers.{i}."
        for twin in ("", "_moe_gen"):
            for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                shapes[f"{pre}self_attn.{name}{twin}.weight"] = (rows, d)
                shapes[f"{pre}self_attn.{name}{twin}.bias"] = (rows,)
            shapes[f"{pre}self_attn.o_proj{twin}.weight"] = (d, q)
            shapes[f"{pre}self_attn.q_norm{twin}.weight"] = (hd,)
            shapes[f"{pre}self_attn.k_norm{twin}.weight"] = (hd,)
            shapes[f"{pre}mlp{twin}.gate_proj.weight"] = (inter, d)
            shapes[f"{pre}mlp{twin}.up_proj.weight"] = (inter, d)
            shapes[f"{pre}mlp{twin}.down_proj.weight"] = (d, inter)
            shapes[f"{pre}input_layernorm{twin}.weight"] = (d,)
            shapes[f"{pre}post_attention_layernorm{twin}.weight"] = (d,)
    for j in range(vit_layers - 1):
        pre = f"vit_model.vision_model.encoder.layers.{j}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{pre}self_attn.{name}.weight"] = (dv, dv)
            shapes[f"{pre}self_attn.{name}.bias"] = (dv,)
        for name in ("layer_norm1", "layer_norm2"):
            shapes[f"{pre}{name}.weight"] = (dv,)
            shapes[f"{pre}{name}.bias"] = (dv,)
        shapes[f"{pre}mlp.fc1.weight"] = (2 * dv, dv)
        shapes[f"{pre}mlp.fc1.bias"] = (2 * dv,)
        shapes[f"{pre}mlp.fc2.weight"] = (dv, 2 * dv)
        shapes[f"{pre}mlp.fc2.bias"] = (dv,)
    state = {k: 0.1 * torch.randn(s, generator=generator) for k, s in shapes.items()}
    for key in state:  # norms near one, as trained ones are
        if "norm" in key and key.endswith("weight"):
            state[key] = state[key] + 1.0
    state["latent_pos_embed.pos_embed"] = sincos_table(t["latent_side"], d)
    state["vit_pos_embed.pos_embed"] = sincos_table(t["vit_side"], d)
    return state


def save_tiny_bagel(
    directory: str | Path,
    seed: int = 0,
    layers: int = 2,
    vit_layers: int = 2,
    weights_file: str = "ema.safetensors",
    state: dict[str, Tensor] | None = None,
    vae_layout: str = "diffusers",
) -> Path:
    """Write a tiny folder in BAGEL's released layout: ``llm_config.json`` (a Qwen2 MoT
    config), ``vit_config.json`` (SigLIP, ``vit_layers`` layers, one more than the
    checkpoint holds), ``weights_file`` (:func:`tiny_bagel_state`, or ``state``), the
    tokenizer files and the VAE: ``vae/`` (a diffusers ``AutoencoderKL``), or with
    ``vae_layout="ae"`` the same VAE as ``ae.safetensors`` in the original (LDM / FLUX)
    layout (:func:`ldm_vae_state`, its config in :data:`SETTINGS_FILE`); returns it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    t = _TINY
    tokenizer = _tiny_tokenizer()
    llm = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": t["hidden"],
        "intermediate_size": t["inter"],
        "num_hidden_layers": layers,
        "num_attention_heads": t["heads"],
        "num_key_value_heads": t["kv"],
        "vocab_size": len(tokenizer),
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "qk_norm": True,
        "layer_module": "Qwen2MoTDecoderLayer",
    }
    (directory / "llm_config.json").write_text(json.dumps(llm, indent=2))
    vit = {"model_type": "siglip_vision_model", **_tiny_vit_config(vit_layers)}
    (directory / "vit_config.json").write_text(json.dumps(vit, indent=2))
    if state is None:
        state = tiny_bagel_state(seed, layers, vit_layers)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / weights_file))
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    vae = _tiny_vae()
    settings: dict[str, Any] = {"adapter": "mot", **TINY_SETTINGS}
    if vae_layout == "ae":
        ldm = ldm_vae_state(vae.state_dict(), len(vae.config.up_block_types))
        save_file({k: v.contiguous() for k, v in ldm.items()}, str(directory / "ae.safetensors"))
        settings["vae_config"] = {k: vae.config[k] for k in TINY_VAE_KEYS}
    elif vae_layout == "diffusers":
        vae.save_pretrained(directory / "vae")
    else:
        raise ValueError(f"vae_layout must be diffusers or ae, got {vae_layout!r}")
    (directory / SETTINGS_FILE).write_text(json.dumps(settings))
    return directory


#: The tiny VAE's config keys that differ from :data:`FLUX_VAE_CONFIG`.
TINY_VAE_KEYS = ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups")


def ldm_vae_state(state: dict[str, Tensor], up_blocks: int) -> dict[str, Tensor]:
    """A diffusers ``AutoencoderKL`` state dict renamed to the original LDM layout (FLUX's
    ``ae.safetensors``; for the tiny checkpoints): ``down_blocks.{i}.resnets.{j}`` ->
    ``down.{i}.block.{j}``, ``downsamplers.0`` -> ``downsample``, ``up_blocks.{i}`` ->
    ``up.{n - 1 - i}`` (LDM counts decoder blocks from the lowest resolution),
    ``mid_block.resnets.{0,1}`` -> ``mid.block_{1,2}``, the mid attention's ``group_norm``,
    ``to_q/k/v``, ``to_out.0`` -> ``norm``, ``q/k/v``, ``proj_out`` as 1 x 1 convolutions,
    ``conv_shortcut`` -> ``nin_shortcut``, ``conv_norm_out`` -> ``norm_out``."""
    attention = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                 ("to_out.0", "proj_out"))  # fmt: skip
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", new)
        new = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", new)
        match = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)$", new)
        if match:
            index, part, rest = match.groups()
            part = "block" if part == "resnets" else "upsample"
            new = f"decoder.up.{up_blocks - 1 - int(index)}.{part}.{rest}"
        new = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", new)
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in attention:
                new = new.replace(f"attn_1.{a}.", f"attn_1.{b}.")
            if value.dim() == 2:
                value = value[:, :, None, None]
        out[new] = value
    return out
