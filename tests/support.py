"""Constants and helpers shared by tests: repository paths, the micro configuration, project copies, Prefect records."""

from dataclasses import dataclass
from pathlib import Path

from latent_sft_core.chunking import ChunkedRow, chunk_bounds
from latent_sft_core.config import DEFAULT_LORA_TARGETS, ENCODER_LORA, deep_merge
from latent_sft_core.text import SpecialIds

LORA_TARGETS = {"encoder": ENCODER_LORA.targets, "decoder": DEFAULT_LORA_TARGETS}

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
GSM8K_AUG_TEST = SHARED_DIR / "data" / "gsm8k_aug" / "test.txt"

# A configuration small enough for a stage to run in seconds on 2 cores (used by integration and pipeline tests).
MICRO_PARAMS: dict = {
    "base": {"seed": 0, "compression_rate": 2, "top_k": 4},
    "prepare_data": {
        "synthetic": {"train_size": 256, "val_size": 16, "test_size": 16, "ood_size": 8, "max_steps": 2, "alt_chains": 2}
    },
    "tokenizer": {"vocab_size": 160},
    "base_model": {
        "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
                 "max_position_embeddings": 256},
        "train": {"epochs": 1, "max_steps": 24, "batch_size": 16, "lr": 0.003, "save_steps": 8,
                  "logging_steps": 4},
        "eval_rows": 8,
        "eval_batch_size": 8,
        "max_new_tokens": 48,
    },
    **{
        stage: {
            **{f"{part}_lora": {"rank": 4, "alpha": 8, "targets": list(LORA_TARGETS[part])} for part in parts},
            "train": {"max_steps": 12, "batch_size": 16, "lr": 0.01, "save_steps": 6, "logging_steps": 2},
            "max_train_rows": 192,
            "max_eval_rows": 16,
        }
        for stage, parts in (
            ("train_encoder", ("encoder",)),
            ("train_decoder", ("decoder",)),
            ("train_joint", ("encoder", "decoder")),
        )
    },
    "cache_soft_labels": {"batch_size": 32, "row_group_rows": 64, "max_rows": None},
    "train_latent": {
        "finetune": "lora",  # the suite was tuned on LoRA; full fine-tuning has its own integration test
        "lora": {"rank": 4, "alpha": 8},
        "train": {"max_steps": 12, "batch_size": 16, "lr": 0.01, "save_steps": 6, "logging_steps": 2},
        "max_train_rows": 192,
        "max_eval_rows": 16,
    },
    "evaluate": {"decoding": {"max_latent_steps": 8, "max_new_tokens": 40}, "ecr_k": [1, 2, 5, 10, 20],
                 "analysis_top_k": 20},
}


def micro_params_file_content() -> dict:
    """The repository's params.yaml with the micro configuration applied: every key DVC tracks is present."""
    import yaml

    return deep_merge(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()), MICRO_PARAMS)


# What a temporary copy of the project needs to run the pipeline under DVC (params.yaml is written apart).
PROJECT_FILES = ["dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/plots", "latent_sft_core", "tasks"]


