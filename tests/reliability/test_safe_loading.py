"""Safe loading: weights only from safetensors, no unrestricted unpickling, no remote code unless asked for, and a
Prefect server that listens on 127.0.0.1 only."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from latent_sft_core.config import parse_params
from latent_sft_core.errors import ArtifactError
from latent_sft_core.modeling import load_base_model, load_pretrained_model, merged
from latent_sft_core.text import build_tokenizer, load_tokenizer
from tests.support import REPO_ROOT

pytestmark = pytest.mark.reliability

CODE_FOLDERS = ("latent_sft_core", "tasks", "flows")


def python_files() -> list[Path]:
    return sorted(file for folder in CODE_FOLDERS for file in (REPO_ROOT / folder).rglob("*.py"))


def test_a_model_folder_with_only_pickled_weights_is_refused(micro_run, tmp_path):
    root, _, _ = micro_run
    model = load_pretrained_model(root / "base")
    folder = tmp_path / "pickled"
    shutil.copytree(root / "base", folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # what transformers < 5 and many hub repos hold
    with pytest.raises(ArtifactError, match=r"pickled: no \*\.safetensors weights .*only safetensors are loaded"):
        load_pretrained_model(folder)


def test_an_adapter_with_only_pickled_weights_is_refused(phase1_run, tmp_path):
    root, _, _ = phase1_run
    adapter = tmp_path / "encoder"
    shutil.copytree(root / "train_encoder" / "encoder", adapter, ignore=shutil.ignore_patterns("*.safetensors"))
    (adapter / "adapter_model.bin").write_bytes(b"a pickle: never opened")
    with pytest.raises(ArtifactError, match=r"encoder: no \*\.safetensors weights"):
        merged(load_pretrained_model(root / "base"), adapter)


def torch_load_calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "load" and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"]


def test_every_torch_load_is_restricted_to_weights():
    """No ``torch.load`` without ``weights_only=True``, and no pickle at all, in the pipeline's own code.

    (The libraries' own loads are reported in RELIABILITY.md: transformers' Trainer resumes optimizer,
    scheduler and RNG state with ``weights_only=True``; DeepSpeed's checkpoint engine does not.)
    """
    offenders = []
    for file in python_files():
        source = file.read_text()
        tree = ast.parse(source)
        for call in torch_load_calls(tree):
            restricted = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                             for k in call.keywords)
            if not restricted:
                offenders.append(f"{file.relative_to(REPO_ROOT)}:{call.lineno}")
        if re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", source, re.MULTILINE):
            offenders.append(f"{file.relative_to(REPO_ROOT)}: imports a pickle module")
    assert offenders == []


def test_the_scan_finds_an_unrestricted_load():
    source = "import torch\nstate = torch.load(path)\nok = torch.load(p, weights_only=True)\n"
    calls = torch_load_calls(ast.parse(source))
    assert [call.lineno for call in calls] == [2, 3]


@pytest.fixture
def recorded_loads(monkeypatch):
    """Every from_pretrained call of transformers' Auto classes, with its keyword arguments."""
    calls = []
    for auto in (AutoModelForCausalLM, AutoTokenizer):
        original = auto.from_pretrained.__func__

        def record(cls, *args, _original=original, **kwargs):
            calls.append((cls.__name__, kwargs))
            return _original(cls, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", classmethod(record))
    return calls


@pytest.mark.parametrize("trust", [None, True])
def test_remote_code_is_trusted_only_when_params_say_so(micro_run, recorded_loads, tmp_path, trust):
    """A local checkpoint as base model (``base.model.source: path``): the params' ``trust_remote_code``, false
    unless set, reaches every from_pretrained call of the tokenizer and model stages."""
    root, _, _ = micro_run
    model_section = {"source": "path", "path": str(root / "base")} | ({"trust_remote_code": trust} if trust else {})
    params = parse_params({"base": {"model": model_section}})
    build_tokenizer(params, root / "raw", tmp_path / "tokenizer")
    load_base_model(params.base.model, params.base_model.tiny, load_tokenizer(tmp_path / "tokenizer"), 0)
    names = [name for name, _ in recorded_loads]
    assert "AutoModelForCausalLM" in names and "AutoTokenizer" in names
    # the pipeline's own folders (tokenizer stage output) are loaded without the option, i.e. untrusted
    assert {kwargs.get("trust_remote_code", False) for _, kwargs in recorded_loads} <= {bool(trust), False}
    model_loads = [kwargs for name, kwargs in recorded_loads if name == "AutoModelForCausalLM"]
    assert all(kwargs["trust_remote_code"] is bool(trust) and kwargs["use_safetensors"] is True
               and kwargs["local_files_only"] is True for kwargs in model_loads)


SERVER_COMMAND = re.compile(r"prefect\s+server\s+start")


def server_commands() -> list[tuple[str, str]]:
    """(file, line) of every place that starts a Prefect server: Makefile, README, flows/, prefect.yaml."""
    places = [REPO_ROOT / "Makefile", REPO_ROOT / "README.md", REPO_ROOT / "prefect.yaml", *python_files()]
    return [(path.name, line) for path in places if path.is_file()
            for line in path.read_text().splitlines() if SERVER_COMMAND.search(line)]


def test_prefect_server_binds_to_localhost():
    commands = server_commands()
    if not commands:
        pytest.skip("no `prefect server start` in Makefile, README, prefect.yaml or flows/ yet (issue 6)")
    unbound = [f"{name}: {line.strip()}" for name, line in commands
               if not re.search(r"(--host[ =]|PREFECT_SERVER_API_HOST=)127\.0\.0\.1\b", line)]
    assert unbound == []
