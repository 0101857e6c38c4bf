"""The Prefect flow on a three-stage toy DVC project (seconds per run): task per stage, DVC as the only cache,
live log, params overrides recorded by DVC, failures, and the evaluation artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flows.pipeline import latent_sft_pipeline
from tests.support import dvc, flow_run_record

pytestmark = pytest.mark.integration

# One script for the three stages; it prints without flushing, so only an unbuffered stage streams live.
TOY_STAGE = """\
import json, sys, time
from pathlib import Path

import yaml

stage = sys.argv[1]
params = yaml.safe_load(Path("params.yaml").read_text())["toy"]
if stage == "first":
    print("first: line one")
    time.sleep(STREAM_GAP_S)
    print("first: line two")
    Path("out").mkdir(exist_ok=True)
    Path("out/first.txt").write_text("first")
elif stage == "second":
    if params["fail"]:
        sys.exit("second: failing on purpose")
    Path("out/second.txt").write_text(str(params["value"]))
else:
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/evaluate.json").write_text(json.dumps(
        {"toy_model": {"test": {"pass@1": 0.5, "ecr": {"1": 0.25}}, "hard": {"pass@1": 0.125}}}))
    Path("metrics/report.md").write_text("| model | pass@1 |\\n|---|---|\\n| toy_model | 0.5 |\\n")
"""
STREAM_GAP_S = 1.5

TOY_DVC_YAML = {
    "stages": {
        "first": {"cmd": "python toy_stage.py first", "deps": ["toy_stage.py"], "outs": ["out/first.txt"]},
        "second": {"cmd": "python toy_stage.py second", "deps": ["toy_stage.py", "out/first.txt"],
                   "params": ["toy.value", "toy.fail"], "outs": ["out/second.txt"]},
        "evaluate": {"cmd": "python toy_stage.py evaluate", "deps": ["toy_stage.py", "out/second.txt"],
                     "metrics": [{"metrics/evaluate.json": {"cache": False}}],
                     "outs": [{"metrics/report.md": {"cache": False}}]},
    }
}
STAGES = list(TOY_DVC_YAML["stages"])


@pytest.fixture
def toy_project(tmp_path) -> Path:
    dvc(tmp_path, "init", "--no-scm", "-q")
    (tmp_path / "toy_stage.py").write_text(TOY_STAGE.replace("STREAM_GAP_S", str(STREAM_GAP_S)))
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(TOY_DVC_YAML, sort_keys=False))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"toy": {"value": 1, "fail": False}}))
    return tmp_path


def run_flow(project: Path, **parameters):
    """The final state of one flow run on ``project`` and its record in the Prefect API."""
    state = latent_sft_pipeline(project_dir=str(project), return_state=True, **parameters)
    return state, flow_run_record(state.state_details.flow_run_id)


def test_each_stage_is_one_task_streamed_live_then_metrics_are_published(prefect_api, toy_project):
    state, record = run_flow(toy_project)
    assert state.is_completed()
    assert state.result() == {stage: True for stage in STAGES}
    assert record.task_run_names() == STAGES
    assert all(task_run.state.is_completed() for task_run in record.task_runs)

    first_log = {log.message: log.timestamp for log in record.logs if log.message.startswith("first: line")}
    assert set(first_log) == {"first: line one", "first: line two"}
    # logged as printed, not collected when the stage ended
    assert (first_log["first: line two"] - first_log["first: line one"]).total_seconds() >= STREAM_GAP_S * 0.8

    artifacts = {artifact.key: artifact for artifact in record.artifacts}
    assert set(artifacts) == {"evaluation-metrics", "evaluation-report"}
    assert json.loads(artifacts["evaluation-metrics"].data) == [
        {"model": "toy_model", "split": "test", "pass@1": 0.5, "ecr.1": 0.25},
        {"model": "toy_model", "split": "hard", "pass@1": 0.125, "ecr.1": None},
    ]
    assert "| toy_model | 0.5 |" in artifacts["evaluation-report"].data


def test_dvc_skips_finished_stages_and_force_reruns_them(prefect_api, toy_project):
    run_flow(toy_project)
    state, record = run_flow(toy_project)
    assert state.result() == {stage: False for stage in STAGES}
    assert record.task_run_names() == STAGES
    assert any("didn't change, skipping" in message for message in record.task_log("first"))
    assert {artifact.key for artifact in record.artifacts} == {"evaluation-metrics", "evaluation-report"}

    state, _ = run_flow(toy_project, force=True, up_to="second")
    assert state.result() == {"first": True, "second": True}


def test_params_overrides_are_recorded_by_dvc(prefect_api, toy_project):
    state, record = run_flow(toy_project, up_to="second", params={"toy.value": 7})
    assert state.result() == {"first": True, "second": True}
    assert record.artifacts == []  # no evaluation in this run
    lock = yaml.safe_load((toy_project / "dvc.lock").read_text())
    assert lock["stages"]["second"]["params"]["params.yaml"]["toy.value"] == 7
    assert (toy_project / "out" / "second.txt").read_text() == "7"

    state, _ = run_flow(toy_project, up_to="second", params=["toy.value=8"])
    assert state.result() == {"first": False, "second": True}
    assert yaml.safe_load((toy_project / "params.yaml").read_text())["toy"] == {"value": 8, "fail": False}


def test_a_failing_stage_fails_its_task_and_the_flow_with_its_error(prefect_api, toy_project):
    state, record = run_flow(toy_project, params={"toy.fail": True})
    assert state.is_failed()
    assert "second: failing on purpose" in state.message
    assert record.task_run_names() == ["first", "second"]
    failed = record.task_runs[1]
    assert failed.state.is_failed() and failed.run_count == 1  # no retries for a stage that does not download
    assert "second: failing on purpose" in record.task_log("second")


def test_unknown_stage_or_parameter_fails_before_any_stage_runs(prefect_api, toy_project):
    state, record = run_flow(toy_project, up_to="third")
    assert state.is_failed() and "unknown stage 'third'" in state.message
    state, record = run_flow(toy_project, params=["toy.missing=1"])
    assert state.is_failed() and "toy.missing" in state.message
    assert record.task_runs == []
