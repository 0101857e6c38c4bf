"""What a real pretrained model costs on this machine: SmolLM2-135M-Instruct (``make smollm2``) through every
stage of the pipeline, each stage a subprocess as under DVC.

A work folder gets the ``smollm2-135m-cpu`` preset with the given batch size and a few steps per training;
every stage runs in it with ``python -m tasks.<stage>``. Per stage: wall seconds, training steps and seconds per
step (the stage's own ``train_seconds`` over its steps, so model loading is left out), and the peak resident
memory of the stage's process. Then what whole runs would take at those step costs: the preset, and the
embedded default's schedule (its rows, epochs and batch sizes) with this model. Stage 2 runs as configured by
the preset (LoRA through DeepSpeed ZeRO-2).

    python -m bench.real_model_cost [--batch-size 8] [--steps 8] [--eval-rows 8] [--work .scratch/bench_real_model]

Run it alone: a second busy process on the cores skews every timing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.report import machine_line, update_section
from latent_sft_core.config import Params, deep_merge, load_params
from latent_sft_core.presets import load_preset
from latent_sft_core.subprocess_env import interpreter_first_path

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESET = "smollm2-135m-cpu"
STAGES = ["prepare_data", "import_model", "tokenizer", "chunk", "base_model", "train_encoder", "train_decoder",
          "train_joint", "merge_lora", "cache_soft_labels", "train_latent", "evaluate"]
TRAINING = {"base_model": "CoT-SFT", "train_encoder": "phase 1 encoder", "train_decoder": "phase 1 decoder",
            "train_joint": "phase 1 joint", "train_latent": "stage 2"}
PHASE1 = ("train_encoder", "train_decoder", "train_joint")


def measured_params(batch_size: int, steps: int, eval_rows: int) -> dict:
    """The preset, on the repository's params, with ``steps`` steps of ``batch_size`` rows per training."""
    short = {"train": {"max_steps": steps, "batch_size": batch_size, "save_steps": steps, "logging_steps": 1}}
    data = deep_merge(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()), load_preset(PRESET))
    return deep_merge(data, {
        "base": {"model": {"gguf_file": str(REPO_ROOT / data["base"]["model"]["gguf_file"])}},
        "prepare_data": {"synthetic": {"train_size": 4 * batch_size * steps, "val_size": eval_rows,
                                       "test_size": eval_rows, "ood_size": eval_rows}},
        "base_model": {**short, "eval_rows": eval_rows},
        **{stage: {**short, "max_train_rows": batch_size * steps, "max_eval_rows": eval_rows} for stage in PHASE1},
        "cache_soft_labels": {"max_rows": batch_size * steps},
        "train_latent": {**short, "max_train_rows": batch_size * steps, "max_eval_rows": eval_rows},
        "evaluate": {"max_rows": eval_rows, "splits": ["test"]},
    })


def run_stage(stage: str, work: Path) -> dict:
    """Run one stage in ``work``: its wall seconds and the peak resident memory of its process (GiB)."""
    env = {**os.environ, "PATH": interpreter_first_path(), "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    log_file = work / "logs" / f"{stage}.log"
    log_file.parent.mkdir(exist_ok=True)
    began = time.perf_counter()
    with log_file.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", f"tasks.{stage}"], cwd=work, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # the child's own rusage: its peak resident set
    seconds = time.perf_counter() - began
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{stage} failed; its output: {log_file}\n{log_file.read_text()[-3000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}  # Linux: KiB


def schedule_steps(params: Params, rows: dict[str, int]) -> dict[str, int]:
    """Optimizer steps of each training under ``params`` with ``rows`` train rows (max_steps, else epochs)."""
    steps = {}
    for stage in TRAINING:
        section = getattr(params, stage)
        train = section.train
        if train.max_steps > 0:
            steps[stage] = train.max_steps
            continue
        limit = getattr(section, "max_train_rows", None)
        used = min(rows["train"], limit) if limit else rows["train"]
        steps[stage] = math.ceil(train.epochs * math.ceil(used / train.batch_size) / train.grad_accum)
    return steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--eval-rows", type=int, default=8)
    parser.add_argument("--work", type=Path, default=REPO_ROOT / ".scratch" / "bench_real_model")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md as it is")
    args = parser.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    params_data = measured_params(args.batch_size, args.steps, args.eval_rows)
    (args.work / "params.yaml").write_text(yaml.safe_dump(params_data, sort_keys=False))

    results: dict[str, dict] = {}
    for stage in STAGES:
        print(f"{stage} ...", flush=True)
        results[stage] = run_stage(stage, args.work)
        if stage in TRAINING:
            metrics = json.loads((args.work / "metrics" / f"{stage}.json").read_text())
            results[stage] |= {"steps": metrics["steps"],
                               "seconds_per_step": round(metrics["train_seconds"] / metrics["steps"], 2)}
        print(f"  {results[stage]}", flush=True)
    evaluation = json.loads((args.work / "metrics" / "evaluate.json").read_text())
    per_question = {model: splits["test"]["seconds_per_question"] for model, splits in evaluation.items()}

    repo_params = load_params(REPO_ROOT / "params.yaml")
    preset_params = Params.model_validate(deep_merge(repo_params.model_dump(mode="json"), load_preset(PRESET)))
    estimates = {}
    for name, schedule in (("preset " + PRESET, preset_params), ("the embedded default's schedule", repo_params)):
        synthetic = schedule.prepare_data.synthetic
        steps = schedule_steps(schedule, {"train": synthetic.train_size})
        hours = sum(steps[stage] * results[stage]["seconds_per_step"] * getattr(schedule, stage).train.batch_size
                    / args.batch_size for stage in TRAINING) / 3600
        questions = (schedule.evaluate.max_rows or synthetic.test_size) * 5  # test, val and three OOD splits
        hours += questions * sum(per_question.values()) / 3600
        estimates[name] = {"steps": steps, "hours": round(hours, 1)}
    summary = {"batch_size": args.batch_size, "stages": results, "seconds_per_question": per_question,
               "estimates": estimates}
    print(json.dumps(summary, indent=2))
    if not args.no_write:
        update_section("real_model_cost", section(args, summary))


def section(args: argparse.Namespace, summary: dict) -> str:
    rows = []
    for stage, result in summary["stages"].items():
        rows.append(f"| {stage} | {TRAINING.get(stage, '')} | {result['seconds']:.0f} | {result.get('steps', '')} | "
                    f"{result.get('seconds_per_step', '')} | {result['peak_rss_gb']:.1f} |")
    estimates = "\n".join(f"| {name} | {', '.join(f'{stage} {steps}' for stage, steps in e['steps'].items())} | "
                          f"{e['hours']} |" for name, e in summary["estimates"].items())
    per_question = ", ".join(f"{model} {seconds:.2f} s" for model, seconds in summary["seconds_per_question"].items())
    return f"""## A real model on CPU: SmolLM2-135M-Instruct

`python -m bench.real_model_cost --batch-size {args.batch_size} --steps {args.steps} --eval-rows {args.eval_rows}`
({machine_line()}). Every stage as a subprocess on the preset `{PRESET}` cut to {args.steps} steps of
{args.batch_size} rows; seconds per step from the stage's own training time (loading left out); peak resident
memory of the stage's process.

| stage | training | wall s | steps | s / step | peak RSS GB |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Greedy decoding per test question: {per_question}. What whole runs would take at these costs (step cost
scaled linearly with the batch size; evaluation on test, val and the three OOD splits):

| run | optimizer steps | hours |
|---|---|---|
{estimates}
"""


if __name__ == "__main__":
    main()
