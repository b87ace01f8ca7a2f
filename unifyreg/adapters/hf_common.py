"""Shared machinery of the adapters over ``transformers`` models (Emu3, Janus, Chameleon,
GLM-Image, and Show-o's Phi).

Each family module (``emu3.py``, ``janus.py``, ``chameleon.py``, ``glm_image.py``,
``showo.py``) subclasses :class:`TransformersAdapter` and supplies what differs: how an
image becomes prompt or response positions, how input embeddings are built, which head
scores image targets, and how generated image tokens become pixels. Everything else lives
here, once:

- loading from a local directory (``from_pretrained(path, local_files_only=True)`` of the
  model and its processor), with clear errors for a missing or wrong directory;
- the prompt layout ``<bos> prefix [image block after_image] prompt suffix response``:
  each text run of the prompt is tokenised in one piece, so its tokens match the model's
  own format, and every token takes the role of the character span it ends in; the
  response is tokenised on its own, so a prompt's tokens are exactly those generation
  starts from;
- right-padded training batches and left-padded generation batches;
- the teacher-forced forward pass (hidden states of the language model, text and image
  next-token losses computed on the target positions only), with the seam's batch
  conventions (:mod:`unifyreg.adapters.base`): a batch's ``attention_mask_4d`` (or, with
  ``masked_positions``, an omni-attention mask) replaces the causal mask, and
  ``masked_positions`` switches the image loss to masked prediction: the inputs there take
  the family's mask token (:attr:`TransformersAdapter.mask_token_id`) unless an embedding
  hook replaces them, and the image head at each masked position is scored against the
  token that was there (no shift). A family whose own objective is masked prediction
  (``image_objective = "masked"``: Show-o) scores no image target in a batch without
  ``masked_positions``;
- greedy decoding with a key/value cache (the family may give the prefill its own
  attention mask and position ids: Show-o's omni-attention, GLM-Image's 3-D positions).

Conventions are those of :mod:`unifyreg.adapters.toy`: a target's kind is stored at the
target token's own position (``target_kind[t]`` describes ``input_ids[t]``, predicted from
position ``t - 1``); the text loss covers the response words and the ``<eos>`` after them;
the image loss covers the image's content tokens only (layout tokens are SPECIAL).
"""

from __future__ import annotations

import bisect
import json
import operator
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

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
    model_attention_mask,
    output_cache,
)
from unifyreg.adapters.prefix import PrefixPass
from unifyreg.images import as_rgb_image
from unifyreg.roles import Role

__all__ = [
    "ADAPTER_SETTINGS_FILE",
    "LORA_PROJECTIONS",
    "PromptTemplate",
    "TokenRow",
    "TransformersAdapter",
    "append_text_spans",
    "byte_level_tokenizer",
    "pixels_to_pil",
    "resolve_dtype",
]

#: Optional file next to the checkpoint with unifyreg's own settings (prompt template, ...).
ADAPTER_SETTINGS_FILE = "unifyreg_adapter.json"
#: Final names of the language model's attention and MLP projections that LoRA adapts.
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or a ``torch.dtype``) -> ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must name a floating-point torch dtype, got {dtype!r}")
    return resolved


@dataclass(frozen=True)
class PromptTemplate:
    """Text around an example: ``<bos> prefix [image after_image] prompt suffix response``.

    ``prefix``, ``after_image`` and ``suffix`` are the model's chat scaffolding (SPECIAL);
    ``response_lead`` is prepended to a text response and belongs to it (e.g. the space
    before the first word of a byte-level BPE vocabulary).
    """

    prefix: str = ""
    after_image: str = ""
    suffix: str = ""
    response_lead: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptTemplate:
        """Inverse of ``dataclasses.asdict``; unknown keys raise ValueError naming them."""
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown prompt template field(s) {unknown}")
        return cls(**data)


