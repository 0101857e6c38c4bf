"""The evaluate stage: every model of the pipeline on every evaluation split, with one decoder and one scorer.

``cot_sft`` (the CoT-SFT base model, decoded explicitly) and ``latent_sft`` (the stage-2 model, thinking in
latents) answer the same questions with the same batching, caps and math-verify scoring, so the table compares
like with like. Per model and split: Pass@1, mean #L (latent steps, or chain tokens for CoT), mean answer tokens
and wall time per question; for the latent model also ECR@K, N_eff and Top-2 (``analysis``).

Where the latent model's accuracy is lost (with the merged phase-1 models, ``phase1_dir``): on every split the
encoder's alpha of each question's gold chain (the teacher, computed on the fly as the soft-label cache does)
is fed (1) to the phase-1 decoder: ``phase1_ceiling_pass@1``, what the latents carry; (2) to the stage-2 model:
``teacher_forced_pass@1``, whether it can answer from them; its own latents give ``pass@1`` (free-running).
Per latent step the stage-2 model's distribution (at alpha's temperature, as stage 2 trains it) is compared with
the teacher's latent of the same index, teacher-forced and free-running: ``*_top1_agreement`` (same most
probable token) and ``*_kl`` (KL(teacher || student), nats), averaged over the compared latents. Per question,
``free_running_on_teacher_path``: the share whose free-running latents stay on the teacher's path (as many
latents, each with the teacher's top-1 token), and Pass@1 on and off that path (``free_running_pass@1_on_teacher_path``,
``..._off_teacher_path``; null for an empty group): when the errors are all off the path, stage 2 loses its
accuracy in producing the latents, not in answering from them. ``teacher_forced_stop_rate``: the share of
teacher-forced latent steps whose greedy token is ``</think>``, where the model, free-running, would have stopped
thinking (step 1 is the same step either way: nothing is fed before it).

Outputs: ``metrics/evaluate.json`` ({model: {split: {metric: value}}}), ``metrics/report.md`` (the same as
Markdown tables), per-question predictions (Parquet), the ECR@K curve and the top-token heat map (DVC plots).
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from latent_sft_core.analysis import ecr_at_k, path_posterior
from latent_sft_core.chunking import ChunkedRow, read_chunked
from latent_sft_core.config import DEFAULT_COMPUTE, ComputeParams, ModelName, Params, check_top_k
from latent_sft_core.distributed import process_group
from latent_sft_core.errors import ArtifactError, loud_warning
from latent_sft_core.inference import Decoded, LatentMode, decode
from latent_sft_core.io import atomic_outputs, write_json
from latent_sft_core.modeling import for_inference, load_model, load_pretrained_model
from latent_sft_core.phase1_model import encode_rows
from latent_sft_core.scoring import answer_text, is_correct
from latent_sft_core.soft_embedding import SparseAlpha
from latent_sft_core.text import TextFormat, encode, special_ids, tokenizer_fingerprint

log = logging.getLogger(__name__)

TRAINING_SPLITS = ("train",)
DECIMALS = 4

PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string()),
        pa.field("split", pa.string()),
        pa.field("id", pa.string()),
        pa.field("question", pa.string()),
        pa.field("gold", pa.string()),
        pa.field("prediction", pa.string()),
        pa.field("correct", pa.bool_()),
        pa.field("reasoning_tokens", pa.int32()),
        pa.field("answer_tokens", pa.int32()),
        pa.field("closed", pa.bool_()),
        pa.field("capped", pa.bool_()),
        pa.field("seconds", pa.float32()),
        pa.field("reasoning", pa.string()),  # explicit chain, or the greedy token of each latent step
        pa.field("latent_top_ids", pa.list_(pa.list_(pa.int32()))),  # per latent step, most probable first
        pa.field("latent_top_probs", pa.list_(pa.list_(pa.float32()))),
    ]
)


@dataclass(frozen=True)
class EvaluationOutputs:
    metrics: Path
    report: Path
    predictions: Path
    ecr_plot: Path
    heatmap_plot: Path


@dataclass(frozen=True)
class SplitRun:
    """One model's answers on one split."""

    model: ModelName
    split: str
    rows: list[ChunkedRow]
    decoded: list[Decoded]
    predictions: list[str]
    correct: list[bool]


