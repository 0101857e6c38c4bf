"""tokenizer -> chunk -> base_model on the micro configuration: loss goes down, outputs load back, resume works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from latent_sft_core.base_model import train_base_model
from latent_sft_core.chunking import read_chunked
from latent_sft_core.errors import ArtifactError, DataError
from latent_sft_core.text import special_ids, tokenizer_fingerprint
from tests.support import MICRO_PARAMS, run_until_killed, subprocess_environment

pytestmark = pytest.mark.integration


def test_chunk_stage_outputs(micro_run):
    root, params, _ = micro_run
    tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    ids = special_ids(tokenizer)
    splits = {p.stem for p in (root / "chunked").glob("*.parquet")}
    assert {"train", "val", "test", "hard", "reworded", "two_step"} <= splits
    rows = read_chunked(root / "chunked" / "train.parquet", 2, tokenizer_fingerprint(tokenizer))
    raw = pq.read_table(root / "raw" / "train.parquet").to_pylist()
    assert len(rows) == len(raw) == 256
    for row, example in zip(rows, raw):
        assert row.id == example["id"]
        assert tokenizer.decode(row.cot_ids) == example["cot"]
        assert tokenizer.decode(row.prompt_ids) == example["question"] + "\n"
        assert tokenizer.decode(row.answer_ids) == example["answer"]
        assert sum(row.chunks(), []) == row.cot_ids
        assert row.num_chunks == -(-len(row.cot_ids) // 2)
        assert not {ids.think_open, ids.think_close, ids.latent} & set(row.cot_ids + row.prompt_ids)
    stats = json.loads((root / "metrics" / "chunk.json").read_text())
    mean_tokens = sum(len(r.cot_ids) for r in rows) / len(rows)
    assert stats["compression_rate"] == 2
    assert stats["train"]["mean_chain_tokens"] == pytest.approx(mean_tokens, abs=1e-3)
    assert stats["train"]["rows"] == 256
    test_rows = read_chunked(root / "chunked" / "test.parquet")
    assert any(r.alt_cot_ids for r in test_rows)


def test_base_model_loss_goes_down_and_checkpoint_loads(micro_run):
    root, _, metrics = micro_run
    curve = (root / "plots" / "loss.csv").read_text().splitlines()
    assert curve[0] == "step,loss"
    losses = [float(line.split(",")[1]) for line in curve[1:]]
    assert len(losses) >= 3
    assert losses[-1] < losses[0] * 0.8
    assert metrics["steps"] == 24 and 0.0 <= metrics["val_pass@1"] <= 1.0 and metrics["val_rows"] == 8
    assert json.loads((root / "metrics" / "base_model.json").read_text()) == metrics
    assert (root / "base" / "model.safetensors").is_file()
    assert not list((root / "base").glob("*.bin"))
    assert not (root / "scratch").exists()  # resume checkpoints are dropped once outputs are written

    model = AutoModelForCausalLM.from_pretrained(str(root / "base"))
    tokenizer = AutoTokenizer.from_pretrained(str(root / "base"))
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == special_ids(tokenizer).pad
    ids = torch.tensor([[special_ids(tokenizer).think_open, 5, 6]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 3, len(tokenizer)) and torch.isfinite(logits).all()


def test_too_long_row_is_an_error_naming_the_row(micro_run, tmp_path):
    root, params, _ = micro_run
    short = params.model_copy(
        update={"base_model": params.base_model.model_copy(
            update={"train": params.base_model.train.model_copy(update={"max_seq_len": 10})})}
    )
    with pytest.raises(DataError, match=r"train\.parquet: row train-\d+ has \d+ tokens.*max_seq_len=10"):
        train_base_model(short, root / "raw", root / "tokenizer", tmp_path / "out", tmp_path / "m.json",
                         tmp_path / "l.csv", scratch_dir=tmp_path / "scratch")
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


def test_missing_tokenizer_is_a_clear_error(micro_run, tmp_path):
    root, params, _ = micro_run
    with pytest.raises(ArtifactError, match="no tokenizer here"):
        train_base_model(params, root / "raw", tmp_path / "nothing", tmp_path / "out", tmp_path / "m.json",
                         tmp_path / "l.csv", scratch_dir=tmp_path / "scratch")


def _stage_command(workdir: Path, root: Path) -> list[str]:
    return [
        sys.executable, "-m", "tasks.base_model", "--params", str(workdir / "params.yaml"),
        "--raw", str(root / "raw"), "--tokenizer", str(root / "tokenizer"), "--out", str(workdir / "base"),
        "--metrics", str(workdir / "metrics.json"), "--loss-curve", str(workdir / "loss.csv"),
    ]


def test_killed_stage_resumes_to_the_same_model(micro_run, tmp_path):
    """SIGKILL after the first checkpoint; the rerun resumes from it and ends with the uninterrupted weights."""
    root, _, _ = micro_run
    micro = json.loads(json.dumps(MICRO_PARAMS))
    # slow enough steps that the kill lands between the first checkpoint and the end
    micro["base_model"]["tiny"] |= {"hidden_size": 64, "intermediate_size": 256, "num_layers": 2}
    micro["base_model"]["train"] |= {"max_steps": 48, "save_steps": 8, "batch_size": 32}
    micro["base_model"]["eval_rows"] = 0
    runs = {}
    for name in ("straight", "killed"):
        workdir = tmp_path / name
        workdir.mkdir()
        (workdir / "params.yaml").write_text(yaml.safe_dump(micro))
        runs[name] = workdir

    subprocess.run(_stage_command(runs["straight"], root), cwd=runs["straight"], env=subprocess_environment(),
                   check=True, capture_output=True)

    killed = runs["killed"]
    state = killed / ".scratch" / "base_model" / "checkpoint-8" / "trainer_state.json"
    run_until_killed(_stage_command(killed, root), killed, state)
    assert state.exists(), "no checkpoint before the kill"
    assert not (killed / "base").exists(), "the stage finished before it could be killed"

    rerun = subprocess.run(_stage_command(killed, root), cwd=killed, env=subprocess_environment(), capture_output=True,
                           text=True, check=True)
    assert "resuming from" in rerun.stderr and "checkpoint-" in rerun.stderr
    straight_weights = load_file(runs["straight"] / "base" / "model.safetensors")
    resumed_weights = load_file(killed / "base" / "model.safetensors")
    assert straight_weights.keys() == resumed_weights.keys()
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=0, atol=1e-6, msg=name)
    straight_metrics = json.loads((runs["straight"] / "metrics.json").read_text())
    resumed_metrics = json.loads((killed / "metrics.json").read_text())
    assert resumed_metrics["steps"] == straight_metrics["steps"] == 48
    assert resumed_metrics["final_loss"] == pytest.approx(straight_metrics["final_loss"], abs=1e-6)


def test_changed_params_discard_stale_checkpoints(tmp_path):
    from latent_sft_core.training import prepare_scratch

    scratch = tmp_path / "scratch"
    assert prepare_scratch(scratch, "run-a") is None
    (scratch / "checkpoint-4").mkdir()
    (scratch / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (scratch / "checkpoint-8").mkdir()  # cut short by a kill: no trainer state
    assert prepare_scratch(scratch, "run-a") == str(scratch / "checkpoint-4")
    assert not (scratch / "checkpoint-8").exists()
    assert prepare_scratch(scratch, "run-b") is None
    assert not (scratch / "checkpoint-4").exists()
