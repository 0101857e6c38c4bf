"""The method's results on the embedded benchmark (the paper's Table 1): Pass@1 and #L of every row, over seeds.

Every row runs once per seed (``--seeds``, default 0 1 2):

* Latent-SFT(4) and the other Latent rows (``VARIANTS``: Latent-SFT(2), the ablations, and extension rows of
  ours): one ``dvc exp run --temp`` each with the row's param overrides plus ``base.seed=<seed>``. DVC reuses
  every unchanged stage from its cache, so each seed's base model is trained once for all rows of that seed;
  the metrics are read back from the experiment's commit;
* CoT-SFT: the ``cot_sft`` metrics of the Latent-SFT(4) experiment of the same seed (no run of its own);
* No-CoT: the base model trained to answer right after ``<think></think>`` (``base_model.reasoning: none``) with
  ``base.seed`` set, trained and evaluated here through the library on the workspace's data, in a temporary folder.

Each finished run is kept as ``bench/results/method_table/<row>/seed<N>.json`` (its metrics files, overrides,
seed, date, machine, wall minutes and a fingerprint of the overrides and params.yaml). A rerun skips the
(row, seed) pairs kept with the current fingerprint and reruns those made with other params (``--keep-stale``
keeps them instead), so the table fills up over several sittings: no run starts once ``--max-minutes`` have
passed. The work goes seed by seed, Latent-SFT(4) first. After every run the table is written into
BENCHMARKS.md from all kept results: mean ± std over seeds per row, then the per-seed Latent diagnostics.

    python -m bench.method_table [--variants all|name ...] [--seeds 0 1 2] [--no-nocot] [--max-minutes 110]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import BENCHMARKS_MD, machine_line, update_section
from latent_sft_core import paths
from latent_sft_core.config import load_params
from latent_sft_core.evaluation import markdown_row, percent
from latent_sft_core.io import write_json
from latent_sft_core.subprocess_env import interpreter_first_path

DEFAULT_ROW = "Latent-SFT(4)"  # the default params
COT_ROW = "CoT-SFT"
NO_COT_ROW = "No-CoT"
# Phase 1 without the chunk-anchor term (ours) of the default params; without it and the diversity term (ours).
NO_CHUNK_ANCHOR = ["train_encoder.chunk_anchor_weight=0", "train_joint.chunk_anchor_weight=0"]
PAPER_PHASE1_LOSS = ["train_encoder.diversity_weight=0", "train_joint.diversity_weight=0", *NO_CHUNK_ANCHOR]
HIDDEN_STATE = ["latent.kind=hidden_state", *PAPER_PHASE1_LOSS]  # no alpha to diversify or anchor
# Latent row -> `dvc exp run -S` overrides on top of the default params (and base.seed).
VARIANTS: dict[str, list[str]] = {
    "Latent-SFT(2)": ["base.compression_rate=2"],
    "Hidden state (c=4)": HIDDEN_STATE,
    "w/o LTIM (c=4)": ["latent.encoder_mask=causal"],
    "w/o LTSuM (c=4)": ["latent.decoder_mask=causal"],
    # The paper's phase-1 loss (L_sup alone): the default adds the diversity and chunk-anchor terms (ours).
    "Paper's L_sup in phase 1 (c=4)": PAPER_PHASE1_LOSS,
    # Extension rows: ours, beyond the paper's table.
    "Phase 1 without the chunk anchor (ours, c=4)": NO_CHUNK_ANCHOR,
    "Scheduled sampling (ours, c=4)": ["train_latent.scheduled_sampling.enabled=true"],
    # the hidden-state row with a term that keeps its LM head off </think> at the latent slots, as KL does for alpha
    "Hidden state with a stop term (ours, c=4)": [*HIDDEN_STATE, "train_latent.hidden_state_stop_weight=1"],
}
# What `no_cot_metrics` changes in the params; recorded with its runs and part of their fingerprint.
NO_COT_OVERRIDES = ["base_model.reasoning=none", "evaluate.models=[cot_sft]"]
# The stage that imports a real base model (models/pretrained), which No-CoT's tokenizer and training read.
NO_COT_MODEL_STAGE = "import_model"
EXP_PREFIX = "method"
RESULTS_DIR = Path("bench/results/method_table")
METRIC_FILES = ["evaluate.json", "cache_soft_labels.json", "train_encoder.json", "train_decoder.json",
                "train_joint.json", "train_latent.json"]
RESULT_NAME = re.compile(r"seed(\d+)\.json")

RunMetrics = dict[str, Any]  # metrics file name -> its content
Result = dict[str, Any]  # one kept run, as stored
Results = dict[tuple[str, int], Result]  # (row, seed) -> its kept run


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")


def all_rows() -> dict[str, list[str]]:
    """Every row that runs, in the order of the runs within a seed -> its overrides."""
    return {DEFAULT_ROW: [], **VARIANTS, NO_COT_ROW: NO_COT_OVERRIDES}


def fingerprint(overrides: list[str], params_text: str) -> str:
    """Identifies what a row's runs were made with; a kept run with another one is out of date."""
    return hashlib.sha256(json.dumps([sorted(overrides), params_text]).encode()).hexdigest()


