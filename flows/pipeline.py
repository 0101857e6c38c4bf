"""The pipeline as a Prefect flow: one task per DVC stage, in dvc.yaml's order, each running `dvc repro -s`.

DVC stays the only cache: a task always calls DVC, and DVC skips a stage whose deps, params and outs are
unchanged. dvc.yaml is the one description of the stages; this module reads it and never lists them itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import Task

from latent_sft_core.subprocess_env import interpreter_first_path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Only downloads fail for reasons a retry can cure (network); training stages resume from their checkpoints
# when rerun, so a retry there would only repeat a deterministic failure.
NETWORK_STAGES = frozenset({"prepare_data", "import_model"})
NETWORK_RETRIES = 2
NETWORK_RETRY_DELAY_S = 30

# Written by the evaluation stage (the stage that declares EVALUATION_METRICS) and published after it.
EVALUATION_METRICS = "metrics/evaluate.json"
EVALUATION_REPORT = "metrics/report.md"

# Lines of a failed stage's output repeated in the task's error (the whole output is in the run log).
ERROR_TAIL_LINES = 40


@dataclass(frozen=True)
class DvcStage:
    """One stage of dvc.yaml: its name, the paths it reads and the paths it writes (outs, metrics, plots)."""

    name: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]


class StageFailed(RuntimeError):
    """`dvc repro` of one stage exited with an error."""


def declared_paths(entries: Sequence[str | Mapping[str, Any]]) -> tuple[str, ...]:
    """The paths of a dvc.yaml list whose items are either a path or ``{path: options}``."""
    return tuple(entry if isinstance(entry, str) else next(iter(entry)) for entry in entries)


def read_stages(dvc_yaml: Path) -> list[DvcStage]:
    """The stages of ``dvc_yaml`` in the order the file lists them."""
    specs = yaml.safe_load(dvc_yaml.read_text())["stages"]
    return [
        DvcStage(
            name=name,
            deps=declared_paths(spec.get("deps", [])),
            outs=declared_paths([*spec.get("outs", []), *spec.get("metrics", []), *spec.get("plots", [])]),
        )
        for name, spec in specs.items()
    ]


def overlaps(first: str, second: str) -> bool:
    """Whether two DVC paths name the same file or one lies inside the other."""
    a, b = PurePosixPath(first), PurePosixPath(second)
    return a == b or a in b.parents or b in a.parents


def check_stage_order(stages: Sequence[DvcStage]) -> None:
    """Raise ValueError unless every stage comes after the stages whose outputs it reads.

    The flow runs stages in file order (DVC alone would sort them by their deps), so the order must respect
    the deps.
    """
    for position, stage in enumerate(stages):
        for later in stages[position + 1:]:
            read = [dep for dep in stage.deps if any(overlaps(dep, out) for out in later.outs)]
            if read:
                raise ValueError(f"dvc.yaml: stage {stage.name!r} reads {read}, written by the later stage "
                                 f"{later.name!r}; list {later.name!r} first")


def stages_up_to(stages: Sequence[DvcStage], up_to: str | None) -> list[DvcStage]:
    """The stages from the first one to ``up_to`` included (all of them when ``up_to`` is None)."""
    names = [stage.name for stage in stages]
    if up_to is None:
        return list(stages)
    if up_to not in names:
        raise ValueError(f"unknown stage {up_to!r}; dvc.yaml has {names}")
    return list(stages[: names.index(up_to) + 1])


def params_overrides(params: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """``section.key=value`` overrides, the syntax of ``dvc exp run -S``.

    ``params`` is either such strings or a mapping from dotted keys to values; values are written as JSON,
    which the override grammar reads back with their type (``true``, ``2``, ``"causal"``, ``null``, lists).
    """
    if not params:
        return []
    if isinstance(params, Mapping):
        return [f"{key}={json.dumps(value)}" for key, value in params.items()]
    return list(params)


def apply_params_overrides(params_file: Path, overrides: list[str]) -> None:
    """Write ``overrides`` into ``params_file`` with DVC's own code for ``dvc exp run -S``.

    The values stay in the file, so every stage DVC runs next records them in dvc.lock.
    """
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides

    try:
        apply_overrides(params_file, overrides)
    except InvalidArgumentError as error:
        raise ValueError(f"params overrides {overrides} do not apply to {params_file}: {error.__cause__}") from error


def stage_environment() -> dict[str, str]:
    """The environment DVC and the stages run in: this interpreter's environment, offline, unbuffered."""
    return {
        **os.environ,
        "PATH": interpreter_first_path(),
        # a piped Python buffers its output in blocks; the run log should follow the stage line by line
        "PYTHONUNBUFFERED": "1",
        # progress bars redraw many times a second, and every redraw becomes a log line
        "TQDM_MININTERVAL": os.environ.get("TQDM_MININTERVAL", "10"),
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    }