def evaluation_splits(params: Params, chunked_dir: Path) -> list[str]:
    """The splits to evaluate: ``evaluate.splits``, or every chunked split but train (test first, then val)."""
    chunked_dir = Path(chunked_dir)
    available = sorted(path.stem for path in chunked_dir.glob("*.parquet"))
    wanted = params.evaluate.splits
    if wanted is None:
        wanted = sorted((s for s in available if s not in TRAINING_SPLITS), key=lambda s: (s != "test", s != "val", s))
    missing = [s for s in wanted if s not in available]
    if missing:
        raise ArtifactError(f"{chunked_dir}: no chunked split {', '.join(missing)} (evaluate.splits); "
                            f"available: {', '.join(available) or 'none'}")
    if not wanted:
        raise ArtifactError(f"{chunked_dir}: no evaluation split (only {', '.join(available) or 'nothing'})")
    return list(wanted)


def run_split(
    params: Params, name: ModelName, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, split: str,
    rows: list[ChunkedRow], teacher: Sequence[SparseAlpha] | None = None, follow_teacher: bool = False,
) -> SplitRun:
    """Decode and score one split with one model (latent mode for ``latent_sft``, explicit for ``cot_sft``);
    ``teacher`` / ``follow_teacher`` as in ``inference.decode``."""
    section = params.evaluate
    latent = LatentMode.from_params(params) if name == "latent_sft" else None
    decoded = decode(model, [row.prompt_ids for row in rows], special_ids(tokenizer), section.decoding, latent,
                     keep_top=section.analysis_top_k, teacher=teacher, follow_teacher=follow_teacher)
    predictions = [answer_text(d, tokenizer) for d in decoded]
    correct = [is_correct(p, row.answer) for p, row in zip(predictions, rows)]
    return SplitRun(name, split, rows, decoded, predictions, correct)


@dataclass(frozen=True)
class Phase1Teacher:
    """The merged phase-1 encoder and decoder: the teacher's latents of a gold chain, and the ceiling."""

    encoder: PreTrainedModel
    decoder: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    @classmethod
    def load(cls, folder: Path, compute: ComputeParams = DEFAULT_COMPUTE) -> Phase1Teacher:
        decoder, tokenizer = load_model(Path(folder) / "decoder")
        encoder = load_pretrained_model(Path(folder) / "encoder")
        return cls(for_inference(encoder, compute), for_inference(decoder, compute), tokenizer)

    def alphas(self, params: Params, rows: Sequence[ChunkedRow]) -> list[SparseAlpha]:
        """Per row, the encoder's alpha of each of its N latents ([N, k]; the hidden states [N, d] for the
        hidden-state ablation), as the soft-label cache computes them."""
        alphas = []
        batches = encode_rows(self.encoder, self.decoder, params.latent, params.base.top_k, rows,
                              special_ids(self.tokenizer), params.evaluate.decoding.batch_size)
        for batch, latents in batches:
            ids, values = (None, latents.hidden) if latents.alpha is None else (latents.alpha.ids, latents.alpha.probs)
            bounds = [0, *accumulate(row.num_chunks for row in batch)]
            alphas += [SparseAlpha(None if ids is None else ids[a:b], values[a:b]) for a, b in zip(bounds, bounds[1:])]
        return alphas


