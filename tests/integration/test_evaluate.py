"""The evaluate stage and `latent-sft infer` on the micro run (CoT-SFT base model and a stage-2 model)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from latent_sft_core.cli import main as cli_main
from latent_sft_core.config import parse_params
from latent_sft_core.errors import ArtifactError
from latent_sft_core.evaluation import EvaluationOutputs, answer_question, describe, evaluate
from latent_sft_core.inference import Decoded, LatentStep
from latent_sft_core.modeling import load_model
from latent_sft_core.scoring import is_correct
from tests.support import deep_merge

pytestmark = pytest.mark.integration

EVAL_SPLITS = ["test", "val", "hard", "reworded", "two_step"]
ROWS = {"test": 16, "val": 16, "hard": 8, "reworded": 8, "two_step": 8}


def outputs_in(folder: Path) -> EvaluationOutputs:
    return EvaluationOutputs(folder / "evaluate.json", folder / "report.md", folder / "predictions.parquet",
                             folder / "ecr.csv", folder / "heatmap.json")


def model_dirs(root: Path) -> dict[str, Path]:
    return {"cot_sft": root / "base", "latent_sft": root / "latent"}


@pytest.fixture(scope="module")
def evaluated(latent_run, tmp_path_factory):
    root, params = latent_run
    params = parse_params(deep_merge(params.model_dump(mode="json"), {
        "evaluate": {"decoding": {"max_latent_steps": 8, "max_new_tokens": 40}, "ecr_k": [1, 2, 4],
                     "analysis_top_k": 8, "heatmap_questions": 2, "heatmap_tokens": 3},
    }))
    outputs = outputs_in(tmp_path_factory.mktemp("evaluate"))
    results = evaluate(params, root / "chunked", model_dirs(root), outputs, phase1_dir=root / "merged")
    return root, params, outputs, results


def test_every_model_on_every_evaluation_split(evaluated):
    _, _, outputs, results = evaluated
    assert json.loads(outputs.metrics.read_text()) == results
    assert list(results) == ["cot_sft", "latent_sft"]
    for splits in results.values():
        assert list(splits) == EVAL_SPLITS  # test first, then val; train is never evaluated
        for split, metrics in splits.items():
            assert metrics["rows"] == ROWS[split]
            assert 0 <= metrics["pass@1"] <= 1 and metrics["seconds_per_question"] > 0
    latent = results["latent_sft"]["test"]
    assert {"ecr@1", "ecr@2", "ecr@4", "n_eff", "top2", "n_eff_rows", "capped_rate"} <= set(latent)
    assert "ecr@1" not in results["cot_sft"]["test"]
    assert 0 <= latent["mean_reasoning_tokens"] <= 8
    # ECR@K grows with K and is at most c
    ecr = [latent[f"ecr@{k}"] for k in (1, 2, 4)]
    assert ecr == sorted(ecr) and ecr[-1] <= 2
    assert latent["n_eff_rows"] > 0 and 1 <= latent["n_eff"] <= 3 and 0 <= latent["top2"] <= 1


def test_where_the_accuracy_is_lost_on_every_split(evaluated):
    """Phase-1 ceiling, stage 2 from the teacher's latents and from its own, with per-latent agreement and KL."""
    root, params, outputs, results = evaluated
    names = ["phase1_ceiling_pass@1", "teacher_forced_pass@1", "teacher_forced_top1_agreement", "teacher_forced_kl",
             "free_running_top1_agreement", "free_running_kl", "teacher_forced_stop_rate"]
    report = outputs.report.read_text()
    assert "## Where the accuracy is lost" in report
    for split in EVAL_SPLITS:
        latent = results["latent_sft"][split]
        assert set(names) <= set(latent), split
        assert all(0 <= latent[name] <= 1 for name in names if "kl" not in name)
        assert latent["teacher_forced_kl"] > 0 and latent["free_running_kl"] > 0
        assert (f"| {split} | {100 * latent['phase1_ceiling_pass@1']:.1f} | "
                f"{100 * latent['teacher_forced_pass@1']:.1f} | {100 * latent['pass@1']:.1f} |") in report
        assert (f"| {latent['teacher_forced_kl']:.3f} | {latent['teacher_forced_stop_rate']:.3f} | "
                f"{latent['free_running_top1_agreement']:.3f} |") in report
        assert not set(names) & set(results["cot_sft"][split])
        # Pass@1 is the on-path and off-path Pass@1 weighted by the share of questions on the teacher's path
        on_rate = latent["free_running_on_teacher_path"]
        on, off = latent["free_running_pass@1_on_teacher_path"], latent["free_running_pass@1_off_teacher_path"]
        assert 0 <= on_rate <= 1 and (on is None) == (on_rate == 0) and (off is None) == (on_rate == 1)
        assert latent["pass@1"] == pytest.approx(on_rate * (on or 0) + (1 - on_rate) * (off or 0), abs=1e-3)
        assert f"| {100 * on_rate:.1f} |" in report


