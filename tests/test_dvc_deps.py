"""dvc.yaml's code dependencies are derived from the imports, not kept by hand.

A stage's command (`repro <stage>`) dispatches through repro/cli.py and repro/pipeline/run.py to the stage's module
repro/pipeline/stages/<stage>.py, which imports only what computes the stage's outputs. Its dependencies are that
module's closure under imports (module-level and function-local alike, read from the source, nothing executed),
each package's __init__.py included. The dispatch itself is not a dependency: it passes the params along. Editing a
module therefore reruns exactly the stages that run it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DISPATCH = {"repro/cli.py", "repro/pipeline/run.py"}


def _module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "repro"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "repro":
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from repro.x import module`
    return out


def module_closure(module: str) -> set[str]:
    """Repository-relative paths of every repro module ``module`` imports, transitively (itself included)."""
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c imports a/__init__ and a/b/__init__ too
            sub = ".".join(parts[:i])
            f = _module_file(sub)
            if f is None or f in seen:
                continue
            seen.add(f)
            todo += sorted(_imports(f))
    return {str(p.relative_to(ROOT)) for p in seen}


def stage_code_deps(stage: str) -> list[str]:
    return sorted(module_closure(f"repro.pipeline.stages.{stage}") - DISPATCH)


def test_every_stage_lists_exactly_the_code_it_runs():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    wrong = {}
    for name, stage in dvc["stages"].items():
        declared = sorted(d for d in stage.get("deps", []) if d.startswith("repro/") and d.endswith(".py"))
        want = stage_code_deps(name)
        if declared != want:
            wrong[name] = {"missing": sorted(set(want) - set(declared)), "extra": sorted(set(declared) - set(want))}
    assert not wrong, ("dvc.yaml's code deps differ from the imports; set each stage's repro/*.py deps to "
                       f"`python -c 'from tests.test_dvc_deps import stage_code_deps as d; print(d(STAGE))'`: {wrong}")


def test_the_closure_follows_function_local_imports_and_package_inits(tmp_path):
    deps = stage_code_deps("ddo")
    assert "repro/methods/ddo/loss.py" in deps and "repro/methods/__init__.py" in deps
    assert "repro/pipeline/stages/fid.py" not in deps  # another stage's code is not a dependency
    assert not DISPATCH & set(deps)
