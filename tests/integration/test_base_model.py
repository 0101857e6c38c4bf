"""tokenizer -> chunk -> base_model on the micro configuration: loss goes down, outputs load back, resume works."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from latent_sft_core.base_model import train_base_model
from latent_sft_core.chunking import read_chunked
from latent_sft_core.config import DecodingParams
from latent_sft_core.errors import ArtifactError, DataError
from latent_sft_core.inference import decode
from latent_sft_core.modeling import load_model
from latent_sft_core.text import special_ids, tokenizer_fingerprint

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
    assert 0.0 <= metrics["val_closed_rate"] <= 1.0
    assert "added_token_rows_moved" not in metrics  # a tiny model's rows are all new
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


def test_no_cot_baseline_answers_without_a_chain(micro_run, tmp_path):
    """``base_model.reasoning: none`` trains ``[prompt] <think> </think> answer <end>``: the model closes its
    reasoning at once, where the CoT-SFT model of the same data writes a chain first."""
    root, params, _ = micro_run
    no_cot = params.model_copy(update={"base_model": params.base_model.model_copy(update={"reasoning": "none"})})
    train_base_model(no_cot, root / "raw", root / "tokenizer", tmp_path / "base", tmp_path / "m.json",
                     tmp_path / "l.csv", scratch_dir=tmp_path / "scratch")
    rows = read_chunked(root / "chunked" / "val.parquet")
    decoding = DecodingParams(batch_size=16, max_new_tokens=8)
    chain_lengths = {}
    for name, folder in (("none", tmp_path / "base"), ("cot", root / "base")):
        model, tokenizer = load_model(folder)
        decoded = decode(model, [r.prompt_ids for r in rows], special_ids(tokenizer), decoding, None, progress=False)
        chain_lengths[name] = [d.num_reasoning_tokens for d in decoded]
    assert all(length == 0 for length in chain_lengths["none"])
    assert all(length > 0 for length in chain_lengths["cot"])


def test_validation_that_never_closes_the_reasoning_is_a_loud_warning(micro_run, monkeypatch, caplog):
    from latent_sft_core import base_model
    from latent_sft_core.inference import Decoded

    root, params, _ = micro_run
    tokenizer = AutoTokenizer.from_pretrained(str(root / "base"))
    model = AutoModelForCausalLM.from_pretrained(str(root / "base"))
    never_closed = lambda model, prompts, *args, **kwargs: [Decoded([7] * 48, [], closed=False) for _ in prompts]  # noqa: E731
    monkeypatch.setattr(base_model, "decode", never_closed)
    with caplog.at_level("WARNING"):
        metrics = base_model.validation_metrics(params, root / "raw", tokenizer, model)
    assert metrics == {"val_rows": 8, "val_pass@1": 0.0, "val_closed_rate": 0.0}
    assert "none of 8 validation answers closed the reasoning with </think>" in caplog.text
    assert "base_model.new_token_lr" in caplog.text
