import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import method_table
from bench.method_table import DEFAULT_ROW, NO_COT_ROW, VARIANTS

pytestmark = pytest.mark.unit

SEEDS = [0, 1, 2]
LATENT_PASS = {0: 0.5, 1: 0.7, 2: 0.9}  # test Pass@1 of every Latent row, by seed


def evaluate_json(latent_pass: float | None, cot_pass: float = 0.8) -> dict:
    models = {"cot_sft": {"test": {"pass@1": cot_pass, "mean_reasoning_tokens": 17.0}}}
    if latent_pass is not None:
        models["latent_sft"] = {"test": {"pass@1": latent_pass, "mean_reasoning_tokens": 4.0}}
    return models


def planned_calls(rows: list[str], seeds: list[int]) -> list[tuple]:
    """The fakes' calls, in order, for ``rows`` run over ``seeds``."""
    overrides = {DEFAULT_ROW: [], **VARIANTS}
    return [("no-cot", seed) if row == NO_COT_ROW else ("exp", (*overrides[row], f"base.seed={seed}"))
            for seed in seeds for row in rows]


@pytest.fixture
def bench(tmp_path, monkeypatch):
    calls: list[tuple] = []

    def fake_experiment(name: str, overrides: list[str]) -> dict:
        calls.append(("exp", tuple(overrides)))
        seed = int(overrides[-1].removeprefix("base.seed="))
        return {"evaluate.json": evaluate_json(LATENT_PASS[seed]), "train_latent.json": {"steps": 10}}

    def fake_no_cot(params_path: Path, seed: int) -> dict:
        calls.append(("no-cot", seed))
        return {"evaluate.json": evaluate_json(None, cot_pass=0.2)}

    monkeypatch.setattr(method_table, "run_experiment", fake_experiment)
    monkeypatch.setattr(method_table, "no_cot_metrics", fake_no_cot)
    params = tmp_path / "params.yaml"
    params.write_text("base:\n  seed: 0\n")
    results, md = tmp_path / "results", tmp_path / "BENCHMARKS.md"

    def run(*argv: str) -> None:
        method_table.main(["--params", str(params), "--results-dir", str(results), "--benchmarks-md", str(md),
                           *argv])

    return SimpleNamespace(calls=calls, run=run, params=params, results=results, md=md)


def stored(bench, row: str, seed: int) -> dict:
    return json.loads(method_table.result_path(bench.results, row, seed).read_text())


def test_a_fresh_run_keeps_one_result_per_row_and_seed_seed_major_default_first(bench):
    bench.run()
    rows = [DEFAULT_ROW, *VARIANTS, NO_COT_ROW]
    assert bench.calls == planned_calls(rows, SEEDS)
    assert sorted(p.relative_to(bench.results).as_posix() for p in bench.results.rglob("*.json")) == sorted(
        f"{method_table.slug(row)}/seed{seed}.json" for row in rows for seed in SEEDS)
    result = stored(bench, "Latent-SFT(2)", 1)
    assert result["row"] == "Latent-SFT(2)" and result["seed"] == 1
    assert result["overrides"] == ["base.compression_rate=2", "base.seed=1"]
    assert result["metrics"] == {"evaluate.json": evaluate_json(0.7), "train_latent.json": {"steps": 10}}
    assert result["fingerprint"] == method_table.fingerprint(["base.compression_rate=2"], bench.params.read_text())
    assert result["machine"] and result["date"] and result["wall_minutes"] >= 0
    assert stored(bench, NO_COT_ROW, 2)["overrides"] == [*method_table.NO_COT_OVERRIDES, "base.seed=2"]


def test_b_a_rerun_skips_the_kept_pairs_and_runs_the_new_ones(bench):
    bench.run("--variants", "Latent-SFT(2)", "--seeds", "0", "1")
    first = method_table.result_path(bench.results, DEFAULT_ROW, 0).read_text()
    bench.calls.clear()
    bench.run("--variants", "Latent-SFT(2)", "--seeds", "0", "1")
    assert bench.calls == []
    assert method_table.result_path(bench.results, DEFAULT_ROW, 0).read_text() == first
    bench.run("--variants", "Latent-SFT(2)", "--seeds", "0", "1", "2")
    assert bench.calls == planned_calls([DEFAULT_ROW, "Latent-SFT(2)", NO_COT_ROW], [2])


