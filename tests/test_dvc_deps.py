"""dvc.yaml's code deps are exactly what each stage runs, and the package layout holds: one folder per method over a
method-free kit, reached only through the registry and the `Method` interface, with no import cycles.

The import graph is read with `ast` (top-level and function-level imports). The registry's dynamic imports count as
the modules they can load: `get_method("aaclip")` (a literal name) as that method's package, any other
`get_method(...)` as the selected method's package for `fit@` / `score@` stages and as every method's elsewhere;
a `.stage_function(...)` / `.deploy_module()` call as the methods' `stages` / `deploy` modules (named by their
`Method`)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from anomaly_core.methods import REGISTRY, method_names

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("anomaly_core", "stages")
PKG = REPO / "anomaly_core"
METHODS = PKG / "methods"
REGISTRY_FILE = METHODS / "__init__.py"


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


def imported_files(path: Path, parents: bool = True) -> set[Path]:
    """Project files a file imports (with `parents`, the packages' __init__ files that importing runs too)."""
    out = set()
    for name in imported_modules(path):
        parts = name.split(".")
        for i in range(1 if parents else len(parts), len(parts) + 1):
            target = module_file(".".join(parts[:i]))
            if target is not None and target != path:
                out.add(target)
    return out


def method_package(name: str) -> Path:
    return METHODS / name / "__init__.py"


def named_modules(attr: str) -> list[Path]:
    """The files of every method's `Method.<attr>` module (`stages`, `deploy`), loaded by name at run time."""
    from anomaly_core.methods import get_method

    names = [getattr(get_method(m), attr) for m in method_names()]
    return [f for n in names if n and (f := module_file(n)) is not None]


def registry_calls(path: Path) -> list[str | None]:
    """The arguments of `get_method(...)` calls in a file: the literal method name, or None for an expression."""
    if path == REGISTRY_FILE:
        return []
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "get_method":
            arg = node.args[0] if node.args else None
            out.append(arg.value if isinstance(arg, ast.Constant) else None)
    return out


def closure(roots: list[Path], item: str | None = None) -> set[Path]:
    """Every project file executed when `roots` run (parent packages' __init__ included), the registry's dynamic
    loads added as described in the module docstring."""
    seen: set[Path] = set()
    todo = list(roots)
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for call in registry_calls(f):
            names = [call] if call else ([item] if item else method_names())
            todo += [method_package(name) for name in names]
        text = f.read_text()
        if ".stage_function(" in text and f.name != "base.py":
            todo += named_modules("stages")
        if ".deploy_module()" in text:
            todo += named_modules("deploy")
        todo += imported_files(f)
    return seen


def stage_files(cmd: str, item: str | None = None) -> set[Path]:
    return closure([REPO / s for s in re.findall(r"stages/\w+\.py", cmd)], item)


def covered(f: Path, deps: list[Path]) -> bool:
    return any(f == d or d in f.parents for d in deps)


def uncovered(cmd: str, deps: list[str], item: str | None = None) -> list[str]:
    """Project files a stage's command runs that none of its deps (a file or a parent directory) covers."""
    dep_paths = [(REPO / d).resolve() for d in deps]
    return [str(f.relative_to(REPO)) for f in sorted(stage_files(cmd, item)) if not covered(f, dep_paths)]


def unused_method_deps(cmd: str, deps: list[str], item: str | None = None) -> list[str]:
    """Method folders a stage lists as deps but never runs (editing them would re-run it for nothing)."""
    files = stage_files(cmd, item)
    listed = [d for d in deps if Path(d).parent == Path("anomaly_core/methods") and (REPO / d).is_dir()]
    return [d for d in listed if not any(covered(f, [(REPO / d).resolve()]) for f in files)]


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


DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_every_stage_dep_covers_its_import_graph():
    problems = {name: missing for name, cmd, deps, item in expanded_stages(DVC) if (missing := uncovered(cmd, deps, item))}
    assert problems == {}, f"stages import project modules their dvc.yaml deps do not list: {problems}"


def test_no_stage_lists_a_method_folder_it_does_not_run():
    problems = {name: extra for name, cmd, deps, item in expanded_stages(DVC)
                if (extra := unused_method_deps(cmd, deps, item))}
    assert problems == {}, f"stages list method folders they never import: {problems}"


def test_the_checks_see_a_missing_module_and_an_unused_method_folder():
    """A stage that imports store.py through fusion-free code but lists only its script is caught (as the old
    `fuse` stage, which imported store.py and evaluation.py without listing them); so is a score@knn that lists
    VPT's folder."""
    missing = uncovered("PYTHONPATH=. python stages/fuse.py", ["stages/fuse.py", "stages/common.py"])
    assert "anomaly_core/store.py" in missing and "anomaly_core/fusion.py" in missing
    assert uncovered("python stages/fuse.py", ["stages", "anomaly_core"]) == []
    deps = ["stages", "anomaly_core/kit", "anomaly_core/methods/knn", "anomaly_core/methods/vpt_knn"]
    assert unused_method_deps("python stages/score.py", deps, "knn") == ["anomaly_core/methods/vpt_knn"]


def test_score_and_fit_stages_of_one_method_run_only_that_methods_code():
    """score@knn / fit@knn run knn's folder and the kit, no other method's code; dvc.yaml gives each per-method stage
    `anomaly_core/methods/${item}` and no other method folder, so editing vpt_knn's code re-runs no kNN stage."""
    for stage in ("score", "fit"):
        files = {str(f.relative_to(REPO)) for f in stage_files(f"python stages/{stage}.py", "knn")}
        assert "anomaly_core/methods/knn/__init__.py" in files
        others = {f for f in files if f.startswith("anomaly_core/methods/") and f.count("/") > 2
                  and not f.startswith("anomaly_core/methods/knn/")}
        assert others == set(), others
        deps = DVC["stages"][stage]["do"]["deps"]
        assert "anomaly_core/methods/${item}" in deps
        assert not [d for d in deps if d.startswith("anomaly_core/methods/") and d not in
                    ("anomaly_core/methods/${item}", "anomaly_core/methods/__init__.py", "anomaly_core/methods/base.py")]


# ---------------------------------------------------------------------------- package layout


def package_files() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def method_of(path: Path) -> str | None:
    """The method whose folder holds `path`, or None."""
    rel = path.relative_to(METHODS) if METHODS in path.parents else None
    return rel.parts[0] if rel is not None and len(rel.parts) > 1 else None


def test_every_registered_method_is_a_folder_of_its_own():
    for name, module in REGISTRY.items():
        assert module == f"anomaly_core.methods.{name}", (name, module)
        assert (METHODS / name / "__init__.py").is_file(), name
    assert sorted(p.name for p in METHODS.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(REGISTRY)


def test_nothing_outside_a_method_imports_its_modules():
    """Outside `methods/<name>/`, a method is reached through the registry (`anomaly_core.methods`) and the
    interface (`anomaly_core.methods.base`) only; stages and the rest of the package never import its modules."""
    problems = []
    for f in package_files() + sorted((REPO / "stages").glob("*.py")):
        own = method_of(f)
        for target in imported_files(f, parents=False):
            other = method_of(target)
            if other is not None and other != own:
                problems.append(f"{f.relative_to(REPO)} imports {target.relative_to(REPO)}")
    assert problems == []


def test_the_kit_imports_no_method():
    kit = sorted((PKG / "kit").glob("*.py"))
    assert kit
    problems = [f"{f.relative_to(REPO)} imports {t.relative_to(REPO)}" for f in kit for t in imported_files(f)
                if METHODS in t.parents or t == REGISTRY_FILE]
    assert problems == []


def test_no_import_cycles_in_the_package():
    """The module graph of anomaly_core (every import, function-level ones too; a package's __init__ only where it is
    imported by name) has no cycle."""
    graph = {f: {t for t in imported_files(f, parents=False) if PKG in t.parents} for f in package_files()}
    state: dict[Path, int] = {}
    cycles = []

    def visit(node: Path, stack: list[Path]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(str(p.relative_to(REPO)) for p in stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for f in graph:
        if f not in state:
            visit(f, [f])
    assert cycles == []


# ---------------------------------------------------------------------------- data and weights files (fingerprint)


def test_stages_reading_the_dataset_or_a_backbone_depend_on_its_fingerprint():
    """Every stage that reads the dataset's files (the ones that list the demo's `data/demo`) depends on
    `data/fingerprint/dataset.json`; every stage whose resolved params hold `backbones.<b>` (it may build that
    backbone) depends on `data/fingerprint/weights_<b>.json`; the AA-CLIP stages on `train_data.json`."""
    from anomaly_core.pipeline import stage_configs

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    configs = stage_configs(params)
    stages = {name: deps for name, _, deps, _ in expanded_stages(DVC)}
    problems = []
    for name, deps in stages.items():
        if name == "fingerprint":  # it writes them
            continue
        if "data/demo" in deps and "data/fingerprint/dataset.json" not in deps:
            problems.append(f"{name}: reads data/demo but not data/fingerprint/dataset.json")
        stem = name.replace("@", "-")
        for branch in (configs.get(stem) or {}).get("backbones", {}):
            if f"data/fingerprint/weights_{branch}.json" not in deps:
                problems.append(f"{name}: reads backbones.{branch} but not data/fingerprint/weights_{branch}.json")
    for name in ("train_text_adapter", "train_image_adapter"):
        if "data/fingerprint/train_data.json" not in stages[name]:
            problems.append(f"{name}: reads aaclip.train_data but not data/fingerprint/train_data.json")
    assert problems == []
    assert DVC["stages"]["fingerprint"]["always_changed"] is True
    assert [d for d in stages["prepare"] if d.startswith("data/fingerprint/")] == ["data/fingerprint/dataset.json"]
