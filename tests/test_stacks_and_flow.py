"""The seam for continuous families and for models with two stacks of layers: the task
loss's weights, the flow-matching convention, per-example noise, quantities on the stack
that serves them, scores by depth fraction, and their consumers (metrics, files, figures,
L_div, the ablation's aggregate)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from unifyreg.adapters.base import (
    Adapter,
    ForwardOutput,
    HiddenStack,
    LayerStack,
    fraction_layers,
)
from unifyreg.adapters.continuous import (
    DEFAULT_PROBE_TIMESTEP,
    FLOW_CONVENTIONS,
    FlowSchedule,
    example_seed,
    flow_mse,
    sample_noise_levels,
    seeded_noise,
    shift_noise_levels,
)
from unifyreg.callbacks import probe_metrics
from unifyreg.config import ConfigError, FinetuneConfig, ProbeConfig, load_config
from unifyreg.losses import divergence_loss, stack_divergence_loss
from unifyreg.manifest import ManifestExample
from unifyreg.module import UMMModule
from unifyreg.probing import ProbeResult, QuantityAxis, QuantityRecords, probe_batch, run_probe
from unifyreg.quantities import QUANTITIES, align_by_depth, batch_quantities
from unifyreg.recipes.ablate import aggregate
from unifyreg.report import ablation_figures, close_figures, probe_stats_csv, write_probe_result
from unifyreg.roles import Role

R = Role


# ---------------------------------------------------------------------- the task loss


def test_default_task_loss_is_the_token_weighted_mean_to_the_digit(tiny_adapter, tiny_splits):
    examples = [*tiny_splits["finetune"][:6]]
    batch = tiny_adapter.encode(examples)
    out = tiny_adapter.forward(batch, output_hidden_states=False)
    assert out.image_loss_kind == "ce" and out.text_tokens > 0 and out.image_tokens > 0
    by_hand = (out.text_loss * out.text_tokens + out.image_loss * out.image_tokens) / (
        out.text_tokens + out.image_tokens
    )
    assert torch.equal(out.task_loss, by_hand)
    assert torch.equal(out.weighted_task_loss(None, None), by_hand)
    # The module's loss/task is that value (the default weights are None).
    module = UMMModule(tiny_adapter, total_steps=1)
    torch.manual_seed(0)
    assert torch.equal(module.training_step(batch, 0), by_hand)
    # Explicit weights: the weighted sum of the two means; one weight alone: the other is 1.
    assert torch.allclose(
        out.weighted_task_loss(0.25, 2.0), 0.25 * out.text_loss + 2.0 * out.image_loss
    )
    assert torch.allclose(out.weighted_task_loss(None, 3.0), out.text_loss + 3 * out.image_loss)
    weighted = UMMModule(tiny_adapter, total_steps=1, text_weight=0.0, image_weight=1.0)
    assert torch.allclose(weighted.training_step(batch, 0), out.image_loss)


def test_an_mse_image_loss_defaults_to_weights_one_and_one():
    roles = torch.tensor([[R.TEXT_PROMPT, R.IMAGE_RESPONSE]])
    out = ForwardOutput(
        None,
        [],
        roles,
        torch.tensor(2.0),
        torch.tensor(3),
        torch.tensor(0.5),
        torch.tensor(400),
        image_loss_kind="mse",
    )
    assert float(out.task_loss) == 2.5  # not (2*3 + 0.5*400) / 403
    assert float(out.weighted_task_loss(1.0, 4.0)) == 4.0
    with pytest.raises(ValueError, match="image_loss_kind must be one of ce, mse"):
        ForwardOutput(None, [], roles, *[torch.tensor(0)] * 4, image_loss_kind="l1")


def test_the_loss_weights_and_the_probe_timestep_are_checked_config_keys():
    assert ProbeConfig().timestep == DEFAULT_PROBE_TIMESTEP == 0.5
    base = ["model.adapter=toy"]
    cfg = load_config(FinetuneConfig, None, [*base, "loss.image_weight=2", "probe.timestep=0.9"])
    assert (cfg.loss.text_weight, cfg.loss.image_weight, cfg.probe.timestep) == (None, 2.0, 0.9)
    with pytest.raises(ConfigError, match=r"probe\.timestep must be in \[0, 1\], got 1.5"):
        load_config(FinetuneConfig, None, [*base, "probe.timestep=1.5"])
    with pytest.raises(ConfigError, match=r"loss\.text_weight must be a finite number >= 0"):
        load_config(FinetuneConfig, None, [*base, "loss.text_weight=-1"])


# ---------------------------------------------------------------------- flow matching


def test_flow_conventions_give_the_families_inputs_targets_and_times():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    t = torch.tensor([0.25, 1.0])
    qwen, omnigen2 = FLOW_CONVENTIONS["qwen_image"], FLOW_CONVENTIONS["omnigen2"]
    xt = qwen.noisy(x0, eps, t)
    assert torch.allclose(xt[0], 0.75 * x0[0] + 0.25 * eps[0])
    assert torch.equal(xt[1], eps[1])  # t = 1: pure noise
    assert torch.equal(qwen.target_of(x0, eps), eps - x0)
    assert torch.equal(omnigen2.target_of(x0, eps), x0 - eps)
    assert torch.equal(qwen.model_time(t), t)  # sigma, 1 = noise
    assert torch.equal(omnigen2.model_time(t), 1 - t)  # 1 = data
    # Either way the velocity d x_t / d t is eps - x0: an Euler step from t to 0 recovers x0.
    for convention in (qwen, omnigen2):
        v = convention.velocity(convention.target_of(x0, eps))
        assert torch.allclose(xt[0] + (0 - 0.25) * v[0], x0[0], atol=1e-6)


def test_noise_levels_follow_the_schedule():
    g = torch.Generator().manual_seed(0)
    uniform = sample_noise_levels(20000, FlowSchedule(), g)
    assert uniform.dtype == torch.float32 and 0 < float(uniform.min()) and float(uniform.max()) < 1
    assert float(uniform.mean()) == pytest.approx(0.5, abs=0.01)
    logit = sample_noise_levels(20000, FlowSchedule("logit_normal", 0.0, 1.0), g)
    assert float(torch.logit(logit.double()).std()) == pytest.approx(1.0, abs=0.03)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_noise_levels(t, 3.0), 3 * t / (1 + 2 * t))
    assert torch.equal(shift_noise_levels(t, 1.0), t)
    with pytest.raises(ValueError, match="unknown flow schedule setting"):
        FlowSchedule.from_dict({"sampler": "uniform"})


def test_noise_is_seeded_per_example_whatever_the_batch():
    a = ManifestExample("c", "draw a cat", response_image=np.zeros((4, 4, 3), np.uint8))
    b = ManifestExample("c", "draw a dog", response_image=np.zeros((4, 4, 3), np.uint8))
    same = ManifestExample("c", "draw a cat", response_image=np.zeros((4, 4, 3), np.uint8))
    other_pixels = ManifestExample("c", "draw a cat", response_image=np.ones((4, 4, 3), np.uint8))
    seeds = [example_seed(e) for e in (a, b, same, other_pixels)]
    assert seeds[0] == seeds[2] and len({seeds[0], seeds[1], seeds[3]}) == 3
    assert all(0 <= s < 2**63 for s in seeds)
    together = seeded_noise(torch.tensor(seeds[:2]), (3, 5))
    alone = seeded_noise([seeds[1]], (3, 5))
    assert torch.equal(together[1], alone[0]) and not torch.equal(together[0], together[1])
    # Stable across interpreters (Python's own hash is salted per process).
    code = (
        "import numpy as np; from unifyreg.manifest import ManifestExample; "
        "from unifyreg.adapters.continuous import example_seed; "
        "print(example_seed(ManifestExample('c', 'draw a cat', "
        "response_image=np.zeros((4, 4, 3), np.uint8))))"
    )
    env = {"PYTHONHASHSEED": "123", "PATH": ""}
    import os

    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    printed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert int(printed.stdout) == seeds[0]


def test_flow_mse_is_the_mean_over_scored_elements_counted_in_tokens():
    prediction = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]], requires_grad=True)
    target = torch.zeros(1, 3, 2)
    loss, tokens = flow_mse(prediction, target)
    assert float(loss.detach()) == pytest.approx((1 + 4 + 9 + 16) / 6) and int(tokens) == 3
    mask = torch.tensor([[False, True, False]])
    loss, tokens = flow_mse(prediction, target, mask)
    assert float(loss.detach()) == pytest.approx((9 + 16) / 2) and int(tokens) == 1
    loss, tokens = flow_mse(prediction, target, torch.zeros(1, 3, dtype=torch.bool))
    assert float(loss) == 0.0 and int(tokens) == 0
    loss.backward()  # an empty loss stays on the graph
    assert torch.equal(prediction.grad, torch.zeros_like(prediction))


# ---------------------------------------------------------------------- stacks


def test_fraction_layers_and_alignment_by_depth():
    assert fraction_layers([0, 1, 2], 2, 4) == (0, 2, 4)
    assert fraction_layers([0, 2, 4], 4, 2) == (0, 1, 2)
    assert fraction_layers([0, 1, 2, 3, 4], 4, 2) == (0, 1, 2)  # duplicates removed
    a = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)  # 3 points: the coarser
    b = torch.tensor([0.0, 2.0, 3.0, 5.0, 6.0], dtype=torch.float64)
    fa, fb = [0.0, 0.5, 1.0], [0.0, 0.25, 0.5, 0.75, 1.0]
    a2, b2, at = align_by_depth(a, fa, b, fb)
    assert torch.equal(a2, a) and at.tolist() == fa
    assert torch.allclose(b2, torch.as_tensor(np.interp(fa, fb, b.numpy())))
    b3, a3, _ = align_by_depth(b, fb, a, fa)  # whichever comes first, the coarser decides
    assert torch.equal(a3, a) and torch.allclose(b3, b2)
    # Unsorted layers are sorted; ends are held outside the finer's range.
    x, y, at = align_by_depth(
        torch.tensor([2.0, 1.0]), [1.0, 0.5], torch.tensor([1.0, 3.0, 5.0]), [0.25, 0.5, 0.75]
    )
    assert at.tolist() == [0.5, 1.0] and x.tolist() == [1.0, 2.0] and y.tolist() == [3.0, 5.0]


def test_hidden_stacks_are_checked():
    roles = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="2 hidden-state tensors for 3 layer indices"):
        HiddenStack("d", [0, 1, 2], [torch.zeros(2, 3, 4)] * 2, roles, 2, ["response/image"])
    with pytest.raises(ValueError, match="depth must be >= 1"):
        HiddenStack("d", [0], None, roles, 0, ["response/image"])
    with pytest.raises(ValueError, match="1 row indices for 2 rows"):
        HiddenStack("d", [0], None, roles, 1, [], rows=torch.tensor([0]))
    stack = HiddenStack("d", [0, 2], None, roles, 4, ["response/image"])
    assert stack.fractions() == (0.0, 0.5)
    zeros = [torch.tensor(0)] * 4
    with pytest.raises(ValueError, match="stack names must differ"):
        ForwardOutput(None, [], roles, *zeros, stack_name="d", depth=2, extra_stacks=[stack])
    with pytest.raises(ValueError, match="served by two extra stacks"):
        ForwardOutput(None, [], roles, *zeros, depth=2, extra_stacks=[stack, stack])
    out = ForwardOutput(None, [0, 1], roles, *zeros, depth=1, extra_stacks=[stack])
    assert out.primary_stack().quantities == ("encoding/text", "encoding/image", "response/text")
    assert out.stack_for("response/image") is stack
    with pytest.raises(ValueError, match="must give its depth"):
        ForwardOutput(None, [0, 1], roles, *zeros, extra_stacks=[stack]).primary_stack()


def _records(values):
    values = np.asarray(values, dtype=float)
    return QuantityRecords(
        values, values / 10, ["c"] * len(values), np.full(len(values), 4, np.int64)
    )


def _two_stack_result():
    """response/image on a 4-block denoiser (layers 0, 2, 4), the rest on a 2-block LLM."""
    records = {
        "encoding/text": _records([[5.0, 4.0, 3.0], [7.0, 6.0, 5.0]]),
        "encoding/image": _records([[1.0, 2.0, 3.0]]),
        "response/text": _records([[10.0, 8.0, 6.0]]),
        "response/image": _records([[2.0, 4.0, 9.0]]),
    }
    axes = {"response/image": QuantityAxis("denoiser", (0, 2, 4), 4)}
    return ProbeResult((0, 1, 2), records, {"alpha": 1.01, "base": 2.0}, {}, 2, axes, "mllm")


def test_scores_compare_two_stacks_by_depth_fraction():
    result = _two_stack_result()
    assert result.axis("response/text") == QuantityAxis("mllm", (0, 1, 2), 2)
    assert result.axis("response/image").fractions() == (0.0, 0.5, 1.0)
    scores = result.scores()
    # Normalised means: Ht = [.6 .5 .4], Hi = [.1 .2 .3] (same stack: layer by layer);
    # Ct = [1 .8 .6] at fractions 0, .5, 1 and Ci = [.2 .4 .9] at the same fractions.
    assert scores["encoding_gap"] == pytest.approx(np.mean([0.5, 0.3, 0.1]))
    assert scores["response_split"] == pytest.approx(np.mean([0.8, 0.4, -0.3]))
    assert scores["final_gap"] == pytest.approx(0.3)
    # A finer denoiser trajectory is interpolated onto the LLM's fractions.
    finer = _two_stack_result()
    finer.axes["response/image"] = QuantityAxis("denoiser", (0, 1, 2, 3, 4), 4)
    finer.records["response/image"] = _records([[2.0, 3.0, 4.0, 6.0, 9.0]])
    assert finer.scores() == pytest.approx(scores)


def test_two_stack_results_round_trip_merge_and_report(tmp_path):
    result = _two_stack_result()
    again = ProbeResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.axes == result.axes and again.depth == 2 and again.stack == "mllm"
    assert again.scores() == result.scores()
    merged = ProbeResult.merge([result, again])
    assert len(merged.records["response/image"]) == 2 and merged.axes == result.axes
    other = _two_stack_result()
    other.axes["response/image"] = QuantityAxis("denoiser", (0, 4), 4)
    with pytest.raises(ValueError, match="different stacks"):
        ProbeResult.merge([result, other])
    metrics = probe_metrics(result)
    assert "probe/response/image/layer_04" in metrics  # the denoiser's own layer index
    assert "probe/response/text/layer_02" in metrics
    assert "probe/response/text/layer_04" not in metrics
    summary = result.summary()
    assert summary["axes"]["response/image"] == {
        "stack": "denoiser",
        "layers": [0, 2, 4],
        "depth": 4,
    }
    assert summary["axes"]["encoding/text"] == {"stack": "mllm", "layers": [0, 1, 2], "depth": 2}
    rows = probe_stats_csv(result).splitlines()
    assert rows[0].endswith(",stack") and "response/image,all,4," in "\n".join(rows)
    assert [r.rsplit(",", 1)[1] for r in rows if r.startswith("response/image")] == ["denoiser"] * 6
    paths = write_probe_result(result, tmp_path / "out", figures=True)
    assert paths["response_figure"].stat().st_size > 0


class _TwoStackAdapter(Adapter):
    """A stand-in for a two-stage family: a 2-block primary stack over each example's
    prompt and text response, a 4-block 'denoiser' over its prompt and image tokens (for
    the rows with an image response only), hidden states drawn from each example's seed."""

    name = "two_stack_test"
    layer_stack = LayerStack("blocks")
    image_objective = "flow"

    def __init__(self):
        self.model = nn.Module()
        self.model.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
        self.seen_timesteps = []

    @property
    def hidden_size(self):
        return 6

    def encode(self, examples):
        roles, den_roles = [], []
        for e in examples:
            text = [R.TEXT_PROMPT] * 3 + ([R.TEXT_RESPONSE] * 4 if e.response_text else [R.SPECIAL])
            roles.append(text)
            den_roles.append([R.TEXT_PROMPT] * 3 + [R.IMAGE_RESPONSE] * 5)
        width = max(map(len, roles))
        batch_roles = torch.tensor([r + [R.PAD] * (width - len(r)) for r in roles])
        return {
            "roles": batch_roles,
            "denoiser_roles": torch.tensor(den_roles),
            "noise_seeds": torch.tensor([example_seed(e) for e in examples]),
            "has_image": torch.tensor([e.response_image is not None for e in examples]),
        }

    def forward(self, batch, output_hidden_states=True, layers=None, **_):
        self.seen_timesteps.append(batch.get("timesteps"))
        chosen = self.resolve_layers(layers)
        seeds = batch["noise_seeds"]
        primary = seeded_noise(seeds, (3, *batch["roles"].shape[1:], 6)).transpose(0, 1)
        rows = torch.nonzero(batch["has_image"]).flatten()
        den_layers = fraction_layers(chosen, 2, 4)
        den = seeded_noise(seeds[rows] + 1, (5, 8, 5)).transpose(0, 1)
        zero = torch.zeros(())
        return ForwardOutput(
            [primary[i] for i in chosen],
            chosen,
            batch["roles"],
            zero,
            zero,
            zero,
            zero,
            image_loss_kind="mse",
            depth=2,
            stack_name="llm",
            extra_stacks=[
                HiddenStack(
                    "denoiser",
                    den_layers,
                    [den[i] for i in den_layers],
                    batch["denoiser_roles"][rows],
                    4,
                    ["response/image"],
                    rows=rows,
                )
            ],
        )

    def input_embeddings(self, batch):
        raise NotImplementedError

    def generate_text(self, examples, max_new_tokens=8):
        raise NotImplementedError

    def generate_images(self, examples):
        raise NotImplementedError

    def save(self, directory):
        raise NotImplementedError

    @classmethod
    def load(cls, directory, **kwargs):
        raise NotImplementedError


