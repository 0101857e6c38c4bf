"""Stage evaluate: the CoT-SFT baseline and the latent model on every evaluation split (Pass@1, #L, ECR@K, N_eff)."""

import sys
from pathlib import Path

from latent_sft_core import paths
from latent_sft_core.config import load_params
from latent_sft_core.evaluation import EvaluationOutputs, evaluate
from latent_sft_core.stage_cli import run_cli, stage_parser


def main(argv=None) -> None:
    parser = stage_parser("evaluate", __doc__)
    parser.add_argument("--chunked", type=Path, default=paths.CHUNKED_DIR)
    parser.add_argument("--cot-sft", type=Path, default=paths.BASE_MODEL_DIR, help="the CoT-SFT model")
    parser.add_argument("--latent-sft", type=Path, default=paths.LATENT_MODEL_DIR, help="the stage-2 model")
    parser.add_argument("--phase1", type=Path, default=paths.STAGE1_MERGED_DIR,
                        help="the merged phase-1 models (teacher latents, phase-1 ceiling)")
    parser.add_argument("--no-phase1", action="store_true",
                        help="no phase-1 models (a model trained elsewhere): Pass@1 and #L without the diagnostics")
    parser.add_argument("--metrics", type=Path, default=paths.METRICS_DIR / "evaluate.json")
    parser.add_argument("--report", type=Path, default=paths.METRICS_DIR / "report.md")
    parser.add_argument("--predictions", type=Path, default=paths.RESULTS_DIR / "predictions.parquet")
    parser.add_argument("--ecr-plot", type=Path, default=paths.PLOTS_DIR / "ecr_at_k.csv")
    parser.add_argument("--heatmap-plot", type=Path, default=paths.PLOTS_DIR / "latent_top_tokens.json")
    args = parser.parse_args(argv)
    outputs = EvaluationOutputs(args.metrics, args.report, args.predictions, args.ecr_plot, args.heatmap_plot)
    results = evaluate(load_params(args.params), args.chunked, {"cot_sft": args.cot_sft, "latent_sft": args.latent_sft}, outputs,
             phase1_dir=None if args.no_phase1 else args.phase1)
    if results is not None:
        print(outputs.report.read_text(encoding="utf-8"))


if __name__ == "__main__":
    sys.exit(run_cli(main))