@dataclass
class TokenRow:
    """One sequence under construction: ids with a role and a target kind per position.

    ``extras`` holds further per-position integer fields (e.g. VQ codes, position masks),
    0 where not given; ``row_tensors`` holds per-sequence tensors (e.g. pixel values).
    """

    extra_fields: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    roles: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    extras: dict[str, list[int]] = field(default_factory=dict)
    row_tensors: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.extra_fields:
            self.extras.setdefault(name, [0] * len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)

    def append(
        self,
        ids: Sequence[int],
        role: Role | Sequence[int],
        target: int | Sequence[int] = TARGET_NONE,
        **extras: Sequence[int],
    ) -> None:
        """Append positions; ``role`` / ``target`` are one value for all or one per position."""
        n = len(ids)
        roles = [int(role)] * n if isinstance(role, (Role, int)) else [int(r) for r in role]
        targets = [int(target)] * n if isinstance(target, int) else [int(t) for t in target]
        if len(roles) != n or len(targets) != n:
            raise ValueError("ids, roles and targets must have the same length")
        unknown = set(extras) - set(self.extra_fields)
        if unknown:
            raise ValueError(f"unknown per-position field(s) {sorted(unknown)}")
        self.ids += [int(i) for i in ids]
        self.roles += roles
        self.targets += targets
        for name in self.extra_fields:
            values = extras.get(name)
            if values is not None and len(values) != n:
                raise ValueError(f"field {name!r} needs {n} values, got {len(values)}")
            self.extras[name] += [int(v) for v in values] if values is not None else [0] * n


def byte_level_tokenizer(
    special_tokens: Sequence[str], first_tokens: Sequence[str] = (), **named_tokens: Any
) -> Any:  # transformers.PreTrainedTokenizerFast
    """A tiny byte-level BPE tokenizer (256 byte tokens, no merges) plus special tokens.

    Any text encodes without unknown tokens and decodes back exactly, which makes it a
    small stand-in for the real vocabularies in tests. ``first_tokens`` (special) take ids
    ``0 .. len(first_tokens) - 1`` (GLM-Image puts its vision tokens there), then come the
    256 bytes, then ``special_tokens`` in order; ``named_tokens`` go to
    ``PreTrainedTokenizerFast`` (``bos_token``, ``extra_special_tokens={"image_token": ...}``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(first_tokens)}
    for byte in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[byte] = len(vocab)
    for token in special_tokens:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([*first_tokens, *special_tokens])
    return PreTrainedTokenizerFast(tokenizer_object=backend, **named_tokens)


def append_text_spans(
    tokenizer: Any, row: TokenRow, spans: Sequence[tuple[str, Role, int]]
) -> None:
    """Tokenise ``spans`` (text, role, target) as one string and append the tokens to
    ``row``; a token takes the span its last character lies in, so merges across span
    borders keep the real format (slow tokenizers without offsets: one call per span)."""
    spans = [span for span in spans if span[0]]
    if not spans:
        return
    text = "".join(span[0] for span in spans)
    ends = list(np.cumsum([len(span[0]) for span in spans]))
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # slow tokenizers have no offsets: one call per span
        for piece, role, target in spans:
            ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            row.append(ids, role, target)
        return
    for token_id, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        char = min(max(end - 1, start, 0), len(text) - 1)
        _, role, target = spans[bisect.bisect_right(ends, char)]
        row.append([token_id], role, target)


def pixels_to_pil(pixels: Tensor, image_processor: Any) -> Image.Image:
    """Undo an image processor's rescale/normalise on ``[3, H, W]`` pixels -> an RGB image."""
    array = pixels.detach().float().cpu().numpy()
    if getattr(image_processor, "do_normalize", False):
        mean = np.asarray(image_processor.image_mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(image_processor.image_std, dtype=np.float32).reshape(-1, 1, 1)
        array = array * std + mean
    scale = getattr(image_processor, "rescale_factor", 1 / 255)
    array = array / scale if getattr(image_processor, "do_rescale", True) else array * 255
    array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), mode="RGB")