def dvc(project: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``dvc *args`` in ``project`` (its stages with this interpreter) and return its output; fail on error.
    ``env``: extra environment variables for the stages."""
    import os
    import subprocess
    import sys

    from latent_sft_core.subprocess_env import interpreter_first_path

    env = {**os.environ, "PATH": interpreter_first_path(),
           "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(project), **(env or {})}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def micro_project(root: Path) -> Path:
    """A copy of the project in ``root`` on the micro configuration, with the repository's DVC settings
    (analytics off, link cache), ready for ``dvc repro``."""
    import shutil

    import yaml

    root.mkdir(parents=True, exist_ok=True)
    dvc(root, "init", "--no-scm", "-q")
    for name in PROJECT_FILES:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, root / name)
    dvc(root, "config", "core.no_scm", "true")  # the repository's config replaced the one `init --no-scm` wrote
    (root / "params.yaml").write_text(yaml.safe_dump(micro_params_file_content()))
    return root


SPECIAL_IDS = SpecialIds(think_open=2, think_close=3, latent=4, pad=0, end=1)


def chunked_row(cot, c=2, prompt=(10, 11), answer=(30,), row_id="r", alt=()) -> ChunkedRow:
    """A hand-made chunked row: ``cot`` ids cut into chunks of ``c`` (question "q", gold answer "7")."""
    return ChunkedRow(
        id=row_id, question="q", answer="7", prompt_ids=list(prompt), cot_ids=list(cot), answer_ids=list(answer),
        chunk_bounds=chunk_bounds(len(cot), c), alt_cot_ids=[list(a) for a in alt],
    )


STAGE1_STAGES = ("train_encoder", "train_decoder", "train_joint")


def stage1_inputs(root: Path, stage: str):
    """The inputs of a phase-1 stage inside a micro-run folder (earlier stages' outputs named by stage)."""
    from latent_sft_core.phase1_training import Stage1Inputs

    return Stage1Inputs(
        base_dir=root / "base",
        chunked_dir=root / "chunked",
        encoder_stage_dir=root / "train_encoder" if stage != "train_encoder" else None,
        decoder_stage_dir=root / "train_decoder" if stage == "train_joint" else None,
    )


def subprocess_environment() -> dict:
    """Environment for running a stage as a subprocess: this checkout importable, offline, one thread each,
    and no distributed variables inherited from the test process."""
    import os

    inherited = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**inherited, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_until_killed(command: list[str], cwd: Path, marker: Path, timeout_s: float = 300) -> None:
    """Start ``command`` and, as soon as ``marker`` exists (a checkpoint's trainer state), SIGKILL it with every
    process under it (torchrun puts its workers in sessions of their own, so a process group would miss them), as
    a machine going down would."""
    import os
    import signal
    import subprocess
    import time

    import psutil

    process = subprocess.Popen(command, cwd=cwd, env=subprocess_environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    tree = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    process.wait()


@dataclass(frozen=True)
class FlowRunRecord:
    """What the Prefect API holds about one flow run: its task runs (in start order), logs and artifacts."""

    task_runs: list
    logs: list
    artifacts: list

    def task_run_names(self) -> list[str]:
        return [task_run.name for task_run in self.task_runs]

    def task_log(self, name: str) -> list[str]:
        """The messages the task run called ``name`` logged, in order."""
        (task_run,) = [task_run for task_run in self.task_runs if task_run.name == name]
        return [log.message for log in self.logs if log.task_run_id == task_run.id]


def flow_run_record(flow_run_id) -> FlowRunRecord:
    """Read one flow run back from the Prefect API (after sending the logs still queued in this process)."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    page = 200
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        logs: list = []
        while True:  # the API answers at most one page at a time
            batch = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=page,
                                     offset=len(logs))
            logs.extend(batch)
            if len(batch) < page:
                break
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return FlowRunRecord(sorted(task_runs, key=lambda task_run: task_run.start_time), logs, artifacts)


# GPT-2-style tokenizers take <|endoftext|> as their unknown token (SmolLM2's vocabulary has it at id 0); a
# vocabulary without it gains one on loading
TINY_GGUF_TOKENS = ["<s>", "</s>", "<|endoftext|>", *"abcdefghijklmnopqrstuvwxyz0123456789", " ", "ab", "=", "+"]
# A chat template with a system role, in the ChatML-like shape of SmolLM2's
TINY_GGUF_CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                           "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def write_tiny_gguf(path: Path, architecture: str = "llama", seed: int = 0, hidden: int = 16) -> Path:
    """A one-layer model of ``architecture`` as a float32 GGUF file (14 KB) with a BPE tokenizer and a chat
    template: what llama.cpp's converter writes for a Llama, at toy size."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    ffn, heads, vocab = 2 * hidden, 2, len(TINY_GGUF_TOKENS)
    writer.add_name("tiny test model")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TINY_GGUF_TOKENS)
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))  # 3: control tokens
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(2)
    writer.add_chat_template(TINY_GGUF_CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    weight("token_embd.weight", vocab, hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (hidden, hidden)), ("attn_v", (hidden, hidden)),
                        ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                        ("ffn_down", (hidden, ffn))]:
        weight(f"blk.0.{name}.weight", *shape)
    for name in ("attn_norm", "ffn_norm"):
        writer.add_tensor(f"blk.0.{name}.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
