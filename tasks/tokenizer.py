"""Stage tokenizer: train the embedded tokenizer on the train split, or extend a real model's own tokenizer."""

import sys
from pathlib import Path

from latent_sft_core import paths
from latent_sft_core.config import load_params
from latent_sft_core.stage_cli import run_cli, stage_parser
from latent_sft_core.text import build_tokenizer


def main(argv=None) -> None:
    parser = stage_parser("tokenizer", __doc__)
    parser.add_argument("--raw", type=Path, default=paths.RAW_DIR)
    parser.add_argument("--pretrained", type=Path, default=paths.PRETRAINED_DIR)
    parser.add_argument("--out", type=Path, default=paths.TOKENIZER_DIR)
    args = parser.parse_args(argv)
    tokenizer = build_tokenizer(load_params(args.params), args.raw, args.out, args.pretrained)
    print(f"tokenizer: {len(tokenizer)} tokens -> {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