def _stack_examples():
    image = np.zeros((4, 4, 3), np.uint8)
    return [
        ManifestExample("composition", "draw a red cube", response_image=image),
        ManifestExample("deductive", "two plus one", response_text="three"),
        ManifestExample("composition", "draw a blue ball", response_image=image + 1),
        ManifestExample("inductive", "one two", response_text="three four"),
    ]


def test_the_probe_computes_each_quantity_on_the_stack_that_serves_it():
    adapter = _TwoStackAdapter()
    examples = _stack_examples()
    result = run_probe(adapter, examples, ProbeConfig(batch_size=3, timestep=0.3))
    # Continuous families are probed at probe.timestep, every row.
    assert all(torch.equal(t, torch.full_like(t, 0.3)) for t in adapter.seen_timesteps)
    assert result.layers == (0, 1, 2) and result.stack == "llm" and result.depth == 2
    assert result.axes == {"response/image": QuantityAxis("denoiser", (0, 2, 4), 4)}
    image = result.records["response/image"]
    assert image.categories == ["composition", "composition"] and image.values.shape == (2, 3)
    # The values are the estimator's on the denoiser's own hidden states and roles.
    batch = adapter.encode(examples)
    out = adapter.forward(batch)
    stack = out.extra_stacks[0]
    expected = probe_batch(
        stack.hidden_layers, stack.roles, ["c", "c"], stack.layers, ProbeConfig()
    )
    assert np.array_equal(image.values, expected["response/image"].values)
    assert len(result.records["response/text"]) == 2 and len(result.records["encoding/text"]) == 4
    # Batching does not change anything (the noise is seeded per example).
    again = run_probe(adapter, list(reversed(examples)), ProbeConfig(batch_size=1, timestep=0.3))
    with pytest.warns(UserWarning, match="lacks the samples for encoding_gap"):
        assert again.scores() == pytest.approx(result.scores(), rel=1e-12, abs=1e-12)


