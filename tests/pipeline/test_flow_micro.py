"""The Prefect flow on the micro pipeline: one task run per dvc.yaml stage, DVC deciding what runs, an override
that reruns stage 2 for real through the flow, and the evaluation artifacts once a stage writes them."""

from __future__ import annotations

import pytest
import yaml

from flows.pipeline import EVALUATION_METRICS, latent_sft_pipeline, read_stages
from tests.support import flow_run_record

pytestmark = pytest.mark.pipeline

KL_WEIGHT = 0.75  # a value no other test sets, so train_latent is out of date whatever ran before


def test_flow_runs_every_stage_once_and_dvc_records_the_override(prefect_api, built_micro_project):
    project = built_micro_project.root
    stages = read_stages(project / "dvc.yaml")
    names = [stage.name for stage in stages]

    state = latent_sft_pipeline(project_dir=str(project), params=[f"train_latent.kl_weight={KL_WEIGHT}"],
                                return_state=True)
    record = flow_run_record(state.state_details.flow_run_id)
    assert state.is_completed(), state.message
    assert record.task_run_names() == names
    assert all(task_run.state.is_completed() for task_run in record.task_runs)

    ran = state.result()
    assert not ran["prepare_data"] and ran["train_latent"]
    assert any(message.startswith("Running stage 'train_latent'") for message in record.task_log("train_latent"))
    assert any("didn't change, skipping" in message for message in record.task_log("prepare_data"))
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert lock["train_latent"]["params"]["params.yaml"]["train_latent"]["kl_weight"] == KL_WEIGHT

    evaluates = any(EVALUATION_METRICS in stage.outs for stage in stages)
    expected_artifacts = {"evaluation-metrics", "evaluation-report"} if evaluates else set()
    assert {artifact.key for artifact in record.artifacts} == expected_artifacts
