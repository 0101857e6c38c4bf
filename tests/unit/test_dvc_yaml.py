"""dvc.yaml agrees with the code: every stage lists its module and every library module it imports as deps,
and names only params keys that exist in the schema."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from latent_sft_core.config import Params
from tests.support import REPO_ROOT

pytestmark = pytest.mark.unit

STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
PROJECT_PACKAGES = ("latent_sft_core", "tasks")


def module_file(name: str) -> Path | None:
    parts = name.split(".")
    for candidate in (REPO_ROOT.joinpath(*parts).with_suffix(".py"), REPO_ROOT.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Project modules imported by ``path`` (absolute imports, including the packages they live in)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    found = set()
    for name in names:
        if name.split(".")[0] not in PROJECT_PACKAGES:
            continue
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            if module_file(".".join(parts[:depth])):
                found.add(".".join(parts[:depth]))
    return found


def import_closure(entry: Path) -> set[Path]:
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(module_file(name) for name in imported_modules(path))
    return seen


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(REPO_ROOT)
    return any(relative == Path(dep) or Path(dep) in relative.parents for dep in deps)


LAUNCHER = "latent_sft_core.launcher"


def command_modules(command: str) -> tuple[str, str]:
    """(launcher module, stage module) of a dvc.yaml command ``python -m <launcher> tasks.<stage> ...``."""
    words = command.split()
    assert words[:2] == ["python", "-m"] and len(words) >= 4, command
    return words[2], words[3]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_starts_through_the_launcher(stage):
    assert command_modules(STAGES[stage]["cmd"]) == (LAUNCHER, f"tasks.{stage}")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_cover_its_imports(stage):
    spec = STAGES[stage]
    closure: set[Path] = set()
    for module in command_modules(spec["cmd"]):
        entry = module_file(module)
        assert entry is not None, f"{stage}: {module} not found"
        closure |= import_closure(entry)
    missing = sorted(str(p.relative_to(REPO_ROOT)) for p in closure if not covered(p, spec["deps"]))
    assert not missing, f"dvc.yaml stage {stage} lacks deps: {missing}"
    code_deps = [d for d in spec["deps"] if d.endswith(".py") or d.startswith("latent_sft_core")]
    for dep in code_deps:
        assert (REPO_ROOT / dep).exists(), f"{stage}: dep {dep} does not exist"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_params_exist_in_schema(stage):
    defaults = Params().model_dump()
    for key in STAGES[stage].get("params", []):
        node = defaults
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{stage}: params key {key} not in the schema"
            node = node[part]


def test_every_stage_module_is_a_stage():
    modules = {command_modules(spec["cmd"])[1].removeprefix("tasks.") for spec in STAGES.values()}
    on_disk = {p.stem for p in (REPO_ROOT / "tasks").glob("*.py") if not p.stem.startswith("_")}
    assert modules == on_disk
