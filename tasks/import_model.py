"""Stage import_model: the pretrained model of base.model (a local checkpoint, a GGUF file or a Hub repository)
as a Hugging Face checkpoint, with a manifest of what was read in models/pretrained (only the manifest for tiny)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from latent_sft_core.config import load_params
from latent_sft_core.model_import import import_model
from latent_sft_core.paths import PRETRAINED_DIR
from latent_sft_core.stage_cli import run_cli, stage_parser

log = logging.getLogger("latent_sft.import_model")


def main(argv: Sequence[str] | None = None) -> None:
    parser = stage_parser("import_model", __doc__)
    parser.add_argument("--out", type=Path, default=PRETRAINED_DIR, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    manifest, imported = import_model(load_params(args.params).base.model, args.out)
    log.info("model source %s -> %s (%s)", manifest["source"], args.out, "imported" if imported else "up to date")


if __name__ == "__main__":
    sys.exit(run_cli(main))
