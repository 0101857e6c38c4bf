"""The micro pipeline, built once per session in a temporary copy of the project and shared by the DVC, flow
and browser tests (each starts from whatever state the others left: DVC decides what is out of date)."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import dvc, micro_project


@dataclass(frozen=True)
class BuiltProject:
    """A project copy after its first ``dvc repro`` (``first_repro``: what that repro printed)."""

    root: Path
    first_repro: str


@pytest.fixture(scope="session")
def built_micro_project(tmp_path_factory) -> BuiltProject:
    root = micro_project(tmp_path_factory.mktemp("project"))
    return BuiltProject(root, dvc(root, "repro"))