def test_c_a_run_with_another_fingerprint_is_rerun_unless_kept(bench, capsys):
    bench.run("--seeds", "0", "--no-nocot", "--variants")
    path = method_table.result_path(bench.results, DEFAULT_ROW, 0)
    path.write_text(json.dumps({**stored(bench, DEFAULT_ROW, 0), "fingerprint": "other params"}))
    bench.calls.clear()

    bench.run("--seeds", "0", "--no-nocot", "--variants", "--keep-stale")
    assert bench.calls == []
    assert "1 kept runs were made with other params or overrides: included (`--keep-stale`)." in bench.md.read_text()
    assert "| Latent-SFT(4) | 1 |" in bench.md.read_text()

    bench.run("--seeds", "0", "--no-nocot", "--variants", "--max-minutes", "0")
    text = bench.md.read_text()
    assert "left out until rerun" in text and "| Latent-SFT(4) | 0 |\n" in text and "50.0" not in text

    bench.run("--seeds", "0", "--no-nocot", "--variants")
    assert bench.calls == planned_calls([DEFAULT_ROW], [0])
    assert "Latent-SFT(4) seed 0: the kept run was made with other params or overrides; rerunning" in (
        capsys.readouterr().out)
    assert stored(bench, DEFAULT_ROW, 0)["fingerprint"] == method_table.fingerprint([], bench.params.read_text())

    bench.params.write_text("base:\n  seed: 0\n  top_k: 5\n")  # other default params: every row reruns
    bench.calls.clear()
    bench.run("--seeds", "0", "--no-nocot", "--variants")
    assert bench.calls == planned_calls([DEFAULT_ROW], [0])


def test_c_restamp_keeps_runs_across_a_params_change_that_does_not_touch_them(bench, capsys):
    bench.run("--seeds", "0", "--no-nocot", "--variants", "Latent-SFT(2)")
    before = stored(bench, "Latent-SFT(2)", 0)
    old_params = bench.params.with_name("old-params.yaml")
    old_params.write_text(bench.params.read_text())
    bench.params.write_text("base:\n  seed: 0\n  model: {gguf_file: null}\n")  # a key only another source reads
    stale = method_table.result_path(bench.results, "Latent-SFT(2)", 1)  # made with yet other params
    stale.write_text(json.dumps({**before, "seed": 1, "fingerprint": "other params"}))
    bench.calls.clear()

    with pytest.raises(SystemExit):
        bench.run("--seeds", "0", "--no-nocot", "--variants", "Latent-SFT(2)", "--restamp", "new model-source keys")
    bench.run("--seeds", "0", "--no-nocot", "--variants", "Latent-SFT(2)", "--restamp", "new model-source keys",
              "--restamp-from", str(old_params))
    assert bench.calls == []
    assert json.loads(stale.read_text())["fingerprint"] == "other params"  # not made with the old params: stale
    after = stored(bench, "Latent-SFT(2)", 0)
    assert after["fingerprint"] == method_table.fingerprint(["base.compression_rate=2"], bench.params.read_text())
    assert after["restamped"] == [{"date": after["restamped"][0]["date"], "fingerprint": before["fingerprint"],
                                   "reason": "new model-source keys"}]
    assert after["metrics"] == before["metrics"] and after["date"] == before["date"]
    assert "Latent-SFT(2) seed 0: re-stamped (new model-source keys)" in capsys.readouterr().out
    assert ("Kept across a params change that does not affect them (`--restamp`): Latent-SFT(2) seed 0, "
            "Latent-SFT(4) seed 0 (new model-source keys).") in bench.md.read_text()
    bench.run("--seeds", "0", "--no-nocot", "--variants", "Latent-SFT(2)")  # current now: nothing reruns
    assert bench.calls == []


def test_d_no_time_left_starts_nothing_and_writes_the_table_from_kept_runs(bench, capsys):
    bench.run("--seeds", "0", "--no-nocot", "--variants")
    bench.calls.clear()
    bench.md.write_text("# Benchmarks\n")
    bench.run("--seeds", "0", "1", "--no-nocot", "--variants", "--max-minutes", "0")
    assert bench.calls == []
    text = bench.md.read_text()
    assert "| Latent-SFT(4) | 1 | 50.0 | 4.00 |" in text and "| CoT-SFT | 1 | 80.0 | 17.00 |" in text
    assert "Not run yet (1): Latent-SFT(4) seed 1." in text
    assert "1 of 2 runs left: Latent-SFT(4) seed 1" in capsys.readouterr().out


