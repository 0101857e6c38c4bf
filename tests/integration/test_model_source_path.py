"""`base.model.source: path`: a local Hugging Face checkpoint gains the special tokens and resized embeddings."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from latent_sft_core.base_model import train_base_model
from latent_sft_core.config import parse_params
from latent_sft_core.data.prepare import prepare_data
from latent_sft_core.errors import ArtifactError
from latent_sft_core.modeling import load_pretrained_model
from latent_sft_core.text import THINK_CLOSE, build_tokenizer, encode, special_ids
from tests.support import MICRO_PARAMS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory):
    """A word-level tokenizer and a small Llama saved like a downloaded model (no pad, no method tokens)."""
    folder = tmp_path_factory.mktemp("checkpoint")
    words = ["[UNK]", "</s>"] + [str(d) for d in range(10)] + list("<>=+-*/?.") + ["has", "buys", "more", "How"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="</s>")
    tokenizer.save_pretrained(str(folder))
    config = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, eos_token_id=1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return folder, len(words)


def params_for(folder, **base_model):
    data = json.loads(json.dumps(MICRO_PARAMS))
    data["base"]["model"] = {"source": "path", "path": str(folder)}
    data["base_model"] |= base_model
    return parse_params(data)


def test_checkpoint_gets_special_tokens_and_resized_embeddings(local_checkpoint, tmp_path):
    folder, original_vocab = local_checkpoint
    params = params_for(folder, skip_sft=True, eval_rows=0)
    prepare_data(params, tmp_path / "raw")
    tokenizer = build_tokenizer(params, tmp_path / "raw", tmp_path / "tokenizer")
    ids = special_ids(tokenizer)
    assert len(tokenizer) == original_vocab + 4  # <think>, </think>, <|latent|>, pad
    assert encode(tokenizer, f"3 {THINK_CLOSE} 4") == [5, ids.think_close, 6]
    assert {ids.think_open, ids.think_close, ids.latent, ids.pad} == set(range(original_vocab, original_vocab + 4))
    assert ids.end == 1

    metrics = train_base_model(params, tmp_path / "raw", tmp_path / "tokenizer", tmp_path / "base",
                               tmp_path / "m.json", tmp_path / "loss.csv", scratch_dir=tmp_path / "scratch")
    assert "steps" not in metrics  # skip_sft: the checkpoint is kept as is, only fitted to the tokenizer
    assert not (tmp_path / "loss.csv").exists()
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    original = AutoModelForCausalLM.from_pretrained(str(folder))
    embeddings = model.get_input_embeddings().weight
    assert embeddings.shape[0] == original_vocab + 4
    torch.testing.assert_close(embeddings[:original_vocab], original.get_input_embeddings().weight)
    # new rows start at the mean of the old ones (mean resizing), not at random values
    torch.testing.assert_close(embeddings[original_vocab:].mean(0),
                               original.get_input_embeddings().weight.mean(0), atol=0.05, rtol=0)
    assert model.config.pad_token_id == ids.pad and model.config.eos_token_id == ids.end


def test_checkpoint_is_fine_tuned_unless_skipped(local_checkpoint, tmp_path):
    folder, _ = local_checkpoint
    params = params_for(folder, eval_rows=4)
    prepare_data(params, tmp_path / "raw")
    build_tokenizer(params, tmp_path / "raw", tmp_path / "tokenizer")
    metrics = train_base_model(params, tmp_path / "raw", tmp_path / "tokenizer", tmp_path / "base",
                               tmp_path / "m.json", tmp_path / "loss.csv", scratch_dir=tmp_path / "scratch")
    assert metrics["steps"] == 24 and metrics["val_rows"] == 4
    lines = (tmp_path / "loss.csv").read_text().splitlines()[1:]
    assert float(lines[-1].split(",")[1]) < float(lines[0].split(",")[1])


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match=r"no \*\.safetensors weights"):
        load_pretrained_model(tmp_path)
    with pytest.raises(ArtifactError, match="no config.json"):
        load_pretrained_model(tmp_path / "elsewhere")



def test_added_token_rows_learn_at_their_own_rate(local_checkpoint, tmp_path):
    folder, _ = local_checkpoint
    moved = {}
    for name, new_token_lr in (("train.lr", None), ("10 x train.lr", 0.03)):
        params = params_for(folder, eval_rows=0, new_token_lr=new_token_lr)
        work = tmp_path / name
        prepare_data(params, work / "raw")
        build_tokenizer(params, work / "raw", work / "tokenizer")
        metrics = train_base_model(params, work / "raw", work / "tokenizer", work / "base", work / "m.json",
                                   work / "loss.csv", scratch_dir=work / "scratch")
        moved[name] = metrics["added_token_rows_moved"]
    assert set(moved["train.lr"]) == {"<think>", "</think>", "<|latent|>", "<|pad|>"}
    for token in ("<think>", "</think>"):  # in every training sequence; the other two never are
        assert moved["train.lr"][token] > 0
        assert moved["10 x train.lr"][token] > 5 * moved["train.lr"][token]
