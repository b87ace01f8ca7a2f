"""Tests of the hooked adapter on a small hand-written model that is not a transformers class:
a MAR-like decoder whose text is causal and whose image tokens see each other (omni-attention),
trained by masked image-token prediction (Harmon's contextual prediction, in miniature)."""

import json
import math

import lightning as L
import numpy as np
import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unifyreg.adapters import get_adapter_class
from unifyreg.adapters.base import omni_attention_mask
from unifyreg.adapters.hooked import HookedAdapter, HookedStep
from unifyreg.callbacks import EntropyProbe
from unifyreg.config import LoraSettings, LossConfig, OptimConfig, ProbeConfig
from unifyreg.images import ImageCodes
from unifyreg.losses import ContextualPredictionLoss
from unifyreg.manifest import ManifestExample
from unifyreg.module import UMMModule, apply_lora, example_loader
from unifyreg.probing import run_probe
from unifyreg.roles import Role

R = Role
PAD, BOS, SEP, BOI, EOI, EOS, MASK = range(7)
CODES = 8  # image codes take ids 7 .. 14; characters follow
CHAR0 = 7 + CODES
VOCAB = CHAR0 + 96
WIDTH, LAYERS = 32, 2


class Block(nn.Module):
    """Pre-norm attention (additive mask) + MLP, written out by hand."""

    def __init__(self, width: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x, mask):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, -1).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        weights = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask).softmax(-1)
        x = x + self.proj((weights @ v).transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyMAR(nn.Module):
    """Token + position embeddings, blocks, final norm, one head over the whole vocabulary."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.embed = nn.Embedding(VOCAB, WIDTH)
            self.position = nn.Embedding(64, WIDTH)
            self.blocks = nn.ModuleList(Block(WIDTH) for _ in range(LAYERS))
            self.norm = nn.LayerNorm(WIDTH)
            self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids, mask):
        x = self.embed(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


def _chars(text):
    return [CHAR0 + (ord(c) - 32) % 96 for c in text]


def collate(examples):
    """``<bos> prompt [<boi> image <eoi>] <sep> answer <eos>`` / ``... <sep> <boi> image <eoi>``."""
    rows = []
    for e in examples:
        ids, roles, kinds = [BOS, *_chars(e.prompt_text)], [R.SPECIAL], []
        roles += [R.TEXT_PROMPT] * len(e.prompt_text)
        if e.prompt_image is not None:
            codes = [7 + int(c) for c in e.prompt_image.flat]
            ids += [BOI, *codes, EOI]
            roles += [R.SPECIAL, *[R.IMAGE_PROMPT] * len(codes), R.SPECIAL]
        ids.append(SEP)
        roles.append(R.SPECIAL)
        kinds = [0] * len(ids)
        if e.response_image is not None:
            codes = [7 + int(c) for c in e.response_image.flat]
            ids += [BOI, *codes, EOI]
            roles += [R.SPECIAL, *[R.IMAGE_RESPONSE] * len(codes), R.SPECIAL]
            kinds += [0, *[2] * len(codes), 0]
        else:
            ids += [*_chars(e.response_text), EOS]
            roles += [*[R.TEXT_RESPONSE] * len(e.response_text), R.SPECIAL]
            kinds += [1] * (len(e.response_text) + 1)
        rows.append((ids, roles, kinds))
    length = max(len(ids) for ids, _, _ in rows)
    batch = {
        name: torch.zeros(len(rows), length, dtype=torch.long)
        for name in ("input_ids", "attention_mask", "roles", "target_kind")
    }
    for b, (ids, roles, kinds) in enumerate(rows):
        n = len(ids)
        batch["input_ids"][b, :n] = torch.tensor(ids)
        batch["attention_mask"][b, :n] = 1
        batch["roles"][b, :n] = torch.tensor([int(r) for r in roles])
        batch["target_kind"][b, :n] = torch.tensor(kinds)
    return batch


def step(model, batch):
    """Text: next-token CE; images: masked-token CE at ``masked_positions`` (no shift)."""
    masked = batch.get("masked_positions")
    ids = batch["input_ids"]
    inputs = ids if masked is None else ids.masked_fill(masked, MASK)
    mask = omni_attention_mask(batch["roles"], batch["attention_mask"])
    logits = model(inputs, mask)
    text = batch["target_kind"][:, 1:] == 1
    text_loss = F.cross_entropy(logits[:, :-1][text], ids[:, 1:][text]) if text.any() else None
    image_loss, image_tokens = None, 0
    if masked is not None and masked.any():
        image_loss, image_tokens = F.cross_entropy(logits[masked], ids[masked]), int(masked.sum())
    return HookedStep(text_loss, int(text.sum()), image_loss, image_tokens, logits)


def mask_half(batch):
    """The model's own objective: mask each image-response code with probability 1/2."""
    image = batch["roles"] == R.IMAGE_RESPONSE
    return {**batch, "masked_positions": image & (torch.rand(image.shape) < 0.5)}


def _adapter(**kwargs):
    options = {
        "embeddings": "embed",
        "final_norm": "norm",
        "lora_targets": ["qkv", "proj"],
        "training_batch": mask_half,
        "image_objective": "masked",  # its step scores masked_positions, images bidirectional
        "supports_masked_prediction": True,
    }
    options.update(kwargs)
    return HookedAdapter(TinyMAR(), "blocks", step, collate, **options)


def _grid(seed, n=16):
    return ImageCodes(np.random.default_rng(seed).integers(0, CODES, n))


def _examples():
    return [
        ManifestExample("composition", "draw a cat", response_image=_grid(1)),
        ManifestExample("attribute", "what is it?", prompt_image=_grid(2), response_text="a cat"),
        ManifestExample("deductive", "one plus one", response_text="two"),
        ManifestExample("composition", "a red dog", response_image=_grid(3)),
    ]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------- the seam


def test_hidden_states_are_the_blocks_and_roles_the_collates():
    adapter = _adapter()
    assert get_adapter_class("hooked") is HookedAdapter
    assert (adapter.num_layers, adapter.hidden_size) == (LAYERS, WIDTH)
    batch = adapter.encode(_examples())
    with torch.no_grad():
        out = adapter.forward(batch, keep_logits=True)
        model = adapter.model
        mask = omni_attention_mask(batch["roles"], batch["attention_mask"])
        x = model.embed(batch["input_ids"]) + model.position(torch.arange(batch["roles"].shape[1]))
        states = [x]
        for block in model.blocks:
            states.append(block(states[-1], mask))
    assert torch.equal(out.roles, batch["roles"])
    assert out.layers == (0, 1, 2)
    for got, expected in zip(out.hidden_layers, states, strict=True):
        torch.testing.assert_close(got, expected)
    with torch.no_grad():
        normed = adapter.forward(batch, layers=[-1], final_norm=True).hidden_layers[0]
        torch.testing.assert_close(normed, model.norm(states[-1]))
        torch.testing.assert_close(adapter.input_embeddings(batch), states[0])
    assert out.logits.shape == (4, batch["roles"].shape[1], VOCAB)


def test_image_tokens_see_each_other_and_text_stays_causal():
    adapter = _adapter()
    example = _examples()[0]
    codes = example.response_image.flat.copy()
    codes[-1] = (codes[-1] + 1) % CODES
    changed = ManifestExample("c", example.prompt_text, response_image=ImageCodes(codes))
    with torch.no_grad():
        a = adapter.forward(adapter.encode([example])).hidden_states
        b = adapter.forward(adapter.encode([changed])).hidden_states
    first = 1 + len(example.prompt_text) + 2  # bos, prompt, sep, boi
    assert not torch.allclose(a[-1, 0, first], b[-1, 0, first])
    torch.testing.assert_close(a[:, 0, :first], b[:, 0, :first], rtol=0, atol=0)


def test_losses_equal_a_hand_computation():
    adapter = _adapter()
    torch.manual_seed(0)
    batch = adapter.training_batch(adapter.encode(_examples()))
    masked = batch["masked_positions"]
    with torch.no_grad():
        out = adapter.forward(batch, output_hidden_states=False)
        ids = batch["input_ids"]
        mask = omni_attention_mask(batch["roles"], batch["attention_mask"])
        logits = adapter.model(ids.masked_fill(masked, MASK), mask)
    b, t = torch.nonzero(masked, as_tuple=True)
    torch.testing.assert_close(out.image_loss, F.cross_entropy(logits[b, t], ids[b, t]))
    text = batch["target_kind"][:, 1:] == 1
    torch.testing.assert_close(
        out.text_loss, F.cross_entropy(logits[:, :-1][text], ids[:, 1:][text])
    )
    assert int(out.image_tokens) == int(masked.sum()) > 0
    assert int(out.text_tokens) == len("a cat") + 1 + len("two") + 1


def test_the_probe_runs_unchanged():
    adapter = _adapter()
    adapter.model.train()
    result = run_probe(adapter, _examples(), ProbeConfig(batch_size=3))
    assert {q: len(r) for q, r in result.records.items()} == {
        "encoding/text": 3, "encoding/image": 1, "response/text": 2, "response/image": 2,
    }  # fmt: skip
    assert all(np.isfinite(r.values).all() for r in result.records.values())
    assert set(result.scores()) == {"encoding_gap", "response_split", "final_gap"}
    assert adapter.model.training  # the probe ran in eval mode and restored the mode


@pytest.mark.parametrize("embeddings", ["embed", None])
def test_both_loss_terms_compute(embeddings):
    adapter = _adapter(embeddings=embeddings, hidden_size=WIDTH)
    torch.manual_seed(0)
    batch = adapter.training_batch(adapter.encode(_examples()))
    term = ContextualPredictionLoss(
        LossConfig(w_ctx=1.0, w_div=1.0, ctx_mode="bidirectional"), adapter.hidden_size
    )
    out = adapter.forward(batch)
    total, logs = term(adapter, batch, out, step=0)
    assert torch.isfinite(total) and logs["loss/ctx_tokens"] > 0 and logs["loss/div_parts"] == 2
    causal = ContextualPredictionLoss(LossConfig(w_ctx=1.0, ctx_mode="causal"), adapter.hidden_size)
    with pytest.raises(ValueError, match="predicts masked image tokens: use loss.ctx_mode=bidir"):
        causal(adapter, batch, out, step=0)
    (out.task_loss + total).backward()
    assert term.mask_embedding.grad.abs().sum() > 0
    assert adapter.model.blocks[0].qkv.weight.grad.abs().sum() > 0


def test_embedding_hooks_replace_the_sequence_the_blocks_read():
    batch = collate(_examples())
    image = batch["roles"] == R.IMAGE_RESPONSE

    def zero_images(embeds, _batch):
        return embeds.masked_fill(image[..., None], 0.0)

    on_module = _adapter()
    on_block = _adapter(embeddings=None, hidden_size=WIDTH)
    with torch.no_grad():
        a = on_module.forward(batch, layers=[0], embedding_hook=zero_images).hidden_layers[0]
        b = on_block.forward(batch, layers=[0], embedding_hook=zero_images).hidden_layers[0]
    position = on_module.model.position(torch.arange(image.shape[1])).expand_as(a)
    torch.testing.assert_close(a[image], position[image])  # token embedding replaced, then +pos
    assert (b[image] == 0).all()  # the first block's input itself
    torch.testing.assert_close(a[~image], b[~image])


def test_misuse_gives_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no layer list at 'layers'"):
        HookedAdapter(TinyMAR(), "layers", step, collate)
    with pytest.raises(ValueError, match="no embedding module at 'embedding'"):
        HookedAdapter(TinyMAR(), "blocks", step, collate, embeddings="embedding")
    with pytest.raises(ValueError, match="collate must return a dict with 'roles'"):
        HookedAdapter(TinyMAR(), "blocks", step, lambda e: {"input_ids": torch.zeros(1)}).encode(
            _examples()[:1]
        )
    misaligned = _adapter(embeddings="position", hidden_size=WIDTH)
    batch = collate(_examples())
    with pytest.raises(ValueError, match="not aligned with the batch's roles"):
        misaligned.forward(batch, embedding_hook=lambda e, b: e)

    def padded_roles(examples):  # roles one column longer than the blocks' sequence
        batch = collate(examples)
        return {**batch, "roles": F.pad(batch["roles"], (0, 1))}

    wrong = HookedAdapter(
        TinyMAR(), "blocks", lambda m, b: step(m, {**b, "roles": b["roles"][:, :-1]}), padded_roles
    )
    with pytest.raises(ValueError, match="roles must label the blocks' sequence"):
        wrong.forward(wrong.encode(_examples()))
    no_width = HookedAdapter(TinyMAR(), "blocks", step, collate)
    with pytest.raises(ValueError, match="hidden_size"):
        _ = no_width.hidden_size
    with pytest.raises(NotImplementedError, match="generate_images"):
        no_width.generate_images(_examples()[:1])
    from unifyreg.cli import main

    probe_set = tmp_path / "p.jsonl"
    probe_set.write_text(json.dumps({"text": "hi", "response": "there"}) + "\n")
    args = ["probe", "model.adapter=hooked", f"model.path={tmp_path}", f"probe_set={probe_set}"]
    assert main(args) == 2  # a config error that points to the Python route


# ---------------------------------------------------------------------- LoRA, files, training


def test_lora_targets_are_given_by_name():
    adapter = _adapter()
    batch = adapter.training_batch(adapter.encode(_examples()))
    with torch.no_grad():
        before = adapter.forward(batch, keep_logits=True).logits
    apply_lora(adapter, LoraSettings(r=2, alpha=4))
    adapted = {
        n for n, m in adapter.model.named_modules() if isinstance(m, peft.tuners.lora.Linear)
    }
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in adapted} == {
        f"{i}.{name}" for i in range(LAYERS) for name in ("qkv", "proj")
    }
    out = adapter.forward(batch, keep_logits=True)
    torch.testing.assert_close(out.logits, before)  # LoRA's B starts at zero
    assert len(out.hidden_layers) == LAYERS + 1  # hooks reach the blocks inside peft's wrapper
    trainable = [n for n, p in adapter.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_save_and_load_round_trip(tmp_path):
    adapter = _adapter()
    with torch.no_grad():
        adapter.model.head.bias.add_(1.0)
    adapter.save(tmp_path / "m")
    options = {"model": TinyMAR(seed=1), "layers": "blocks", "step": step, "collate": collate}
    loaded = HookedAdapter.load(tmp_path / "m", embeddings="embed", **options)
    batch = collate(_examples())
    with torch.no_grad():
        a = adapter.forward(batch, keep_logits=True).logits
        b = loaded.forward(batch, keep_logits=True).logits
    assert torch.equal(a, b)
    assert json.loads((tmp_path / "m" / "unifyreg_hooked.json").read_text())["layers"] == "blocks"


def test_python_finetune_with_umm_module_and_entropy_probe(tmp_path):
    """The README's route for a user model: LoRA, UMMModule with both terms, EntropyProbe."""
    adapter = apply_lora(_adapter(), LoraSettings(r=4, alpha=8))
    examples = _examples() * 2
    term = ContextualPredictionLoss(
        LossConfig(w_ctx=1.0, w_div=0.5, ctx_mode="bidirectional"), adapter.hidden_size
    )
    module = UMMModule(
        adapter,
        OptimConfig(lr=1e-3, warmup_steps=0),
        total_steps=4,
        loss_terms=[term],
        hidden_states_for_terms=term.needs_hidden_states,
    )
    probe = EntropyProbe(_examples(), ProbeConfig(), output_dir=tmp_path / "probe", figures="never")
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        callbacks=[probe],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = example_loader(adapter, examples, batch_size=4, shuffle=True)
    lora_before = [p.detach().clone() for n, p in adapter.model.named_parameters() if "lora_B" in n]
    trainer.fit(module, loader)
    assert [entry["epoch"] for entry in probe.history] == [0, 1, 2]
    assert "unify/encoding_gap" in probe.history[-1]["metrics"]
    lora_after = [p for n, p in adapter.model.named_parameters() if "lora_B" in n]
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, lora_after, strict=True))