def test_no_run_starts_once_the_minutes_are_spent(bench, monkeypatch):
    clock = {"minutes": 0.0}

    def ten_minute_runs(name: str, overrides: list[str]) -> dict:
        clock["minutes"] += 10
        return {"evaluate.json": evaluate_json(0.5)}

    monkeypatch.setattr(method_table, "run_experiment", ten_minute_runs)
    monkeypatch.setattr(method_table, "elapsed_minutes", lambda since: clock["minutes"])
    bench.run("--no-nocot", "--max-minutes", "25")
    assert clock["minutes"] == 30  # started at 0, 10 and 20
    assert sorted(p.parent.name for p in bench.results.rglob("seed0.json")) == sorted(
        method_table.slug(row) for row in [DEFAULT_ROW, "Latent-SFT(2)", "Hidden state (c=4)"])


def kept(seed: int, evaluate: dict, **metrics: dict) -> dict:
    return {"seed": seed, "machine": "m", "wall_minutes": 10.0,
            "metrics": {"evaluate.json": evaluate, **metrics}}


def test_e_the_tables_show_mean_and_std_over_seeds_and_dashes_for_absent_metrics():
    splits = {"two_step": {"pass@1": 0.1, "mean_reasoning_tokens": 4.0},
              "val": {"pass@1": 0.2, "mean_reasoning_tokens": 4.0},
              "hard": {"pass@1": 0.3, "mean_reasoning_tokens": 3.0}}
    latent_test = {"pass@1": 0.5, "mean_reasoning_tokens": 4.0, "phase1_ceiling_pass@1": 0.98,
                   "teacher_forced_pass@1": 0.75, "free_running_on_teacher_path": 0.6}
    results = {
        (DEFAULT_ROW, 0): kept(0, {"cot_sft": {"test": {"pass@1": 0.9, "mean_reasoning_tokens": 17.0}},
                                   "latent_sft": {"test": latent_test, **splits}},
                               **{"cache_soft_labels.json": {"train": {"latent_health": {
                                   "collapsed": False, "distinct_top1": 37}}}}),
        (DEFAULT_ROW, 1): kept(1, evaluate_json(0.7)),
        (DEFAULT_ROW, 2): kept(2, evaluate_json(0.9)),
        ("Latent-SFT(2)", 1): kept(1, {"latent_sft": {"test": {"pass@1": 0.6, "mean_reasoning_tokens": 8.0}}},
                                   **{"cache_soft_labels.json": {"train": {"latent_health": {"collapsed": True}}}}),
    }
    summary = method_table.summary_table(results).splitlines()
    assert summary[0] == ("| method | seeds | test Pass@1 % | test #L | val Pass@1 % | val #L | hard Pass@1 % "
                          "| hard #L | two_step Pass@1 % | two_step #L |")
    assert summary[2] == "| CoT-SFT | 3 | 83.3 ± 5.8 | 17.00 ± 0.00 | – | – | – | – | – | – |"
    assert summary[3] == "| No-CoT | 0 | – | – | – | – | – | – | – | – |"
    assert summary[4] == "| Latent-SFT(4) | 3 | 70.0 ± 20.0 | 4.00 ± 0.00 | 20.0 | 4.00 | 30.0 | 3.00 | 10.0 | 4.00 |"
    assert summary[5] == "| Latent-SFT(2) | 1 | 60.0 | 8.00 | – | – | – | – | – | – |"
    assert summary[6:] == [f"| {row} | 0 | – | – | – | – | – | – | – | – |" for row in list(VARIANTS)[1:]]

    per_seed = method_table.per_seed_table(results).splitlines()
    assert per_seed[2:] == [
        "| Latent-SFT(4) | 0 | no | 37 | 98.0 | 75.0 | 50.0 | 60.0 | 90.0 |",
        "| Latent-SFT(4) | 1 | – | – | – | – | 70.0 | – | 80.0 |",
        "| Latent-SFT(4) | 2 | – | – | – | – | 90.0 | – | 80.0 |",
        "| Latent-SFT(2) | 1 | yes | – | – | – | 60.0 | – | 80.0 |",
    ]


def healthy(collapsed: bool) -> dict:
    return {"cache_soft_labels.json": {"train": {"latent_health": {"collapsed": collapsed}}}}


def run_pair(latent_pass: float, latent_length: float, cot_pass: float, ceiling: float | None = None,
             ood: float = 0.5) -> dict:
    latent = {"pass@1": latent_pass, "mean_reasoning_tokens": latent_length}
    if ceiling is not None:
        latent["phase1_ceiling_pass@1"] = ceiling
    return {"cot_sft": {"test": {"pass@1": cot_pass, "mean_reasoning_tokens": 10.0},
                        "hard": {"pass@1": ood, "mean_reasoning_tokens": 12.0}},
            "latent_sft": {"test": latent}}


