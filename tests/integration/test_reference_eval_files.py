"""The reference repository's data files through the jsonl source with their own field names: training rows
(problem / cot / cot_answer) and the test files of GSM8k-Aug, GSM-Hard, SVAMP and MultiArith (problem /
solution / answer); and an evaluation-only run (a trained model on those test files, no train split)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from latent_sft_core.chunking import read_chunked
from latent_sft_core.config import parse_params
from latent_sft_core.data.prepare import prepare_data
from latent_sft_core.data.readers import read_gsm8k_aug_txt
from latent_sft_core.data.schema import read_examples
from latent_sft_core.scoring import is_correct
from tests.support import GSM8K_AUG_TEST, deep_merge

pytestmark = pytest.mark.integration

TEST_FIELDS = {"question": "problem", "cot": "solution", "answer": "answer"}
TRAIN_FIELDS = {"question": "problem", "cot": "cot", "answer": "cot_answer"}
# Hand-made lines in each file's schema: the answer a string (GSM8k-Aug), a float (GSM-Hard, SVAMP: their gold
# answers are decimals) or an integer (MultiArith); extra columns (the multi-chain file's gen_solutions) ignored.
REFERENCE_TEST_FILES = {
    "gsm8k_aug": [{"problem": "Tom has 5 apples. He buys 3 more. How many apples does he have?",
                   "solution": "<<5+3=8>>", "answer": "8"}],
    "gsm_hard": [{"problem": "A farm has 2127862 ducks. Each lays 2 eggs. How many eggs?",
                  "solution": "<<2127862*2=4255724>>", "answer": 4255724.0},
                 {"problem": "Ann splits 7 pens between 2 friends. How many pens does each get?",
                  "solution": "<<7/2=3.5>>", "answer": 3.5}],
    "svamp": [{"problem": "Paco had 8 cookies. He ate 3 of them. How many cookies did Paco have left?",
               "solution": "<<8-3=5>>", "answer": 5.0, "gen_solutions": ["<<8-3=5>>", "<<8-2-1=5>>"]}],
    "multiarith": [{"problem": "A pet store had 3 cages of 4 birds. How many birds?", "solution": "<<3*4=12>>",
                    "answer": 12}],
}
EXPECTED_ANSWERS = {"gsm8k_aug": ["8"], "gsm_hard": ["4255724.0", "3.5"], "svamp": ["5.0"], "multiarith": ["12"]}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def reference_files_params(folder: Path, with_train: bool, base: dict | None = None):
    files = {split: write_jsonl(folder / f"{split}.jsonl", rows) for split, rows in REFERENCE_TEST_FILES.items()}
    split_fields = {split: TEST_FIELDS for split in files}
    if with_train:
        train = [{"problem": f"Ann has {n} pens. She buys 2 more. How many pens?", "cot": f"<think><<{n}+2={n + 2}>></think>",
                  "cot_answer": f"The final answer is \\boxed{{{n + 2}}}"} for n in range(3, 7)]
        files["train"] = write_jsonl(folder / "train.jsonl", train)
    section = {"files": files, "fields": TRAIN_FIELDS, "split_fields": split_fields}
    return parse_params(deep_merge(base or {}, {"base": {"data": {"source": "jsonl"}}, "prepare_data": {"jsonl": section}}))


def test_each_reference_schema_is_read_with_its_own_field_names(tmp_path):
    params = reference_files_params(tmp_path, with_train=True)
    report = prepare_data(params, tmp_path / "raw")
    assert set(report.splits) == {"train", *REFERENCE_TEST_FILES}
    for split, rows in REFERENCE_TEST_FILES.items():
        examples = read_examples(tmp_path / "raw" / f"{split}.parquet")
        assert [(e.question, e.cot, e.answer) for e in examples] == [
            (row["problem"], row["solution"], answer) for row, answer in zip(rows, EXPECTED_ANSWERS[split])]
    train = read_examples(tmp_path / "raw" / "train.parquet")
    assert (train[0].cot, train[0].answer) == ("<<3+2=5>>", "The final answer is \\boxed{5}")  # <think> stripped
    # decimals as the files write them still score against a model's plain answer
    assert is_correct("4255724", "4255724.0") and is_correct("The answer is \\boxed{5}", "5.0")
    assert is_correct("3.5", "3.5") and not is_correct("3", "3.5")


@pytest.mark.skipif(not GSM8K_AUG_TEST.exists(), reason="shared GSM8k-Aug test split not present")
def test_the_real_gsm8k_aug_test_split_in_the_reference_schema_reads_as_the_txt_file(tmp_path):
    from_txt = read_gsm8k_aug_txt(GSM8K_AUG_TEST, "test").examples
    as_reference = [{"problem": e.question, "solution": e.cot, "answer": e.answer} for e in from_txt]
    section = {"files": {"test": write_jsonl(tmp_path / "GSM8k-Aug-test.jsonl", as_reference)},
               "split_fields": {"test": TEST_FIELDS}}
    prepare_data(parse_params({"base": {"data": {"source": "jsonl"}}, "prepare_data": {"jsonl": section}}),
                 tmp_path / "raw")
    read_back = read_examples(tmp_path / "raw" / "test.parquet")
    assert len(read_back) == len(from_txt) == 1319
    assert [(e.question, e.cot, e.answer) for e in read_back] == [(e.question, e.cot, e.answer) for e in from_txt]


def test_a_trained_model_is_evaluated_on_the_reference_test_files_without_a_train_split(latent_run, tmp_path):
    """README's recipe: prepare_data, chunk (with the model's own tokenizer) and evaluate --no-phase1."""
    from tasks.chunk import main as chunk_main
    from tasks.evaluate import main as evaluate_main
    from tasks.prepare_data import main as prepare_main

    root, micro = latent_run
    base = deep_merge(micro.model_dump(mode="json"), {"evaluate": {"models": ["latent_sft"]}})
    params = reference_files_params(tmp_path, with_train=False, base=base)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    eval_dir = tmp_path / "eval"
    prepare_main(["--params", str(params_file), "--out", str(eval_dir / "raw")])
    chunk_main(["--params", str(params_file), "--raw", str(eval_dir / "raw"), "--tokenizer", str(root / "latent"),
                "--out", str(eval_dir / "chunked"), "--metrics", str(eval_dir / "chunk.json")])
    evaluate_main(["--params", str(params_file), "--chunked", str(eval_dir / "chunked"), "--latent-sft",
                   str(root / "latent"), "--no-phase1", *(f"--{option}={eval_dir / name}" for option, name in (
                       ("metrics", "evaluate.json"), ("report", "report.md"), ("predictions", "predictions.parquet"),
                       ("ecr-plot", "ecr.csv"), ("heatmap-plot", "heatmap.json")))])

    results = json.loads((eval_dir / "evaluate.json").read_text())
    assert list(results) == ["latent_sft"]
    assert sorted(results["latent_sft"]) == sorted(REFERENCE_TEST_FILES)
    for split, rows in REFERENCE_TEST_FILES.items():
        metrics = results["latent_sft"][split]
        assert metrics["rows"] == len(rows) and 0.0 <= metrics["pass@1"] <= 1.0
        assert "phase1_ceiling_pass@1" not in metrics  # no phase-1 models: no diagnostics
        assert len(read_chunked(eval_dir / "chunked" / f"{split}.parquet", 2)) == len(rows)
