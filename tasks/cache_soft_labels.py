"""Stage cache_soft_labels: the merged encoder's latent distributions (alpha) for each row, as Parquet."""

import sys
from pathlib import Path

from latent_sft_core import paths
from latent_sft_core.config import load_params
from latent_sft_core.soft_label_caching import cache_soft_labels
from latent_sft_core.stage_cli import run_cli, stage_parser


def main(argv=None) -> None:
    parser = stage_parser("cache_soft_labels", __doc__)
    parser.add_argument("--merged", type=Path, default=paths.STAGE1_MERGED_DIR)
    parser.add_argument("--chunked", type=Path, default=paths.CHUNKED_DIR)
    parser.add_argument("--out", type=Path, default=paths.SOFT_LABELS_DIR)
    parser.add_argument("--metrics", type=Path, default=paths.METRICS_DIR / "cache_soft_labels.json")
    args = parser.parse_args(argv)
    metrics = cache_soft_labels(load_params(args.params), args.merged, args.chunked, args.out, args.metrics)
    if metrics is not None:
        print(f"soft labels -> {args.out}: {metrics}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
