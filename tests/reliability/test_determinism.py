"""Determinism: ``dvc repro --force`` twice on the micro configuration writes the same bytes.

Two forced runs of the whole pipeline in one temporary copy of the project; after each, every file of the data
outputs (raw splits, tokenizer, chunked splits, soft-label cache) and of the models is hashed, and every
metrics file is read. The hashes must be equal file by file, and the metrics equal value by value apart from
wall-time figures (``TIMING_KEYS``), which measure the machine, not the pipeline.

About 4 minutes on 2 cores: marked ``slow`` (not in the default run); ``.ci/run`` runs it as its own step.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from latent_sft_core import paths
from tests.support import dvc, micro_project

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

HASHED_OUTPUTS = (paths.RAW_DIR, paths.TOKENIZER_DIR, paths.CHUNKED_DIR, paths.SOFT_LABELS_DIR, paths.BASE_MODEL_DIR,
                  paths.STAGE1_MERGED_DIR, paths.LATENT_MODEL_DIR)
TIMING_KEYS = {"train_seconds", "latents_per_second", "seconds_per_question"}


def file_hashes(project: Path) -> dict[str, str]:
    """sha256 of every file under the hashed outputs, by path relative to the project."""
    return {str(file.relative_to(project)): hashlib.sha256(file.read_bytes()).hexdigest()
            for folder in HASHED_OUTPUTS for file in sorted((project / folder).rglob("*")) if file.is_file()}


def without_timings(value: object) -> object:
    if isinstance(value, dict):
        return {key: without_timings(item) for key, item in value.items() if key not in TIMING_KEYS}
    return value


def metrics(project: Path) -> dict[str, object]:
    return {file.name: without_timings(json.loads(file.read_text()))
            for file in sorted((project / paths.METRICS_DIR).glob("*.json"))}


def test_forced_reruns_write_identical_outputs_and_metrics(tmp_path):
    project = micro_project(tmp_path / "project")
    runs = []
    for _ in range(2):
        dvc(project, "repro", "--force")
        runs.append((file_hashes(project), metrics(project)))
    (first_hashes, first_metrics), (second_hashes, second_metrics) = runs
    assert {Path(name).parts[0] for name in first_hashes} == {"data", "artifacts", "models"}
    assert first_hashes.keys() == second_hashes.keys()
    changed = sorted(name for name in first_hashes if first_hashes[name] != second_hashes[name])
    assert changed == [], f"files that differ between the two runs: {changed}"
    assert len(first_metrics) >= 8 and first_metrics == second_metrics
