"""Run by tests/integration/test_distributed.py under torchrun: the encoder's latents of a few validation rows
from models DeepSpeed ZeRO-3 has partitioned (every weight, outside any forward: the health pass), against the
same models whole. Argv: the micro run's folder, its params as JSON, the file rank 0 writes the comparison to."""

from __future__ import annotations

import faulthandler
import json
import sys
from pathlib import Path

import deepspeed
import torch

from latent_sft_core.chunking import read_chunked
from latent_sft_core.config import Params
from latent_sft_core.distributed import World, close_process_group, ensure_distributed_env, partitioned
from latent_sft_core.modeling import load_pretrained_model
from latent_sft_core.phase1_model import Stage1Model, encode_rows
from latent_sft_core.stage_cli import end_process_now
from latent_sft_core.text import load_tokenizer, special_ids

ROWS, BATCH_SIZE = 5, 2  # three batches: an odd number, which two processes cannot share out evenly


def main(root: Path, params: Params, out: Path) -> None:
    faulthandler.dump_traceback_later(300, exit=True)  # a deadlock fails in minutes, with every stack
    ensure_distributed_env()
    deepspeed.init_distributed("gloo")
    ids = special_ids(load_tokenizer(root / "base"))
    rows = read_chunked(root / "chunked" / "val.parquet", params.base.compression_rate)[:ROWS]

    def alphas(encoder, decoder) -> list[torch.Tensor]:
        return [latents.alpha.probs for _, latents in
                encode_rows(encoder, decoder, params.latent, params.base.top_k, rows, ids, BATCH_SIZE)]

    whole = load_pretrained_model(root / "base")
    expected = alphas(whole, whole)
    encoder, decoder = load_pretrained_model(root / "base"), load_pretrained_model(root / "base")
    config = {"train_micro_batch_size_per_gpu": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    deepspeed.initialize(model=Stage1Model(encoder, decoder, params.latent, params.base.top_k), config=config)
    embeddings = decoder.get_input_embeddings().weight
    before = {"partitioned": bool(partitioned([embeddings])), "numel": embeddings.numel()}
    with torch.no_grad():
        got = alphas(encoder.eval(), decoder.eval())
    if World.from_environment().is_main:
        difference = max(float((a - b).abs().max()) for a, b in zip(got, expected))
        out.write_text(json.dumps({"embeddings_before": before, "batches": [len(got), len(expected)],
                                   "max_difference": difference}))
    close_process_group()
    end_process_now()  # as a stage ends (stage_cli): DeepSpeed's teardown can abort a finished process


if __name__ == "__main__":
    main(Path(sys.argv[1]), Params.model_validate_json(sys.argv[2]), Path(sys.argv[3]))
