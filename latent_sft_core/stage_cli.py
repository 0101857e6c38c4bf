"""What every stage CLI shares: argument parsing, logging, and turning PipelineErrors into one clear line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from latent_sft_core.config import DEFAULT_PARAMS_PATH
from latent_sft_core.distributed import World, close_process_group
from latent_sft_core.errors import PipelineError

log = logging.getLogger("latent_sft")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def stage_parser(name: str, description: str | None) -> argparse.ArgumentParser:
    """An argparse parser with the options every stage takes (``--params``)."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{name}", description=description)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS_PATH, help="params file (default: %(default)s)")
    return parser


def run_cli(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> int:
    """Run a CLI entry point; a PipelineError becomes 'error: <message>' on stderr and exit status 2."""
    setup_logging()
    try:
        main(argv)
        close_process_group()
        if World.from_environment().size > 1:
            end_process_now()
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def end_process_now() -> None:
    """End a finished process of a distributed stage with status 0, without the interpreter's teardown.

    Its work is done, its outputs written and its process group closed; what the teardown would still destroy
    (DeepSpeed's engine and communication objects, gloo's threads) can abort the process at exit. Seen in CI:
    rank 1 of a 2-process train_joint under ZeRO-3 ended with "terminate called without an active exception"
    (SIGABRT) after both ranks had finished, and torchrun failed the stage."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
