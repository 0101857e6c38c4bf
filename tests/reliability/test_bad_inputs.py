"""The bad-input corpus: every stage's command line, given one broken input, fails cleanly.

Each case runs ``python -m tasks.<stage>`` as a subprocess on the micro run's artefacts with one input (or the
params file) broken, and checks: a non-zero exit status, an ``error: ...`` message on stderr (no traceback)
that names the file, row or key at fault, and nothing at any of the stage's output paths (no output, no
staging folder) where DVC would take it for a result.

A case costs a few seconds (the start-up of torch and transformers), so the default run takes the first case
of every stage; the rest are marked ``slow`` and run in ``.ci/run``'s second step (``-m slow``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from latent_sft_core.config import ModelSourceParams
from latent_sft_core.data.synthetic import SPLITS as SYNTHETIC_SPLITS
from latent_sft_core.model_import import import_model
from tests.stage_cli import STAGES, stage_command
from tests.support import REPO_ROOT, deep_merge, micro_params_file_content, subprocess_environment, write_tiny_gguf

pytestmark = pytest.mark.reliability


@dataclass(frozen=True)
class Broken:
    """What a case changes: params overrides, replaced input folders (by option), or the params file's text."""

    params: dict = field(default_factory=dict)
    inputs: dict[str, Path] = field(default_factory=dict)
    params_text: str | None = None


@dataclass(frozen=True)
class Case:
    name: str
    stage: str
    error: str  # a regex the error message must match: it names the file, row or key at fault
    breaks: Callable[[Path, Path], Broken]  # (case folder, micro-run folder) -> what is broken


# ------------------------------------------------------------------------------------------- builders


def txt_train_file(content: bytes) -> Callable[[Path, Path], Broken]:
    """prepare_data reading a GSM8k-Aug txt train split with ``content`` (one good line first)."""

    def breaks(case: Path, _: Path) -> Broken:
        (case / "train.txt").write_bytes(content)
        files = {"train": str(case / "train.txt")}
        source = {"base": {"data": {"source": "gsm8k_aug_txt"}}, "prepare_data": {"gsm8k_aug_txt": {"files": files}}}
        return Broken(params=source)

    return breaks


def jsonl_train_file(content: str) -> Callable[[Path, Path], Broken]:
    def breaks(case: Path, _: Path) -> Broken:
        (case / "train.jsonl").write_text(content, encoding="utf-8")
        files = {"train": str(case / "train.jsonl")}
        return Broken(params={"base": {"data": {"source": "jsonl"}}, "prepare_data": {"jsonl": {"files": files}}})

    return breaks


def gguf_model(write: Callable[[Path], Path]) -> Callable[[Path, Path], Broken]:
    """base.model: the GGUF file that ``write`` makes in the case's inputs folder."""

    def breaks(case: Path, _: Path) -> Broken:
        folder = case / "inputs"
        folder.mkdir(exist_ok=True)
        return Broken(params={"base": {"model": {"source": "gguf", "gguf_file": str(write(folder))}}})

    return breaks


def checkpoint_model(remove_files: tuple[str, ...] = (), chat_template: str | None = None,
                     text: dict | None = None) -> Callable[[Path, Path], Broken]:
    """base.model: a local checkpoint (the tiny GGUF converted) without ``remove_files``, with ``chat_template``."""

    def breaks(case: Path, _: Path) -> Broken:
        checkpoint = case / "inputs" / "checkpoint"
        import_model(ModelSourceParams(source="gguf", gguf_file=str(write_tiny_gguf(case / "tiny.gguf"))), checkpoint)
        for name in remove_files:
            (checkpoint / name).unlink()
        if chat_template is not None:
            (checkpoint / "chat_template.jinja").write_text(chat_template)
        model = {"source": "path", "path": str(checkpoint)}
        return Broken(params={"base": {"model": model, **({"text": text} if text else {})}})

    return breaks


def params_change(overrides: dict) -> Callable[[Path, Path], Broken]:
    return lambda case, root: Broken(params=overrides)


def params_text(text: str) -> Callable[[Path, Path], Broken]:
    return lambda case, root: Broken(params_text=text)


def edited_copy(option: str, folder: str, edit: Callable[[Path], None]) -> Callable[[Path, Path], Broken]:
    """A copy of the micro run's ``folder`` with ``edit`` applied, given to the stage as ``--option``."""

    def breaks(case: Path, root: Path) -> Broken:
        copy = case / "inputs" / folder
        shutil.copytree(root / folder, copy)
        edit(copy)
        return Broken(inputs={option: copy})

    return breaks