def diagnostics(
    params: Params, phase1: Phase1Teacher, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
    free_running: SplitRun, teacher: Sequence[SparseAlpha],
) -> dict[str, float | None]:
    """Where the latent model's accuracy is lost on one split (module docstring)."""
    if tokenizer_fingerprint(phase1.tokenizer) != tokenizer_fingerprint(tokenizer):
        raise ArtifactError("the phase-1 models and the latent model use different tokenizers")
    split, rows = free_running.split, free_running.rows
    ceiling = run_split(params, "latent_sft", phase1.decoder, phase1.tokenizer, split, rows, teacher, True)
    forced = run_split(params, "latent_sft", model, tokenizer, split, rows, teacher, True)
    metrics = {
        "phase1_ceiling_pass@1": _mean([float(c) for c in ceiling.correct]),
        "teacher_forced_pass@1": _mean([float(c) for c in forced.correct]),
    }
    for name, run in (("teacher_forced", forced), ("free_running", free_running)):
        compared = [step for decoded in run.decoded for step in decoded.latent_steps if step.teacher_kl is not None]
        metrics[f"{name}_top1_agreement"] = _mean([float(step.teacher_agrees) for step in compared])
        metrics[f"{name}_kl"] = _mean([step.teacher_kl for step in compared])
    metrics["teacher_forced_stop_rate"] = stop_rate(forced.decoded, special_ids(tokenizer).think_close)
    if params.latent.kind == "soft_embedding":  # the hidden-state ablation's latents have no top-1 token
        metrics |= teacher_path_metrics(free_running.decoded, teacher, free_running.correct)
    return metrics


def stop_rate(decoded: Sequence[Decoded], stop_id: int) -> float:
    """Share of the latent steps of ``decoded`` whose greedy token (``Decoded.reasoning_ids``, one per latent step
    first) is ``stop_id``; 0 without latent steps."""
    greedy = [token for d in decoded for token in d.reasoning_ids[:len(d.latent_steps)]]
    return _mean([float(token == stop_id) for token in greedy])


def teacher_path_metrics(
    decoded: Sequence[Decoded], teacher: Sequence[SparseAlpha], correct: Sequence[bool],
) -> dict[str, float | None]:
    """Share of questions whose latents stay on the teacher's path (as many latents as the teacher's alpha [N, k]
    has rows, each with the teacher's top-1 token), and Pass@1 on and off that path (None for an empty group)."""
    on_path = [len(d.latent_steps) == alpha.probs.shape[0] and all(step.teacher_agrees for step in d.latent_steps)
               for d, alpha in zip(decoded, teacher, strict=True)]
    groups = {True: [], False: []}
    for follows, right in zip(on_path, correct, strict=True):
        groups[follows].append(float(right))
    return {
        "free_running_on_teacher_path": _mean([float(follows) for follows in on_path]),
        "free_running_pass@1_on_teacher_path": _mean(groups[True]) if groups[True] else None,
        "free_running_pass@1_off_teacher_path": _mean(groups[False]) if groups[False] else None,
    }


def _mean(values: Sequence[float]) -> float:
    return round(statistics.fmean(values), DECIMALS) if values else 0.0


def split_metrics(run: SplitRun, params: Params) -> dict[str, float]:
    """The metrics of one model on one split (see the module docstring)."""
    decoded = run.decoded
    metrics = {
        "rows": len(decoded),
        "pass@1": _mean([float(c) for c in run.correct]),
        "mean_reasoning_tokens": _mean([d.num_reasoning_tokens for d in decoded]),
        "mean_answer_tokens": _mean([len(d.answer_ids) for d in decoded]),
        "seconds_per_question": round(statistics.fmean(d.seconds for d in decoded), 6) if decoded else 0.0,
        "closed_rate": _mean([float(d.closed) for d in decoded]),
    }
    if run.model != "latent_sft":
        return metrics
    metrics["capped_rate"] = _mean([float(d.capped) for d in decoded])
    for k in params.evaluate.ecr_k:
        values = [ecr_at_k(d.latent_steps, row.chunks(), k) for d, row in zip(decoded, run.rows)]
        metrics[f"ecr@{k}"] = _mean([v for v in values if v is not None])
    c = params.base.compression_rate
    posteriors = [path_posterior(d.latent_steps, [row.cot_ids, *row.alt_cot_ids], c) for d, row in zip(decoded, run.rows)]
    scored = [p for p in posteriors if p is not None]
    metrics |= {"n_eff": _mean([p.n_eff for p in scored]), "top2": _mean([p.top2 for p in scored]),
                "n_eff_rows": len(scored)}
    return metrics


