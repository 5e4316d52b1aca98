"""dvc.yaml agrees with the code: every stage's outs are the files `orca8k.layout` names, its params keys exist in
both params files, and its deps cover every orca8k module the stage imports (so a code change reruns exactly the
stages it affects)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from orca8k.config import load_config, read_params
from orca8k.layout import Layout
from orca8k.stages import STAGES
from tests.fixtures.common import REPO

SRC = REPO / "src"
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PARAMS = read_params(REPO / "params.yaml")
RECIPE = read_params(REPO / "recipes" / "llama2-13b-orca-8k.yaml")
# Modules every stage imports whose *values* DVC tracks through `params:` (the schema, the file names, the error
# classes, package markers). Listing them as deps would rerun the whole pipeline on any schema edit.
INFRA = {"orca8k/__init__.py", "orca8k/config.py", "orca8k/layout.py", "orca8k/errors.py", "orca8k/stages/__init__.py"}


def render(text: str) -> str:
    def value(m: re.Match) -> str:
        node = PARAMS
        for part in m.group(1).split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", value, text)


def entries(stage: dict, key: str) -> list[tuple[str, dict]]:
    out = []
    for item in stage.get(key, []):
        if isinstance(item, dict):
            (path, opts), = item.items()
        else:
            path, opts = item, {}
        out.append((render(path), opts or {}))
    return out


def module_file(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for cand in (SRC / rel.with_suffix(".py"), SRC / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def orca8k_imports(path: Path) -> set[Path]:
    """Files of every orca8k module imported anywhere in `path` (function-level imports included)."""
    pkg = ".".join(path.relative_to(SRC).with_suffix("").parts[:-1])
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] == "orca8k" and (f := module_file(name)):
                found.add(f)
    return found


def closure(start: Path) -> set[Path]:
    seen, todo = set(), [start]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(orca8k_imports(f) - seen)
        # a package's __init__ runs on import of any of its modules
        for parent in f.relative_to(SRC).parents:
            init = SRC / parent / "__init__.py"
            if parent != Path(".") and init.is_file() and init not in seen:
                todo.append(init)
    return seen


def test_every_stage_is_declared_with_its_cli_command():
    assert list(DVC) == list(STAGES)
    for name, stage in DVC.items():
        assert stage["cmd"] == f"orca8k {name}"


def test_outputs_are_the_files_layout_names(monkeypatch):
    monkeypatch.chdir(REPO)
    layout = Layout.from_config(load_config(REPO / "params.yaml"))
    declared = {}
    for name, stage in DVC.items():
        for key in ("outs", "metrics", "plots"):
            for path, opts in entries(stage, key):
                declared[(REPO / path).resolve()] = (name, key, opts)
    expected = {
        "mix": [layout.mix, layout.mix_metrics],
        "validate": [layout.validation],
        "base": [layout.base],
        "tokenize": [layout.tokenized, layout.tokenize_metrics],
        "train": [layout.model, layout.checkpoints, layout.train_run, layout.train_metrics],
        "evaluate": [layout.eval_reports, layout.eval_metrics, layout.ppl_vs_context, layout.passkey],
        "sampling-report": [layout.sampling_reports],
        "register": [layout.register_reports, layout.register_metrics],
    }
    for stage, paths in expected.items():
        for p in paths:
            assert p in declared and declared[p][0] == stage, f"{stage}: {p} is not declared as its output in dvc.yaml"
    ckpt = declared[layout.checkpoints][2]
    assert ckpt.get("persist") is True and ckpt.get("cache") is False


@pytest.mark.parametrize("stage", list(STAGES))
def test_params_keys_exist_in_both_params_files(stage):
    for key in DVC[stage].get("params", []):
        for name, data in (("params.yaml", PARAMS), ("recipe", RECIPE)):
            node = data
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{stage}: params key {key} missing in {name}"
                node = node[part]


@pytest.mark.parametrize("stage", list(STAGES))
def test_deps_cover_the_stage_code(stage):
    module = SRC / "orca8k" / "stages" / f"{STAGES[stage]}.py"
    if not module.is_file():
        pytest.skip(f"{module} not written yet")
    deps = [REPO / path for path, _ in entries(DVC[stage], "deps")]
    for dep in deps:
        if str(dep).startswith(str(SRC)):
            assert dep.exists(), f"{stage}: dep {dep.relative_to(REPO)} does not exist"
    needed = {f for f in closure(module) if f.relative_to(SRC).as_posix() not in INFRA}
    missing = sorted(
        f.relative_to(REPO).as_posix() for f in needed if not any(f == d or d in f.parents for d in deps)
    )
    assert not missing, f"dvc.yaml stage {stage!r} imports code it does not list as deps: {missing}"