class TransformersAdapter(Adapter):
    """Base of the adapters over ``transformers`` models (see the module docstring).

    Subclasses set the class attributes below and implement the ``_image_*`` hooks;
    ``model`` is the ``transformers`` model (possibly wrapped by peft) and ``processor``
    its processor (tokenizer + image processor), or a tokenizer alone for a family whose
    image tokenizer lies outside ``transformers`` (Show-o).
    """

    #: The ``transformers`` model class (``from_pretrained`` target).
    model_class: type[nn.Module]
    #: ``config.model_type`` a checkpoint of this family has.
    model_type: str = ""
    #: Dotted path from the model to its language model (the module holding ``layers``).
    language_model_path: str = ""
    #: Per-position integer fields this family adds to a batch (besides the common ones).
    extra_fields: tuple[str, ...] = ()
    #: Name of the final norm inside the language model.
    final_norm_name: str = "norm"
    #: Final names of the projections LoRA adapts inside the language model's layers.
    lora_projections: tuple[str, ...] = LORA_PROJECTIONS
    #: How image targets are scored in a batch without ``masked_positions``:
    #: ``"next_token"`` (from the position before, autoregressive families) or
    #: ``"masked"`` (none: only masked positions are ever scored; Show-o).
    image_objective: str = "next_token"
    supports_masked_prediction = True
    supports_prefix_reuse = True
    #: Vocabulary id whose embedding replaces the inputs at ``masked_positions`` (None: the
    #: family has none, and masked positions need an embedding hook).
    mask_token_id: int | None = None
    default_template = PromptTemplate()

    def __init__(self, model: nn.Module, processor: Any, template: PromptTemplate | None = None):
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.template = template or self.default_template
        config = self.text_config
        self.max_positions = int(config.max_position_embeddings)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self.tokenizer, name) is None:
                raise ValueError(f"the {self.name} tokenizer has no {name[:-3]}")
        self.bos_id = int(self.tokenizer.bos_token_id)
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.pad_id = int(self.tokenizer.pad_token_id)
        #: LoRA targets: the full names of the language model's projections. A full name
        #: is a suffix of the module's name in any wrapper too, and none of them can match a
        #: vision tower, VQ model or generation head (those reuse names such as ``q_proj``).
        self.default_lora_targets = self.lora_target_module_names()

    # ------------------------------------------------------------------ model parts

    @property
    def layer_stack(self) -> LayerStack:  # type: ignore[override]
        """The language model's ``layers`` and final norm (:attr:`final_norm_name`)."""
        path = self.language_model_path
        return LayerStack(f"{path}.layers", f"{path}.{self.final_norm_name}")

    @property
    def language_model(self) -> nn.Module:
        """The decoder whose hidden states are reported (embeddings, ``layers``, ``norm``)."""
        return operator.attrgetter(self.language_model_path)(self.base_model)

    @property
    def text_config(self) -> Any:
        """The language model's config (vocabulary, width, depth, positions)."""
        return self.language_model.config

    @property
    def lm_head(self) -> nn.Module:
        """The text output head (hidden state -> vocabulary logits)."""
        return self.base_model.lm_head

    def lora_target_module_names(self) -> tuple[str, ...]:
        """Full names (in :attr:`base_model`) of the language model's attention/MLP projections."""
        prefix = f"{self.language_model_path}.layers."
        return tuple(
            name
            for name, module in self.base_model.named_modules()
            if name.startswith(prefix)
            and name.rsplit(".", 1)[-1] in self.lora_projections
            and isinstance(module, nn.Linear)
        )

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """The language model's input embeddings of token ids."""
        return self.language_model.get_input_embeddings()(input_ids)

    # ------------------------------------------------------------------ construction

    def adapter_settings(self) -> dict[str, Any]:
        """unifyreg's own settings, saved next to the checkpoint (JSON-serialisable)."""
        return {"adapter": self.name, "template": asdict(self.template)}

    def save(self, directory: str | Path) -> None:
        """``save_pretrained`` of the model and the processor + :data:`ADAPTER_SETTINGS_FILE`."""
        if self.base_model is not self.model:
            raise ValueError(
                "the model is wrapped by peft: merge the LoRA weights first "
                "(adapter.model = adapter.model.merge_and_unload()) and save again"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        (directory / ADAPTER_SETTINGS_FILE).write_text(json.dumps(self.adapter_settings()))

    @classmethod
    def load(
        cls,
        directory: str | Path,
        dtype: str | torch.dtype = "float32",
        trust_remote_code: bool = False,
        template: PromptTemplate | dict[str, Any] | None = None,
        **settings: Any,
    ) -> TransformersAdapter:
        """Load model and processor from a local directory (never from a hub).

        ``dtype`` is the weights' dtype; ``template`` overrides the prompt template (saved
        one, else the family default); further keyword ``settings`` override saved settings
        of the family (see its ``__init__``). ``trust_remote_code=True`` is ignored with a
        warning: the native ``transformers`` classes run, no code from the directory does.
        """
        from transformers import AutoProcessor

        if trust_remote_code:
            warnings.warn(
                f"trust_remote_code=True is ignored by the {cls.name!r} adapter: it loads the "
                f"native transformers class {cls.model_class.__name__}, and no code from "
                f"{str(directory)!r} is executed",
                UserWarning,
                stacklevel=2,
            )
        directory = cls._check_directory(directory)
        saved: dict[str, Any] = {}
        settings_file = directory / ADAPTER_SETTINGS_FILE
        if settings_file.is_file():
            saved = json.loads(settings_file.read_text())
            if saved.get("adapter", cls.name) != cls.name:
                raise ValueError(
                    f"{directory} was saved by the {saved['adapter']!r} adapter, not {cls.name!r}"
                )
        model = cls.model_class.from_pretrained(
            directory, dtype=resolve_dtype(dtype), local_files_only=True
        )
        model.eval()
        try:
            processor = AutoProcessor.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise FileNotFoundError(
                f"{str(directory)!r} holds a {cls.model_type} model but no usable processor "
                f"(tokenizer + image processor): {error}"
            ) from error
        if not (hasattr(processor, "tokenizer") and hasattr(processor, "image_processor")):
            raise FileNotFoundError(
                f"{str(directory)!r} holds a {cls.model_type} model but no processor "
                f"(found only a {type(processor).__name__}); save the model's processor there"
            )
        if isinstance(template, dict):
            template = PromptTemplate.from_dict(template)
        if template is None and "template" in saved:
            template = PromptTemplate.from_dict(saved["template"])
        family_settings = {k: v for k, v in saved.items() if k not in ("adapter", "template")}
        family_settings.update(settings)
        return cls(model, processor, template=template, **family_settings)

    @classmethod
    def _check_directory(cls, directory: str | Path) -> Path:
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"model directory {str(directory)!r} does not exist (the {cls.name} adapter "
                "loads local directories only; download the weights there first)"
            )
        config_file = directory / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{str(directory)!r} is not a saved transformers model: no config.json"
            )
        model_type = json.loads(config_file.read_text()).get("model_type")
        if model_type != cls.model_type:
            raise ValueError(
                f"{str(directory)!r} holds a {model_type!r} model; the {cls.name} adapter "
                f"needs {cls.model_type!r}"
            )
        if not any((directory / name).is_file() for name in WEIGHT_FILES):
            raise FileNotFoundError(
                f"{str(directory)!r} has a config.json but no weights "
                f"(expected one of {', '.join(WEIGHT_FILES)})"
            )
        return directory

    # ------------------------------------------------------------------ encoding

    def _new_row(self) -> TokenRow:
        return TokenRow(extra_fields=self.extra_fields)

    def _blank_row_tensors(self) -> dict[str, Tensor]:
        """Per-sequence tensors every batch carries, as their value for a row without them."""
        return {}

    def _append_text(self, row: TokenRow, spans: Sequence[tuple[str, Role, int]]) -> None:
        """:func:`append_text_spans` with this adapter's tokenizer."""
        append_text_spans(self.tokenizer, row, spans)

    def _append_image_prompt(self, row: TokenRow, image: Image.Image) -> None:
        """Append an image prompt's positions (content positions IMAGE_PROMPT)."""
        raise NotImplementedError

    def _append_image_response(self, row: TokenRow, image: Image.Image) -> None:
        """Append an image response's positions (content IMAGE_RESPONSE, image targets)."""
        raise NotImplementedError

    def _prompt_row(self, example: Any) -> TokenRow:
        """``<bos> prefix [image after_image] prompt suffix`` (what generation starts from)."""
        template = self.template
        row = self._new_row()
        row.append([self.bos_id], Role.SPECIAL)
        if example.prompt_image is not None:
            self._append_text(row, [(template.prefix, Role.SPECIAL, TARGET_NONE)])
            self._append_image_prompt(row, as_rgb_image(example.prompt_image, "prompt_image"))
            lead = template.after_image
        else:
            lead = template.prefix
        self._append_text(
            row,
            [
                (lead, Role.SPECIAL, TARGET_NONE),
                (example.prompt_text, Role.TEXT_PROMPT, TARGET_NONE),
                (template.suffix, Role.SPECIAL, TARGET_NONE),
            ],
        )
        return row

    def encode_example(self, example: Any) -> TokenRow:
        """The full sequence of one example (prompt and reference response)."""
        row = self._prompt_row(example)
        if example.response_image is not None:
            self._append_image_response(row, as_rgb_image(example.response_image, "response_image"))
        elif example.response_text is not None:
            # Tokenised alone (not with the prompt) so the prompt's tokens are the ones
            # generation starts from; the <eos> is a target: generation must learn to stop.
            self._append_text(
                row,
                [
                    (self.template.response_lead, Role.TEXT_RESPONSE, TARGET_TEXT),
                    (example.response_text, Role.TEXT_RESPONSE, TARGET_TEXT),
                ],
            )
            row.append([self.eos_id], Role.SPECIAL, TARGET_TEXT)
        return row

    def encode_prompts(
        self, examples: Sequence[Any], padding_side: str = "left"
    ) -> dict[str, Tensor]:
        """The prompts alone (``<bos> ... suffix``, what generation starts from), padded on
        ``padding_side``; same keys as :meth:`encode`, no targets."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        with torch.no_grad():
            rows = [self._prompt_row(example) for example in examples]
        return self._collate(rows, padding_side)

    def _collate(self, rows: Sequence[TokenRow], padding_side: str) -> dict[str, Tensor]:
        if not rows:
            raise ValueError("cannot encode an empty list of examples")
        length = max(len(row) for row in rows)
        size = (len(rows), length)
        batch = {
            "input_ids": torch.full(size, self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros(size, dtype=torch.long),
            "roles": torch.full(size, int(Role.PAD), dtype=torch.long),
            "target_kind": torch.zeros(size, dtype=torch.long),
        }
        for name in self.extra_fields:
            batch[name] = torch.zeros(size, dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(row)
            span = slice(0, n) if padding_side == "right" else slice(length - n, length)
            batch["input_ids"][b, span] = torch.tensor(row.ids)
            batch["attention_mask"][b, span] = 1
            batch["roles"][b, span] = torch.tensor(row.roles)
            batch["target_kind"][b, span] = torch.tensor(row.targets)
            for name in self.extra_fields:
                batch[name][b, span] = torch.tensor(row.extras[name])
        for name, blank in self._blank_row_tensors().items():
            batch[name] = torch.stack([row.row_tensors.get(name, blank) for row in rows])
        return batch

    def encode(self, examples: Sequence[Any]) -> dict[str, Tensor]:
        """Right-padded batch: ``input_ids``, ``attention_mask``, ``roles``, ``target_kind``
        and the family's extra fields (see its module docstring)."""
        if len(examples) == 0:
            raise ValueError("cannot encode an empty list of examples")
        rows = []
        with torch.no_grad():
            for index, example in enumerate(examples):
                try:
                    row = self.encode_example(example)
                except ValueError as error:
                    raise ValueError(
                        f"example {index} ({example.prompt_text!r}): {error}"
                    ) from None
                if len(row) > self.max_positions:
                    raise ValueError(
                        f"example {index} ({example.prompt_text!r}) has {len(row)} tokens; "
                        f"the model allows {self.max_positions}"
                    )
                rows.append(row)
        return self._collate(rows, "right")

    # ------------------------------------------------------------------ forward

    def model_input_ids(self, batch: dict[str, Tensor]) -> Tensor:
        """``input_ids`` as the model reads them: :attr:`mask_token_id` at the batch's
        ``masked_positions`` when the family has a mask token (the batch keeps the
        original tokens, which are the masked-prediction targets)."""
        ids = batch["input_ids"].to(self.device)
        masked = batch.get("masked_positions")
        if masked is not None and self.mask_token_id is not None:
            ids = ids.masked_fill(masked.to(ids.device).bool(), self.mask_token_id)
        return ids

    def input_embeddings(self, batch: dict[str, Tensor]) -> Tensor:
        """``[B, S, d]`` inputs of the language model (hidden state 0) for an encoded batch."""
        return self.embed_tokens(self.model_input_ids(batch))

    def _image_logits(
        self, hidden: Tensor, batch: dict[str, Tensor], positions: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Logits and labels of the image targets at ``positions`` (``[n, 2]`` (b, t) pairs);
        ``hidden`` ``[n, d]`` holds the final hidden state that predicts each target (the
        position before it for next-token prediction, its own for masked prediction).
        Default: ``lm_head`` over the shared vocabulary, labels from ``input_ids`` (Emu3,
        Chameleon, GLM-Image, Show-o)."""
        b, t = positions.unbind(-1)
        return self.lm_head(hidden), batch["input_ids"].to(hidden.device)[b, t]

    def _position_arguments(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Extra position keywords of the language model for a teacher-forced batch (default
        none: the model counts positions itself; GLM-Image passes its 3-D positions)."""
        return {}

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
        """Teacher-forced forward pass; see :meth:`Adapter.forward` for the contract and the
        module docstring for ``attention_mask_4d`` and ``masked_positions``.

        ``record_prefix`` / ``prefix``: keep a prefix's keys and values, or run only the
        positions after a kept prefix (:mod:`unifyreg.adapters.prefix`; the losses then
        cover the targets after it, ``logits`` the positions after it; no hidden states)."""
        device = self.device
        chosen = self.resolve_layers(layers)
        masked = batch.get("masked_positions")
        if masked is not None and self.mask_token_id is None and embedding_hook is None:
            raise ValueError(
                f"the batch asks for masked prediction (masked_positions), but the "
                f"{self.name} adapter has no mask token: pass an embedding_hook that "
                "replaces the masked inputs"
            )
        embeds = self.input_embeddings(batch)
        if embedding_hook is not None:
            embeds = embedding_hook(embeds, batch)
        attention_mask = model_attention_mask(batch, device, embeds.dtype)
        run = PrefixPass(self.language_model, record_prefix, prefix, output_hidden_states, layers)
        start = run.start
        embeds, attention_mask, positions = run.cut(
            embeds, attention_mask, self._position_arguments(batch)
        )
        with self.capture(chosen, output_hidden_states and prefix is None, final_norm) as captured:
            out = self.language_model(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                **run.model_kwargs(),
                **positions,
            )
        run.check(embeds.shape[1])
        final = out.last_hidden_state  # positions [start, S)
        # Position t predicts token t + 1, so a target at t >= 1 is scored from t - 1; after
        # a prefix, only targets whose scoring position lies after it.
        kinds = batch["target_kind"].to(device).clone()
        kinds[:, : start + 1] = TARGET_NONE
        text_positions = torch.nonzero(kinds == TARGET_TEXT)
        b, t = text_positions.unbind(-1)
        text_logits = self.lm_head(final[b, t - 1 - start])
        text_labels = batch["input_ids"].to(device)[b, t]
        if masked is not None:  # masked prediction: each masked position predicts itself
            scored = masked.to(device).bool().clone()
            scored[:, :start] = False  # (the prefix holds no image response)
            image_positions = torch.nonzero(scored)
            b, t = image_positions.unbind(-1)
            image_hidden = final[b, t - start]
        else:
            if self.image_objective == "next_token":
                image_positions = torch.nonzero(kinds == TARGET_IMAGE)
            else:  # a masked-prediction family scores masked positions only
                image_positions = kinds.new_zeros((0, 2))
            b, t = image_positions.unbind(-1)
            image_hidden = final[b, t - 1 - start]
        image_logits, image_labels = self._image_logits(image_hidden, batch, image_positions)
        text_loss, text_tokens = _mean_cross_entropy(text_logits, text_labels)
        image_loss, image_tokens = _mean_cross_entropy(image_logits, image_labels)
        return ForwardOutput(
            hidden_states=captured.states() if captured is not None else None,
            layers=chosen,
            roles=batch["roles"].to(device),
            text_loss=text_loss,
            text_tokens=text_tokens,
            image_loss=image_loss,
            image_tokens=image_tokens,
            logits=self.lm_head(final) if keep_logits else None,
            prefix_states=run.states(self.num_layers),
        )

    # ------------------------------------------------------------------ generation

    def _generation_attention_mask(self, batch: dict[str, Tensor], mask: Tensor) -> Tensor:
        """The attention mask of a left-padded prompt batch's prefill (default: the 2-D
        padding mask ``mask``; a family with its own prompt attention returns a 4-D one)."""
        return mask

    def _generation_positions(self, batch: dict[str, Tensor], mask: Tensor) -> Tensor:
        """Position ids of a left-padded prompt batch (default ``[B, S]``: counted from
        each row's first real token, so left padding shifts nothing)."""
        return (mask.cumsum(-1) - 1).clamp_min(0)

    @torch.no_grad()
    def _greedy(
        self,
        rows: Sequence[TokenRow],
        steps: int,
        choose: Callable[[int, Tensor], Tensor],
        embed: Callable[[Tensor], Tensor],
        stop_id: int | None,
        batch_size: int,
        next_positions: Callable[[Tensor, int], Tensor] | None = None,
    ) -> list[list[int]]:
        """Greedy decoding from left-padded prompts with a key/value cache.

        ``choose(step, hidden)`` maps the last final hidden state ``[b, d]`` to the next
        ids ``[b]`` (head, restrictions, forced layout tokens); ``embed(ids)`` gives the
        next input embeddings ``[b, 1, d]``. ``next_positions(prompt_positions, step)``
        gives the position ids of the token chosen at ``step`` (default: one past the
        prompt's last position, plus ``step``). Rows are cut at ``stop_id``.
        """
        if next_positions is None:

            def next_positions(prompt_positions: Tensor, step: int) -> Tensor:
                return prompt_positions[..., -1:] + 1 + step

        if batch_size < 1 or steps < 1:
            raise ValueError(
                f"batch_size and the number of new tokens must be >= 1, got {batch_size} "
                f"and {steps}"
            )
        was_training = self.model.training
        self.model.eval()
        device = self.device
        results: list[list[int]] = []
        try:
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                batch = self._collate(chunk, "left")
                width = batch["input_ids"].shape[1]
                if width + steps > self.max_positions:
                    raise ValueError(
                        f"a prompt of {width} tokens plus {steps} new tokens exceeds the "
                        f"model's {self.max_positions} positions"
                    )
                mask = batch["attention_mask"].to(device)
                prompt_positions = self._generation_positions(batch, mask).to(device)
                out = self.language_model(
                    inputs_embeds=self.input_embeddings(batch),
                    attention_mask=self._generation_attention_mask(batch, mask),
                    position_ids=prompt_positions,
                    use_cache=True,
                )
                finished = torch.zeros(len(chunk), dtype=torch.bool, device=device)
                generated = []
                for step in range(steps):
                    next_ids = choose(step, out.last_hidden_state[:, -1])
                    generated.append(next_ids)
                    if stop_id is not None:
                        finished |= next_ids == stop_id
                        if bool(finished.all()):
                            break
                    if step == steps - 1:
                        break
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                    out = self.language_model(
                        inputs_embeds=embed(next_ids),
                        attention_mask=mask,
                        position_ids=next_positions(prompt_positions, step),
                        use_cache=True,
                        **cache_argument(self.language_model, output_cache(out)),
                    )
                for tokens in torch.stack(generated, dim=1).tolist():
                    if stop_id is not None and stop_id in tokens:
                        tokens = tokens[: tokens.index(stop_id)]
                    results.append(tokens)
        finally:
            self.model.train(was_training)
        return results

    def _banned_in_text(self) -> Tensor:
        """``[V]`` bool: ids text generation may not emit (the family's image tokens)."""
        return torch.zeros(self.lm_head.out_features, dtype=torch.bool)

    def _embed_ids(self, ids: Tensor) -> Tensor:
        return self.embed_tokens(ids[:, None])

    def generate_text(
        self, examples: Sequence[Any], max_new_tokens: int = 8, batch_size: int = 16
    ) -> list[str]:
        """Greedy answers: until ``<eos>``, at most ``max_new_tokens``, image tokens banned."""
        banned = self._banned_in_text().to(self.device)

        def choose(step: int, hidden: Tensor) -> Tensor:
            logits = self.lm_head(hidden).float()
            return logits.masked_fill(banned, float("-inf")).argmax(-1)

        with torch.no_grad():
            rows = [self._prompt_row(example) for example in examples]
        tokens = self._greedy(
            rows, max_new_tokens, choose, self._embed_ids, self.eos_id, batch_size
        )
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens]


def _mean_cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mean token cross-entropy (float32) and the token count; 0 when there are no labels."""
    count = torch.tensor(labels.numel(), device=logits.device)
    if labels.numel() == 0:
        # The empty sum is an exact 0 that stays on the graph, so backward still works.
        return logits.float().sum(), count
    return F.cross_entropy(logits.float(), labels), count
