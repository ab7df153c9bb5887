"""The package's import graph: every module imports, no module reaches itself through
imports (module-level or inside functions: a deferred import only hides a cycle), the
applications sit on top (tools/ may import training/, never the other way; the library below
imports neither), and core/ names no engine (compact_dist.core.backend is the seam; see
docs/EXTENDING.md)."""

import ast
import importlib
import re
from pathlib import Path

import compact_dist

ROOT = Path(compact_dist.__file__).parent
ENGINE_NAMES = re.compile(r"deepspeed|ds_id|ds_tensor|_hp_mapping")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the compact_dist modules it imports anywhere in its source."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports the module pkg.mod where it exists
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # import a.b.c: the module a.b.c
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the DFS path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "compact_dist.core.backend" in graph
    # the package root wires the shipped backends in: it may import anything, nothing may
    # import it back (checked like any other edge)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# who may import an application package: tools/ only itself; training/ itself and tools/
IMPORTED_ONLY_BY = {"compact_dist.tools": ("compact_dist.tools",),
                    "compact_dist.training": ("compact_dist.training", "compact_dist.tools")}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'importer -> imported' for each import of tools/ or training/ from below them."""
    return [f"{name} -> {target}" for name in sorted(graph) for target in sorted(graph[name])
            for package, importers in IMPORTED_ONLY_BY.items()
            if _in(target, package) and not any(_in(name, p) for p in importers)]


def test_training_never_imports_tools():
    """Helpers that training and tools share live in training/ (run_files, indexed_writer,
    saved_tensors, startup); tools/ builds on them. Deferred imports count."""
    graph = import_graph()
    assert graph["compact_dist.tools.export"] & {"compact_dist.training.run_files"}
    assert not upward_imports(graph), "\n".join(upward_imports(graph))


def test_upward_imports_are_found():
    graph = {"compact_dist.training.data": {"compact_dist.tools.preprocess"},
             "compact_dist.tools.export": {"compact_dist.training.run_files"},
             "compact_dist.core.layers": {"compact_dist.training.startup"},
             "compact_dist.tools.hf_import": {"compact_dist.tools.export"},
             "compact_dist.toolsy": {"compact_dist.tools"}}
    assert upward_imports(graph) == ["compact_dist.core.layers -> compact_dist.training.startup",
                                     "compact_dist.toolsy -> compact_dist.tools",
                                     "compact_dist.training.data -> compact_dist.tools.preprocess"]


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """The modules `start` imports, directly or through others."""
    seen, stack = set(), [start]
    while stack:
        for target in graph.get(stack.pop(), ()):
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def test_checkpoints_and_the_fsdp2_engine_reach_no_deepspeed_module():
    """The atomic checkpoint directory serves every training engine: it, resume and the FSDP2
    engine reach compact_dist.deepspeed through no import (the engine's own save / load are
    behind compact_dist.training.engine_base.TrainingEngine)."""
    graph = import_graph()
    assert "compact_dist.deepspeed.engine" in reachable(graph, "compact_dist.training.engine_setup")
    for start in ("compact_dist.training.checkpoint", "compact_dist.training.checkpoint_dir",
                  "compact_dist.training.resume", "compact_dist.training.engine_fsdp"):
        found = sorted(m for m in reachable(graph, start) | {start}
                       if _in(m, "compact_dist.deepspeed"))
        assert not found, f"{start} -> {found}"


def test_every_module_imports():
    for name in _modules():
        importlib.import_module(name)


def test_core_names_no_engine():
    hits = [f"{path.relative_to(ROOT.parent)}:{i}: {line.strip()}"
            for path in sorted((ROOT / "core").rglob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1)
            if ENGINE_NAMES.search(line)]
    assert not hits, "\n".join(hits)


def _module_level_calls(tree: ast.Module):
    """Calls that run when the module is imported (outside functions and classes' methods)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Call):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def test_importing_installs_no_global_hook():
    """No module installs a process-wide hook when imported: the optimizer step pre-hook
    that tells forward A may have changed (compact_dist.core.factor_state.OptimizerSteps) is
    installed when the first compact layer is built, once."""
    from torch.optim import optimizer as torch_optimizer

    from compact_dist.core.factor_state import OptimizerSteps, ZeroTracker

    hooky = re.compile(r"register_.*hook|^install$")
    found = []
    for name, path in _modules().items():
        for call in _module_level_calls(ast.parse(path.read_text())):
            func = call.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if hooky.search(called):
                found.append(f"{name}:{call.lineno} {called}")
    assert not found, found
    ZeroTracker(), ZeroTracker()
    hooks = torch_optimizer._global_optimizer_pre_hooks
    assert sum(h == OptimizerSteps.hook for h in hooks.values()) == 1
