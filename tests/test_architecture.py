"""The layout's rules, read from the package's own imports (module-level and lazy, every `import` node):
no import cycle, the math imports neither diffusers nor the loader, the toy world and the test
fixtures are known to the shells only, and no module outside the model families names a model."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "estlora"
# The pure math: factors -> scores -> plans, and the settings they read.
MATH = {"estlora.updates", "estlora.scores", "estlora.plan", "estlora.config"}
MODEL_LIBRARIES = ("diffusers", "transformers", "peft", "safetensors", "accelerate", "huggingface_hub")
# Who may import the toy world and the test fixtures: the shells, the commands, and those packages themselves.
FIXTURE_USERS = ("estlora", "estlora.cli", "estlora.ui", "estlora.commands", "estlora.toy", "estlora.testing")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """Every module `name` imports (absolute names), wherever in the file the import statement stands."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & MODULES.keys()
            found |= submodules
            if len(submodules) < len(node.names):  # names defined in `base` itself: `base` is imported
                found.add(base)
    return found


def internal_edges(name: str) -> set[str]:
    """The estlora modules `name` imports, with the packages Python initialises on the way into another
    package (a module's own packages are initialised before it anyway; the root is the API surface)."""
    own = {".".join(name.split(".")[:k]) for k in range(1, len(name.split(".")))}
    edges = set()
    for target in imports(name):
        if target in MODULES:
            parts = target.split(".")
            edges.add(target)
            edges |= {".".join(parts[:k]) for k in range(2, len(parts))} & MODULES.keys() - own
    return edges - {name}


GRAPH = {name: internal_edges(name) for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_reader_sees_every_module_and_its_imports():
    """The rules below hold only if the reader finds the imports: spot checks, lazy ones included."""
    assert {"estlora.families.sdxl", "estlora.runtime.fusion", "estlora.toy.world", "estlora.cli"} <= MODULES.keys()
    assert "estlora.families.family" in GRAPH["estlora.families.sdxl"]
    assert "estlora.testing.tiny_sdxl" in GRAPH["estlora.cli"]  # imported inside a function
    assert "diffusers" in imports("estlora.families.sdxl")  # lazily, inside functions


def test_no_import_cycle():
    assert cycles(GRAPH) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]  # the check can fail


def test_no_cycle_between_subpackages():
    """Layers, not only modules: the graph of subpackages (and top-level modules) is acyclic too."""

    def unit(name: str) -> str:
        parts = name.split(".")
        return (
            ".".join(parts[:2]) if len(parts) > 2 or (MODULES[name].name == "__init__.py" and len(parts) == 2) else name
        )

    packages: dict[str, set[str]] = {}
    for name, targets in GRAPH.items():
        if name == "estlora":
            continue
        packages.setdefault(unit(name), set()).update(unit(t) for t in targets if t != "estlora")
    for name in packages:
        packages[name].discard(name)
    assert cycles(packages) == []


@pytest.mark.parametrize("name", sorted(MATH))
def test_the_math_imports_no_model_library_and_no_loader(name):
    own = {t for t in imports(name) if t.split(".")[0] in MODEL_LIBRARIES}
    assert not own, f"{name} imports {own}"

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in GRAPH[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    reached = reaches(name)
    assert not {m for m in reached if m.startswith(("estlora.files", "estlora.loading", "estlora.families"))}
    assert not {t for m in reached for t in imports(m) if t.split(".")[0] in MODEL_LIBRARIES}


def test_only_the_shells_know_the_toy_world_and_the_fixtures():
    for name, targets in GRAPH.items():
        if any(t.startswith(("estlora.toy", "estlora.testing")) for t in targets):
            assert name == "estlora" or name.startswith(FIXTURE_USERS[1:]), f"{name} imports the toy world or fixtures"


def test_outside_the_families_no_module_names_a_model():
    """Family-agnostic code asks its family for the denoiser, its classes and its pipelines."""
    named = ("unet", "UNet2DConditionModel", "StableDiffusionXLPipeline", "FluxTransformer2DModel", "transformer")
    for name, path in MODULES.items():
        if name.startswith(("estlora.families", "estlora.testing", "estlora.toy")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                assert node.attr not in named, f"{name}:{node.lineno} names .{node.attr}"
            if isinstance(node, ast.Name | ast.alias):
                assert getattr(node, "id", getattr(node, "name", None)) not in named, f"{name}:{node.lineno}"


# ComfyUI's own modules (GPL code): the node package under comfyui/ imports them, estlora never does.
COMFYUI_MODULES = ("comfy", "comfy_extras", "comfy_api", "folder_paths", "nodes", "execution", "server")


def test_estlora_never_imports_comfyui():
    for name in MODULES:
        found = {t for t in imports(name) if t.split(".")[0] in COMFYUI_MODULES}
        assert not found, f"{name} imports ComfyUI's {found}"
    node_package = PACKAGE.parents[1] / "comfyui"
    used = set()
    for path in node_package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                used.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                used.update(alias.name.split(".")[0] for alias in node.names)
    assert {"comfy", "estlora"} <= used  # the reader sees the node package's imports: the check can fail