def decoding_warnings(results: dict[str, dict[str, dict[str, float]]], params: Params) -> list[str]:
    """What makes a model's Pass@1 on a split meaningless: no answer closed (nothing was scored), or a latent
    model that never chose ``</think>`` itself (every question stopped at the latent-step cap)."""
    warnings = []
    for model, splits in results.items():
        for split, metrics in splits.items():
            if metrics["rows"] and metrics["closed_rate"] == 0:
                warnings.append(f"{model} on {split}: none of {metrics['rows']} answers closed the reasoning with "
                                "</think>, so Pass@1 is 0 because nothing was scored (evaluate.decoding.max_new_tokens="
                                f"{params.evaluate.decoding.max_new_tokens}; has base_model learnt the </think> row?)")
            elif metrics["rows"] and metrics.get("capped_rate") == 1:
                warnings.append(f"{model} on {split}: every question reached the latent-step cap "
                                f"(evaluate.decoding.max_latent_steps={params.evaluate.decoding.max_latent_steps}): "
                                "the model never chose </think> after its latents, the cap closed them all")
    return warnings


def prediction_records(run: SplitRun, tokenizer: PreTrainedTokenizerBase, shown: int) -> list[dict]:
    records = []
    for row, decoded, prediction, correct in zip(run.rows, run.decoded, run.predictions, run.correct):
        records.append({
            "model": run.model, "split": run.split, "id": row.id, "question": row.question, "gold": row.answer,
            "prediction": prediction, "correct": correct, "reasoning_tokens": decoded.num_reasoning_tokens,
            "answer_tokens": len(decoded.answer_ids), "closed": decoded.closed, "capped": decoded.capped,
            "seconds": decoded.seconds, "reasoning": tokenizer.decode(decoded.reasoning_ids),
            "latent_top_ids": [list(step.ids[:shown]) for step in decoded.latent_steps],
            "latent_top_probs": [list(step.probs[:shown]) for step in decoded.latent_steps],
        })
    return records


def heatmap_records(run: SplitRun, tokenizer: PreTrainedTokenizerBase, questions: int, shown: int) -> list[dict]:
    """Top tokens of every latent step for the first ``questions`` questions: one record per (step, rank)."""
    records = []
    for number, (row, decoded) in enumerate(zip(run.rows[:questions], run.decoded), start=1):
        label = f"{number}. {row.question[:60]}"
        for step_number, step in enumerate(decoded.latent_steps, start=1):
            for rank, (token, prob) in enumerate(zip(step.ids[:shown], step.probs[:shown]), start=1):
                records.append({"question": label, "latent_step": step_number, "rank": rank,
                                "token": tokenizer.decode([token]), "prob": round(prob, DECIMALS)})
    return records


def markdown_report(results: dict[str, dict[str, dict[str, float]]], params: Params) -> str:
    """Pass@1 and #L of every model side by side per split (with latent #L / CoT #L), then every metric."""
    models = list(results)
    splits = list(results[models[0]])
    compare = {"cot_sft", "latent_sft"} <= set(models)
    columns = [f"{m} {what}" for m in models for what in ("Pass@1 %", "#L")] + (["#L ratio"] if compare else [])
    lines = [
        "# Evaluation",
        "",
        f"c = {params.base.compression_rate}, k = {params.base.top_k}. Pass@1: math-verify on the text after "
        "`</think>`. #L: latent steps (latent_sft) or chain tokens (cot_sft), the answer excluded.",
        "",
        markdown_row(["split", *columns]),
        markdown_row(["---"] * (1 + len(columns))),
    ]
    for split in splits:
        cells = [split]
        for model in models:
            values = results[model][split]
            cells += [f"{100 * values['pass@1']:.1f}", f"{values['mean_reasoning_tokens']:.2f}"]
        if compare:
            chain = results["cot_sft"][split]["mean_reasoning_tokens"]
            latent = results["latent_sft"][split]["mean_reasoning_tokens"]
            cells.append(f"{latent / chain:.2f}" if chain else "n/a")
        lines.append(markdown_row(cells))
    lines += _losses_table(results.get("latent_sft", {}))
    for model in models:
        names = list(results[model][splits[0]])
        lines += ["", f"## {model}", "", markdown_row(["split", *names]), markdown_row(["---"] * (1 + len(names)))]
        lines += [markdown_row([split, *(_cell(values.get(n)) for n in names)]) for split, values in results[model].items()]
    return "\n".join(lines) + "\n"


