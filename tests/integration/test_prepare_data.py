"""The prepare_data stage on micro configs, the Hub download (offline, from a fake cache) and the converter."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest

from latent_sft_core.cli import main as cli_main
from latent_sft_core.config import HubParams, Params, parse_params
from latent_sft_core.data.hub import download_hub_files
from latent_sft_core.data.prepare import prepare_data
from latent_sft_core.data.schema import Example, read_examples
from latent_sft_core.data.synthetic import SPLITS, generate_synthetic
from latent_sft_core.errors import DataError
from latent_sft_core.stage_cli import run_cli
from tasks.prepare_data import main as stage_main
from tests.support import GSM8K_AUG_TEST as REAL_TEST_TXT

pytestmark = pytest.mark.integration

CONSOLE_SCRIPT = Path(sys.executable).parent / "latent-sft"
GOOD_TXT = "Tom has 5 apples. He buys 3 more.||<<5+3=8>> #### 8\nAnn has 4 pens. She gives away 1.||<<4-1=3>> #### 3\n"
BAD_TXT = "Q1||<<1+1=2>> #### 2\nno separator #### 2\nQ3||<<2*2=4>> #### four\nQ4|| #### 4\n"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "someone/math-data"


def params(data: dict[str, object], source: str) -> Params:
    return parse_params({"base": {"data": {"source": source}}, "prepare_data": data})


def micro_synthetic() -> Params:
    sizes = {"train_size": 40, "val_size": 5, "test_size": 6, "ood_size": 4}
    return params({"synthetic": sizes}, "synthetic")


def txt_files(tmp_path: Path, train: str, test: str = GOOD_TXT) -> dict[str, str]:
    (tmp_path / "train.txt").write_text(train, encoding="utf-8")
    (tmp_path / "test.txt").write_text(test, encoding="utf-8")
    return {"train": str(tmp_path / "train.txt"), "test": str(tmp_path / "test.txt")}


def make_previous_output(out: Path) -> None:
    out.mkdir()
    (out / "train.parquet").write_text("previous run", encoding="utf-8")


# ------------------------------------------------------------------------------------------ stage


def test_synthetic_writes_every_split_and_a_report(tmp_path: Path) -> None:
    p = micro_synthetic()
    out = tmp_path / "raw"
    report = prepare_data(p, out)
    expected = generate_synthetic(p.prepare_data.synthetic, p.base.seed)
    assert sorted(path.name for path in out.iterdir()) == sorted(
        [f"{split}.parquet" for split in SPLITS] + ["report.json"]
    )
    for split in SPLITS:
        assert read_examples(out / f"{split}.parquet") == expected[split]
    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert saved == report.to_json()
    assert saved["source"] == "synthetic"
    assert saved["params"]["prepare_data.synthetic"]["train_size"] == 40
    assert saved["splits"]["test"] == {
        "file": None,
        "rows_read": 6,
        "rejected": 0,
        "rejected_rows": [],
        "moved_to_val": 0,
        "moved_from_train": 0,
        "dropped_by_max_rows": 0,
        "kept": 6,
    }


def test_max_rows_caps_every_split(tmp_path: Path) -> None:
    p = params(
        {"max_rows": 5, "synthetic": {"train_size": 40, "val_size": 5, "test_size": 6, "ood_size": 4}}, "synthetic"
    )
    report = prepare_data(p, tmp_path / "raw")
    kept = {split: len(read_examples(tmp_path / "raw" / f"{split}.parquet")) for split in SPLITS}
    assert kept == {"train": 5, "val": 5, "test": 5, "hard": 4, "reworded": 4, "two_step": 4}
    assert report.splits["train"].dropped_by_max_rows == 35
    assert report.splits["test"].dropped_by_max_rows == 1


def test_error_mode_writes_nothing_and_keeps_previous_output(tmp_path: Path) -> None:
    p = params({"gsm8k_aug_txt": {"files": txt_files(tmp_path, BAD_TXT)}}, "gsm8k_aug_txt")
    fresh = tmp_path / "fresh"
    with pytest.raises(DataError) as caught:
        prepare_data(p, fresh)
    message = str(caught.value)
    assert "2 malformed row(s)" in message
    assert f"{tmp_path / 'train.txt'}:2: expected exactly one '||'" in message
    assert f"{tmp_path / 'train.txt'}:3: answer is not a number: 'four'" in message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["test.txt", "train.txt"]  # no temporary folder left

    previous = tmp_path / "previous"
    make_previous_output(previous)
    with pytest.raises(DataError):
        prepare_data(p, previous)
    assert [path.name for path in previous.iterdir()] == ["train.parquet"]
    assert (previous / "train.parquet").read_text(encoding="utf-8") == "previous run"


def test_skip_mode_reports_every_rejected_row(tmp_path: Path) -> None:
    p = params({"on_bad_row": "skip", "gsm8k_aug_txt": {"files": txt_files(tmp_path, BAD_TXT)}}, "gsm8k_aug_txt")
    out = tmp_path / "raw"
    prepare_data(p, out)
    train = read_examples(out / "train.parquet")
    assert [(row.id, row.question, row.answer) for row in train] == [("train-1", "Q1", "2"), ("train-4", "Q4", "4")]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["splits"]["train"]["rows_read"] == 4
    assert report["splits"]["train"]["kept"] == 2
    assert report["splits"]["train"]["rejected"] == 2
    assert report["splits"]["train"]["rejected_rows"] == [
        {
            "file": str(tmp_path / "train.txt"),
            "line": 2,
            "reason": "expected exactly one '||' between question and chain, found 0",
        },
        {"file": str(tmp_path / "train.txt"), "line": 3, "reason": "answer is not a number: 'four'"},
    ]
    assert report["splits"]["test"]["kept"] == 2 and report["splits"]["test"]["rejected_rows"] == []


def test_skip_mode_still_fails_when_every_row_is_rejected(tmp_path: Path) -> None:
    files = txt_files(tmp_path, "no separator #### 2\n")
    with pytest.raises(DataError, match="split 'train': every row was rejected"):
        prepare_data(params({"on_bad_row": "skip", "gsm8k_aug_txt": {"files": files}}, "gsm8k_aug_txt"), tmp_path / "o")


def test_jsonl_relative_paths_split_fields_and_val_from_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    train = [
        {"problem": f"P{i}", "cot": f"<think><<{i}+1={i + 1}>></think>", "cot_answer": str(i + 1)} for i in range(6)
    ]
    Path("data").mkdir()
    Path("data/train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in train), encoding="utf-8")
    Path("data/test.jsonl").write_text('{"problem": "T", "solution": "<<1+1=2>>", "answer": 2}\n', encoding="utf-8")
    section = {
        "files": {"train": "data/train.jsonl", "test": "data/test.jsonl"},
        "fields": {"question": "problem", "cot": "cot", "answer": "cot_answer"},
        "split_fields": {"test": {"question": "problem", "cot": "solution", "answer": "answer"}},
    }
    report = prepare_data(params({"val_from_train": 2, "jsonl": section}, "jsonl"), Path("out"))
    train_rows = read_examples(Path("out/train.parquet"))
    val_rows = read_examples(Path("out/val.parquet"))
    test_rows = read_examples(Path("out/test.parquet"))
    assert [row.question for row in train_rows] == ["P0", "P1", "P2", "P3"]
    assert [(row.id, row.split, row.question) for row in val_rows] == [
        ("train-5", "val", "P4"),
        ("train-6", "val", "P5"),
    ]
    assert train_rows[0].cot == "<<0+1=1>>"
    assert [(row.question, row.cot, row.answer) for row in test_rows] == [("T", "<<1+1=2>>", "2")]
    assert (report.splits["train"].moved_to_val, report.splits["val"].moved_from_train) == (2, 2)
    assert (report.splits["train"].kept, report.splits["val"].kept) == (4, 2)


def test_val_from_train_conflicts_with_a_val_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="split 'val' already has 5 rows"):
        prepare_data(
            params({"val_from_train": 3, "synthetic": {"train_size": 20, "val_size": 5}}, "synthetic"), tmp_path / "o"
        )
    assert not (tmp_path / "o").exists()


def test_a_file_source_without_train_is_evaluation_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "t.txt").write_text(GOOD_TXT, encoding="utf-8")
    p = params({"gsm8k_aug_txt": {"files": {"test": str(tmp_path / "t.txt")}}}, "gsm8k_aug_txt")
    with caplog.at_level(logging.WARNING):
        report = prepare_data(p, tmp_path / "o")
    assert list(report.splits) == ["test"] and sorted(path.name for path in (tmp_path / "o").glob("*.parquet")) == [
        "test.parquet"]
    assert "has no 'train' file: this data set can only be evaluated" in caplog.text
    with pytest.raises(DataError, match=r"o/train\.parquet: no such split \(the folder has: test\)"):
        read_examples(tmp_path / "o" / "train.parquet")
    no_train_to_move = params({"val_from_train": 1, "gsm8k_aug_txt": {"files": {"test": str(tmp_path / "t.txt")}}},
                              "gsm8k_aug_txt")
    with pytest.raises(DataError, match="val_from_train is 1 but there is no train split"):
        prepare_data(no_train_to_move, tmp_path / "o2")
    with pytest.raises(DataError, match="prepare_data.jsonl.files names no file"):
        prepare_data(params({}, "jsonl"), tmp_path / "o3")


def test_stage_cli_runs_and_reports_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        "prepare_data:\n  synthetic: {train_size: 10, val_size: 2, test_size: 2, ood_size: 2}\n", encoding="utf-8"
    )
    assert run_cli(stage_main, ["--params", str(params_file), "--out", str(tmp_path / "raw")]) == 0
    assert "train: 10 rows kept (10 read, 0 rejected)" in caplog.text
    assert len(read_examples(tmp_path / "raw" / "two_step.parquet")) == 2
    params_file.write_text("prepare_data:\n  synthetic: {train_size: 0}\n", encoding="utf-8")
    assert run_cli(stage_main, ["--params", str(params_file), "--out", str(tmp_path / "raw")]) == 2


# -------------------------------------------------------------------------------------------- hub


@pytest.fixture
def fake_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face cache holding two files of REPO at 'main', with the hub in offline mode.

    huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE into ``huggingface_hub.constants`` at import and
    looks them up there at call time, so the constants are patched as well as the environment.
    """
    cache = tmp_path / "hf" / "hub"
    repo_dir = cache / f"datasets--{REPO.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    (snapshot / "gsm8k").mkdir(parents=True)
    (snapshot / "gsm8k" / "train.jsonl").write_text(
        '{"problem": "P1", "cot": "<<1+1=2>>", "cot_answer": "2"}\n'
        '{"problem": "P2", "cot": "<<2+2=4>>", "cot_answer": "4"}\n'
        '{"problem": "P3", "cot_answer": "6"}\n',
        encoding="utf-8",
    )
    (snapshot / "test.jsonl").write_text('{"problem": "T", "solution": "", "answer": "7"}\n', encoding="utf-8")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT, encoding="utf-8")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


