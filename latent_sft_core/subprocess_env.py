"""The environment of child processes that must run this interpreter's tools (dvc, the stages' ``python``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def interpreter_first_path(path: str | None = None) -> str:
    """``path`` (default: this process's PATH) with this interpreter's folder first.

    DVC runs each stage as ``python -m tasks.<stage>``, and the flow and the benchmarks call ``dvc``: from an
    unactivated venv, both would otherwise be whatever comes first on the user's PATH.
    """
    inherited = os.environ.get("PATH", "") if path is None else path
    return f"{Path(sys.executable).parent}{os.pathsep}{inherited}"
