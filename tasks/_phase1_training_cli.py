"""The command line shared by the three phase-1 training stages (each stage module names itself)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from latent_sft_core import paths
from latent_sft_core.config import load_params
from latent_sft_core.phase1_training import Stage1Inputs, Stage1Name, train_stage1
from latent_sft_core.stage_cli import stage_parser

OUTPUTS = {
    "train_encoder": paths.STAGE1_ENCODER_DIR,
    "train_decoder": paths.STAGE1_DECODER_DIR,
    "train_joint": paths.STAGE1_JOINT_DIR,
}


def stage1_main(stage: Stage1Name, description: str, argv: Sequence[str] | None) -> None:
    parser = stage_parser(stage, description)
    parser.add_argument("--base", type=Path, default=paths.BASE_MODEL_DIR)
    parser.add_argument("--chunked", type=Path, default=paths.CHUNKED_DIR)
    parser.add_argument("--encoder-stage", type=Path, default=paths.STAGE1_ENCODER_DIR)
    parser.add_argument("--decoder-stage", type=Path, default=paths.STAGE1_DECODER_DIR)
    parser.add_argument("--out", type=Path, default=OUTPUTS[stage])
    parser.add_argument("--metrics", type=Path, default=paths.METRICS_DIR / f"{stage}.json")
    parser.add_argument("--loss-curve", type=Path, default=paths.PLOTS_DIR / f"{stage}_loss.csv")
    args = parser.parse_args(argv)
    inputs = Stage1Inputs(
        base_dir=args.base,
        chunked_dir=args.chunked,
        encoder_stage_dir=args.encoder_stage if stage != "train_encoder" else None,
        decoder_stage_dir=args.decoder_stage if stage == "train_joint" else None,
    )
    metrics = train_stage1(load_params(args.params), stage, inputs, args.out, args.metrics, args.loss_curve)
    if metrics is not None:
        print(f"{stage} -> {args.out}: {metrics}")