def test_g_the_targets_are_judged_on_the_seeds_each_row_has():
    results = {
        # CoT-SFT 0.90 / 0.80 / 0.85; Latent-SFT(4) 0.89 / 0.77 / 0.84 (mean gap 1.67 points) at 2.9 / 10
        (DEFAULT_ROW, 0): kept(0, run_pair(0.89, 2.9, 0.90, ceiling=0.95, ood=0.96), **healthy(False)),
        (DEFAULT_ROW, 1): kept(1, run_pair(0.77, 2.9, 0.80, ceiling=0.76, ood=0.30), **healthy(False)),
        (DEFAULT_ROW, 2): kept(2, run_pair(0.84, 2.9, 0.85, ceiling=0.90, ood=0.30), **healthy(False)),
        # seed 1 only: judged against seed 1's CoT-SFT (0.80), not the 3-seed mean (0.85)
        ("Latent-SFT(2)", 1): kept(1, run_pair(0.82, 5.0, 0.80)),
        ("Hidden state (c=4)", 0): kept(0, run_pair(0.90, 2.9, 0.90)),
    }
    lines = method_table.targets_table(results, planned_seeds=3).splitlines()
    assert lines[2] == ("| every seed: phase 1 not collapsed, ceiling ≥ CoT-SFT − 3 points | seed 0: not collapsed, "
                        "ceiling 95.0 vs CoT-SFT 90.0; seed 1: not collapsed, ceiling 76.0 vs CoT-SFT 80.0; seed 2: "
                        "not collapsed, ceiling 90.0 vs CoT-SFT 85.0 | missed |")  # seed 1: 4 points below
    assert lines[3] == "| Latent-SFT(4): within 2 points of CoT-SFT at #L ≤ 0.3x (means) | 83.3 vs 85.0 at 0.29x | met |"
    assert lines[4] == ("| Latent-SFT(2): at least CoT-SFT at #L ≤ 0.5x (means) | 82.0 vs 80.0 at 0.50x "
                        "| met so far (1 of 3 seeds) |")
    # seed 0 only: 90.0 against seed 0's full method, 89.0
    assert lines[5] == ("| Hidden state (c=4) below Latent-SFT(4) (means) | 90.0 vs 89.0 "
                        "| missed so far (1 of 3 seeds) |")
    assert lines[6] == "| CoT-SFT on `hard` between 20% and 95% (mean) | 52.0 | met |"
    assert len(lines) == 7

    results[DEFAULT_ROW, 1] = kept(1, run_pair(0.77, 3.5, 0.80, ceiling=0.80), **healthy(True))
    lines = method_table.targets_table(results, planned_seeds=3).splitlines()
    assert "seed 1: collapsed" in lines[2] and lines[2].endswith("| missed |")
    assert lines[3].endswith("at 0.31x | missed |")  # #L over 0.3x


def test_g_targets_without_runs_are_not_measured():
    lines = method_table.targets_table({}, planned_seeds=3).splitlines()
    assert [line.rsplit("|", 2)[1].strip() for line in lines[2:]] == ["not measured"] * 4


def test_e_the_written_section_comes_from_every_kept_run(bench):
    bench.run("--seeds", "0", "1", "2", "--no-nocot", "--variants")
    text = bench.md.read_text()
    assert "| Latent-SFT(4) | 3 | 70.0 ± 20.0 | 4.00 ± 0.00 |" in text
    assert "| CoT-SFT | 3 | 80.0 ± 0.0 | 17.00 ± 0.00 |" in text
    assert "| Latent-SFT(4) | 2 | – | – | – | – | 90.0 | – | 80.0 |" in text
    assert "Seeds (`base.seed`, each retraining the base model): 0, 1, 2;" in text
    assert ("| Latent-SFT(4): within 2 points of CoT-SFT at #L ≤ 0.3x (means) | 70.0 vs 80.0 at 0.24x | missed |"
            in text)
    bench.run("--seeds", "0", "--no-nocot", "--variants")  # a sitting on fewer seeds keeps the others in the table
    assert "| Latent-SFT(4) | 3 | 70.0 ± 20.0 | 4.00 ± 0.00 |" in bench.md.read_text()


def test_f_a_half_written_result_of_a_killed_run_is_not_a_result(bench):
    folder = bench.results / method_table.slug(DEFAULT_ROW)
    staging = folder / ".seed0.json.abcd1234.tmp"
    staging.mkdir(parents=True)
    (staging / "seed0.json").write_text('{"row": "Latent-SFT(4)", "seed": 0, "metr')
    bench.run("--seeds", "0", "--no-nocot", "--variants")
    assert bench.calls == planned_calls([DEFAULT_ROW], [0])
    assert stored(bench, DEFAULT_ROW, 0)["metrics"]["evaluate.json"] == evaluate_json(0.5)
    assert not staging.exists()