HUB_SECTION = {
    "repo_id": REPO,
    "files": {"train": "gsm8k/train.jsonl", "test": "test.jsonl"},
    "fields": {"question": "problem", "cot": "cot", "answer": "cot_answer"},
    "split_fields": {"test": {"question": "problem", "cot": "solution", "answer": "answer"}},
}


def test_download_hub_files_copies_from_the_cache(fake_hub_cache: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    local = download_hub_files(HubParams.model_validate(HUB_SECTION), dest)
    assert local == {"train": dest / "gsm8k" / "train.jsonl", "test": dest / "test.jsonl"}
    assert local["test"].read_text(encoding="utf-8") == '{"problem": "T", "solution": "", "answer": "7"}\n'


def test_download_failure_names_repo_revision_and_file(fake_hub_cache: Path, tmp_path: Path) -> None:
    hub = HubParams.model_validate({**HUB_SECTION, "revision": "v2"})
    with pytest.raises(DataError, match=f"cannot download {REPO}@v2:gsm8k/train.jsonl"):
        download_hub_files(hub, tmp_path / "dest")


def test_prepare_from_hub_keeps_downloads_and_names_repo_files(fake_hub_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    report = prepare_data(params({"on_bad_row": "skip", "hub": HUB_SECTION}, "hub"), out)
    train = read_examples(out / "train.parquet")
    assert [(row.question, row.answer, row.source) for row in train] == [("P1", "2", "hub"), ("P2", "4", "hub")]
    assert [(row.question, row.answer) for row in read_examples(out / "test.parquet")] == [("T", "7")]
    assert (out / "hub" / "gsm8k" / "train.jsonl").is_file()
    rejected = report.to_json()["splits"]["train"]["rejected_rows"]  # type: ignore[index]
    assert rejected == [{"file": f"{REPO}@main:gsm8k/train.jsonl", "line": 3, "reason": "missing field 'cot'"}]


# ---------------------------------------------------------------------------------------- convert


def run_convert(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exited:
        cli_main(["data", "convert", *args])
    return int(exited.value.code or 0)


def test_convert_txt_and_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "in.txt").write_text(GOOD_TXT, encoding="utf-8")
    assert run_convert(["--source", "gsm8k_aug_txt", str(tmp_path / "in.txt"), str(tmp_path / "t.parquet")]) == 0
    assert capsys.readouterr().out.startswith("wrote 2 rows (split 'train', 2 lines read)")
    rows = read_examples(tmp_path / "t.parquet")
    assert [(r.id, r.question, r.cot, r.answer) for r in rows] == [
        ("train-1", "Tom has 5 apples. He buys 3 more.", "<<5+3=8>>", "8"),
        ("train-2", "Ann has 4 pens. She gives away 1.", "<<4-1=3>>", "3"),
    ]
    (tmp_path / "in.jsonl").write_text('{"k": "a", "q": "Q", "s": "<<1+1=2>>", "a": 2, "extra": 1}\n', encoding="utf-8")
    args = ["--source", "jsonl", "--split", "test", "--question-field", "q", "--cot-field", "s", "--answer-field", "a"]
    assert run_convert([*args, "--id-field", "k", str(tmp_path / "in.jsonl"), str(tmp_path / "j.parquet")]) == 0
    assert read_examples(tmp_path / "j.parquet") == [Example("a", "test", "Q", "<<1+1=2>>", "2", "jsonl")]


def test_convert_malformed_row_fails_and_leaves_no_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.txt").write_text(BAD_TXT, encoding="utf-8")
    output = tmp_path / "out.parquet"
    assert run_convert(["--source", "gsm8k_aug_txt", str(tmp_path / "bad.txt"), str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert f"{tmp_path / 'bad.txt'}:2: expected exactly one '||'" in err
    assert f"{tmp_path / 'bad.txt'}:3: answer is not a number: 'four'" in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bad.txt"]
    output.write_text("older output", encoding="utf-8")
    assert run_convert(["--source", "gsm8k_aug_txt", str(tmp_path / "bad.txt"), str(output)]) == 2
    assert output.read_text(encoding="utf-8") == "older output"


def test_convert_console_script(tmp_path: Path) -> None:
    if not CONSOLE_SCRIPT.exists():
        pytest.skip("latent-sft console script not installed in this environment")
    source = REAL_TEST_TXT if REAL_TEST_TXT.exists() else tmp_path / "in.txt"
    if not REAL_TEST_TXT.exists():
        source.write_text(GOOD_TXT, encoding="utf-8")
    output = tmp_path / "x.parquet"
    done = subprocess.run(
        [str(CONSOLE_SCRIPT), "data", "convert", "--source", "gsm8k_aug_txt", str(source), str(output)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = read_examples(output)
    assert done.stdout.count("\n") == 1 and done.stdout.startswith(f"wrote {len(rows)} rows")
    assert len(rows) == (1319 if REAL_TEST_TXT.exists() else 2)