def result_path(results_dir: Path, row: str, seed: int) -> Path:
    return results_dir / slug(row) / f"seed{seed}.json"


def load_results(results_dir: Path, rows: list[str]) -> Results:
    """Every kept run of ``rows``; staging folders of an interrupted write are not results."""
    results: Results = {}
    for row in rows:
        for path in sorted((results_dir / slug(row)).glob("seed*.json")):
            match = RESULT_NAME.fullmatch(path.name)
            if match is None:
                continue
            try:
                results[row, int(match[1])] = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: not valid JSON ({error}); delete it to rerun that run") from None
    return results


def run_dvc(command: list[str]) -> None:
    """Run a dvc command with this interpreter's environment first on PATH (the stages call ``python``)."""
    print("$", shlex.join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "PATH": interpreter_first_path()})


def run_experiment(name: str, overrides: list[str]) -> RunMetrics:
    """``dvc exp run --temp`` with ``overrides``; returns the experiment's files among METRIC_FILES."""
    exp_name = f"{EXP_PREFIX}-{slug(name)}-{int(time.time())}"
    command = ["dvc", "exp", "run", "--temp", "--name", exp_name]
    for override in overrides:
        command += ["--set-param", override]
    run_dvc(command)

    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], check=True, capture_output=True, text=True).stdout

    refs = git("for-each-ref", "--format=%(refname)", "refs/exps").split()
    ref = next((r for r in refs if r.endswith(f"/{exp_name}")), None)
    if ref is None:
        raise RuntimeError(f"dvc exp run finished but no git ref refs/exps/.../{exp_name} holds its results")
    committed = set(git("ls-tree", "--name-only", f"{ref}:{paths.METRICS_DIR.as_posix()}").split())
    return {name: json.loads(git("show", f"{ref}:{(paths.METRICS_DIR / name).as_posix()}"))
            for name in METRIC_FILES if name in committed}


def no_cot_metrics(params_path: Path, seed: int) -> RunMetrics:
    """Train the no-CoT baseline on the data of ``seed`` and evaluate it on every evaluation split.

    The synthetic data is drawn with ``base.seed``, so each Latent experiment of seed N trains and evaluates on
    seed N's draw; No-CoT makes the same draw (data, tokenizer, chunks) through the library in its temporary
    folder, not the workspace's (which is params.yaml's seed). DVC provides the imported base model of a
    real-model run first: experiments run in temporary copies, so a fresh clone's workspace has none.
    """
    # torch and transformers take seconds to import; only this run needs them
    from latent_sft_core.base_model import train_base_model
    from latent_sft_core.chunking import chunk_dataset
    from latent_sft_core.data.prepare import prepare_data
    from latent_sft_core.evaluation import EvaluationOutputs, evaluate
    from latent_sft_core.text import build_tokenizer

    run_dvc(["dvc", "repro", NO_COT_MODEL_STAGE])
    params = load_params(params_path)
    no_cot = params.model_copy(update={
        "base": params.base.model_copy(update={"seed": seed}),
        "base_model": params.base_model.model_copy(update={"reasoning": "none"}),
        "evaluate": params.evaluate.model_copy(update={"models": ["cot_sft"]}),
    })
    with tempfile.TemporaryDirectory(prefix="no-cot-") as tmp:
        folder = Path(tmp)
        prepare_data(no_cot, folder / "raw")
        build_tokenizer(no_cot, folder / "raw", folder / "tokenizer", paths.PRETRAINED_DIR)
        chunk_dataset(no_cot, folder / "raw", folder / "tokenizer", folder / "chunked", folder / "chunk.json")
        train_base_model(no_cot, folder / "raw", folder / "tokenizer", folder / "model", folder / "metrics.json",
                         folder / "loss.csv", scratch_dir=folder / "scratch")
        outputs = EvaluationOutputs(
            metrics=folder / "evaluate.json", report=folder / "report.md", predictions=folder / "predictions.parquet",
            ecr_plot=folder / "ecr.csv", heatmap_plot=folder / "heatmap.json",
        )
        return {"evaluate.json": evaluate(no_cot, folder / "chunked", {"cot_sft": folder / "model"}, outputs)}


