"""`dvc repro` end to end on the micro configuration, in a temporary copy of the project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from latent_sft_core import paths
from tests.support import REPO_ROOT, micro_params_file_content

pytestmark = pytest.mark.pipeline

PROJECT_FILES = ["dvc.yaml", ".dvcignore", "latent_sft_core", "tasks"]


def dvc(project: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(project)}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(micro_params_file_content()))
    dvc(root, "init", "--no-scm", "-q")
    shutil.copytree(REPO_ROOT / ".dvc" / "plots", root / ".dvc" / "plots")
    dvc(root, "config", "core.analytics", "false")
    return root


def ran_stages(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def test_repro_runs_every_stage_then_nothing(project):
    stages = set(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    assert ran_stages(dvc(project, "repro")) == stages
    for out in (paths.RAW_DIR / "train.parquet", paths.TOKENIZER_DIR / "tokenizer.json",
                paths.CHUNKED_DIR / "test.parquet", paths.BASE_MODEL_DIR / "model.safetensors",
                paths.METRICS_DIR / "chunk.json", paths.METRICS_DIR / "base_model.json",
                paths.STAGE1_MERGED_DIR / "decoder" / "model.safetensors", paths.SOFT_LABELS_DIR / "train.parquet",
                paths.LATENT_MODEL_DIR / "model.safetensors", paths.METRICS_DIR / "train_latent.json",
                paths.METRICS_DIR / "evaluate.json", paths.METRICS_DIR / "report.md",
                paths.RESULTS_DIR / "predictions.parquet", paths.PLOTS_DIR / "latent_top_tokens.json"):
        assert (project / out).is_file(), out
    second = dvc(project, "repro")
    assert ran_stages(second) == set()
    assert "up to date" in second
    metrics = dvc(project, "metrics", "show")
    assert "val_pass@1" in metrics and "mean_chain_tokens" in metrics and "latent_sft.test.ecr@1" in metrics
    vega = dvc(project, "plots", "show", "--show-vega", "plots/latent_top_tokens.json")
    assert '"layer"' in vega and '"latent_step"' in vega  # the heat-map template, filled


PHASE1 = {"train_encoder", "train_decoder", "train_joint", "merge_lora"}
PHASE2 = {"cache_soft_labels", "train_latent", "evaluate"}


def test_param_change_reruns_only_downstream(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train_latent"]["kl_weight"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran_stages(dvc(project, "repro")) == {"train_latent", "evaluate"}
    params["base"]["compression_rate"] = 3  # chunking depends on c; the CoT-SFT base model does not
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran_stages(dvc(project, "repro")) == {"chunk"} | PHASE1 | PHASE2


def test_single_stage_rerun(project):
    assert ran_stages(dvc(project, "repro", "-f", "-s", "chunk")) == {"chunk"}
