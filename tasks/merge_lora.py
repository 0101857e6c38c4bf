"""Stage merge_lora: merge the phase-1 adapters into plain Hugging Face encoder and decoder checkpoints."""

import sys
from pathlib import Path

from latent_sft_core import paths
from latent_sft_core.phase1_training import merge_stage1
from latent_sft_core.stage_cli import run_cli, stage_parser


def main(argv=None) -> None:
    parser = stage_parser("merge_lora", __doc__)
    parser.add_argument("--base", type=Path, default=paths.BASE_MODEL_DIR)
    parser.add_argument("--encoder-stage", type=Path, default=paths.STAGE1_ENCODER_DIR)
    parser.add_argument("--decoder-stage", type=Path, default=paths.STAGE1_DECODER_DIR)
    parser.add_argument("--joint-stage", type=Path, default=paths.STAGE1_JOINT_DIR)
    parser.add_argument("--out", type=Path, default=paths.STAGE1_MERGED_DIR)
    args = parser.parse_args(argv)
    merge_stage1(args.base, args.encoder_stage, args.decoder_stage, args.joint_stage, args.out)
    print(f"merged encoder and decoder -> {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
