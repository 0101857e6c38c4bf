"""The method's results on the embedded benchmark (the paper's Table 1): Pass@1 and #L of every variant.

Rows:

* CoT-SFT and Latent-SFT(4): the workspace's own ``metrics/evaluate.json`` (run ``dvc repro`` first);
* Latent-SFT(2) and the ablations (hidden-state latents, w/o LTIM, w/o LTSuM): one ``dvc exp run --temp`` each
  with its param overrides, so DVC reuses every unchanged stage from the cache (the base model, the data) and
  records the experiment; their metrics are read back from the experiment's commit;
* No-CoT: the base model trained to answer right after ``<think></think>`` (``base_model.reasoning: none``),
  trained and evaluated here through the library on the workspace's data, into a temporary folder.

Extra seeds (``--seeds 1 2``) repeat the Latent-SFT rows with ``base.seed`` changed, which retrains the base
model too; each cell is then mean ± std over the seeds. Writes the table into BENCHMARKS.md.

    python -m bench.method_table [--variants all|name ...] [--seeds 1 2] [--no-nocot]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.report import machine_line, update_section
from latent_sft_core import paths
from latent_sft_core.base_model import train_base_model
from latent_sft_core.config import Params, load_params
from latent_sft_core.evaluation import EvaluationOutputs, evaluate

# name -> `dvc exp run -S` overrides; Latent-SFT(4) is the default configuration itself.
VARIANTS: dict[str, list[str]] = {
    "Latent-SFT(2)": ["base.compression_rate=2"],
    "Hidden state (c=4)": ["latent.kind=hidden_state"],
    "w/o LTIM (c=4)": ["latent.encoder_mask=causal"],
    "w/o LTSuM (c=4)": ["latent.decoder_mask=causal"],
}
EXP_PREFIX = "method"

ModelMetrics = dict[str, dict[str, float]]  # split -> metric -> value
Metrics = dict[str, ModelMetrics]  # model -> split -> metric -> value


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")


def run_experiment(name: str, overrides: list[str]) -> Metrics:
    """``dvc exp run --temp`` with ``overrides``; returns the experiment's metrics/evaluate.json."""
    exp_name = f"{EXP_PREFIX}-{slug(name)}-{int(time.time())}"
    command = ["dvc", "exp", "run", "--temp", "--name", exp_name]
    for override in overrides:
        command += ["--set-param", override]
    print("$", shlex.join(command), flush=True)
    subprocess.run(command, check=True)
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], check=True,
                          capture_output=True, text=True).stdout.split()
    ref = next((r for r in refs if r.endswith(f"/{exp_name}")), None)
    if ref is None:
        raise RuntimeError(f"dvc exp run finished but no git ref refs/exps/.../{exp_name} holds its results")
    shown = subprocess.run(["git", "show", f"{ref}:{paths.METRICS_DIR / 'evaluate.json'}"], check=True,
                           capture_output=True, text=True).stdout
    return json.loads(shown)


def no_cot_metrics(params: Params) -> Metrics:
    """Train the no-CoT baseline on the workspace's data and evaluate it on every evaluation split."""
    no_cot = params.model_copy(update={
        "base_model": params.base_model.model_copy(update={"reasoning": "none"}),
        "evaluate": params.evaluate.model_copy(update={"models": ["cot_sft"]}),
    })
    with tempfile.TemporaryDirectory(prefix="no-cot-") as tmp:
        folder = Path(tmp)
        train_base_model(no_cot, paths.RAW_DIR, paths.TOKENIZER_DIR, folder / "model", folder / "metrics.json",
                         folder / "loss.csv", scratch_dir=folder / "scratch")
        outputs = EvaluationOutputs(
            metrics=folder / "evaluate.json", report=folder / "report.md", predictions=folder / "predictions.parquet",
            ecr_plot=folder / "ecr.csv", heatmap_plot=folder / "heatmap.json",
        )
        return evaluate(no_cot, paths.CHUNKED_DIR, {"cot_sft": folder / "model"}, outputs)


def cell(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def table(rows: dict[str, list[ModelMetrics]], splits: list[str]) -> str:
    """Markdown: one row per method, Pass@1 % and #L per split (mean ± std over the runs of that row)."""
    head = "| method | runs | " + " | ".join(f"{s} Pass@1 % | {s} #L" for s in splits) + " |"
    rule = "|---|---|" + "---|---|" * len(splits)
    lines = [head, rule]
    for name, runs in rows.items():
        cells = []
        for split in splits:
            cells.append(cell([run[split]["pass@1"] for run in runs if split in run], scale=100))
            cells.append(cell([run[split]["mean_reasoning_tokens"] for run in runs if split in run], digits=2))
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--variants", nargs="*", default=["all"], help=f"'all' or names among: {list(VARIANTS)}")
    parser.add_argument("--seeds", nargs="*", type=int, default=[], help="extra base.seed values (retrain the base)")
    parser.add_argument("--no-nocot", action="store_true", help="leave out the no-CoT baseline")
    args = parser.parse_args()
    params = load_params(args.params)
    variants = VARIANTS if args.variants == ["all"] else {name: VARIANTS[name] for name in args.variants}
    began = time.perf_counter()

    default = json.loads((paths.METRICS_DIR / "evaluate.json").read_text())
    rows: dict[str, list[ModelMetrics]] = {
        "CoT-SFT": [default["cot_sft"]],
        "No-CoT": [],
        "Latent-SFT(4)": [default["latent_sft"]],
        **{name: [] for name in variants},
    }
    splits = sorted(default["cot_sft"], key=lambda split: split != "test")  # test first, then the OOD splits
    command = "python -m bench.method_table" + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds else "")

    def write_table() -> None:  # after every run, so that an interrupted table keeps what it has
        minutes = (time.perf_counter() - began) / 60
        update_section("method_table", f"""## Results of the method on the embedded benchmark (the paper's Table 1)

`{command}` ({machine_line()}), {minutes:.0f} min. Pass@1 (%, greedy) and #L (mean reasoning length: CoT tokens,
or latent steps) per split; the default params (`params.yaml`) except where the method's name says; CoT-SFT and
Latent-SFT(4) are the default run's `metrics/evaluate.json`, the other Latent-SFT rows `dvc exp run` experiments
(named `{EXP_PREFIX}-*`), No-CoT the base model trained without the chain. A cell with ± is mean ± std over runs;
runs = 0: not run yet.

{table(rows, splits)}
""")

    if args.no_nocot:
        del rows["No-CoT"]
    for name, overrides in variants.items():
        rows[name].append(run_experiment(name, overrides)["latent_sft"])
        write_table()
    if not args.no_nocot:
        rows["No-CoT"].append(no_cot_metrics(params)["cot_sft"])
        write_table()
    for seed in args.seeds:
        seeded = run_experiment(f"seed{seed}", [f"base.seed={seed}"])
        rows["CoT-SFT"].append(seeded["cot_sft"])
        rows["Latent-SFT(4)"].append(seeded["latent_sft"])
        for name, overrides in variants.items():
            rows[name].append(run_experiment(f"{name} seed{seed}", [*overrides, f"base.seed={seed}"])["latent_sft"])
        write_table()
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
