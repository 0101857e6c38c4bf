"""Phase-1 collapse under stress: the three phase-1 trainings with a longer encoder-only stage, per setting.

The encoder-only training (decoder frozen) moves alpha; trained 4x longer than the default (25,600 rows, 400
steps) it shows on one machine what a shorter run showed on another: whether the latents drift off their
chunks into a collapse, and whether the joint training brings them back. Each configuration runs
train_encoder, train_decoder and train_joint (library calls, the workspace's ``models/base`` and
``data/chunked``, so run ``dvc repro base_model chunk`` first) and records the collapse guard's statistics of
each stage (``latent_health``). Results are kept per configuration in ``bench/results/phase1_collapse/`` and a
finished configuration is skipped when rerun; the table goes into BENCHMARKS.md after every configuration.

    python -m bench.phase1_collapse [--configs all|name ...] [--encoder-rows 25600]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from bench.report import machine_line, update_section
from latent_sft_core import paths
from latent_sft_core.config import Params, load_params, parse_params
from latent_sft_core.io import write_json
from latent_sft_core.stage1 import Stage1Inputs, train_stage1

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "phase1_collapse"
STAGES = ("train_encoder", "train_decoder", "train_joint")
# name -> overrides of params.yaml (dotted keys); the encoder-only stage's rows come from --encoder-rows
CONFIGS: dict[str, dict[str, object]] = {
    "encoder lr 1e-3, T = 1 (the former default)": {"train_encoder.train.lr": 1e-3},
    "encoder lr 1e-3, T = 4": {"train_encoder.train.lr": 1e-3, "latent.temperature": 4.0},
    "encoder lr 1e-4, T = 1 (the default)": {"train_encoder.train.lr": 1e-4},
}
SHOWN = ("distinct_top1", "chunk_mass", "mean_entropy", "collapsed")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def configured(params: Params, overrides: dict[str, object], encoder_rows: int) -> Params:
    data = params.model_dump(mode="json")
    for key, value in {**overrides, "train_encoder.max_train_rows": encoder_rows}.items():
        *path, last = key.split(".")
        section = data
        for part in path:
            section = section[part]
        section[last] = value
    return parse_params(data)


def run_config(params: Params) -> dict:
    """The three phase-1 trainings in a temporary folder; per stage its best validation L_sup and latent health."""
    result = {}
    with tempfile.TemporaryDirectory(prefix="phase1-collapse-") as tmp:
        out = Path(tmp)
        for stage in STAGES:
            inputs = Stage1Inputs(paths.BASE_MODEL_DIR, paths.CHUNKED_DIR,
                                  out / "train_encoder" if stage != "train_encoder" else None,
                                  out / "train_decoder" if stage == "train_joint" else None)
            metrics = train_stage1(params, stage, inputs, out / stage, out / f"{stage}.json", out / f"{stage}.csv",
                                   scratch_dir=out / "scratch" / stage)
            result[stage] = {"best_val_loss": metrics["best_val_loss"], **metrics["latent_health"]}
    return result


def table(results: dict[str, dict]) -> str:
    head = "| configuration | stage | val L_sup | distinct top-1 | chunk mass | entropy | collapsed |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for name, stages in results.items():
        for stage, values in stages.items():
            lines.append(f"| {name} | {stage} | {values['best_val_loss']:.3f} | {values['distinct_top1']} | "
                         f"{values['chunk_mass']:.3f} | {values['mean_entropy']:.2f} | "
                         f"{'**yes**' if values['collapsed'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--configs", nargs="*", default=["all"], help=f"'all' or names among: {list(CONFIGS)}")
    parser.add_argument("--encoder-rows", type=int, default=25600, help="rows of the encoder-only stage")
    args = parser.parse_args()
    params = load_params(args.params)
    configs = CONFIGS if args.configs == ["all"] else {name: CONFIGS[name] for name in args.configs}
    results: dict[str, dict] = {}

    def write_table() -> None:  # after every configuration, so that an interrupted run keeps what it has
        update_section("phase1_collapse", f"""### Phase-1 collapse under stress

`python -m bench.phase1_collapse --encoder-rows {args.encoder_rows}` ({machine_line()}): the three phase-1
trainings of the default params with the encoder-only stage on {args.encoder_rows:,} rows (the default: 6,400),
on the workspace's base model (seed {params.base.seed}). Per stage, the best validation L_sup and the collapse
guard's statistics of the encoder's alpha on the validation rows (`latent_sft_core/latent_health.py`).

{table(results)}
""")

    for name, overrides in configs.items():
        stored = RESULTS_DIR / f"{slug(name)}-rows{args.encoder_rows}.json"
        if not stored.is_file():
            began = time.perf_counter()
            stages = run_config(configured(params, overrides, args.encoder_rows))
            write_json(stored, {"overrides": overrides, "encoder_rows": args.encoder_rows, "machine": machine_line(),
                                "minutes": round((time.perf_counter() - began) / 60, 1), "stages": stages})
        results[name] = json.loads(stored.read_text())["stages"]
        write_table()

if __name__ == "__main__":
    main()
