"""Stage train_encoder: LoRA on the latent token encoder (new latent-token row trainable); decoder frozen."""

import sys
from functools import partial

from latent_sft_core.stage_cli import run_cli
from tasks._phase1_training_cli import stage1_main

main = partial(stage1_main, "train_encoder", __doc__)

if __name__ == "__main__":
    sys.exit(run_cli(main))
