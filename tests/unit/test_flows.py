"""The Prefect flow's stage graph comes from dvc.yaml; retries, metrics rows, params overrides, the offline
plots template; the stages and the library never import prefect."""

from __future__ import annotations

import ast
import io
import tarfile

import pytest
import yaml

from flows.offline_plots import build_page, cdn_packages
from flows.pipeline import (
    NETWORK_STAGES,
    DvcStage,
    apply_params_overrides,
    check_stage_order,
    flatten_metrics,
    params_overrides,
    read_stages,
    stage_task,
    stages_up_to,
)
from tests.support import REPO_ROOT

pytestmark = pytest.mark.unit

DVC_YAML = REPO_ROOT / "dvc.yaml"


def test_flow_stages_are_dvc_yaml_stages_in_file_order_and_after_their_inputs():
    stages = read_stages(DVC_YAML)
    assert [stage.name for stage in stages] == list(yaml.safe_load(DVC_YAML.read_text())["stages"])
    check_stage_order(stages)
    chunk = stages[[stage.name for stage in stages].index("chunk")]
    assert "artifacts/tokenizer" in chunk.deps and "metrics/chunk.json" in chunk.outs


def test_a_stage_listed_before_the_stage_it_reads_is_refused():
    producer = DvcStage("producer", deps=(), outs=("data/raw",))
    consumer = DvcStage("consumer", deps=("data/raw/train.parquet",), outs=("data/chunked",))
    check_stage_order([producer, consumer])
    with pytest.raises(ValueError, match="'consumer' reads \\['data/raw/train.parquet'\\].*'producer'"):
        check_stage_order([consumer, producer])


def test_stages_up_to():
    stages = [DvcStage(name, (), ()) for name in ("a", "b", "c")]
    assert [stage.name for stage in stages_up_to(stages, "b")] == ["a", "b"]
    assert stages_up_to(stages, None) == stages
    with pytest.raises(ValueError, match="unknown stage 'd'"):
        stages_up_to(stages, "d")


def test_only_the_download_stages_retry():
    retries = {stage.name: stage_task(stage.name).retries for stage in read_stages(DVC_YAML)}
    assert {name for name, count in retries.items() if count} == {"prepare_data", "import_model"} == set(NETWORK_STAGES)
    assert stage_task("train_latent").name == "train_latent"


def test_flatten_metrics_gives_one_row_per_model_and_split_with_every_column():
    metrics = {
        "cot_sft": {"test": {"pass@1": 0.94, "mean_reasoning_tokens": 12.1}},
        "latent_sft": {"test": {"pass@1": 0.9, "ecr@k": {"1": 0.5, "5": 0.75}}, "hard": {"pass@1": 0.1}},
    }
    assert flatten_metrics(metrics) == [
        {"model": "cot_sft", "split": "test", "pass@1": 0.94, "mean_reasoning_tokens": 12.1, "ecr@k.1": None,
         "ecr@k.5": None},
        {"model": "latent_sft", "split": "test", "pass@1": 0.9, "mean_reasoning_tokens": None, "ecr@k.1": 0.5,
         "ecr@k.5": 0.75},
        {"model": "latent_sft", "split": "hard", "pass@1": 0.1, "mean_reasoning_tokens": None, "ecr@k.1": None,
         "ecr@k.5": None},
    ]
    assert flatten_metrics({}) == []


def test_params_overrides_from_a_mapping_or_strings():
    assert params_overrides(None) == []
    assert params_overrides(["base.compression_rate=2"]) == ["base.compression_rate=2"]
    assert params_overrides({"base.compression_rate": 2, "latent.kind": "hidden_state", "latent.full_vocab": True,
                             "prepare_data.max_rows": None}) == [
        "base.compression_rate=2", 'latent.kind="hidden_state"', "latent.full_vocab=true",
        "prepare_data.max_rows=null"]


def test_params_overrides_keep_their_types_and_unknown_keys_fail(tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text("base:\n  compression_rate: 4  # c\nlatent:\n  kind: soft_embedding\n  full_vocab: false\n")
    apply_params_overrides(params_file, params_overrides({"base.compression_rate": 2, "latent.full_vocab": True})
                           + ["latent.kind=hidden_state"])
    assert yaml.safe_load(params_file.read_text()) == {
        "base": {"compression_rate": 2}, "latent": {"kind": "hidden_state", "full_vocab": True}}
    assert "# c" in params_file.read_text()
    with pytest.raises(ValueError, match="base.missing"):
        apply_params_overrides(params_file, ["base.missing=1"])


def imports_prefect(path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        if any(name == "prefect" or name.startswith("prefect.") for name in names):
            return True
    return False


def test_stages_and_library_never_import_prefect():
    sources = [*(REPO_ROOT / "tasks").rglob("*.py"), *(REPO_ROOT / "latent_sft_core").rglob("*.py")]
    assert len(sources) > 20
    assert [str(path) for path in sources if imports_prefect(path)] == []


def test_plots_template_inlines_the_scripts_dvc_would_load_from_the_cdn(tmp_path):
    packages = cdn_packages()
    assert [name for name, _ in packages] == ["vega", "vega-lite", "vega-embed"]
    tarballs = []
    for name, version in packages:
        tarball = tmp_path / f"{name}-{version}.tgz"
        with tarfile.open(tarball, "w:gz") as archive:
            build = f"window['{name}'] = true;".encode()
            info = tarfile.TarInfo(f"package/build/{name}.min.js")
            info.size = len(build)
            archive.addfile(info, io.BytesIO(build))
        tarballs.append(tarball)
    page = build_page(packages, tarballs)
    positions = [page.index(f"window['{name}'] = true;") for name, _ in packages]
    assert positions == sorted(positions)
    assert "{plot_divs}" in page and "{scripts}" not in page and "http" not in page
