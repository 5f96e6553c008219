"""The rewards package has no import cycle: statically (every import, function-level ones too) and at run time (each module
imported first, in a fresh interpreter)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "astrolabe"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _all_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``path`` imports anywhere, in functions too (a function-level import that
    goes back up is a cycle deferred to run time, not a cure); ``if TYPE_CHECKING`` blocks excluded."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" in ast.unparse(node.test):
                for child in node.orelse:
                    self.visit(child)
            else:
                self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            out.update(a.name for a in node.names if a.name in known)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)

    Visitor().visit(ast.parse(path.read_text()))
    return out & known - {name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle found by a depth-first search (one representative per back edge)."""
    found, state, stack = [], {}, []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)
    return found


def test_no_static_import_cycle_through_rewards() -> None:
    modules = _all_modules()
    graph = {name: _imports(path, name, set(modules)) for name, path in modules.items()}
    assert graph["astrolabe.rewards.registry"] >= {"astrolabe.rewards.contract"}  # the parser sees imports
    cycles = [c for c in _cycles(graph) if any(m.startswith("astrolabe.rewards") for m in c)]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_each_rewards_module_imports_first_in_a_fresh_interpreter() -> None:
    names = sorted(n for n in _all_modules() if n.startswith("astrolabe.rewards"))
    assert {"astrolabe.rewards.contract", "astrolabe.rewards.registry", "astrolabe.rewards.models.hpsv3"} <= set(names)
    # one interpreter; before each module every astrolabe.rewards* module is dropped, so each is imported first
    code = (
        "import importlib, json, sys\n"
        "import astrolabe\n"
        "failed = {}\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m.startswith('astrolabe.rewards')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed[name] = repr(exc)\n"
        "print(json.dumps(failed))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}
