"""The layering rules, checked on the source with ``ast`` (no import, no regex).

* the import arrow is ``flows -> stages -> astrolabe``: ``astrolabe/`` imports neither ``prefect``,
  ``stages`` nor ``flows``; ``stages/`` imports neither ``flows`` nor ``prefect``;
* ``stages/`` holds registered stages (and ``__init__.py``, their registry ``STAGES``) only: every module
  there is a stage of :data:`stages.STAGES`, helper code lives in the library or in its stage's module;
* only the atomic writer (``astrolabe/artifacts/atomic.py``) renames files into place: no other module calls
  ``os.replace`` / ``os.rename`` / ``os.renames`` / ``shutil.move`` / ``Path.rename`` / ``Path.replace``.

``Path.replace(target)`` and ``str.replace(old, new)`` share a name; a ``.replace`` call with exactly one
positional argument and no keyword is taken for the path one (``str.replace`` needs two arguments).
Imports inside functions count like top-level ones. The registry itself is read by importing ``stages``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ATOMIC_WRITER = "astrolabe/artifacts/atomic.py"
FORBIDDEN_IMPORTS = {"astrolabe": {"prefect", "stages", "flows"}, "stages": {"flows", "prefect"}}
RENAMING_FUNCTIONS = {("os", "replace"), ("os", "rename"), ("os", "renames"), ("shutil", "move")}


def python_files(*packages: str) -> Iterator[Path]:
    for package in packages:
        yield from sorted((ROOT / package).rglob("*.py"))


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imported_packages(tree: ast.Module) -> set[str]:
    """Top-level package names of every absolute import in ``tree`` (``a.b.c`` -> ``a``)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def _renaming_names(tree: ast.Module) -> dict[str, str]:
    """Local names bound to a renaming function by ``from os import replace [as r]``: ``{local: "os.replace"}``."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in ("os", "shutil"):
            for alias in node.names:
                if (node.module, alias.name) in RENAMING_FUNCTIONS:
                    out[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return out


def rename_calls(tree: ast.Module) -> list[tuple[int, str]]:
    """``(line, what)`` of every call that renames or moves a file (module docstring)."""
    aliases = _renaming_names(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in aliases:
            found.append((node.lineno, aliases[f.id]))
        elif isinstance(f, ast.Attribute):
            if isinstance(f.value, ast.Name) and (f.value.id, f.attr) in RENAMING_FUNCTIONS:
                found.append((node.lineno, f"{f.value.id}.{f.attr}"))
            elif f.attr == "rename":
                found.append((node.lineno, ".rename()"))
            elif f.attr == "replace" and len(node.args) == 1 and not node.keywords:
                found.append((node.lineno, ".replace(target)"))
    return found


# ----------------------------------------------------------------------------------- the checkers themselves


def test_checkers_recognise_what_they_forbid():
    src = """
import os, shutil
from os import replace as swap
from shutil import move
from pathlib import Path
import prefect.flows
from flows.run import train_run

def f(p: Path, s: str):
    from stages import STAGES
    os.replace(p, p); os.rename(p, p); shutil.move(p, p); swap(p, p); move(p, p)
    p.rename(p); p.with_suffix(".x").replace(p)
    s.replace("a", "b"); s.replace("a", "b", 1); os.path.join(s); p.write_text(s)
"""
    tree = ast.parse(src)
    assert imported_packages(tree) >= {"prefect", "flows", "stages"}
    assert [what for _, what in rename_calls(tree)] == [
        "os.replace", "os.rename", "shutil.move", "os.replace", "shutil.move", ".rename()", ".replace(target)",
    ]


# ----------------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("package", sorted(FORBIDDEN_IMPORTS))
def test_import_arrow(package):
    bad = {
        str(path.relative_to(ROOT)): sorted(imported_packages(parse(path)) & FORBIDDEN_IMPORTS[package])
        for path in python_files(package)
    }
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"the import arrow is flows -> stages -> astrolabe; {package}/ must not import: {bad}"


def test_every_module_in_stages_is_a_registered_stage():
    from stages import STAGES

    assert {m.__name__ for m in STAGES.values()} == {f"stages.{name}" for name in STAGES}  # module = stage name
    assert {p.stem for p in (ROOT / "stages").glob("*.py")} == {"__init__", *STAGES}
    assert {"filter_prompts", "rollout", "score", "label_uncertainty", "nft_update", "evaluate"} <= set(STAGES)
    assert not [p for p in (ROOT / "stages").iterdir() if p.is_dir() and p.name != "__pycache__"]


def test_only_the_atomic_writer_renames_files():
    offenders = {}
    for path in python_files("astrolabe", "stages", "flows", "tests"):
        rel = path.relative_to(ROOT).as_posix()
        if rel == ATOMIC_WRITER:
            continue
        if calls := rename_calls(parse(path)):
            offenders[rel] = calls
    assert not offenders, (
        f"publish files through {ATOMIC_WRITER} (write_text / write_json / publish_file / publish_dir / atomic_dir) "
        f"instead of renaming them: {offenders}"
    )
    assert rename_calls(parse(ROOT / ATOMIC_WRITER))  # the writer itself does rename (the check sees it)
