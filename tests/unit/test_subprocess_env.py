import os
import sys
from pathlib import Path

import pytest

from latent_sft_core.subprocess_env import interpreter_first_path


def test_the_interpreters_folder_comes_first_before_the_given_path():
    assert interpreter_first_path("/usr/bin:/bin").split(os.pathsep) == [str(Path(sys.executable).parent),
                                                                         "/usr/bin", "/bin"]


def test_the_default_is_this_processs_path(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", "/opt/tools")
    assert interpreter_first_path() == f"{Path(sys.executable).parent}{os.pathsep}/opt/tools"
    monkeypatch.delenv("PATH")
    assert interpreter_first_path() == f"{Path(sys.executable).parent}{os.pathsep}"