def test_predictions_agree_with_the_metrics(evaluated):
    _, _, outputs, results = evaluated
    table = pq.read_table(outputs.predictions).to_pylist()
    assert len(table) == 2 * sum(ROWS.values())
    for model, splits in results.items():
        for split, metrics in splits.items():
            rows = [r for r in table if r["model"] == model and r["split"] == split]
            assert metrics["pass@1"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows), abs=1e-4)
            assert metrics["mean_reasoning_tokens"] == pytest.approx(
                sum(r["reasoning_tokens"] for r in rows) / len(rows), abs=1e-4)
            for r in rows:
                assert r["correct"] == is_correct(r["prediction"], r["gold"])
                assert (r["prediction"] == "") or r["closed"]
                if model == "cot_sft":
                    assert r["latent_top_ids"] == [] and not r["capped"]
                else:
                    assert len(r["latent_top_ids"]) == r["reasoning_tokens"]
                    assert all(len(ids) == 3 for ids in r["latent_top_ids"])
                    assert all(p == sorted(p, reverse=True) for p in r["latent_top_probs"])


def test_report_and_plots(evaluated):
    _, _, outputs, results = evaluated
    report = outputs.report.read_text()
    for split in EVAL_SPLITS:
        cot, latent = results["cot_sft"][split], results["latent_sft"][split]
        ratio = latent["mean_reasoning_tokens"] / cot["mean_reasoning_tokens"]
        assert (f"| {split} | {100 * cot['pass@1']:.1f} | {cot['mean_reasoning_tokens']:.2f} | "
                f"{100 * latent['pass@1']:.1f} | {latent['mean_reasoning_tokens']:.2f} | {ratio:.2f} |") in report
    curve = outputs.ecr_plot.read_text().splitlines()
    assert curve[0] == "k,ecr" and [line.split(",")[0] for line in curve[1:]] == ["1", "2", "4"]
    assert [float(line.split(",")[1]) for line in curve[1:]] == [results["latent_sft"]["test"][f"ecr@{k}"]
                                                                  for k in (1, 2, 4)]
    heatmap = json.loads(outputs.heatmap_plot.read_text())
    predictions = [r for r in pq.read_table(outputs.predictions).to_pylist()
                   if r["model"] == "latent_sft" and r["split"] == "test"][:2]
    assert len(heatmap) == 3 * sum(r["reasoning_tokens"] for r in predictions)
    assert {r["question"][:2] for r in heatmap} <= {"1.", "2."} and {r["rank"] for r in heatmap} <= {1, 2, 3}


def test_bad_inputs_leave_no_outputs(latent_run, tmp_path):
    root, params = latent_run
    outputs = outputs_in(tmp_path)
    missing_split = parse_params(deep_merge(params.model_dump(mode="json"), {"evaluate": {"splits": ["gsm_hard"]}}))
    with pytest.raises(ArtifactError, match=r"chunked.*no chunked split gsm_hard.*available: .*hard"):
        evaluate(missing_split, root / "chunked", model_dirs(root), outputs)
    # the CoT-SFT model is evaluated before the latent model is found missing: still nothing is written
    with pytest.raises(ArtifactError, match=r"nowhere: no config\.json"):
        evaluate(params, root / "chunked", {"cot_sft": root / "base", "latent_sft": tmp_path / "nowhere"}, outputs)
    other_c = parse_params(deep_merge(params.model_dump(mode="json"), {"base": {"compression_rate": 3}}))
    with pytest.raises(ArtifactError, match=r"test\.parquet: chunked with latent_sft.compression_rate=2 but this run expects 3"):
        evaluate(other_c, root / "chunked", model_dirs(root), outputs)
    assert list(tmp_path.iterdir()) == []


def test_infer_prints_what_the_evaluation_decodes(latent_run, tmp_path, capsys):
    root, params = latent_run
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    question = "Tom has 3 apples and buys 4 more. How many apples does he have?"
    for model, flags, explicit in (("latent", [], False), ("base", ["--explicit"], True)):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["infer", "--model", str(root / model), "--params", str(params_file), "--top", "3", *flags,
                      question])
        assert exit_info.value.code == 0
        loaded, tokenizer = load_model(root / model)
        decoded = answer_question(params, loaded, tokenizer, question, explicit, keep_top=3)
        assert capsys.readouterr().out == describe(decoded, tokenizer) + "\n"
        assert explicit == (decoded.latent_steps == ())


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(96 + i) for i in ids)


def test_describe_shows_each_latent_steps_top_tokens():
    steps = (LatentStep((1, 2), (0.75, 0.25)), LatentStep((3, 1), (0.5, 0.125)))
    decoded = Decoded(reasoning_ids=[1, 3], answer_ids=[7, 8], closed=True, latent_steps=steps)
    assert describe(decoded, CharTokenizer()) == (
        "latent steps: 2\n  step 1: 'a' 0.750  'b' 0.250\n  step 2: 'c' 0.500  'a' 0.125\nanswer: gh"
    )
    explicit = Decoded(reasoning_ids=[1, 2], answer_ids=[], closed=False)
    assert describe(explicit, CharTokenizer()) == (
        "reasoning (2 tokens): ab\nanswer: (none: the reasoning was never closed)"
    )
