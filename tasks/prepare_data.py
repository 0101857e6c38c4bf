"""Stage prepare_data: read the configured data source and write data/raw/{split}.parquet plus report.json."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from latent_sft_core.config import load_params
from latent_sft_core.data.prepare import prepare_data
from latent_sft_core.paths import RAW_DIR
from latent_sft_core.stage_cli import run_cli, stage_parser

log = logging.getLogger("latent_sft.prepare_data")


def main(argv: Sequence[str] | None = None) -> None:
    parser = stage_parser("prepare_data", __doc__)
    parser.add_argument("--out", type=Path, default=RAW_DIR, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    report = prepare_data(params, args.out)
    log.info("source %s -> %s", report.source, args.out)
    for split_report in report.splits.values():
        log.info("%s", split_report.summary())


if __name__ == "__main__":
    sys.exit(run_cli(main))