def run_once(row: str, seed: int, overrides: list[str], params_path: Path) -> RunMetrics:
    if row == NO_COT_ROW:
        return no_cot_metrics(params_path, seed)
    return run_experiment(f"{row} seed{seed}", [*overrides, f"base.seed={seed}"])


def restamp(results_dir: Path, fingerprints: dict[str, str], previous: dict[str, str], reason: str) -> None:
    """Give every kept run made with the ``previous`` params (its row's fingerprint there) the current fingerprint,
    recording the old one and ``reason``. Runs made with any other params stay stale."""
    for (row, seed), result in load_results(results_dir, list(fingerprints)).items():
        if result["fingerprint"] == fingerprints[row] or result["fingerprint"] != previous[row]:
            continue
        record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "fingerprint": result["fingerprint"],
                  "reason": reason}
        write_json(result_path(results_dir, row, seed), {
            **result, "fingerprint": fingerprints[row], "restamped": [*result.get("restamped", []), record]})
        print(f"{row} seed {seed}: re-stamped ({reason})", flush=True)


def elapsed_minutes(since: float) -> float:
    return (time.monotonic() - since) / 60


# ------------------------------------------------------------------------------------------- the table


def dig(mapping: Any, *keys: str) -> Any:
    """``mapping[k1][k2]...``, or None where a level is missing."""
    for key in keys:
        if not isinstance(mapping, dict) or key not in mapping:
            return None
        mapping = mapping[key]
    return mapping


NOT_MEASURED = "–"


