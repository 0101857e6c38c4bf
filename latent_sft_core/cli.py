"""The user-facing ``latent-sft`` command. Each subcommand is a thin layer over a library function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from latent_sft_core.stage import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latent-sft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    from latent_sft_core.data.convert import add_convert_command

    data = commands.add_parser("data", help="data set tools").add_subparsers(dest="data_command", required=True)
    add_convert_command(data)
    return parser


def _dispatch(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    args.handler(args)


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run_cli(_dispatch, argv))
