"""The seam of DESIGN.md, as structure: imports, the lazy registry, the quantity table,
hidden states by hooks, and result files that outlive a change of code."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from unifyreg.adapters import ADAPTERS, adapter_spec, available_adapters, get_adapter_class
from unifyreg.adapters.base import LayerStack, capture_hidden_states
from unifyreg.probing import ProbeResult
from unifyreg.quantities import PAIRS, QUANTITIES, QUANTITY_TABLE, quantity

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "unifyreg"
DATA = Path(__file__).resolve().parent / "data"


def _fresh_modules(code: str) -> list[str]:
    """Module names loaded by ``code`` in a fresh interpreter."""
    script = f"import sys\n{code}\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return out.stdout.split()


# ---------------------------------------------------------------------- imports


def test_probing_losses_and_config_import_no_model_code():
    loaded = _fresh_modules("import unifyreg.probing, unifyreg.losses, unifyreg.config")
    assert not [m for m in loaded if m == "transformers" or m.startswith("transformers.")]
    assert not [
        m for m in loaded if m.startswith("unifyreg.adapters.") and m != "unifyreg.adapters.base"
    ]


def test_callbacks_add_no_model_family_to_what_lightning_loads():
    # Lightning itself imports transformers' auto classes (through torchmetrics); the
    # callbacks must not add any model family on top of that.
    lightning_alone = set(_fresh_modules("import lightning"))
    with_callbacks = set(_fresh_modules("import unifyreg.callbacks"))
    added = {m for m in with_callbacks - lightning_alone if m.startswith("transformers.models.")}
    assert added == set()
    assert not [m for m in with_callbacks if m.startswith("unifyreg.adapters.") and "base" not in m]


def test_the_registry_is_lazy_and_names_every_family():
    loaded = _fresh_modules(
        "from unifyreg.adapters import available_adapters, adapter_spec\n"
        "names = available_adapters(); [adapter_spec(n) for n in names]\n"
        "from unifyreg.config import load_config, FinetuneConfig\n"
        "load_config(FinetuneConfig, None, ['model.adapter=janus', 'model.path=/tmp', "
        "'data=d.jsonl', 'probe_set=p.jsonl'])"
    )
    assert "unifyreg.adapters.janus" not in loaded and "unifyreg.adapters.toy" not in loaded
    assert {"toy", "emu3", "janus", "chameleon"} <= set(available_adapters())
    for name in available_adapters():
        cls = get_adapter_class(name)
        assert cls.name == name and ADAPTERS[name].cls is cls
    with pytest.raises(ValueError, match="unknown adapter 'nope'; registered: chameleon"):
        adapter_spec("nope")


def _module_level_imports(path: Path, inside_functions: bool = False) -> set[str]:
    """unifyreg modules imported at module level (not under TYPE_CHECKING), and with
    ``inside_functions`` also those imported lazily inside functions."""
    tree = ast.parse(path.read_text())
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("unifyreg"):
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("unifyreg"))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if inside_functions or isinstance(node, ast.ClassDef):
                    visit(node.body)
            elif hasattr(node, "body"):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                visit(getattr(node, "finalbody", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return found


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_there_is_no_import_circle():
    # Lazy imports inside functions count too: a circle hidden that way (a result writing
    # its files through the report that reads results) is still a circle of rooms.
    graph = {
        _module_name(p): _module_level_imports(p, inside_functions=True)
        for p in PACKAGE.rglob("*.py")
    }
    # Importing a.b.c also runs a.b's __init__ (unless the importer lives inside a.b,
    # which that __init__ is then already running).
    for name, deps in graph.items():
        for dep in list(deps):
            parts = dep.split(".")
            for i in range(2, len(parts)):
                package = ".".join(parts[:i])
                if package in graph and not (name + ".").startswith(package + "."):
                    deps.add(package)
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep == node or dep not in graph:
                continue
            if state.get(dep) == 1:
                raise AssertionError(
                    "import circle: " + " -> ".join(path[path.index(dep) :] + [dep])
                )
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize(
    "room", ["unifyreg.quantities", "unifyreg.probing", "unifyreg.losses", "unifyreg.config"]
)
def test_rooms_below_the_adapters_never_import_a_family_or_a_recipe(room):
    path = PACKAGE / (room.split(".", 1)[1].replace(".", "/") + ".py")
    imported = _module_level_imports(path)
    assert not [m for m in imported if m.startswith("unifyreg.recipes")]
    assert not [
        m for m in imported if m.startswith("unifyreg.adapters.") and m != "unifyreg.adapters.base"
    ]


def test_every_third_party_import_is_a_declared_dependency():
    """Every third-party import is a dependency, or an optional extra's (the loggers) that
    is only imported inside a function, so `import unifyreg...` works without it."""
    import importlib.metadata

    import tomllib

    def names(deps):
        return {
            d.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower() for d in deps
        }

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = names(project["dependencies"])
    optional = names(project["optional-dependencies"]["loggers"])
    declared = required | optional
    owners = importlib.metadata.packages_distributions()
    missing, eager = {}, {}
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)) and getattr(node, "level", 0) == 0:
                for name in (
                    [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                ):
                    top = name.split(".")[0]
                    if {d.lower() for d in owners.get(top, [top])} & optional:
                        eager.setdefault(top, str(path.relative_to(ROOT)))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "unifyreg":
                    continue
                dists = {d.lower() for d in owners.get(top, [top])}
                if not dists & declared:
                    missing.setdefault(top, str(path.relative_to(ROOT)))
    assert missing == {}  # e.g. tqdm was imported but not declared
    assert eager == {}  # an optional package imported at module level


# ---------------------------------------------------------------------- quantities


def test_the_quantity_table_defines_names_pairs_and_samples():
    assert QUANTITIES == ("encoding/text", "encoding/image", "response/text", "response/image")
    assert PAIRS == {
        "encoding": ("encoding/text", "encoding/image"),
        "response": ("response/text", "response/image"),
    }
    assert [q.is_proxy for q in QUANTITY_TABLE] == [False, False, True, True]
    from unifyreg.roles import Role as R

    roles = torch.tensor(
        [
            [R.TEXT_PROMPT, R.TEXT_PROMPT, R.IMAGE_RESPONSE, R.PAD],
            [R.TEXT_PROMPT, R.IMAGE_PROMPT, R.TEXT_RESPONSE, R.TEXT_RESPONSE],
            [R.SPECIAL, R.IMAGE_RESPONSE, R.PAD, R.PAD],  # no prompt: no proxy
        ]
    )
    assert quantity("encoding/text").samples(roles).tolist() == [True, False, False]
    assert quantity("encoding/image").samples(roles).tolist() == [False, True, False]
    assert quantity("response/text").samples(roles).tolist() == [False, True, False]
    assert quantity("response/image").samples(roles).tolist() == [True, False, False]
    with pytest.raises(ValueError, match="unknown quantity 'encoding/audio'"):
        quantity("encoding/audio")


def test_result_files_written_before_the_seam_change_still_load():
    # Written by commit c8d7ef0 (the last before the estimator package and the quantity
    # table): same scores, same records.
    result = ProbeResult.load(DATA / "probe_result_c8d7ef0.json")
    raw = json.loads((DATA / "probe_result_c8d7ef0.json").read_text())
    assert result.layers == (0, 1, 2)
    for q in QUANTITIES:
        assert result.records[q].values.tolist() == raw["records"][q]["values"]
    scores = result.scores()
    assert scores["encoding_gap"] == pytest.approx(0.2707670423122259, abs=1e-15)
    assert scores["response_split"] == pytest.approx(0.08340669371331633, abs=1e-15)
    assert scores["final_gap"] == pytest.approx(0.059763232955979524, abs=1e-15)
    again = ProbeResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.scores() == scores


# ---------------------------------------------------------------------- hooks


class _Block(nn.Module):
    """A block that is not a transformers class: returns (hidden, extra)."""

    def __init__(self, d):
        super().__init__()
        self.linear = nn.Linear(d, d)

    def forward(self, x, scale=1.0):
        return torch.tanh(self.linear(x)) * scale + x, "extra"


class _Stack(nn.Module):
    def __init__(self, d=6, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(d) for _ in range(depth))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        states = [x]
        for block in self.blocks:
            x, _ = block(x, scale=0.5)
            states.append(x)
        return self.norm(x), states


def test_hooks_capture_the_asked_layers_of_any_layer_list_and_leave_none_behind():
    torch.manual_seed(0)
    model = _Stack()
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        final, states = model(x)
    stack = LayerStack("blocks", "norm")
    with torch.no_grad(), capture_hidden_states(model, stack, (3, 0, 1)) as captured:
        model(x)
    got = captured.states()
    for value, layer in zip(got, (3, 0, 1), strict=True):
        assert torch.equal(value, states[layer])
    with torch.no_grad(), capture_hidden_states(model, stack, (3,), final_norm=True) as captured:
        model(x)
    assert torch.equal(captured.states()[0], final)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    with pytest.raises(ValueError, match="layer 4 out of range"):
        with capture_hidden_states(model, stack, (4,)):
            pass
    with pytest.raises(ValueError, match="no layer list at 'layers'"):
        with capture_hidden_states(model, LayerStack("layers"), (1,)):
            pass


def test_toy_hidden_states_match_transformers_and_final_norm_is_explicit(tiny_adapter, tiny_splits):
    batch = tiny_adapter.encode(tiny_splits["probe/image/attribute"][:3])
    L = tiny_adapter.num_layers
    with torch.no_grad():
        reference = tiny_adapter.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
        ).hidden_states
        before = tiny_adapter.forward(batch)
        after = tiny_adapter.forward(batch, layers=[L], final_norm=True)
        block_out = {}
        handle = tiny_adapter.model.model.layers[-1].register_forward_hook(
            lambda _m, _a, out: block_out.setdefault("h", out[0] if isinstance(out, tuple) else out)
        )
        tiny_adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        handle.remove()
    for layer in range(L):  # 0 .. L-1: the residual stream, as transformers returns it
        torch.testing.assert_close(before.hidden_layers[layer], reference[layer], rtol=0, atol=0)
    # Layer L: transformers puts the final norm's output there; unifyreg takes the block's
    # output unless final_norm=True.
    torch.testing.assert_close(after.hidden_layers[0], reference[L], rtol=0, atol=0)
    torch.testing.assert_close(before.hidden_layers[L], block_out["h"], rtol=0, atol=0)
    assert not torch.allclose(before.hidden_layers[L], reference[L])