def _losses_table(latent: dict[str, dict[str, float]]) -> list[str]:
    """Markdown lines: per split, the latent model's accuracy from the teacher's latents (phase-1 decoder, stage-2
    model) and from its own, with per-latent agreement; empty without the diagnostics."""
    splits = [split for split, values in latent.items() if "phase1_ceiling_pass@1" in values]
    if not splits:
        return []
    columns = ["split", "phase-1 ceiling %", "stage 2 teacher-forced %", "stage 2 free-running %",
               "top-1 agreement TF", "KL TF", "TF stop rate", "top-1 agreement FR", "KL FR",
               "FR on teacher's path %", "FR Pass@1 on / off path %"]
    lines = ["", "## Where the accuracy is lost", "",
             "The phase-1 decoder and the stage-2 model answering from the encoder's latents of the gold chain "
             "(teacher), and the stage-2 model from its own latents; per latent step, agreement of the top-1 "
             "token and KL(teacher || student), teacher-forced (TF) and free-running (FR); the share of TF steps "
             "whose greedy token is </think> (free-running, the model would stop there); the questions whose "
             "free-running latents keep the teacher's top-1 token at every step, and Pass@1 on and off that path.", "",
             markdown_row(columns), markdown_row(["---"] * len(columns))]
    for split in splits:
        v = latent[split]
        lines.append(markdown_row([
            split, percent(v["phase1_ceiling_pass@1"]), percent(v["teacher_forced_pass@1"]),
            percent(v["pass@1"]), f"{v['teacher_forced_top1_agreement']:.3f}", f"{v['teacher_forced_kl']:.3f}",
            f"{v['teacher_forced_stop_rate']:.3f}", f"{v['free_running_top1_agreement']:.3f}", f"{v['free_running_kl']:.3f}",
            percent(v.get("free_running_on_teacher_path")),
            f"{percent(v.get('free_running_pass@1_on_teacher_path'))} / "
            f"{percent(v.get('free_running_pass@1_off_teacher_path'))}",
        ]))
    return lines


def percent(value: float | None, missing: str = "n/a") -> str:
    """A fraction as a percentage with one decimal; `missing` where nothing was measured (None)."""
    return missing if value is None else f"{100 * value:.1f}"


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


def markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def write_outputs(
    outputs: EvaluationOutputs, results: dict, report: str, records: list[dict], ecr_curve: list[dict],
    heatmap: list[dict],
) -> None:
    """All five outputs, or none of them."""
    with atomic_outputs() as staged:
        pq.write_table(pa.Table.from_pylist(records, schema=PREDICTION_SCHEMA), staged.path(outputs.predictions),
                       compression="zstd")
        with staged.path(outputs.ecr_plot).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["k", "ecr"])
            writer.writeheader()
            writer.writerows(ecr_curve)
        staged.path(outputs.heatmap_plot).write_text(json.dumps(heatmap, indent=1, ensure_ascii=False) + "\n",
                                                     encoding="utf-8")
        staged.path(outputs.report).write_text(report, encoding="utf-8")
        write_json(staged.path(outputs.metrics), results)


def evaluate(
    params: Params, chunked_dir: Path, model_dirs: dict[str, Path], outputs: EvaluationOutputs,
    phase1_dir: Path | None = None,
) -> dict | None:
    """The evaluate stage (module docstring). ``model_dirs`` maps every name in ``evaluate.models`` to a folder;
    ``phase1_dir`` (the merged phase-1 models) adds the diagnostics of the latent model. Under several processes
    the questions are shared out (``distributed``) and rank 0 writes the outputs and returns the results (the
    others return None)."""
    with process_group() as world:
        results, records, ecr_curve, heatmap = _evaluate_models(params, chunked_dir, model_dirs, phase1_dir)
    if not world.is_main:
        return None
    warnings = decoding_warnings(results, params)
    for warning in warnings:
        loud_warning(log, f"evaluate: {warning}")
    report = markdown_report(results, params)
    if warnings:
        report += "\n## Warnings\n\n" + "\n".join(f"- {warning}" for warning in warnings) + "\n"
    write_outputs(outputs, results, report, records, ecr_curve, heatmap)
    return results