def truncate(name: str) -> Callable[[Path], None]:
    """Cut the file ``name`` to half its length (a copy interrupted, a disk that filled up)."""

    def edit(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return edit


def remove(*names: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        for name in names:
            path = folder / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()

    return edit


def only_bin_weights(model: str = "") -> Callable[[Path], None]:
    """Replace a model folder's safetensors weights by a pickle ``pytorch_model.bin`` (never loaded)."""

    def edit(folder: Path) -> None:
        target = folder / model
        for weights in target.glob("*.safetensors"):
            weights.unlink()
        (target / "pytorch_model.bin").write_bytes(b"not loaded: a pickle could run code")

    return edit


def rewrite_parquet(name: str, change: Callable) -> Callable[[Path], None]:
    """Rewrite a Parquet file through ``change(table) -> table`` (other columns, other metadata); the table
    carries the file's footer metadata, where the soft-label cache keeps its counts."""

    def edit(folder: Path) -> None:
        path = folder / name
        # without pyarrow's serialised schema, which holds the old metadata and would win on reading
        footer = {key: value for key, value in pq.read_metadata(path).metadata.items() if key != b"ARROW:schema"}
        pq.write_table(change(pq.read_table(path).replace_schema_metadata(footer)), path)

    return edit


def without_column(name: str) -> Callable:
    return lambda table: table.drop_columns([name])


def with_metadata(**values: str) -> Callable:
    def change(table):
        metadata = dict(table.schema.metadata or {})
        metadata |= {f"latent_sft.{key}".encode(): value.encode() for key, value in values.items()}
        return table.replace_schema_metadata(metadata)

    return change


def soft_labels_of_another_run(key: str, value: str) -> Callable[[Path, Path], Broken]:
    """The micro run's soft-label cache as if written by another run (other c, k or tokenizer)."""
    return edited_copy("soft-labels", "labels", rewrite_parquet("train.parquet", with_metadata(**{key: value})))


def empty_file(option: str, folder: str, name: str) -> Callable[[Path, Path], Broken]:
    def edit(copy: Path) -> None:
        (copy / name).write_bytes(b"")

    return edited_copy(option, folder, edit)


GOOD_TXT = b"Tom has 2 apples and buys 3.||<<2+3=5>> #### 5\n"
GOOD_JSONL = '{"question": "Q", "cot": "<<1+1=2>>", "answer": "2"}\n'

CASES = [
    # prepare_data: malformed GSM8k-Aug lines, jsonl rows, empty and missing files
    Case("txt without ||", "prepare_data", r"train\.txt:2: expected exactly one '\|\|'",
         txt_train_file(GOOD_TXT + b"Tom has 2 apples <<2+3=5>> #### 5\n")),
    Case("txt without ####", "prepare_data", r"train\.txt:2: expected exactly one '####'",
         txt_train_file(GOOD_TXT + b"Tom has 2 apples.||<<2+3=5>> 5\n")),
    Case("txt empty question", "prepare_data", r"train\.txt:2: empty question",
         txt_train_file(GOOD_TXT + b"  ||<<2+3=5>> #### 5\n")),
    Case("txt non-numeric answer", "prepare_data", r"train\.txt:2: answer is not a number: 'five'",
         txt_train_file(GOOD_TXT + b"Q||<<2+3=5>> #### five\n")),
    Case("txt latin-1 line", "prepare_data", r"train\.txt:2: not valid UTF-8",
         txt_train_file(GOOD_TXT + b"caf\xe9||<<1+1=2>> #### 2\n")),
    Case("txt UTF-16 file", "prepare_data", r"train\.txt:1: not valid UTF-8",
         txt_train_file(GOOD_TXT.decode().encode("utf-16"))),
    Case("txt empty file", "prepare_data", r"train\.txt: file has no rows", txt_train_file(b"")),
    Case("txt missing file", "prepare_data", r"nowhere\.txt: cannot read file",
         lambda case, root: Broken(params={
             "base": {"data": {"source": "gsm8k_aug_txt"}},
             "prepare_data": {"gsm8k_aug_txt": {"files": {"train": str(case / "nowhere.txt")}}}})),
    Case("jsonl missing field", "prepare_data", r"train\.jsonl:2: missing field 'cot'",
         jsonl_train_file(GOOD_JSONL + '{"question": "Q", "answer": "2"}\n')),
    Case("jsonl extra fields only", "prepare_data", r"train\.jsonl:2: missing field 'question'",
         jsonl_train_file(GOOD_JSONL + '{"problem": "Q", "cot": "", "answer": "2", "source": "x"}\n')),
    Case("jsonl question not a string", "prepare_data", r"train\.jsonl:2: field 'question' must be a string, got num",
         jsonl_train_file(GOOD_JSONL + '{"question": 12, "cot": "", "answer": "2"}\n')),
    Case("jsonl answer a list", "prepare_data", r"train\.jsonl:2: field 'answer' must be a string or a number",
         jsonl_train_file(GOOD_JSONL + '{"question": "Q", "cot": "", "answer": [2]}\n')),
    Case("jsonl not an object", "prepare_data", r"train\.jsonl:2: expected a JSON object, got array",
         jsonl_train_file(GOOD_JSONL + '["Q", "", "2"]\n')),
    Case("jsonl invalid JSON", "prepare_data", r"train\.jsonl:2: invalid JSON",
         jsonl_train_file(GOOD_JSONL + '{"question": "Q",\n')),
    Case("jsonl empty file", "prepare_data", r"train\.jsonl: file has no rows", jsonl_train_file("\n")),
    # the pretrained model (import_model, and the tokenizer stage that renders its chat template)
    Case("gguf file missing", "import_model", r"nowhere\.gguf: no such GGUF file \(base\.model\.gguf_file\)",
         params_change({"base": {"model": {"source": "gguf", "gguf_file": "/nonexistent/nowhere.gguf"}}})),
    Case("gguf file truncated", "import_model", r"cut\.gguf: cannot read it as GGUF, truncated or corrupt",
         gguf_model(lambda folder: folder.joinpath("cut.gguf").write_bytes(
             write_tiny_gguf(folder / "whole.gguf").read_bytes()[:10_000]) and folder / "cut.gguf")),
    Case("gguf of an unsupported architecture", "import_model", r"rwkv\.gguf: architecture 'rwkv99' is not one",
         gguf_model(lambda folder: write_tiny_gguf(folder / "rwkv.gguf", architecture="rwkv99"))),
    Case("checkpoint without a tokenizer", "import_model", r"checkpoint: no tokenizer",
         checkpoint_model(remove_files=("tokenizer.json", "tokenizer_config.json"))),
    Case("chat template without a system role", "tokenizer", r"checkpoint: its chat template cannot render the "
         r"system instruction.*System role not supported",
         checkpoint_model(chat_template="{% if messages[0]['role'] == 'system' %}"
                                        "{{ raise_exception('System role not supported') }}{% endif %}",
                          text={"template": "chat"})),
    # the params file
    Case("params unknown key", "chunk", r"params\.yaml: invalid parameters\n  base\.compresion_rate: unknown key",
         params_change({"base": {"compresion_rate": 2}})),
    Case("params unknown section", "chunk", r"params\.yaml: invalid parameters\n  chunking: unknown key",
         params_change({"chunking": {"c": 2}})),
    Case("params wrong type", "chunk", r"base\.top_k: Input should be a valid integer.*'ten'",
         params_change({"base": {"top_k": "ten"}})),
    Case("params c = 0", "chunk", r"base\.compression_rate: Input should be greater than or equal to 1 \(got 0\)",
         params_change({"base": {"compression_rate": 0}})),
    Case("params negative learning rate", "base_model", r"base_model\.train\.lr: Input should be greater than 0",
         params_change({"base_model": {"train": {"lr": -0.1}}})),
    Case("params bad choice", "train_latent", r"train_latent\.deepspeed\.zero_stage: Input should be 2 or 3",
         params_change({"train_latent": {"deepspeed": {"zero_stage": 1}}})),
    Case("params ZeRO-3 option under ZeRO-2", "train_joint", r"train_joint\.deepspeed: Value error, "
         r"persistence_threshold needs zero_stage 3",
         params_change({"train_joint": {"deepspeed": {"enabled": True, "persistence_threshold": 0}}})),
    Case("params new-token lr under ZeRO-3", "base_model", r"base_model: Value error, new_token_lr rescales rows",
         params_change({"base_model": {"new_token_lr": 0.01, "deepspeed": {"enabled": True, "zero_stage": 3}}})),
    Case("params several nodes without a hostfile", "chunk", r"launch: Value error, launch\.hostfile is required",
         params_change({"launch": {"launcher": "deepspeed", "nodes": 2, "master_addr": "node0"}})),
    Case("params not YAML", "tokenizer", r"params\.yaml: not valid YAML", params_text("base: {seed: [\n")),
    Case("params not a mapping", "tokenizer", r"params\.yaml: expected a mapping", params_text("- base\n")),
    Case("params k > vocab (phase 1)", "train_encoder", r"base\.top_k=100000 is larger than the vocabulary of .*base",
         params_change({"base": {"top_k": 100000}})),
    Case("params k > vocab (cache)", "cache_soft_labels", r"base\.top_k=100000 is larger than .*decoder",
         params_change({"base": {"top_k": 100000}})),
    Case("params k > vocab (evaluate)", "evaluate", r"base\.top_k=100000 is larger than the vocabulary of .*latent",
         params_change({"base": {"top_k": 100000}})),
    # raw splits
    Case("raw split truncated (tokenizer)", "tokenizer", r"raw/train\.parquet: not a readable Parquet file",
         edited_copy("raw", "raw", truncate("train.parquet"))),
    Case("raw split truncated (chunk)", "chunk", r"raw/test\.parquet: not a readable Parquet file",
         edited_copy("raw", "raw", truncate("test.parquet"))),
    Case("raw split empty file", "base_model", r"raw/train\.parquet: not a readable Parquet file",
         empty_file("raw", "raw", "train.parquet")),
    Case("raw split without a column", "chunk", r"raw/val\.parquet: columns do not match the raw schema",
         edited_copy("raw", "raw", rewrite_parquet("val.parquet", without_column("answer")))),
    Case("raw folder without splits", "chunk", r"raw: no split files",
         edited_copy("raw", "raw", remove(*(f"{split}.parquet" for split in SYNTHETIC_SPLITS)))),
    Case("tokenizer folder empty", "chunk", r"tokenizer: no tokenizer here",
         edited_copy("tokenizer", "tokenizer", remove("tokenizer_config.json"))),
    # chunked splits
    Case("chunked split truncated (phase 1)", "train_encoder", r"chunked/train\.parquet: not a readable chunked",
         edited_copy("chunked", "chunked", truncate("train.parquet"))),
    Case("chunked split truncated (cache)", "cache_soft_labels", r"chunked/val\.parquet: not a readable chunked",
         edited_copy("chunked", "chunked", truncate("val.parquet"))),
    Case("chunked split truncated (evaluate)", "evaluate", r"chunked/test\.parquet: not a readable chunked",
         edited_copy("chunked", "chunked", truncate("test.parquet"))),
    Case("chunked with another c", "train_decoder", r"train\.parquet: chunked with latent_sft\.compression_rate=2 .*3",
         params_change({"base": {"compression_rate": 3}})),
    Case("chunked with another tokenizer", "train_latent", r"train\.parquet: chunked with latent_sft\.tokenizer=other",
         edited_copy("chunked", "chunked", rewrite_parquet("train.parquet", with_metadata(tokenizer="other")))),
    Case("chunked split without a column", "train_joint", r"chunked/train\.parquet: missing columns \['chunk_bounds'\]",
         edited_copy("chunked", "chunked", rewrite_parquet("train.parquet", without_column("chunk_bounds")))),
    # models and adapters
    Case("base model without weights", "train_encoder", r"base: no \*\.safetensors weights",
         edited_copy("base", "base", remove("model.safetensors"))),
    Case("base model with only pytorch_model.bin", "train_decoder", r"base: no \*\.safetensors weights",
         edited_copy("base", "base", only_bin_weights())),
    Case("model source path without weights", "base_model", r"checkpoint: no \*\.safetensors weights",
         lambda case, root: Broken(params={"base": {"model": {"source": "path",
                                                              "path": str(_weightless_checkpoint(case, root))}}})),
    Case("encoder adapter missing", "train_joint", r"train_encoder/encoder: no peft adapter here",
         edited_copy("encoder-stage", "train_encoder", remove("encoder"))),
    Case("joint adapter missing", "merge_lora", r"train_joint/decoder: no peft adapter here",
         edited_copy("joint-stage", "train_joint", remove("decoder"))),
    Case("merged encoder without weights", "cache_soft_labels", r"merged/encoder: no \*\.safetensors weights",
         edited_copy("merged", "merged", remove("encoder/model.safetensors"))),
    Case("merged decoder with only pytorch_model.bin", "train_latent", r"merged/decoder: no \*\.safetensors weights",
         edited_copy("merged", "merged", only_bin_weights("decoder"))),
    Case("latent model without config", "evaluate", r"latent: no config\.json",
         edited_copy("latent-sft", "latent", remove("config.json"))),
    # the soft-label cache
    Case("soft labels of another c", "train_latent", r"labels/train\.parquet.*compression_rate=5.*compression_rate=2",
         soft_labels_of_another_run("compression_rate", "5")),
    Case("soft labels of another k", "train_latent", r"labels/train\.parquet.*k=7.*k=4",
         soft_labels_of_another_run("k", "7")),
    Case("soft labels of another tokenizer", "train_latent", r"labels/train\.parquet.*tokenizer_fingerprint=0123456789",
         soft_labels_of_another_run("tokenizer_fingerprint", "0123456789abcdef")),
    Case("soft labels of another temperature", "train_latent", r"train\.parquet.*temperature=0\.5.*temperature=1\.0",
         soft_labels_of_another_run("temperature", "0.5")),
    Case("soft labels truncated", "train_latent", r"labels/train\.parquet",
         edited_copy("soft-labels", "labels", truncate("train.parquet"))),
    Case("soft labels missing", "train_latent", r"labels/val\.parquet: no soft-label file here",
         edited_copy("soft-labels", "labels", remove("val.parquet"))),
]


def _weightless_checkpoint(case: Path, root: Path) -> Path:
    """A Hugging Face model folder (config and tokenizer) whose weights were never copied."""
    checkpoint = case / "inputs" / "checkpoint"
    shutil.copytree(root / "base", checkpoint, ignore=shutil.ignore_patterns("*.safetensors"))
    return checkpoint


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stderr: str
    outputs_left: list[str]
    seconds: float


def run_case(case: Case, folder: Path, micro_root: Path) -> Outcome:
    """Break what the case breaks, run the stage, and list what it left under ``outputs/``."""
    broken = case.breaks(folder, micro_root)
    if broken.params_text is not None:
        (folder / "params.yaml").write_text(broken.params_text)
    else:
        (folder / "params.yaml").write_text(yaml.safe_dump(deep_merge(micro_params_file_content(), broken.params)))
    started = time.perf_counter()
    result = subprocess.run(stage_command(case.stage, folder, micro_root, broken.inputs), cwd=folder,
                            env=subprocess_environment(), capture_output=True, text=True)
    outputs = folder / "outputs"
    left = sorted(str(p.relative_to(outputs)) for p in outputs.rglob("*")) if outputs.exists() else []
    return Outcome(result.returncode, result.stderr, left, time.perf_counter() - started)


def first_case_of_each_stage() -> set[str]:
    first: dict[str, str] = {}
    for case in CASES:
        first.setdefault(case.stage, case.name)
    return set(first.values())


DEFAULT_RUN = first_case_of_each_stage()
CASE_PARAMS = [pytest.param(case, id=case.name, marks=() if case.name in DEFAULT_RUN else pytest.mark.slow)
               for case in CASES]


@pytest.fixture(scope="module")
def outcomes(request, latent_run, tmp_path_factory) -> dict[str, Outcome]:
    """The outcome of every selected case, run two at a time (a subprocess is mostly start-up, partly I/O)."""
    root, _ = latent_run
    base = tmp_path_factory.mktemp("bad_inputs")
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_bad_input_fails_cleanly"]

    def run(index_case: tuple[int, Case]) -> tuple[str, Outcome]:
        index, case = index_case
        folder = base / f"case{index:02d}"
        folder.mkdir()
        return case.name, run_case(case, folder, root)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(run, enumerate(selected)))
    (base / "durations.json").write_text(json.dumps({name: round(o.seconds, 1) for name, o in results.items()}))
    return results


def test_case_names_are_unique():
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_bad_input_fails_cleanly(outcomes, case):
    outcome = outcomes[case.name]
    assert outcome.returncode == 2, outcome.stderr[-3000:]
    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    errors = outcome.stderr[outcome.stderr.index("error: "):] if "error: " in outcome.stderr else ""
    assert re.search(case.error, errors, re.DOTALL), f"expected /{case.error}/ in:\n{outcome.stderr[-3000:]}"
    assert outcome.outputs_left == [], f"{case.stage} left {outcome.outputs_left} behind"


def test_every_stage_is_in_the_corpus():
    dvc_stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert set(STAGES) == set(dvc_stages)
    assert {case.stage for case in CASES} == set(STAGES)
