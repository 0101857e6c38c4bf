"""The user-facing ``latent-sft`` command. Each subcommand is a thin layer over a library function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from latent_sft_core.config import DEFAULT_PARAMS_PATH
from latent_sft_core.stage_cli import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latent-sft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    from latent_sft_core.data.convert import add_convert_command

    data = commands.add_parser("data", help="data set tools").add_subparsers(dest="data_command", required=True)
    add_convert_command(data)
    infer = commands.add_parser("infer", help="answer a question with a trained model and show its latent steps",
                                description=_infer.__doc__)
    infer.add_argument("--model", type=Path, required=True, help="model folder (models/latent, models/base, ...)")
    infer.add_argument("--params", type=Path, default=DEFAULT_PARAMS_PATH,
                       help="params file for the prompt template, alpha and decoding (default: %(default)s)")
    infer.add_argument("--explicit", action="store_true", help="decode explicit CoT (a CoT-SFT model)")
    infer.add_argument("--top", type=int, default=5, help="tokens shown per latent step (default: %(default)s)")
    infer.add_argument("question")
    infer.set_defaults(handler=_infer)
    return parser


def _infer(args: argparse.Namespace) -> None:
    """Answer QUESTION; print each latent step's top tokens with their probabilities, then the answer."""
    from latent_sft_core.config import Params, load_params
    from latent_sft_core.evaluation import answer_question, describe
    from latent_sft_core.modeling import load_model

    params = load_params(args.params) if args.params.is_file() else Params()
    model, tokenizer = load_model(args.model)
    decoded = answer_question(params, model, tokenizer, args.question, args.explicit, max(args.top, 1))
    print(describe(decoded, tokenizer))


def _dispatch(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    args.handler(args)


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run_cli(_dispatch, argv))