def test_stack_divergence_loss_on_one_stack_equals_divergence_loss_exactly():
    g = torch.Generator().manual_seed(0)
    roles = torch.tensor(
        [
            [R.TEXT_PROMPT] * 4 + [R.IMAGE_RESPONSE] * 4,
            [R.IMAGE_PROMPT] * 4 + [R.TEXT_RESPONSE] * 4,
        ]
    )
    hidden = torch.randn(3, 2, 8, 6, generator=g, dtype=torch.float64)
    zero = torch.zeros(())
    out = ForwardOutput(hidden, [0, 1, 2], roles, zero, zero, zero, zero)
    assert stack_divergence_loss(out) == divergence_loss(hidden, roles)
    picked = stack_divergence_loss(out, [0, -1])
    assert picked == divergence_loss(hidden[[0, 2]], roles)


def test_stack_divergence_loss_aligns_two_stacks_and_reaches_both():
    g = torch.Generator().manual_seed(1)
    roles = torch.tensor([[R.TEXT_PROMPT] * 3 + [R.TEXT_RESPONSE] * 3])
    den_roles = torch.tensor([[R.TEXT_PROMPT] * 3 + [R.IMAGE_RESPONSE] * 4])
    llm = torch.randn(3, 1, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    den = torch.randn(5, 1, 7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(())
    stack = HiddenStack("denoiser", range(5), den.unbind(0), den_roles, 4, ["response/image"])
    out = ForwardOutput(
        llm.unbind(0), [0, 1, 2], roles, zero, zero, zero, zero, depth=2, extra_stacks=[stack]
    )
    value, used = stack_divergence_loss(out, parts=("response",))
    assert used == 1
    text = batch_quantities(llm.unbind(0), roles, 2.0, "median_differentiable", dtype=torch.float64)
    image = batch_quantities(
        den.unbind(0), den_roles, 2.0, "median_differentiable", dtype=torch.float64
    )
    ct = text["response/text"].normalized.mean(dim=1)
    ci = image["response/image"].normalized.mean(dim=1)[[0, 2, 4]]  # fractions 0, .5, 1
    assert float(value) == pytest.approx(float(((ct - ci) ** 2).mean()), rel=1e-12)
    value.backward()
    assert llm.grad.abs().sum() > 0 and den.grad[[0, 2, 4]].abs().sum() > 0
    # div_layers name the primary's layers; the denoiser takes the same fractions.
    only_last, _ = stack_divergence_loss(out, [2], parts=("response",))
    assert float(only_last) == pytest.approx(float((ct[2] - ci[2]) ** 2), rel=1e-12)


def test_the_ablation_keeps_each_quantitys_layers():
    record = {
        "arm": "baseline",
        "seed": 0,
        "layers": [0, 1, 2],
        "quantity_layers": {"response/image": [0, 2, 4], "response/text": [0, 1, 2]},
        "scores": {"encoding_gap": 0.1, "response_split": 0.1, "final_gap": 0.1},
        "accuracies": {},
        "trajectories": {"response/image": [0.1, 0.2, 0.3], "response/text": [0.3, 0.2, 0.1]},
    }
    by_arm = aggregate([record], ["baseline"])
    assert by_arm["baseline"]["quantity_layers"]["response/image"] == [0, 2, 4]
    figures = ablation_figures(by_arm)
    ax = figures["trajectories"].axes[QUANTITIES.index("response/image")]
    assert ax.lines[0].get_xdata().tolist() == [0, 2, 4]
    close_figures(figures)


def test_unset_loss_weights_leave_the_toy_base_cache_key_unchanged():
    """Keys added to the loss section after the cache key was defined are left out of it at
    their defaults (existing caches and shipped bases keep their keys); set, they count."""
    from unifyreg.config import LossConfig, PretrainToyConfig
    from unifyreg.toy.base import cache_key

    default = PretrainToyConfig()
    assert cache_key(default) == "706b85a59e55"  # the key before the weights existed
    weighted = PretrainToyConfig(loss=LossConfig(image_weight=2.0))
    assert cache_key(weighted) != cache_key(default)


def test_a_hooked_flow_model_gets_an_mse_loss_and_the_probe_timestep():
    from unifyreg.adapters.hooked import HookedAdapter, HookedStep

    class Flow(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

        def forward(self, ids):
            h = self.embed(ids)
            for block in self.blocks:
                h = h + block(h)
            return h

    seen = []

    def step(model, batch):
        seen.append(batch.get("timesteps"))
        h = model(batch["input_ids"])
        return HookedStep(image_loss=(h**2).mean(), image_tokens=h.shape[1])

    def collate(examples):
        ids = torch.tensor([[1, 2, 3, 4]] * len(examples))
        roles = torch.tensor([[R.TEXT_PROMPT] * 2 + [R.IMAGE_RESPONSE] * 2] * len(examples))
        return {"input_ids": ids, "roles": roles}

    adapter = HookedAdapter(
        Flow(), "blocks", step, collate, embeddings="embed", image_objective="flow"
    )
    examples = [ManifestExample("c", "draw", response_image=np.zeros((4, 4, 3), np.uint8))]
    out = adapter.forward(adapter.encode(examples))
    assert out.image_loss_kind == "mse" and torch.equal(out.task_loss, out.image_loss)
    run_probe(adapter, examples, ProbeConfig(timestep=0.25))
    assert torch.equal(seen[-1], torch.tensor([0.25]))
    with pytest.raises(ValueError, match="'next_token', 'masked' or 'flow'"):
        HookedAdapter(Flow(), "blocks", step, collate, image_objective="diffusion")
