"""Stage train_latent (stage 2): KL on the latent slots + CE on the answer, through DeepSpeed ZeRO.

One process by default; several as params.yaml's `launch` section says (dvc.yaml starts every stage through
`latent_sft_core.launcher`), or by hand with `torchrun --nproc_per_node N -m tasks.train_latent` or
`deepspeed --num_gpus N tasks/train_latent.py` (rank 0 writes the outputs).
"""

import argparse
import sys
from pathlib import Path

from latent_sft_core import paths
from latent_sft_core.config import load_params
from latent_sft_core.phase2_training import train_latent
from latent_sft_core.stage_cli import run_cli, stage_parser


def main(argv=None) -> None:
    parser = stage_parser("train_latent", __doc__)
    parser.add_argument("--merged", type=Path, default=paths.STAGE1_MERGED_DIR)
    parser.add_argument("--chunked", type=Path, default=paths.CHUNKED_DIR)
    parser.add_argument("--soft-labels", type=Path, default=paths.SOFT_LABELS_DIR)
    parser.add_argument("--out", type=Path, default=paths.LATENT_MODEL_DIR)
    parser.add_argument("--metrics", type=Path, default=paths.METRICS_DIR / "train_latent.json")
    parser.add_argument("--loss-curve", type=Path, default=paths.PLOTS_DIR / "train_latent_loss.csv")
    # the deepspeed launcher passes --local_rank; LOCAL_RANK in the environment is what is used
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    metrics = train_latent(load_params(args.params), args.merged, args.chunked, args.soft_labels, args.out,
                           args.metrics, args.loss_curve)
    if metrics is not None:
        print(f"train_latent -> {args.out}: {metrics}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