def _evaluate_models(
    params: Params, chunked_dir: Path, model_dirs: dict[str, Path], phase1_dir: Path | None,
) -> tuple[dict[str, dict[str, dict[str, float]]], list[dict], list[dict], list[dict]]:
    """(metrics by model and split, prediction records, ECR@K curve, heat map) of every model on every split."""
    section = params.evaluate
    phase1 = Phase1Teacher.load(phase1_dir, params.compute) if phase1_dir is not None and "latent_sft" in section.models else None
    splits = evaluation_splits(params, chunked_dir)
    results: dict[str, dict[str, dict[str, float]]] = {}
    records: list[dict] = []
    ecr_curve: list[dict] = []
    heatmap: list[dict] = []
    for name in section.models:
        model, tokenizer = load_model(model_dirs[name])
        model = for_inference(model, params.compute)
        if name == "latent_sft":
            check_top_k(params, model.get_input_embeddings().num_embeddings, model_dirs[name])
        tokenizer_id = tokenizer_fingerprint(tokenizer)
        results[name] = {}
        for split in splits:
            rows = read_chunked(Path(chunked_dir) / f"{split}.parquet", params.base.compression_rate,
                                tokenizer_id)[: section.max_rows]
            log.info("evaluate: %s on %s (%d questions)", name, split, len(rows))
            teacher = phase1.alphas(params, rows) if phase1 is not None and name == "latent_sft" else None
            run = run_split(params, name, model, tokenizer, split, rows, teacher)
            results[name][split] = split_metrics(run, params)
            if teacher is not None:
                results[name][split] |= diagnostics(params, phase1, model, tokenizer, run, teacher)
            records += prediction_records(run, tokenizer, section.heatmap_tokens)
            if name == "latent_sft" and split == splits[0]:
                ecr_curve = [{"k": k, "ecr": results[name][split][f"ecr@{k}"]} for k in section.ecr_k]
                heatmap = heatmap_records(run, tokenizer, section.heatmap_questions, section.heatmap_tokens)
            log.info("evaluate: %s on %s: %s", name, split, results[name][split])
    return results, records, ecr_curve, heatmap


def answer_question(
    params: Params, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, question: str, explicit: bool,
    keep_top: int,
) -> Decoded:
    """Decode one question as the evaluation does (prompt template, alpha, caps and sampling from ``params``)."""
    prompt = encode(tokenizer, TextFormat(params.base.text).prompt(question, tokenizer))
    latent = None if explicit else LatentMode.from_params(params)
    return decode(model, [prompt], special_ids(tokenizer), params.evaluate.decoding, latent, keep_top=keep_top,
                  progress=False)[0]


def describe(decoded: Decoded, tokenizer: PreTrainedTokenizerBase) -> str:
    """What the model thought and answered, for a person: each latent step's superposition, then the answer."""
    lines = []
    if decoded.latent_steps:
        lines.append(f"latent steps: {len(decoded.latent_steps)}" + (" (cap reached)" if decoded.capped else ""))
        for number, step in enumerate(decoded.latent_steps, start=1):
            tokens = "  ".join(f"{tokenizer.decode([i])!r} {p:.3f}" for i, p in zip(step.ids, step.probs))
            lines.append(f"  step {number}: {tokens}")
    else:
        lines.append(f"reasoning ({decoded.num_reasoning_tokens} tokens): {tokenizer.decode(decoded.reasoning_ids)}")
    answer = answer_text(decoded, tokenizer)
    lines.append(f"answer: {answer}" if decoded.closed else "answer: (none: the reasoning was never closed)")
    return "\n".join(lines)
