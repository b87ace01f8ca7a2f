"""Any user model through the seam: the ``hooked`` adapter.

For a model no adapter knows (BAGEL, Harmon, JanusFlow, Show-o2 until they get their own,
or a research model), the user gives, from Python:

- ``model``: the ``nn.Module`` (any class; ``transformers`` or not);
- ``layers``: the dotted path of its list of blocks (``"llm.model.layers"``), whose
  outputs are the hidden states (and optionally ``final_norm``, the norm after them);
- ``embeddings``: the dotted path of the input-embedding module, whose output ``[B, S, d]``
  is the sequence the blocks read (the contextual-prediction loss swaps masked inputs
  there); None when no module's output is that sequence (a model that concatenates image
  latents after its token embeddings): the swap is then applied to the first block's input;
- ``collate``: examples -> a batch, a dict of tensors with ``roles`` ``[B, S]`` (one
  :class:`unifyreg.roles.Role` per position of the blocks' sequence) and whatever the
  model needs; rows right-padded (``Role.PAD`` after the last real position);
- ``step``: the one function that runs the model on a batch and returns its task losses,
  ``step(model, batch) -> HookedStep(text_loss, text_tokens, image_loss, image_tokens)``
  (``model`` is the module as trained, possibly wrapped by peft; tensors of the batch are on
  the model's device). An image loss of any kind (next-token, masked-token
  cross-entropy, a flow-matching MSE) is the user's.

unifyreg then captures the hidden states with the seam's forward hooks on ``layers`` (layer
0 = the first block's input), so the probe, both loss terms (``L_ctx`` where ``step``
returns an image loss over the image positions it scores; ``L_div`` always) and the
callbacks run unchanged. LoRA targets are given by name (``lora_targets``: module-name
suffixes, as peft's ``target_modules``). The rest is optional: ``training_batch`` (the
model's own objective on a training batch, e.g. drawing ``masked_positions``, or a flow
model's ``timesteps`` and ``noise_seeds``: :mod:`unifyreg.adapters.continuous`),
``generate_text`` / ``generate_images`` (``fn(adapter, examples) -> list``, for
``probe.responses=generated``), ``hidden_size`` (default: the embedding module's width),
``image_objective`` (``next_token``, ``masked``, or ``flow`` for a continuous model whose
``step`` returns a flow-matching MSE: the image loss is then of kind ``mse`` and the probe
passes ``timesteps = probe.timestep`` in every batch; ``collate`` should seed each
example's noise, :func:`unifyreg.adapters.continuous.example_seed`).

There is no YAML route: ``model.adapter=hooked`` in a config stops with a message pointing
here. Fine-tune and probe from Python with :class:`unifyreg.module.UMMModule`,
:class:`unifyreg.callbacks.EntropyProbe` and :func:`unifyreg.probing.run_probe` (README,
"Any model: the hooked adapter").
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unifyreg.adapters.base import (
    FINAL_NORM_DEFAULT,
    Adapter,
    EmbeddingHook,
    ForwardOutput,
    LayerStack,
)

__all__ = ["HOOKED_FILE", "HookedAdapter", "HookedStep"]

#: What :meth:`HookedAdapter.save` writes next to the weights (the adapter's paths).
HOOKED_FILE = "unifyreg_hooked.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class HookedStep:
    """What the user's ``step`` returns for one batch: mean text and image losses with the
    number of targets each scored (None / 0 where the batch has none), and optionally the
    logits (``keep_logits``)."""

    text_loss: Tensor | None = None
    text_tokens: int | Tensor = 0
    image_loss: Tensor | None = None
    image_tokens: int | Tensor = 0
    logits: Tensor | None = None


class HookedAdapter(Adapter):
    """A user module behind the seam (see the module docstring for every argument).

    Example::

        adapter = HookedAdapter(
            model, layers="llm.model.layers", embeddings="llm.model.embed_tokens",
            collate=my_collate, step=my_step, lora_targets=["q_proj", "v_proj"],
        )
        result = run_probe(adapter, probe_examples, ProbeConfig())
    """

    name = "hooked"

    def __init__(
        self,
        model: nn.Module,
        layers: str,
        step: Callable[[nn.Module, dict[str, Any]], HookedStep],
        collate: Callable[[Sequence[Any]], dict[str, Tensor]],
        *,
        embeddings: str | None = None,
        final_norm: str = "",
        lora_targets: Sequence[str] = (),
        hidden_size: int | None = None,
        training_batch: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
        generate_text: Callable[[HookedAdapter, Sequence[Any]], list[str]] | None = None,
        generate_images: Callable[[HookedAdapter, Sequence[Any]], list[Any]] | None = None,
        block_output: Callable[[Any], Tensor] | None = None,
        block_input: Callable[[tuple, dict], Tensor] | None = None,
        image_objective: str = "next_token",
        supports_masked_prediction: bool = False,
    ) -> None:
        if image_objective not in ("next_token", "masked", "flow"):
            raise ValueError(
                f"image_objective must be 'next_token', 'masked' or 'flow', got {image_objective!r}"
            )
        self.image_objective = image_objective
        self.supports_masked_prediction = bool(supports_masked_prediction)
        self.model = model
        self.layer_stack = LayerStack(layers, final_norm, block_output, block_input)
        self.layer_stack.modules(model)  # a wrong path fails here, naming it
        self.embeddings = embeddings
        if embeddings is not None:
            self._embedding_module()
        self.step = step
        self.collate = collate
        self.default_lora_targets = tuple(lora_targets)
        self._hidden_size = hidden_size
        self._training_batch = training_batch
        self._generate_text = generate_text
        self._generate_images = generate_images

    # ------------------------------------------------------------------ model parts

    def _embedding_module(self) -> nn.Module:
        try:
            module = operator.attrgetter(self.embeddings)(self.base_model)
        except AttributeError:
            raise ValueError(f"the model has no embedding module at {self.embeddings!r}") from None
        if not isinstance(module, nn.Module):
            raise ValueError(f"{self.embeddings!r} is not a module")
        return module

    @property
    def hidden_size(self) -> int:
        """``hidden_size`` as given, else the embedding module's width."""
        if self._hidden_size is not None:
            return int(self._hidden_size)
        if self.embeddings is not None:
            module = self._embedding_module()
            width = getattr(module, "embedding_dim", None)
            weight = getattr(module, "weight", None)
            if width is None and isinstance(weight, Tensor) and weight.dim() == 2:
                width = weight.shape[1]
            if width is not None:
                return int(width)
        raise ValueError(
            "the hooked adapter cannot tell the hidden size: pass hidden_size=... "
            "(or an embeddings module with an embedding_dim)"
        )

    # ------------------------------------------------------------------ batches

    def encode(self, examples: Sequence[Any]) -> dict[str, Tensor]:
        """The user's ``collate``; ValueError when it gives no ``roles`` ``[B, S]``."""
        if len(examples) == 0:
            raise ValueError("cannot encode an empty list of examples")
        batch = self.collate(examples)
        roles = batch.get("roles") if isinstance(batch, dict) else None
        if not isinstance(roles, Tensor) or roles.dim() != 2 or roles.shape[0] != len(examples):
            raise ValueError(
                "the hooked adapter's collate must return a dict with 'roles', a [B, S] "
                "tensor of Role labels for the B examples"
            )
        return batch

    def training_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The user's ``training_batch`` (default: the batch unchanged)."""
        return batch if self._training_batch is None else self._training_batch(batch)

    # ------------------------------------------------------------------ forward

    @contextmanager
    def _embedding_hook(self, hook: EmbeddingHook | None, batch: dict[str, Any]) -> Iterator[None]:
        """Apply ``hook`` to the embedding module's output (or the first block's input)."""
        if hook is None:
            yield
            return
        shape = tuple(batch["roles"].shape)

        def checked(embeds: Any, where: str) -> Tensor:
            if not isinstance(embeds, Tensor) or tuple(embeds.shape[:2]) != shape:
                got = tuple(embeds.shape) if isinstance(embeds, Tensor) else type(embeds)
                raise ValueError(
                    f"embedding hook: {where} gives {got}, not aligned with the batch's "
                    f"roles {list(shape)}; name a module whose output is the blocks' whole "
                    "sequence [B, S, d], or embeddings=None (the first block's input)"
                )
            return hook(embeds, batch)

        if self.embeddings is not None:

            def after(_module, _args, output):
                return checked(output, f"the output of {self.embeddings!r}")

            handle = self._embedding_module().register_forward_hook(after)
        else:
            first = self.layer_stack.modules(self.base_model)[0][0]
            read = self.layer_stack.input

            def before(_module, args, kwargs):
                if read is not None:
                    raise ValueError(
                        "embedding hooks on the first block's input need the embeddings module "
                        "when block_input is custom"
                    )
                if args and isinstance(args[0], Tensor):
                    return (checked(args[0], "the first block's input"), *args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = checked(
                    kwargs.get("hidden_states"), "the first block's input"
                )
                return args, kwargs

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
        """Run the user's ``step`` with hidden-state hooks (and ``embedding_hook``)."""
        device = self.device
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        chosen = self.resolve_layers(layers)
        with (
            self._embedding_hook(embedding_hook, batch),
            self.capture(chosen, output_hidden_states, final_norm) as captured,
        ):
            result = self.step(self.model, batch)
        if not isinstance(result, HookedStep):
            raise TypeError(f"the hooked adapter's step must return a HookedStep, got {result!r}")
        roles = batch["roles"]
        states = captured.states() if captured is not None else None
        for layer, state in zip(chosen, states or [None] * len(chosen), strict=True):
            if state is not None and tuple(state.shape[:2]) != tuple(roles.shape):
                raise ValueError(
                    f"hidden state {layer} is {list(state.shape)}, but the batch's roles are "
                    f"{list(roles.shape)}: roles must label the blocks' sequence, batch first "
                    "(give block_output/block_input to pick the [B, S, d] tensor)"
                )
        zero = torch.zeros((), device=device)
        text_loss = zero if result.text_loss is None else result.text_loss
        image_loss = zero if result.image_loss is None else result.image_loss
        return ForwardOutput(
            hidden_states=states,
            layers=chosen,
            roles=roles,
            text_loss=text_loss,
            text_tokens=torch.as_tensor(result.text_tokens, device=device),
            image_loss=image_loss,
            image_tokens=torch.as_tensor(result.image_tokens, device=device),
            logits=result.logits if keep_logits else None,
            image_loss_kind="mse" if self.image_objective == "flow" else "ce",
        )

    def input_embeddings(self, batch: dict[str, Tensor]) -> Tensor:
        """Hidden state 0 (the first block's input), by running ``step`` with a hook."""
        out = self.forward(batch, layers=[0])
        return out.hidden_layers[0]  # type: ignore[index]

    # ------------------------------------------------------------------ generation

    def generate_text(self, examples: Sequence[Any], max_new_tokens: int = 8) -> list[str]:
        """The user's ``generate_text(adapter, examples)``."""
        if self._generate_text is None:
            raise NotImplementedError("pass generate_text=fn(adapter, examples) to HookedAdapter")
        return self._generate_text(self, examples)

    def generate_images(self, examples: Sequence[Any]) -> list[Any]:
        """The user's ``generate_images(adapter, examples)``."""
        if self._generate_images is None:
            raise NotImplementedError("pass generate_images=fn(adapter, examples) to HookedAdapter")
        return self._generate_images(self, examples)

    # ------------------------------------------------------------------ files

    def save(self, directory: str | Path) -> None:
        """The model's weights (``model.safetensors``) and the adapter's paths."""
        from safetensors.torch import save_model

        if self.base_model is not self.model:
            raise ValueError(
                "the model is wrapped by peft: merge the LoRA weights first "
                "(adapter.model = adapter.model.merge_and_unload()) and save again"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self.model, str(directory / WEIGHTS_FILE))
        paths = {
            "adapter": self.name,
            "layers": self.layer_stack.blocks,
            "embeddings": self.embeddings,
            "final_norm": self.layer_stack.final_norm,
        }
        (directory / HOOKED_FILE).write_text(json.dumps(paths))

    @classmethod
    def load(cls, directory: str | Path, **build: Any) -> HookedAdapter:
        """``HookedAdapter(**build)`` with the weights :meth:`save` wrote to ``directory``.

        Without ``build`` (``model.adapter=hooked`` in a config) this raises
        :class:`unifyreg.config.ConfigError`: the module is built in Python.
        """
        if "model" not in build:
            from unifyreg.config import ConfigError

            raise ConfigError(
                "model.adapter: the hooked adapter wraps a module built in Python; construct "
                "unifyreg.adapters.hooked.HookedAdapter(model, layers, step, collate, ...) and "
                "run unifyreg.probing.run_probe or UMMModule + EntropyProbe (README, 'Any "
                "model: the hooked adapter')"
            )
        from safetensors.torch import load_model

        directory = Path(directory)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(
                f"{str(directory)!r} holds no {WEIGHTS_FILE} (HookedAdapter.save)"
            )
        adapter = cls(**build)
        load_model(adapter.model, str(weights))
        return adapter
