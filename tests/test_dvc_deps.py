"""dvc.yaml's code deps cover every project module a stage runs, so a code change never leaves DVC serving a stale
cached result. The import graph is read with `ast` (top-level and function-level imports); the registry's dynamic
imports (`get_method(name)`) count as the selected method's module for `fit@` / `score@` stages and as every method
for any other stage that calls them."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from anomaly_core.methods import REGISTRY, method_names

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("anomaly_core", "stages")


def module_file(name: str) -> Path | None:
    """The file of a project module or package name, or None for anything else."""
    parts = name.split(".")
    if parts[0] not in PROJECT:
        return None
    base = REPO.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def imported_modules(path: Path) -> set[str]:
    """Module names a file imports (`from a.b import c` yields a.b and a.b.c, which may be a submodule)."""
    out: set[str] = set()
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative import
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, mod] if mod else base)
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def closure(roots: list[Path], dynamic: list[Path]) -> set[Path]:
    """Every project file executed when `roots` run (parent packages' __init__ included); `dynamic` files are
    added when a file that calls the registry's `get_method(...)` is reached."""
    registry = REPO / "anomaly_core" / "methods" / "__init__.py"
    calls = lambda f: f != registry and "get_method(" in f.read_text()
    seen: set[Path] = set()
    todo = list(roots)
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        if calls(f):
            todo += dynamic
        for name in imported_modules(f):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                target = module_file(".".join(parts[:i]))
                if target is not None:
                    todo.append(target)
    return seen


def uncovered(cmd: str, deps: list[str], item: str | None = None) -> list[str]:
    """Project files a stage's command runs that none of its deps (a file or a parent directory) covers."""
    scripts = [REPO / s for s in re.findall(r"stages/\w+\.py", cmd)]
    method_file = lambda m: REPO / REGISTRY[m].replace(".", "/")
    dynamic = [method_file(item).with_suffix(".py")] if item else [method_file(m).with_suffix(".py") for m in REGISTRY]
    dep_paths = [(REPO / d).resolve() for d in deps]
    out = []
    for f in sorted(closure(scripts, dynamic)):
        if not any(f == d or d in f.parents for d in dep_paths):
            out.append(str(f.relative_to(REPO)))
    return out


def expanded_stages(dvc: dict) -> list[tuple[str, str, list[str], str | None]]:
    """(name, cmd, deps, foreach item) for every stage, foreach stages expanded over every registered method."""
    out = []
    for name, stage in dvc["stages"].items():
        if "foreach" in stage:
            assert stage["foreach"] == "${methods}", f"{name}: foreach over something other than ${{methods}}"
            for item in method_names():
                sub = lambda s: s.replace("${item}", item)
                out.append((f"{name}@{item}", sub(stage["do"]["cmd"]), [sub(d) for d in stage["do"]["deps"]], item))
        else:
            out.append((name, stage["cmd"], stage.get("deps", []), None))
    return out


def test_every_stage_dep_covers_its_import_graph():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    problems = {name: missing for name, cmd, deps, item in expanded_stages(dvc) if (missing := uncovered(cmd, deps, item))}
    assert problems == {}, f"stages import project modules their dvc.yaml deps do not list: {problems}"


def test_the_check_sees_a_missing_module():
    """A stage that imports store.py through fusion-free code but lists only its script is caught (as the old
    `fuse` stage, which imported store.py and evaluation.py without listing them)."""
    missing = uncovered("PYTHONPATH=. python stages/fuse.py", ["stages/fuse.py", "stages/common.py"])
    assert "anomaly_core/store.py" in missing and "anomaly_core/fusion.py" in missing
    assert uncovered("python stages/fuse.py", ["stages", "anomaly_core"]) == []


def test_score_stage_of_one_method_does_not_need_other_methods_code():
    """score@knn runs knn's module, not AA-CLIP's: its deps need not (and do not) list the other method files."""
    files = closure([REPO / "stages" / "score.py"], [REPO / "anomaly_core" / "methods" / "knn.py"])
    names = {str(f.relative_to(REPO)) for f in files}
    assert "anomaly_core/methods/knn.py" in names
    assert not names & {"anomaly_core/methods/aaclip.py", "anomaly_core/methods/musc.py"}
