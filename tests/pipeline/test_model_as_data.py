"""The pretrained model is data: a model file changed at the same path reruns what depends on it, and only that."""

from __future__ import annotations

import json

import pytest
import yaml

from latent_sft_core import paths
from latent_sft_core.model_import import MANIFEST_NAME
from tests.support import dvc, micro_project, write_tiny_gguf

pytestmark = [pytest.mark.pipeline, pytest.mark.slow]  # three dvc repro runs: about a minute


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def test_a_gguf_model_rewritten_in_place_reruns_the_stages_after_the_import(tmp_path):
    project = micro_project(tmp_path / "project")
    (tmp_path / "models").mkdir()
    gguf_file = write_tiny_gguf(tmp_path / "models" / "tiny.gguf", seed=0)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["base"]["model"] = {"source": "gguf", "gguf_file": str(gguf_file)}
    (project / "params.yaml").write_text(yaml.safe_dump(params))

    assert ran_stages(dvc(project, "repro", "tokenizer")) == {"prepare_data", "import_model", "tokenizer"}
    pretrained = project / paths.PRETRAINED_DIR
    assert (pretrained / "model.safetensors").is_file()
    tokenizer = json.loads((project / paths.TOKENIZER_DIR / "tokenizer_config.json").read_text())
    assert {"<think>", "</think>", "<|latent|>"} <= set(tokenizer["extra_special_tokens"])
    first = json.loads((pretrained / MANIFEST_NAME).read_text())

    again = dvc(project, "repro", "tokenizer")  # the import runs, finds its source unchanged, changes nothing
    assert ran_stages(again) == {"import_model"}
    assert "Stage 'tokenizer' didn't change, skipping" in again

    write_tiny_gguf(gguf_file, seed=1)  # other weights, same path, same params
    assert ran_stages(dvc(project, "repro", "tokenizer")) == {"import_model", "tokenizer"}
    assert json.loads((pretrained / MANIFEST_NAME).read_text())["sha256"] != first["sha256"]
