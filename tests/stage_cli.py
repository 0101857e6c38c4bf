"""Every stage's command line, run on the artefacts of the micro run with its outputs in a work folder.

A work folder holds ``params.yaml`` and, after a run, ``outputs/`` (every path the stage writes, i.e. what
DVC declares as its outs, metrics and plots); the stage runs with the work folder as its working directory,
so its resume checkpoints go to ``<work folder>/.scratch``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from tests.support import deep_merge, micro_params_file_content

# input option -> folder of the micro run (tests/conftest.py) that holds what the option names
MICRO_RUN_FOLDERS = {
    "raw": "raw", "pretrained": "pretrained", "tokenizer": "tokenizer", "chunked": "chunked", "base": "base", "encoder-stage": "train_encoder",
    "decoder-stage": "train_decoder", "joint-stage": "train_joint", "merged": "merged", "soft-labels": "labels",
    "cot-sft": "base", "latent-sft": "latent", "phase1": "merged",
}
OUTPUT_NAMES = {
    "out": "out", "metrics": "metrics.json", "loss-curve": "loss.csv", "report": "report.md",
    "predictions": "predictions.parquet", "ecr-plot": "ecr.csv", "heatmap-plot": "heatmap.json",
}
TRAINING_OUTPUTS = ("out", "metrics", "loss-curve")
# stage -> (input options, output options), as in tasks/<stage>.py
STAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prepare_data": ((), ("out",)),
    "import_model": ((), ("out",)),
    "tokenizer": (("raw", "pretrained"), ("out",)),
    "chunk": (("raw", "tokenizer"), ("out", "metrics")),
    "base_model": (("raw", "tokenizer", "pretrained"), TRAINING_OUTPUTS),
    "train_encoder": (("base", "chunked"), TRAINING_OUTPUTS),
    "train_decoder": (("base", "chunked", "encoder-stage"), TRAINING_OUTPUTS),
    "train_joint": (("base", "chunked", "encoder-stage", "decoder-stage"), TRAINING_OUTPUTS),
    "merge_lora": (("base", "encoder-stage", "decoder-stage", "joint-stage"), ("out",)),
    "cache_soft_labels": (("merged", "chunked"), ("out", "metrics")),
    "train_latent": (("merged", "chunked", "soft-labels"), TRAINING_OUTPUTS),
    "evaluate": (("chunked", "cot-sft", "latent-sft", "phase1"),
                 ("metrics", "report", "predictions", "ecr-plot", "heatmap-plot")),
}


def output_paths(stage: str, workdir: Path) -> dict[str, Path]:
    """Where ``stage`` writes each of its outputs when run by ``stage_command`` in ``workdir``."""
    return {option: workdir / "outputs" / OUTPUT_NAMES[option] for option in STAGES[stage][1]}


def stage_command(
    stage: str, workdir: Path, micro_root: Path, inputs: dict[str, Path] | None = None,
    launcher: Sequence[str] = (sys.executable, "-m"),
) -> list[str]:
    """``python -m tasks.<stage>`` (or another ``launcher``) reading the micro run, or ``inputs`` by option,
    and writing into ``workdir``."""
    paths = {option: micro_root / MICRO_RUN_FOLDERS[option] for option in STAGES[stage][0]}
    paths |= (inputs or {}) | output_paths(stage, workdir)
    command = [*launcher, f"tasks.{stage}", "--params", str(workdir / "params.yaml")]
    for option, path in paths.items():
        command += [f"--{option}", str(path)]
    return command


def make_workdir(folder: Path, overrides: dict | None = None) -> Path:
    """``folder`` with a params.yaml: the micro configuration with ``overrides`` applied."""
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(deep_merge(micro_params_file_content(), overrides or {})))
    return folder