def test_run_experiment_reads_the_metrics_files_the_experiment_committed(tmp_path, monkeypatch):
    """A stand-in ``dvc`` commits the workspace's metrics as the experiment's ref, as ``dvc exp run --temp`` does."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dvc").write_text('#!/bin/sh\necho "$@" > dvc-args.txt\ngit add metrics\n'
                                 'git -c user.name=t -c user.email=t@t commit -qm exp\n'
                                 'git update-ref "refs/exps/ab/cdef12/$5" HEAD\n')
    (bin_dir / "dvc").chmod(0o755)
    # The interpreter's folder comes first on the experiment's PATH (an unactivated venv), so its dvc is used.
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    workspace = tmp_path / "workspace"
    (workspace / "metrics").mkdir(parents=True)
    (workspace / "metrics" / "evaluate.json").write_text(json.dumps(evaluate_json(0.5)))
    (workspace / "metrics" / "train_latent.json").write_text('{"steps": 10}')
    monkeypatch.chdir(workspace)
    subprocess.run(["git", "init", "-q"], check=True)

    metrics = method_table.run_experiment("Latent-SFT(2) seed1", ["base.compression_rate=2", "base.seed=1"])
    assert metrics == {"evaluate.json": evaluate_json(0.5), "train_latent.json": {"steps": 10}}
    args = (workspace / "dvc-args.txt").read_text().split()
    assert args[:4] == ["exp", "run", "--temp", "--name"] and args[4].startswith("method-latent-sft-2--seed1-")
    assert args[5:] == ["--set-param", "base.compression_rate=2", "--set-param", "base.seed=1"]


def test_no_cot_asks_dvc_for_the_imported_model_before_training(tmp_path, monkeypatch):
    """Experiments run in temporary copies: on a fresh clone the workspace has no imported base model until
    No-CoT asks DVC (a real-model run's tokenizer and training read it)."""
    commands = []

    class Stop(Exception):
        pass

    def fake_dvc(command: list[str]) -> None:
        commands.append(command)
        raise Stop  # nothing may be trained before the model is there

    monkeypatch.setattr(method_table, "run_dvc", fake_dvc)
    with pytest.raises(Stop):
        method_table.no_cot_metrics(tmp_path / "params.yaml", seed=1)
    assert commands == [["dvc", "repro", method_table.NO_COT_MODEL_STAGE]]


def test_the_no_cot_model_stage_makes_the_imported_model():
    import yaml

    from latent_sft_core import paths

    stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    outs = [out if isinstance(out, str) else next(iter(out)) for out in stages[method_table.NO_COT_MODEL_STAGE]["outs"]]
    assert outs == [paths.PRETRAINED_DIR.as_posix()]


def test_no_cot_trains_and_evaluates_on_the_data_drawn_with_its_seed(tmp_path, monkeypatch):
    """The Latent experiments of seed N draw the synthetic data with base.seed = N; No-CoT must use that draw,
    not the workspace's (params.yaml's seed 0)."""
    import pyarrow.parquet as pq

    from latent_sft_core import base_model, evaluation
    from latent_sft_core.config import load_params
    from latent_sft_core.data.synthetic import generate_synthetic

    params = tmp_path / "params.yaml"
    params.write_text("base:\n  seed: 0\nprepare_data:\n  synthetic:\n"
                      "    train_size: 64\n    val_size: 8\n    test_size: 8\n    ood_size: 8\n")
    seen = {}

    def fake_train(no_cot, raw_dir, tokenizer_dir, *args, **kwargs):
        seen["train"] = (no_cot.base.seed, no_cot.base_model.reasoning,
                         pq.read_table(raw_dir / "train.parquet").column("question").to_pylist())

    def fake_evaluate(no_cot, chunked_dir, models, outputs):
        seen["test_questions"] = pq.read_table(chunked_dir / "test.parquet").column("question").to_pylist()
        return {"cot_sft": {}}

    monkeypatch.setattr(method_table, "run_dvc", lambda command: None)
    monkeypatch.setattr(base_model, "train_base_model", fake_train)
    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    synthetic = load_params(params).prepare_data.synthetic
    for seed in (1, 2):
        assert method_table.no_cot_metrics(params, seed) == {"evaluate.json": {"cot_sft": {}}}
        drawn = generate_synthetic(synthetic, seed)
        assert seen["train"] == (seed, "none", [example.question for example in drawn["train"]])
        assert seen["test_questions"] == [example.question for example in drawn["test"]]
    assert drawn["test"] != generate_synthetic(synthetic, 1)["test"]