@task(cache_policy=NO_CACHE)
def run_stage(stage: str, project_dir: Path, force: bool) -> bool:
    """Run ``dvc repro -s <stage>`` in ``project_dir``, streaming its output line by line into the run log.

    Returns whether DVC ran the stage (False: it was up to date). Raises StageFailed, with the end of the
    output, when DVC fails.
    """
    logger = get_run_logger()
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage, *(["--force"] if force else [])]
    tail: deque[str] = deque(maxlen=ERROR_TAIL_LINES)
    ran = False
    process = subprocess.Popen(command, cwd=project_dir, env=stage_environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        for line in process.stdout:
            line = line.rstrip()
            if line:
                logger.info(line)
                tail.append(line)
                ran = ran or line.startswith(f"Running stage '{stage}'")
        process.wait()
    finally:
        if process.poll() is None:  # interrupted while streaming: the stage must not outlive its task
            process.kill()
            process.wait()
    if process.returncode != 0:
        raise StageFailed(f"dvc repro -s {stage} exited with {process.returncode}:\n" + "\n".join(tail))
    return ran


def stage_task(stage: str) -> Task:
    """The Prefect task that runs ``stage``: named after it, retried only when it downloads."""
    retries = NETWORK_RETRIES if stage in NETWORK_STAGES else 0
    return run_stage.with_options(name=stage, task_run_name=stage, retries=retries,
                                  retry_delay_seconds=NETWORK_RETRY_DELAY_S)


def flatten_metrics(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of ``{"model", "split", <metric>...}`` from ``{model: {split: {metric: value}}}``.

    Nested metric mappings become dotted columns (``{"ecr": {"1": 0.5}}`` -> ``ecr.1``); every row has every
    column, ``None`` where a model or split lacks a metric.
    """
    def flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        row: dict[str, Any] = {}
        for key, value in values.items():
            if isinstance(value, Mapping):
                row.update(flat(value, f"{prefix}{key}."))
            else:
                row[f"{prefix}{key}"] = value
        return row

    rows = [{"model": model, "split": split, **flat(values)}
            for model, splits in metrics.items() for split, values in splits.items()]
    columns = list(dict.fromkeys(column for row in rows for column in row))
    return [{column: row.get(column) for column in columns} for row in rows]


def publish_evaluation(project_dir: Path) -> None:
    """Publish the evaluation metrics as a table artifact and its Markdown report, where they exist."""
    metrics = project_dir / EVALUATION_METRICS
    if metrics.is_file():
        create_table_artifact(key="evaluation-metrics", table=flatten_metrics(json.loads(metrics.read_text())),
                              description=f"`{EVALUATION_METRICS}`: one row per model and split")
    report = project_dir / EVALUATION_REPORT
    if report.is_file():
        create_markdown_artifact(key="evaluation-report", markdown=report.read_text(),
                                 description=f"`{EVALUATION_REPORT}`")


@flow(name="latent-sft-pipeline")
def latent_sft_pipeline(
    up_to: str | None = None,
    force: bool = False,
    params: dict[str, Any] | list[str] | None = None,
    project_dir: str | None = None,
) -> dict[str, bool]:
    """Run the DVC stages of ``project_dir`` (default: this checkout) in dvc.yaml order, up to ``up_to``.

    ``force`` reruns the stages even when DVC finds them up to date. ``params`` overrides parameters
    (``{"base.compression_rate": 2}`` or ``["base.compression_rate=2"]``): they are written into params.yaml
    as ``dvc exp run -S`` writes them, before the first stage, and dvc.lock records them. After the stage
    that writes the evaluation metrics, they are published as artifacts. Returns, per stage, whether DVC
    ran it.
    """
    root = Path(project_dir) if project_dir else PROJECT_ROOT
    logger = get_run_logger()
    stages = read_stages(root / "dvc.yaml")
    check_stage_order(stages)
    selected = stages_up_to(stages, up_to)
    overrides = params_overrides(params)
    if overrides:
        apply_params_overrides(root / "params.yaml", overrides)
        logger.info("params.yaml: %s", ", ".join(overrides))
    ran = {}
    for stage in selected:
        ran[stage.name] = stage_task(stage.name)(stage.name, root, force)
        if EVALUATION_METRICS in stage.outs:
            publish_evaluation(root)
    return ran
