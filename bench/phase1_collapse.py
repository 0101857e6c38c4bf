"""Phase-1 collapse: the three phase-1 trainings per configuration and seed, and the collapse guard's verdict.

Whether phase 1's latents stay a superposition of their chunk or collapse onto a few tokens depends on the
encoder-only training's learning rate and length, on the joint training's loss, and on the seed and the
floating-point path. Each configuration runs train_encoder, train_decoder and train_joint (library calls, the
workspace's ``models/base`` and ``data/chunked``, so run ``dvc repro base_model chunk`` first) with
``base.seed`` set per run, and records per stage the best validation L_sup and the collapse guard's
statistics (``latent_health``). ``--encoder-rows`` sets the encoder-only stage's rows (6,400 = the default;
25,600 = the 4x longer stress). Besides params overrides, a configuration can start from another ``<|latent|>``
embedding row (the vocabulary's mean, as a real model's added rows get) or drop the encoder-only stage (the
decoder then learns to read the base model's own latents first): levers the issue names, measured here before
any becomes a param. Results are kept per (configuration, rows, seed, torch threads, base model: the
floating-point path and the base model change where phase 1 lands) in
``bench/results/phase1_collapse/`` and skipped when rerun; the table is written into BENCHMARKS.md from all
kept results after every run, so several processes (e.g. one per seed, ``OMP_NUM_THREADS=1`` each) can share
the work; run it on one and on two threads.

    python -m bench.phase1_collapse [--configs all|name ...] [--seeds 0 1 2] [--encoder-rows 6400]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from bench.report import machine_line, update_section
from latent_sft_core import paths
from latent_sft_core.config import Params, load_params, parse_params
from latent_sft_core.io import write_json
from latent_sft_core.modeling import load_model, load_pretrained_model, save_model, with_lora
from latent_sft_core.phase1_training import ENCODER, Stage1Inputs, train_stage1
from latent_sft_core.text import special_ids

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "phase1_collapse"
STAGES = ("train_encoder", "train_decoder", "train_joint")
SHOWN_STAGES = ("train_encoder", "train_joint")  # train_decoder's latents are train_encoder's


def term_weights(diversity: float, chunk_anchor: float) -> dict[str, float]:
    """Overrides setting the diversity and chunk-anchor weights (ours) of both trainings of the encoder."""
    return {f"{stage}.{term}": weight for stage in ("train_encoder", "train_joint")
            for term, weight in (("diversity_weight", diversity), ("chunk_anchor_weight", chunk_anchor))}


@dataclass(frozen=True)
class Phase1Config:
    """One configuration: ``overrides`` of params.yaml (dotted keys; the encoder-only stage's rows come from
    --encoder-rows), the base model's ``<|latent|>`` row (``trained``: as CoT-SFT left it; ``vocabulary_mean``:
    the mean of the input embeddings, what ``mean_resizing`` gives a real model's new rows), and whether the
    encoder-only stage runs (without it train_decoder reads the latents of the untrained encoder adapter)."""

    overrides: dict[str, object] = field(default_factory=dict)
    latent_row: Literal["trained", "vocabulary_mean"] = "trained"
    encoder_only_stage: bool = True


PAPER_LOSS = term_weights(0.0, 0.0)
CONFIGS: dict[str, Phase1Config] = {
    "chunk anchor 0.1 and diversity 0.05 in both (the default)": Phase1Config(),
    "chunk anchor 0.1 in both, no diversity": Phase1Config(term_weights(0.0, 0.1)),
    "diversity 0.05 in both, encoder lr 1e-3": Phase1Config(term_weights(0.05, 0.0)),
    "diversity 0.05 in train_joint only": Phase1Config(
        {**term_weights(0.05, 0.0), "train_encoder.diversity_weight": 0.0}),
    "paper's L_sup, encoder lr 1e-3": Phase1Config(PAPER_LOSS),
    "paper's L_sup, encoder lr 1e-4": Phase1Config({"train_encoder.train.lr": 1e-4, **PAPER_LOSS}),
    "paper's L_sup, encoder lr 1e-3, T = 4": Phase1Config({"latent.temperature": 4.0, **PAPER_LOSS}),
    "paper's L_sup, full-vocabulary alpha": Phase1Config({"latent.full_vocab": True, **PAPER_LOSS}),
    "paper's L_sup, <|latent|> row = vocabulary mean": Phase1Config(PAPER_LOSS, latent_row="vocabulary_mean"),
    "paper's L_sup, no encoder-only stage": Phase1Config(PAPER_LOSS, encoder_only_stage=False),
}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def base_model_digest(model_dir: Path = paths.BASE_MODEL_DIR) -> str:
    """The first 8 hex digits of the SHA-256 of the base model's weights: which base model a run started from."""
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()[:8]


def result_path(name: str, encoder_rows: int, seed: int, threads: int, base: str,
                results_dir: Path = RESULTS_DIR) -> Path:
    """One run's file; torch's thread count and the base model are part of it: the floating-point path and the
    base model (retrained whenever the code on its path changes) move where phase 1 lands."""
    return results_dir / f"{slug(name)}-rows{encoder_rows}-seed{seed}-threads{threads}-base{base}.json"


def configured(params: Params, overrides: dict[str, object], encoder_rows: int, seed: int) -> Params:
    data = params.model_dump(mode="json")
    for key, value in {**overrides, "train_encoder.max_train_rows": encoder_rows, "base.seed": seed}.items():
        *path, last = key.split(".")
        section = data
        for part in path:
            section = section[part]
        section[last] = value
    return parse_params(data)


