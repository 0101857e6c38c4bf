"""`dvc repro` end to end on the micro configuration, in a temporary copy of the project."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from latent_sft_core import paths
from tests.support import dvc

pytestmark = pytest.mark.pipeline


@pytest.fixture
def project(built_micro_project) -> Path:
    return built_micro_project.root


# import_model reads a model outside the project, which DVC cannot watch: it runs on every repro (always_changed)
# and leaves its output as it was when the source did not change, so nothing after it reruns
ALWAYS_RUN = {"import_model"}


def ran_stages(output: str) -> set[str]:
    """The stages a repro ran, apart from those DVC runs every time."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")} - ALWAYS_RUN


def test_repro_runs_every_stage_then_nothing(built_micro_project, project):
    stages = set(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    assert ran_stages(built_micro_project.first_repro) == stages - ALWAYS_RUN
    assert "Running stage 'import_model'" in built_micro_project.first_repro
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
    assert "Stage 'tokenizer' didn't change, skipping" in second
    metrics = dvc(project, "metrics", "show")
    assert "val_pass@1" in metrics and "mean_chain_tokens" in metrics and "latent_sft.test.ecr@1" in metrics
    vega = dvc(project, "plots", "show", "--show-vega", "plots/latent_top_tokens.json")
    assert '"layer"' in vega and '"latent_step"' in vega  # the heat-map template, filled


def test_outputs_are_links_into_the_cache_not_second_copies(project):
    for out in (paths.RAW_DIR / "train.parquet", paths.BASE_MODEL_DIR / "model.safetensors",
                paths.LATENT_MODEL_DIR / "model.safetensors"):
        assert (project / out).stat().st_nlink >= 2, f"{out} is a copy of its cache entry"


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
