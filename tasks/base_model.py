"""Stage base_model: explicit CoT-SFT of the starting model (tiny config-built Llama, or a local checkpoint)."""

import sys
from pathlib import Path

from latent_sft_core import paths
from latent_sft_core.base_model import train_base_model
from latent_sft_core.config import load_params
from latent_sft_core.stage_cli import run_cli, stage_parser


def main(argv=None) -> None:
    parser = stage_parser("base_model", __doc__)
    parser.add_argument("--raw", type=Path, default=paths.RAW_DIR)
    parser.add_argument("--tokenizer", type=Path, default=paths.TOKENIZER_DIR)
    parser.add_argument("--pretrained", type=Path, default=paths.PRETRAINED_DIR)
    parser.add_argument("--out", type=Path, default=paths.BASE_MODEL_DIR)
    parser.add_argument("--metrics", type=Path, default=paths.METRICS_DIR / "base_model.json")
    parser.add_argument("--loss-curve", type=Path, default=paths.PLOTS_DIR / "base_model_loss.csv")
    args = parser.parse_args(argv)
    metrics = train_base_model(load_params(args.params), args.raw, args.tokenizer, args.out, args.metrics,
                               args.loss_curve, pretrained_dir=args.pretrained)
    if metrics is not None:
        print(f"base model -> {args.out}: {metrics}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