def cell(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return NOT_MEASURED
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def table_rows() -> dict[str, tuple[str, str]]:
    """Table row -> (the row whose runs it reads, its model in their evaluate.json)."""
    return {COT_ROW: (DEFAULT_ROW, "cot_sft"), NO_COT_ROW: (NO_COT_ROW, "cot_sft"),
            **{row: (row, "latent_sft") for row in (DEFAULT_ROW, *VARIANTS)}}


def summary_table(results: Results) -> str:
    """Markdown: one line per table row, seeds and Pass@1 % and #L per split (mean ± std over the seeds)."""
    per_row = {
        name: [result["metrics"]["evaluate.json"][model] for (row, _), result in sorted(results.items())
               if row == source and model in result["metrics"]["evaluate.json"]]
        for name, (source, model) in table_rows().items()
    }
    splits = sorted({split for model_runs in per_row.values() for runs in model_runs for split in runs},
                    key=lambda split: (split != "test", split != "val", split))
    lines = [markdown_row(["method", "seeds", *(f"{s} {metric}" for s in splits for metric in ("Pass@1 %", "#L"))]),
             "|---|---|" + "---|---|" * len(splits)]
    for name, model_runs in per_row.items():
        cells = [name, str(len(model_runs))]
        for split in splits:
            cells.append(cell([runs[split]["pass@1"] for runs in model_runs if split in runs], scale=100))
            cells.append(cell([runs[split]["mean_reasoning_tokens"] for runs in model_runs if split in runs],
                              digits=2))
        lines.append(markdown_row(cells))
    return "\n".join(lines)


def per_seed_table(results: Results) -> str:
    """Markdown: per Latent row and seed, phase 1's latent health, the test Pass@1 of each stage and the share of
    test questions whose free-running latents keep the teacher's top-1 path."""
    lines = ["| method | seed | phase-1 collapsed | distinct top-1 | phase-1 ceiling % | teacher-forced % "
             "| free-running % | on teacher's path % | CoT-SFT % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in (DEFAULT_ROW, *VARIANTS):
        for seed in sorted(seed for kept_row, seed in results if kept_row == row):
            health = dig(results[row, seed], "metrics", "cache_soft_labels.json", "train", "latent_health") or {}
            collapsed = health.get("collapsed")
            test = dig(results[row, seed], "metrics", "evaluate.json", "latent_sft", "test") or {}
            cot_sft = dig(results.get((DEFAULT_ROW, seed)), "metrics", "evaluate.json", "cot_sft", "test", "pass@1")
            measured = (test.get("phase1_ceiling_pass@1"), test.get("teacher_forced_pass@1"), test.get("pass@1"),
                        test.get("free_running_on_teacher_path"), cot_sft)
            lines.append(markdown_row([
                row, str(seed),
                NOT_MEASURED if collapsed is None else ("yes" if collapsed else "no"),
                str(health.get("distinct_top1", NOT_MEASURED)),
                *(percent(value, missing=NOT_MEASURED) for value in measured),
            ]))
    return "\n".join(lines)


# Issue 13's targets: the test split's gap to CoT-SFT (points), #L relative to CoT-SFT's, and CoT-SFT's range on OOD.
CEILING_GAP_POINTS = 3  # every seed: phase-1 ceiling >= CoT-SFT - 3 points
DEFAULT_ROW_GAP_POINTS = 2  # Latent-SFT(4) within 2 points of CoT-SFT (mean over seeds)
LENGTH_RATIO = {DEFAULT_ROW: 0.3, "Latent-SFT(2)": 0.5}  # #L at most this share of CoT-SFT's
HIDDEN_STATE_ROW = "Hidden state (c=4)"
OOD_COT_RANGE = (0.20, 0.95)


def row_means(results: Results, row: str, model: str, split: str,
              seeds: list[int] | None = None) -> tuple[float, float, list[int]] | None:
    """(mean Pass@1, mean #L, their seeds) of ``model`` in the kept runs of ``row`` on ``split`` (of ``seeds``
    only, when given); None if there is none."""
    runs = {seed: dig(result, "metrics", "evaluate.json", model, split) for (kept, seed), result in results.items()
            if kept == row and (seeds is None or seed in seeds)}
    runs = {seed: run for seed, run in sorted(runs.items()) if run}
    if not runs:
        return None
    return (statistics.fmean(run["pass@1"] for run in runs.values()),
            statistics.fmean(run["mean_reasoning_tokens"] for run in runs.values()), list(runs))


def targets_table(results: Results, planned_seeds: int) -> str:
    """Markdown: each target of the method table, what the kept runs measure, and whether it is met.

    A verdict drawn from fewer seeds than ``planned_seeds`` says so ("so far"); one with no run says
    "not measured".
    """
    def verdict(met: bool, seeds: int) -> str:
        word = "met" if met else "missed"
        return word if seeds >= planned_seeds else f"{word} so far ({seeds} of {planned_seeds} seeds)"

    lines = ["| target | measured | verdict |", "|---|---|---|"]
    seeds = sorted(seed for row, seed in results if row == DEFAULT_ROW)
    health = []
    for seed in seeds:
        collapsed = dig(results[DEFAULT_ROW, seed], "metrics", "cache_soft_labels.json", "train", "latent_health",
                        "collapsed")
        test = dig(results[DEFAULT_ROW, seed], "metrics", "evaluate.json") or {}
        ceiling = dig(test, "latent_sft", "test", "phase1_ceiling_pass@1")
        cot_pass = dig(test, "cot_sft", "test", "pass@1")
        health.append((seed, collapsed, ceiling, cot_pass))
    measured = "; ".join(f"seed {seed}: {'collapsed' if collapsed else 'not collapsed'}, ceiling "
                         f"{percent(ceiling, missing=NOT_MEASURED)} vs CoT-SFT {percent(cot_pass, missing=NOT_MEASURED)}"
                         for seed, collapsed, ceiling, cot_pass in health)
    healthy = all(collapsed is False and ceiling is not None and cot_pass is not None
                  and ceiling >= cot_pass - CEILING_GAP_POINTS / 100 for _, collapsed, ceiling, cot_pass in health)
    lines.append(markdown_row([f"every seed: phase 1 not collapsed, ceiling ≥ CoT-SFT − {CEILING_GAP_POINTS} points",
                               measured or NOT_MEASURED,
                               verdict(healthy, len(health)) if health else "not measured"]))

    for row, ratio in LENGTH_RATIO.items():
        latent = row_means(results, row, "latent_sft", "test")
        # CoT-SFT of the same seeds: a row with fewer seeds so far is not judged against another seed's base
        cot = latent and row_means(results, DEFAULT_ROW, "cot_sft", "test", seeds=latent[2])
        gap = DEFAULT_ROW_GAP_POINTS if row == DEFAULT_ROW else 0
        target = (f"{row}: within {gap} points of CoT-SFT" if gap else f"{row}: at least CoT-SFT") + \
            f" at #L ≤ {ratio}x (means)"
        if not cot:
            lines.append(markdown_row([target, NOT_MEASURED, "not measured"]))
            continue
        length = latent[1] / cot[1]
        met = latent[0] >= cot[0] - gap / 100 and length <= ratio
        lines.append(markdown_row([target, f"{percent(latent[0])} vs {percent(cot[0])} at {length:.2f}x",
                                   verdict(met, len(cot[2]))]))

    hidden = row_means(results, HIDDEN_STATE_ROW, "latent_sft", "test")
    full = hidden and row_means(results, DEFAULT_ROW, "latent_sft", "test", seeds=hidden[2])
    target = f"{HIDDEN_STATE_ROW} below {DEFAULT_ROW} (means)"
    if not full:
        lines.append(markdown_row([target, NOT_MEASURED, "not measured"]))
    else:
        lines.append(markdown_row([target, f"{percent(hidden[0])} vs {percent(full[0])}",
                                   verdict(hidden[0] < full[0], len(full[2]))]))

    low, high = OOD_COT_RANGE
    splits = sorted({split for (row, _), result in results.items() if row == DEFAULT_ROW
                     for split in dig(result, "metrics", "evaluate.json", "cot_sft") or {}} - {"test", "val"})
    for split in splits:
        ood = row_means(results, DEFAULT_ROW, "cot_sft", split)
        lines.append(markdown_row([f"CoT-SFT on `{split}` between {low:.0%} and {high:.0%} (mean)",
                                   percent(ood[0]), verdict(low <= ood[0] <= high, len(ood[2]))]))
    return "\n".join(lines)


def section(results: Results, command: str, results_dir: Path, stale: int, keep_stale: bool,
            left: list[tuple[str, int]], planned_seeds: int) -> str:
    """The BENCHMARKS.md section: what was run where, then both tables."""
    seeds = sorted({seed for _, seed in results})
    machines = sorted({result["machine"] for result in results.values()})
    minutes = sum(result["wall_minutes"] for result in results.values())
    notes = []
    if stale:
        notes.append(f"{stale} kept runs were made with other params or overrides: "
                     + ("included (`--keep-stale`)." if keep_stale else "left out until rerun."))
    restamped = [(row, seed, record["reason"]) for (row, seed), result in sorted(results.items())
                 for record in result.get("restamped", [])]
    for reason in dict.fromkeys(reason for _, _, reason in restamped):
        runs = [f"{row} seed {seed}" for row, seed, why in restamped if why == reason]
        notes.append(f"Kept across a params change that does not affect them (`--restamp`): {', '.join(runs)} "
                     f"({reason}).")
    if left:
        notes.append(f"Not run yet ({len(left)}): " + ", ".join(f"{row} seed {seed}" for row, seed in left) + ".")
    return f"""## Results of the method on the embedded benchmark (the paper's Table 1)

`{command}` (the latest sitting; the table is made from every run kept in `{results_dir}/`, over
sittings). Seeds (`base.seed`, each retraining the base model): {", ".join(map(str, seeds)) or "none yet"};
{len(results)} runs, {minutes:.0f} min of wall time in all, on: {"; ".join(machines) or "–"}.
Pass@1 (%, greedy) and #L (mean reasoning length: CoT tokens, or latent steps) per split, mean ± std over the
seeds; the default params (`params.yaml`) except where the method's name says. Every Latent-SFT row is a
`dvc exp run` experiment (named `{EXP_PREFIX}-*`); CoT-SFT is the CoT-SFT model of the Latent-SFT(4) experiment of
the same seed; No-CoT the base model trained without the chain. Rows marked "ours" go beyond the paper.
{" ".join(notes)}

{summary_table(results)}

Per seed, on test: phase 1's latent health (`cache_soft_labels.json`: collapsed, distinct top-1 tokens), the
phase-1 decoder's Pass@1 from the encoder's latents (ceiling), stage 2 teacher-forced and free-running, and
CoT-SFT of the same seed; "–": not measured by that run.

{per_seed_table(results)}

The targets (issue 13), judged on the kept runs:

{targets_table(results, planned_seeds)}
"""


# ------------------------------------------------------------------------------------------- the runs


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="the workspace's params file (fingerprint and No-CoT; dvc exp run reads the workspace's)")
    parser.add_argument("--variants", nargs="*", default=["all"], help=f"'all' or names among: {list(VARIANTS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="base.seed values (each retrains the base model)")
    parser.add_argument("--no-nocot", action="store_true", help="leave out the no-CoT baseline")
    parser.add_argument("--max-minutes", type=float, default=110,
                        help="start no run once this many minutes have passed in this sitting")
    parser.add_argument("--keep-stale", action="store_true",
                        help="keep runs made with other params or overrides instead of rerunning them")
    parser.add_argument("--restamp", metavar="REASON",
                        help="the params file changed in a way that does not affect the kept runs (e.g. keys only "
                             "other model sources read): give them the current fingerprint, REASON recorded in each "
                             "and named under the table (only the runs made with --restamp-from's params)")
    parser.add_argument("--restamp-from", type=Path, metavar="OLD_PARAMS",
                        help="with --restamp: the params file before the change (e.g. from `git show`)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--benchmarks-md", type=Path, default=BENCHMARKS_MD)
    args = parser.parse_args(argv)
    began = time.monotonic()
    variants = list(VARIANTS) if args.variants == ["all"] else args.variants
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if bool(args.restamp) != bool(args.restamp_from):
        parser.error("--restamp and --restamp-from go together: the runs made with the old params are re-stamped")

    rows = all_rows()
    params_text = args.params.read_text()
    fingerprints = {row: fingerprint(overrides, params_text) for row, overrides in rows.items()}
    # seed-major: a seed's base model is trained by its first run and reused from DVC's run cache by the others
    plan = [(row, seed) for seed in args.seeds
            for row in [DEFAULT_ROW, *variants, *([] if args.no_nocot else [NO_COT_ROW])]]
    command = shlex.join(["python", "-m", "bench.method_table", *argv])

    def current(row: str, result: Result) -> bool:
        return result["fingerprint"] == fingerprints[row]

    def write_table() -> list[tuple[str, int]]:
        """Write the table from every kept run; returns the planned (row, seed) pairs still to run."""
        kept = load_results(args.results_dir, list(rows))
        results = {key: result for key, result in kept.items() if args.keep_stale or current(key[0], result)}
        stale = sum(not current(row, result) for (row, _), result in kept.items())
        left = [pair for pair in plan if pair not in results]
        update_section("method_table", section(results, command, args.results_dir, stale, args.keep_stale, left,
                                                         len(args.seeds)),
                       path=args.benchmarks_md)
        return left

    if args.restamp:
        previous_text = args.restamp_from.read_text()
        restamp(args.results_dir, fingerprints,
                {row: fingerprint(overrides, previous_text) for row, overrides in rows.items()}, args.restamp)
    for row, seed in plan:
        kept = load_results(args.results_dir, [row]).get((row, seed))
        if kept is not None and (args.keep_stale or current(row, kept)):
            continue
        if elapsed_minutes(began) >= args.max_minutes:
            break
        if kept is not None:
            print(f"{row} seed {seed}: the kept run was made with other params or overrides; rerunning", flush=True)
        started = time.monotonic()
        metrics = run_once(row, seed, rows[row], args.params)
        write_json(result_path(args.results_dir, row, seed), {
            "row": row, "seed": seed, "overrides": [*rows[row], f"base.seed={seed}"],
            "fingerprint": fingerprints[row], "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": machine_line(), "wall_minutes": round(elapsed_minutes(started), 2), "metrics": metrics,
        })
        write_table()
    left = write_table()
    if left:
        print(f"Stopped after {elapsed_minutes(began):.0f} min (--max-minutes {args.max_minutes:g}); "
              f"{len(left)} of {len(plan)} runs left: " + ", ".join(f"{row} seed {seed}" for row, seed in left)
              + ". Rerun the same command to go on.", flush=True)
    else:
        print(f"All {len(plan)} runs are kept in {args.results_dir}; the table is in {args.benchmarks_md}.")


if __name__ == "__main__":
    main()
