"""Every distributed stage under 2 CPU processes (torchrun + gloo), started through the launcher as dvc.yaml
starts it, against the same stage in one process.

Tolerances (BENCHMARKS.md, "Several processes"): the sharded inference stages (cache_soft_labels, evaluate) compute
each batch exactly as one process does, so their files are identical (wall times aside). The training stages
split each step's rows between the two processes and average their gradients, which changes the floating-point
reduction order and, for the losses averaged per process, the weighting of rows: the final training loss and the
validation losses stay within ``LOSS_TOLERANCE`` of the one-process run and the checkpoint chosen on them is the same. A 2-process stage
killed after its first checkpoint resumes to the uninterrupted 2-process result, bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tests.stage_cli import make_workdir, output_paths, stage_command
from tests.support import run_until_killed, subprocess_environment

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LAUNCHER = (sys.executable, "-m", "latent_sft_core.launcher")
TWO_PROCESSES = {"launch": {"processes_per_node": 2}}
LOSS_TOLERANCE = 2e-3  # relative; measured at most 2.0e-4 (BENCHMARKS.md, "Several processes on CPU")
# the session fixture (tests/conftest.py) whose artefacts each stage reads
FIXTURES = {"base_model": "micro_run", "train_encoder": "phase1_run", "train_decoder": "phase1_run",
            "train_joint": "phase1_run", "train_latent": "labelled_run"}
ZERO2, ZERO3 = ({"deepspeed": {"enabled": True, "zero_stage": stage}} for stage in (2, 3))
# every weight partitioned, however small (DeepSpeed keeps those under 1e5 elements whole by default, which would
# cover the micro model's embedding matrix that phase 1 reads outside its module's forward)
ZERO3_EVERY_WEIGHT = {"deepspeed": {**ZERO3["deepspeed"], "persistence_threshold": 0}}
# (stage, its params overrides): DDP for every stage but train_latent (DeepSpeed ZeRO-2, its default), and ZeRO on
# the other trainings too
TRAINING_CASES = [
    *((stage, {}) for stage in FIXTURES),
    ("base_model", {"base_model": ZERO3}),
    ("train_joint", {"train_joint": ZERO2}),
    ("train_joint", {"train_joint": ZERO3_EVERY_WEIGHT}),
    ("train_latent", {"train_latent": ZERO3}),
]
PRINTED = {"base_model": "base model ->", "cache_soft_labels": "soft labels ->", "train_latent": "train_latent ->"}


def run_stage(stage: str, workdir: Path, root: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(stage_command(stage, workdir, root, launcher=LAUNCHER), cwd=workdir,
                            env=subprocess_environment(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def both_runs(stage: str, tmp_path: Path, root: Path, overrides: dict | None = None):
    """(one-process result, two-process result), each in its own work folder."""
    alone = make_workdir(tmp_path / "one", overrides)
    pair = make_workdir(tmp_path / "two", {**(overrides or {}), **TWO_PROCESSES})
    first = run_stage(stage, alone, root)
    second = run_stage(stage, pair, root)
    assert "rank 0 of 2" in second.stderr and "rank 1 of 2" in second.stderr
    assert "rank 1 of 2" not in first.stderr
    return (alone, first), (pair, second)


def metrics_of(stage: str, workdir: Path) -> dict:
    return json.loads(output_paths(stage, workdir)["metrics"].read_text())


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{file.relative_to(folder)}:{name}": tensor for file in sorted(folder.rglob("*.safetensors"))
            for name, tensor in load_file(file).items()}


def no_staging_left(workdir: Path) -> None:
    assert not [p for p in (workdir / "outputs").iterdir() if p.name.startswith(".")], "staging folders left behind"


def case_id(case: tuple[str, dict]) -> str:
    stage, overrides = case
    deepspeed = overrides.get(stage, {}).get("deepspeed", {})
    zero = deepspeed.get("zero_stage")
    every_weight = "-every-weight" if deepspeed.get("persistence_threshold") == 0 else ""
    return f"{stage}-zero{zero}{every_weight}" if zero else stage


@pytest.mark.parametrize("case", TRAINING_CASES, ids=map(case_id, TRAINING_CASES))
def test_training_stage_under_two_processes(case, request, tmp_path):
    stage, overrides = case
    root = request.getfixturevalue(FIXTURES[stage])[0]
    (alone, _), (pair, result) = both_runs(stage, tmp_path, root, overrides)
    one, two = metrics_of(stage, alone), metrics_of(stage, pair)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    zero = overrides.get(stage, {}).get("deepspeed", {}).get("zero_stage", 2 if stage == "train_latent" else None)
    assert one["zero_stage"] == two["zero_stage"] == zero
    # the global batch is the same: as many optimizer steps, the same rows in each
    assert two["steps"] == one["steps"] > 0
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=LOSS_TOLERANCE)
    if stage != "base_model":  # the stages that choose their checkpoint on the validation loss
        assert two["best_step"] == one["best_step"]
        for step, loss in one["val_loss_by_step"].items():
            assert two["val_loss_by_step"][step] == pytest.approx(loss, rel=LOSS_TOLERANCE), step
    if "latent_health" in one:  # phase 1: alpha's statistics on the validation rows, measured by both processes
        for key in ("mean_entropy", "chunk_mass", "mass_outside_top1"):
            assert two["latent_health"][key] == pytest.approx(one["latent_health"][key], rel=LOSS_TOLERANCE, abs=1e-3)
        assert two["latent_health"]["latents"] == one["latent_health"]["latents"] > 0
    # rank 0 alone wrote the outputs
    if stage in PRINTED:
        assert result.stdout.count(PRINTED[stage]) == 1
    no_staging_left(pair)
    trained, reference = weights(output_paths(stage, pair)["out"]), weights(output_paths(stage, alone)["out"])
    assert trained.keys() == reference.keys() and trained
    for name, tensor in trained.items():  # whole tensors (ZeRO-3 gathers its partitions before saving)
        assert tensor.shape == reference[name].shape and tensor.numel() > 0 and torch.isfinite(tensor).all(), name
    if stage == "train_latent":  # a plain model: it must hold the trained weights, not the start's
        start = weights(root / "merged" / "decoder")
        assert any(not torch.equal(tensor, start[name]) for name, tensor in trained.items())
    assert not (pair / ".scratch" / stage).exists()


def test_sharded_soft_label_cache_equals_one_process(phase1_run, tmp_path):
    root = phase1_run[0]
    (alone, _), (pair, result) = both_runs("cache_soft_labels", tmp_path, root)
    assert result.stdout.count(PRINTED["cache_soft_labels"]) == 1
    one_dir, two_dir = output_paths("cache_soft_labels", alone)["out"], output_paths("cache_soft_labels", pair)["out"]
    files = sorted(p.name for p in one_dir.glob("*.parquet"))
    assert files == ["train.parquet", "val.parquet"] == sorted(p.name for p in two_dir.glob("*.parquet"))
    for name in files:
        one, two = pq.read_table(one_dir / name), pq.read_table(two_dir / name)
        assert one.num_rows > 0 and one.equals(two), name  # same rows, same order, same bits
        assert pq.read_schema(one_dir / name).metadata == pq.read_schema(two_dir / name).metadata
    timing = "latents_per_second"
    strip = {split: {k: v for k, v in values.items() if k != timing}
             for split, values in metrics_of("cache_soft_labels", alone).items()}
    assert strip == {split: {k: v for k, v in values.items() if k != timing}
                     for split, values in metrics_of("cache_soft_labels", pair).items()}
    no_staging_left(pair)


def test_sharded_evaluation_equals_one_process(latent_run, tmp_path):
    root = latent_run[0]
    (alone, _), (pair, _) = both_runs("evaluate", tmp_path, root)
    one = pq.read_table(output_paths("evaluate", alone)["predictions"]).drop_columns(["seconds"])
    two = pq.read_table(output_paths("evaluate", pair)["predictions"]).drop_columns(["seconds"])
    assert one.num_rows > 0 and one.equals(two)

    def untimed(metrics: dict) -> dict:
        return {model: {split: {k: v for k, v in values.items() if "second" not in k} for split, values in splits.items()}
                for model, splits in metrics.items()}

    assert untimed(metrics_of("evaluate", alone)) == untimed(metrics_of("evaluate", pair))
    assert output_paths("evaluate", alone)["report"].read_text().count("|") > 0
    no_staging_left(pair)


# (stage, its params overrides, the first checkpoint): DDP, and phase 1 under ZeRO-3 (DeepSpeed's own checkpoint
# resumes it; the trainable weights are gathered for the best-checkpoint choice)
KILL_CASES = [("base_model", {}, "checkpoint-8"), ("train_joint", {"train_joint": ZERO3_EVERY_WEIGHT}, "checkpoint-6")]


@pytest.mark.parametrize("case", KILL_CASES, ids=lambda case: case_id(case[:2]))
def test_killed_two_process_stage_resumes_to_the_uninterrupted_result(case, request, tmp_path):
    stage, overrides, first_checkpoint = case
    root = request.getfixturevalue(FIXTURES[stage])[0]
    straight, killed = (make_workdir(tmp_path / name, {**overrides, **TWO_PROCESSES}) for name in ("straight", "killed"))
    run_stage(stage, straight, root)
    state = killed / ".scratch" / stage / first_checkpoint / "trainer_state.json"
    run_until_killed(stage_command(stage, killed, root, launcher=LAUNCHER), killed, state)
    assert state.exists(), "no checkpoint before the kill"
    assert not output_paths(stage, killed)["out"].exists(), "the stage finished before it could be killed"
    rerun = run_stage(stage, killed, root)
    assert "resuming from" in rerun.stderr and first_checkpoint in rerun.stderr
    one, two = metrics_of(stage, straight), metrics_of(stage, killed)
    assert {k: v for k, v in one.items() if k != "train_seconds"} == {k: v for k, v in two.items() if k != "train_seconds"}
    straight_weights, resumed = weights(output_paths(stage, straight)["out"]), weights(output_paths(stage, killed)["out"])
    assert [name for name, tensor in straight_weights.items() if not torch.equal(resumed[name], tensor)] == []


def test_the_health_pass_encodes_from_zero3_partitioned_models(micro_run, tmp_path):
    """Phase 1's latent-health pass under ZeRO-3 runs outside any forward, where each process holds only its
    partition of the embedding matrix, with an odd number of batches for two processes."""
    root, params, _ = micro_run
    out = tmp_path / "comparison.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(Path(__file__).with_name("zero3_encode_rows.py")), str(root), params.model_dump_json(), str(out)]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_environment(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    comparison = json.loads(out.read_text())
    # the matrix really was partitioned away (one process holds half of it, and not even that outside a forward)
    assert comparison["embeddings_before"] == {"partitioned": True, "numel": 0}
    assert comparison["batches"] == [3, 3]
    assert comparison["max_difference"] < 1e-5

