"""The package's layers: no import cycle, and each trainer's adapter loads only its own trainer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Every ``lossplug`` module and the ``lossplug`` modules it imports, at any depth of its
    code (an import inside a function counts: it runs all the same, only later)."""
    modules = {_module_name(path): path for path in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for target in targets:
                # `from pkg import sub` imports the module pkg.sub; `from mod import name`, mod
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # a package imports its own submodules; a submodule's import of its package is
            # that edge read backwards (the package is loaded first anyway)
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_in_the_package():
    graph = _imports()
    assert "lossplug.monitoring.tracker" in graph  # the walk found the package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("lossplug.monitoring", ("lightning", "pytorch_lightning", "transformers", "wandb")),
        ("lossplug.kpi", ("lightning", "pytorch_lightning", "transformers", "wandb")),
        ("lossplug.integrations", ("lossplug.callbacks", "lightning", "pytorch_lightning")),
        ("lossplug.ops", ("lossplug.monitoring", "lossplug.kpi", "lossplug.callbacks")),
    ],
)
def test_a_layer_imports_nothing_above_it(layer, forbidden):
    graph = _imports()
    for module, imported in graph.items():
        if module == layer or module.startswith(layer + "."):
            bad = [m for m in imported if m.split(".")[0] in forbidden or m.startswith(forbidden)]
            assert not bad, f"{module} imports {bad}"
    source = "\n".join(
        path.read_text() for path in SRC.rglob("*.py") if _module_name(path).startswith(layer)
    )
    for name in forbidden:
        if "." not in name:  # third-party: no `import lightning` or `from lightning ...` at all
            assert f"import {name}\n" not in source and f"from {name} " not in source, name


def test_the_transformers_callback_loads_no_lightning_module():
    code = (
        "import sys\n"
        "from lossplug.integrations.transformers import LossplugCallback, patch_causal_lm\n"
        "loaded = sorted(m for m in sys.modules\n"
        "                if m.split('.')[0] in ('lightning', 'pytorch_lightning')\n"
        "                or m.startswith('lossplug.callbacks'))\n"
        "print(loaded)\n"
    )
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_patching_a_model_knows_nothing_of_callbacks():
    graph = _imports()
    reach, todo = set(), ["lossplug.integrations.transformers"]
    while todo:
        module = todo.pop()
        for nxt in graph[module] - reach:
            if nxt == "lossplug.integrations._hf_callback":
                continue  # the callback itself, loaded on first use of its name
            reach.add(nxt)
            todo.append(nxt)
    assert not any(m.startswith("lossplug.callbacks") for m in reach), sorted(reach)
