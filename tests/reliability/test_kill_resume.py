"""Kill and resume: every training stage, SIGKILLed after its first checkpoint and run again, resumes from that
checkpoint (weights, optimizer, scheduler, RNG state) and ends where an uninterrupted run ends.

Each case runs the stage's command line three times in subprocesses (one thread each): straight through; until
its first checkpoint's trainer state exists, then SIGKILL; and again in the killed run's folder.

Tolerance: none. The final weights (every tensor of every ``*.safetensors`` the stage writes) and metrics (all
but the wall time) of the resumed run are bit-identical to the straight run's, DeepSpeed ZeRO-2 included: on
the CPU with one thread, a restored optimizer, scheduler, RNG and data order replay the same arithmetic.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.stage_cli import make_workdir, output_paths, stage_command
from tests.support import run_until_killed, subprocess_environment

pytestmark = pytest.mark.reliability


@dataclass(frozen=True)
class KillCase:
    stage: str
    micro_run: str  # the session fixture (tests/conftest.py) whose artefacts the stage reads
    first_checkpoint: int  # the step of the first checkpoint (save_steps)
    overrides: dict = field(default_factory=dict)
    expected: dict = field(default_factory=dict)  # metrics both runs must report


KILL_CASES = [
    KillCase("base_model", "micro_run", 8, expected={"steps": 24}),
    KillCase("train_encoder", "phase1_run", 6, expected={"steps": 12}),
    KillCase("train_decoder", "phase1_run", 6, expected={"steps": 12}),
    KillCase("train_joint", "phase1_run", 6, expected={"steps": 12}),
    # DeepSpeed ZeRO-2 (the stage's default) in one process
    KillCase("train_latent", "labelled_run", 6, expected={"steps": 12, "zero_stage": 2}),
]
WALL_TIME = "train_seconds"


def run_stage(command: list[str], workdir: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=workdir, env=subprocess_environment(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file under ``folder``, keyed by file and tensor name."""
    return {f"{file.relative_to(folder)}:{name}": tensor for file in sorted(folder.rglob("*.safetensors"))
            for name, tensor in load_file(file).items()}


@pytest.mark.parametrize("case", KILL_CASES, ids=[case.stage for case in KILL_CASES])
def test_killed_stage_resumes_to_the_uninterrupted_result(case, request, tmp_path):
    root = request.getfixturevalue(case.micro_run)[0]
    straight, killed = (make_workdir(tmp_path / name, case.overrides) for name in ("straight", "killed"))
    run_stage(stage_command(case.stage, straight, root), straight)

    state = killed / ".scratch" / case.stage / f"checkpoint-{case.first_checkpoint}" / "trainer_state.json"
    run_until_killed(stage_command(case.stage, killed, root), killed, state)
    assert state.exists(), "no checkpoint before the kill"
    outputs = output_paths(case.stage, killed)
    assert not any(path.exists() for path in outputs.values()), "the stage finished before it could be killed"

    rerun = run_stage(stage_command(case.stage, killed, root), killed)
    assert "resuming from" in rerun.stderr and f"checkpoint-{case.first_checkpoint}" in rerun.stderr
    assert not (killed / ".scratch" / case.stage).exists(), "resume checkpoints are dropped once outputs are written"

    straight_weights, resumed_weights = weights(output_paths(case.stage, straight)["out"]), weights(outputs["out"])
    assert straight_weights and straight_weights.keys() == resumed_weights.keys()
    differing = [name for name, tensor in straight_weights.items() if not torch.equal(resumed_weights[name], tensor)]
    assert differing == []
    straight_metrics, resumed_metrics = (json.loads(output_paths(case.stage, w)["metrics"].read_text())
                                         for w in (straight, killed))
    assert straight_metrics.items() >= case.expected.items()
    del straight_metrics[WALL_TIME], resumed_metrics[WALL_TIME]
    assert resumed_metrics == straight_metrics
