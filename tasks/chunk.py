"""Stage chunk: tokenise prompt, chain and answer; cut chains into c-token chunks; write stats as metrics."""

import sys
from pathlib import Path

from latent_sft_core import paths
from latent_sft_core.chunking import chunk_dataset
from latent_sft_core.config import load_params
from latent_sft_core.stage_cli import run_cli, stage_parser


def main(argv=None) -> None:
    parser = stage_parser("chunk", __doc__)
    parser.add_argument("--raw", type=Path, default=paths.RAW_DIR)
    parser.add_argument("--tokenizer", type=Path, default=paths.TOKENIZER_DIR)
    parser.add_argument("--out", type=Path, default=paths.CHUNKED_DIR)
    parser.add_argument("--metrics", type=Path, default=paths.METRICS_DIR / "chunk.json")
    args = parser.parse_args(argv)
    stats = chunk_dataset(load_params(args.params), args.raw, args.tokenizer, args.out, args.metrics)
    for split, values in stats.items():
        print(f"{split}: {values}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
