"""Atomic outputs: a stage that fails while writing its last output leaves every declared output as it was.

Per stage, the outputs of an earlier run are in place; the stage runs through its command line's ``main`` (in
this process, so that a fault can be injected) and its last write is made to fail right after it wrote its
data. Every output must still hold the earlier run's content, and no staging folder may be left beside it.
A stage killed by SIGKILL while writing is covered by ``atomic_outputs`` tests below (a subprocess killed in
the middle of a write) and by tests/reliability/test_kill_resume.py (killed while training: no output).
"""

from __future__ import annotations

import importlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from latent_sft_core.io import atomic_outputs, remove_stale_staging
from latent_sft_core.stage_cli import run_cli
from tests.stage_cli import make_workdir, output_paths, stage_command
from tests.support import REPO_ROOT

pytestmark = pytest.mark.reliability


class InjectedFault(Exception):
    pass


def fails_after(original):
    """``original``, made to raise once it has written its data (a full disk, a kill after the write)."""

    def write_then_fail(*args, **kwargs):
        original(*args, **kwargs)
        raise InjectedFault(original.__name__)

    return write_then_fail


# stage -> (module, name): the function that writes the stage's last output
LAST_WRITES = {
    "prepare_data": ("latent_sft_core.data.prepare", "write_json"),  # report.json, after every split
    "tokenizer": ("transformers", "PreTrainedTokenizerBase.save_pretrained"),
    "chunk": ("latent_sft_core.chunking", "write_json"),
    "base_model": ("latent_sft_core.base_model", "write_loss_curve"),
    "train_encoder": ("latent_sft_core.phase1_training", "write_loss_curve"),
    "train_decoder": ("latent_sft_core.phase1_training", "write_loss_curve"),
    "train_joint": ("latent_sft_core.phase1_training", "write_loss_curve"),
    "merge_lora": ("latent_sft_core.phase1_training", "save_model"),  # the encoder is saved, then the decoder fails
    "cache_soft_labels": ("latent_sft_core.soft_label_caching", "write_json"),
    "train_latent": ("latent_sft_core.phase2_training", "write_loss_curve"),
    "evaluate": ("latent_sft_core.evaluation", "write_json"),
}


def previous_outputs(outputs: dict[str, Path]) -> dict[Path, str]:
    """Put an earlier run's outputs in place (a folder holds one file); return what each path holds."""
    held = {}
    for path in outputs.values():
        target = path / "from_earlier_run" if path.suffix == "" else path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"earlier {path.name}")
        held[target] = target.read_text()
    return held


def inject(monkeypatch, stage: str) -> None:
    module_name, name = LAST_WRITES[stage]
    owner = importlib.import_module(module_name)
    *classes, function = name.split(".")
    for part in classes:
        owner = getattr(owner, part)
    original = getattr(owner, function)
    if stage == "merge_lora":  # fail on the second model, after the first was written
        calls = []

        def second_fails(*args, **kwargs):
            calls.append(1)
            return (fails_after(original) if len(calls) == 2 else original)(*args, **kwargs)

        monkeypatch.setattr(owner, function, second_fails)
    else:
        monkeypatch.setattr(owner, function, fails_after(original))


@pytest.mark.parametrize("stage", list(LAST_WRITES))
def test_failure_in_the_last_write_leaves_earlier_outputs_untouched(stage, latent_run, tmp_path, monkeypatch):
    root, _ = latent_run
    # in this process, stage 2 runs without DeepSpeed (it would set up torch.distributed for the whole session)
    workdir = make_workdir(tmp_path / stage, {"train_latent": {"deepspeed": {"enabled": False}}})
    outputs = output_paths(stage, workdir)
    held = previous_outputs(outputs)
    monkeypatch.chdir(workdir)  # resume checkpoints go to the work folder
    inject(monkeypatch, stage)
    stage_main = importlib.import_module(f"tasks.{stage}").main
    with pytest.raises(InjectedFault):
        run_cli(stage_main, stage_command(stage, workdir, root)[3:])
    assert {path: path.read_text() for path in held} == held
    leftovers = [p.name for p in (workdir / "outputs").iterdir() if p.name not in {o.name for o in outputs.values()}]
    assert leftovers == []
    folders = [path for path in outputs.values() if path.is_dir()]
    assert all([p.name for p in folder.iterdir()] == ["from_earlier_run"] for folder in folders)


# ---------------------------------------------------------------------------------- atomic_outputs itself


def test_all_outputs_appear_together(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "old.bin").write_text("old")
    with atomic_outputs() as staged:
        model = staged.folder(tmp_path / "model")
        (model / "weights").write_text("new")
        staged.path(tmp_path / "metrics.json").write_text("{}")
        assert not (tmp_path / "metrics.json").exists() and (tmp_path / "model" / "old.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "model"]
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["weights"]


def test_an_output_not_written_fails_the_block_and_commits_nothing(tmp_path):
    with pytest.raises(RuntimeError, match=r"outputs not written by the stage: .*curve\.csv"):
        with atomic_outputs() as staged:
            staged.path(tmp_path / "metrics.json").write_text("{}")
            staged.path(tmp_path / "curve.csv")
    assert list(tmp_path.iterdir()) == []


WRITER = """
import sys, time
from pathlib import Path
from latent_sft_core.io import atomic_outputs
with atomic_outputs() as staged:
    staged.path(Path(sys.argv[1]) / "metrics.json").write_text("{}")
    folder = staged.folder(Path(sys.argv[1]) / "model")
    (folder / "half-written").write_text("x")
    print("writing", flush=True)
    time.sleep(60)
"""


def test_a_kill_during_the_write_leaves_no_output_and_the_next_write_clears_its_staging(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout.readline() == "writing\n"
    process.send_signal(signal.SIGKILL)
    process.wait()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and all(name.startswith((".metrics.json.", ".model.")) for name in left)
    remove_stale_staging(tmp_path / "model")
    assert [p.name for p in tmp_path.iterdir()] == [n for n in left if n.startswith(".metrics.json.")]
    with atomic_outputs() as staged:
        staged.path(tmp_path / "metrics.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_staging_of_other_outputs_is_left_alone(tmp_path):
    for name in (".model.abcd1234.tmp", ".model_b.abcd1234.tmp", ".model.old", "model.abcd1234.tmp"):
        (tmp_path / name).mkdir()
    remove_stale_staging(tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.old", ".model_b.abcd1234.tmp", "model.abcd1234.tmp"]