def with_latent_row_at_vocabulary_mean(base_dir: Path, out_dir: Path) -> Path:
    """A copy of the base model in ``out_dir`` whose ``<|latent|>`` input-embedding row is the mean of all rows
    (tied embeddings: its LM-head row too, as ``mean_resizing`` leaves a real model's added rows)."""
    model, tokenizer = load_model(base_dir)
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        embeddings[special_ids(tokenizer).latent] = embeddings.mean(dim=0)
    save_model(model, tokenizer, out_dir)
    return out_dir


def write_untrained_encoder_adapter(params: Params, base_dir: Path, stage_dir: Path) -> None:
    """train_encoder's output as the stage would leave it before its first step: LoRA's initialisation adds
    nothing, so the encoder is the base model."""
    encoder = with_lora(load_pretrained_model(base_dir), params.train_encoder.encoder_lora, params.base.seed)
    encoder.save_pretrained(str(stage_dir / ENCODER))


def run_config(params: Params, config: Phase1Config, base_dir: Path = paths.BASE_MODEL_DIR,
               chunked_dir: Path = paths.CHUNKED_DIR) -> dict:
    """The phase-1 trainings in a temporary folder; per stage run, its best validation L_sup and latent health."""
    result = {}
    with tempfile.TemporaryDirectory(prefix="phase1-collapse-") as tmp:
        out = Path(tmp)
        if config.latent_row == "vocabulary_mean":
            base_dir = with_latent_row_at_vocabulary_mean(base_dir, out / "base")
        for stage in STAGES:
            if stage == "train_encoder" and not config.encoder_only_stage:
                write_untrained_encoder_adapter(params, base_dir, out / stage)
                continue
            inputs = Stage1Inputs(base_dir, chunked_dir,
                                  out / "train_encoder" if stage != "train_encoder" else None,
                                  out / "train_decoder" if stage == "train_joint" else None)
            metrics = train_stage1(params, stage, inputs, out / stage, out / f"{stage}.json", out / f"{stage}.csv",
                                   scratch_dir=out / "scratch" / stage)
            result[stage] = {"best_val_loss": metrics["best_val_loss"], **metrics["latent_health"],
                             "by_step": metrics.get("latent_health_by_step", {})}
    return result


def kept_results(encoder_rows: int, results_dir: Path = RESULTS_DIR) -> dict[str, dict[tuple[str, int, str], dict]]:
    """configuration -> (base model, seed, torch threads) -> stages, for every kept run of a known configuration at
    ``encoder_rows`` (threads "?" for runs that did not record them; base "–" for runs before it was recorded)."""
    kept: dict[str, dict[tuple[str, int, str], dict]] = {}
    for name in CONFIGS:
        for seed_file in sorted(results_dir.glob(f"{slug(name)}-rows{encoder_rows}-seed*.json")):
            stored = json.loads(seed_file.read_text())
            key = (stored.get("base_model", "–"), stored["seed"], str(stored.get("torch_threads", "?")))
            kept.setdefault(name, {})[key] = stored["stages"]
    return kept


def table(results: dict[str, dict[tuple[str, int, str], dict]]) -> str:
    head = ("| configuration | base model | seed | threads | stage | val L_sup | distinct top-1 | chunk mass | entropy "
            "| collapsed |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        for (base, seed, threads), stages in sorted(runs.items()):
            for stage in (shown for shown in SHOWN_STAGES if shown in stages):  # a dropped stage has no row
                values = stages[stage]
                lines.append(f"| {name} | {base} | {seed} | {threads} | {stage} | {values['best_val_loss']:.3f} | "
                             f"{values['distinct_top1']} | {values['chunk_mass']:.3f} | {values['mean_entropy']:.2f} | "
                             f"{'**yes**' if values['collapsed'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--configs", nargs="*", default=["all"], help=f"'all' or names among: {list(CONFIGS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--encoder-rows", type=int, default=6400, help="rows of the encoder-only stage")
    args = parser.parse_args()
    params = load_params(args.params)
    configs = CONFIGS if args.configs == ["all"] else {name: CONFIGS[name] for name in args.configs}
    rows = args.encoder_rows

    def write_table() -> None:  # after every run, from every kept result, so an interrupted run keeps what it has
        update_section(f"phase1_collapse_rows{rows}", f"""### Phase-1 collapse, encoder-only stage on {rows:,} rows

`python -m bench.phase1_collapse --encoder-rows {rows} --seeds ...` ({machine_line()}): the three phase-1
trainings of the default params with the configuration's overrides, `<|latent|>` row and stages, the encoder-only
stage on {rows:,} rows (the default: 6,400), on the workspace's base model (named by the first 8 hex digits of its weights' SHA-256;
"–": the base model of 2026-12-01, before this was recorded; the phase-1 seed per row). Per stage, the best validation L_sup and the collapse guard's statistics of the encoder's alpha on the
validation rows (`latent_sft_core/latent_health.py`); train_decoder's latents are train_encoder's.

{table(kept_results(rows))}
""")

    base = base_model_digest()
    for seed in args.seeds:
        for name, config in configs.items():
            stored = result_path(name, rows, seed, torch.get_num_threads(), base)
            if stored.is_file():
                continue
            began = time.perf_counter()
            stages = run_config(configured(params, config.overrides, rows, seed), config)
            write_json(stored, {**asdict(config), "encoder_rows": rows, "seed": seed, "base_model": base,
                                "machine": machine_line(), "torch_threads": torch.get_num_threads(),
                                "minutes": round((time.perf_counter() - began) / 60, 1), "stages": stages})
            write_table()
    write_table()


if __name__ == "__main__":
    main()
