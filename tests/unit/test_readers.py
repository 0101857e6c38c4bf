"""File readers (GSM8k-Aug txt, jsonl) and the raw Parquet schema."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from latent_sft_core.config import FieldNames
from latent_sft_core.data.readers import RowError, read_gsm8k_aug_txt, read_jsonl
from latent_sft_core.data.schema import RAW_SCHEMA, Example, read_examples, write_examples
from latent_sft_core.errors import DataError
from tests.support import GSM8K_AUG_TEST as REAL_TEST_TXT

pytestmark = pytest.mark.unit

REFERENCE_TRAIN_FIELDS = FieldNames(question="problem", cot="cot", answer="cot_answer")


def write_bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- txt


def test_txt_good_lines_keep_values_exactly(tmp_path: Path) -> None:
    path = write_bytes(
        tmp_path / "good.txt",
        b"  Tom has 5 apples.  He buys 3.||<<5+3=8>> <<8*2=16>> #### 16  \r\n"
        b"\n"
        b"Kyle paid $19.50.|| #### 26\n"
        b"Neg?||<<2-7=-5>> #### -5\n"
        b"Half?||<<1/2=0.5>> #### 0.5\n"
        b"Big?||<<1000*1=1000>> #### 1,000\n"
        b"   \n",
    )
    result = read_gsm8k_aug_txt(path, "test")
    assert result.errors == []
    assert result.rows_read == 5  # blank lines are not rows
    assert result.examples[0] == Example(
        id="test-1",
        split="test",
        question="Tom has 5 apples.  He buys 3.",
        cot="<<5+3=8>> <<8*2=16>>",
        answer="16",
        source="gsm8k_aug_txt",
    )
    assert [(e.id, e.cot, e.answer) for e in result.examples[1:]] == [
        ("test-3", "", "26"),
        ("test-4", "<<2-7=-5>>", "-5"),
        ("test-5", "<<1/2=0.5>>", "0.5"),
        ("test-6", "<<1000*1=1000>>", "1,000"),
    ]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"no separator <<1+1=2>> #### 2", "expected exactly one '||'"),
        (b"a||b||<<1+1=2>> #### 2", "exactly one '||' between question and chain, found 2"),
        (b"question||<<1+1=2>> 2", "expected exactly one '####' before the answer, found 0"),
        (b"question||<<1+1=2>> #### 2 #### 3", "found 2"),
        (b"   ||<<1+1=2>> #### 2", "empty question"),
        (b"question||<<1+1=2>> ####   ", "empty answer"),
        (b"question||<<1+1=2>> #### two", "answer is not a number: 'two'"),
        (b"question||<<1+1=2>> #### 1/2", "answer is not a number"),
        (b"question||<<1+1=2>> #### 12,34", "answer is not a number"),
        (b"caf\xe9||<<1+1=2>> #### 2", "not valid UTF-8"),
    ],
)
def test_txt_malformed_line_gives_line_and_reason(tmp_path: Path, line: bytes, reason: str) -> None:
    path = write_bytes(tmp_path / "bad.txt", b"good||<<1+1=2>> #### 2\n\n" + line + b"\nalso good|| #### 3\n")
    result = read_gsm8k_aug_txt(path, "train")
    assert [e.question for e in result.examples] == ["good", "also good"]
    assert result.rows_read == 3
    assert len(result.errors) == 1
    error = result.errors[0]
    assert (error.file, error.line) == (str(path), 3)
    assert reason in error.reason
    assert str(error) == f"{path}:3: {error.reason}"


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
def test_txt_empty_file_is_an_error_naming_it(tmp_path: Path, content: bytes) -> None:
    path = write_bytes(tmp_path / "empty.txt", content)
    with pytest.raises(DataError, match=re.escape(f"{path}: file has no rows")):
        read_gsm8k_aug_txt(path, "train")


def test_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.txt: cannot read file"):
        read_gsm8k_aug_txt(tmp_path / "nope.txt", "train")


def test_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "bom.txt", b"\xef\xbb\xbfQ?||<<1+1=2>> #### 2\n")
    assert read_gsm8k_aug_txt(path, "train").examples[0].question == "Q?"


@pytest.mark.skipif(not REAL_TEST_TXT.exists(), reason="shared GSM8k-Aug test split not present")
def test_real_gsm8k_aug_test_split() -> None:
    result = read_gsm8k_aug_txt(REAL_TEST_TXT, "test")
    assert result.errors == []
    assert result.rows_read == len(result.examples) == 1319
    assert sum(not e.cot for e in result.examples) == 18
    first = result.examples[0]
    assert first.question.startswith("Janet’s ducks lay 16 eggs per day.")
    assert first.question.endswith("How much in dollars does she make every day at the farmers' market?")
    assert (first.id, first.cot, first.answer) == ("test-1", "<<16-3-4=9>> <<9*2=18>>", "18")
    answers = {e.answer for e in result.examples}
    assert {"-10", "-3", "1,450,000", "65,960"} <= answers
    empty_chain = next(e for e in result.examples if e.question.startswith("Kyle bought"))
    assert (empty_chain.id, empty_chain.cot, empty_chain.answer) == ("test-25", "", "26")
    # every answer is kept exactly as written after '####'
    lines = REAL_TEST_TXT.read_text(encoding="utf-8").splitlines()
    assert [e.answer for e in result.examples] == [line.rsplit("####", 1)[1].strip() for line in lines]


# ------------------------------------------------------------------------------------------ jsonl


def test_jsonl_maps_configured_fields_and_ignores_extra_keys(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"problem": " What is 2+2? ", "cot": "<think><<2+2=4>></think>", "cot_answer": "\\boxed{4}", "x": [1]},
            {"problem": "And 3*3?", "cot": "", "cot_answer": 9, "question": "ignored"},
        ],
    )
    result = read_jsonl(path, "train", REFERENCE_TRAIN_FIELDS)
    assert result.errors == []
    assert result.examples == [
        Example("train-1", "train", "What is 2+2?", "<<2+2=4>>", "\\boxed{4}", "jsonl"),
        Example("train-2", "train", "And 3*3?", "", "9", "jsonl"),
    ]


def test_jsonl_id_field_numbers_and_trailing_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "test.jsonl"
    path.write_text(
        '{"uid": "a-1", "problem": "P", "solution": "<<1+1=2>>", "answer": 2.5}\n\n'
        '{"uid": 7, "problem": "Q", "solution": "", "answer": "3"}\n\n\n',
        encoding="utf-8",
    )
    fields = FieldNames(id="uid", question="problem", cot="solution", answer="answer")
    result = read_jsonl(path, "test", fields, source="hub")
    assert result.rows_read == 2
    assert [(e.id, e.answer, e.source) for e in result.examples] == [("a-1", "2.5", "hub"), ("7", "3", "hub")]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"problem": "P", "cot_answer": "1"}', "missing field 'cot'"),
        ('{"cot": "", "cot_answer": "1"}', "missing field 'problem'"),
        ('{"problem": "P", "cot": ""}', "missing field 'cot_answer'"),
        ('{"problem": ["P"], "cot": "", "cot_answer": "1"}', "field 'problem' must be a string, got array"),
        ('{"problem": "P", "cot": null, "cot_answer": "1"}', "field 'cot' must be a string, got null"),
        ('{"problem": "P", "cot": 5, "cot_answer": "1"}', "field 'cot' must be a string, got number"),
        ('{"problem": "P", "cot": "", "cot_answer": true}', "must be a string or a number, got boolean"),
        ('{"problem": "P", "cot": "", "cot_answer": NaN}', "NaN is not a JSON value"),
        ('{"problem": "  ", "cot": "", "cot_answer": "1"}', "empty question"),
        ('{"problem": "P", "cot": "", "cot_answer": ""}', "empty answer"),
        ('{"problem": "P", "cot": "", ', "invalid JSON"),
        ('["P", "", "1"]', "expected a JSON object, got array"),
    ],
)
def test_jsonl_malformed_line_gives_line_and_reason(tmp_path: Path, line: str, reason: str) -> None:
    good = '{"problem": "P", "cot": "", "cot_answer": "1"}'
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{line}\n{good}\n", encoding="utf-8")
    result = read_jsonl(path, "train", REFERENCE_TRAIN_FIELDS)
    assert [e.id for e in result.examples] == ["train-1", "train-3"]
    assert len(result.errors) == 1
    assert (result.errors[0].file, result.errors[0].line) == (str(path), 2)
    assert reason in result.errors[0].reason


def test_jsonl_duplicate_id_and_bad_utf8(tmp_path: Path) -> None:
    path = write_bytes(
        tmp_path / "ids.jsonl",
        b'{"id": "x", "question": "A", "cot": "", "answer": "1"}\n'
        b'{"id": "x", "question": "B", "cot": "", "answer": "2"}\n'
        b'{"id": "y", "question": "\xff", "cot": "", "answer": "3"}\n',
    )
    result = read_jsonl(path, "train", FieldNames(id="id"))
    assert [e.question for e in result.examples] == ["A"]
    assert result.errors == [
        RowError(str(path), 2, "duplicate id 'x' (first on line 1)"),
        RowError(str(path), 3, "not valid UTF-8"),
    ]


# ----------------------------------------------------------------------------------------- schema


def test_schema_round_trip(tmp_path: Path) -> None:
    rows = [
        Example("t-1", "test", "Q?", "<<1+2=3>>", "3", "synthetic", ("<<2+1=3>>",)),
        Example("t-2", "test", "R?", "", "1,000", "jsonl"),
    ]
    path = tmp_path / "sub" / "test.parquet"
    assert write_examples(path, rows) == 2
    assert read_examples(path) == rows
    assert pq.read_schema(path).names == RAW_SCHEMA.names
    assert sorted(p.name for p in path.parent.iterdir()) == ["test.parquet"]  # no temporary file left


def test_schema_empty_split_round_trips(tmp_path: Path) -> None:
    write_examples(tmp_path / "val.parquet", [])
    assert read_examples(tmp_path / "val.parquet") == []


def test_read_examples_rejects_non_parquet_and_wrong_columns(tmp_path: Path) -> None:
    text = write_bytes(tmp_path / "x.parquet", b"not parquet")
    with pytest.raises(DataError, match="x.parquet: not a readable Parquet file"):
        read_examples(text)
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"id": ["a"], "question": ["q"]}), wrong)
    with pytest.raises(DataError, match="wrong.parquet: columns do not match the raw schema"):
        read_examples(wrong)
    with pytest.raises(DataError, match=r"missing\.parquet: no such split \(the folder has: wrong, x\)$"):
        read_examples(tmp_path / "missing.parquet")
    with pytest.raises(DataError, match=r"train\.parquet: no such split .*can only be evaluated"):
        read_examples(tmp_path / "train.parquet")
