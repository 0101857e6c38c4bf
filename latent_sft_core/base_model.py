"""The base_model stage: explicit CoT-SFT of the starting model (tiny config-built Llama or a local checkpoint).

The result starts phase 1 and is the CoT-SFT baseline of the evaluation. Tokenisation goes through the same
``chunk_examples`` as the chunk stage, but the stage reads the raw splits so that changing c does not retrain it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from latent_sft_core import paths
from latent_sft_core.chunking import ChunkedRow, chunk_examples
from latent_sft_core.config import DecodingParams, Params
from latent_sft_core.data.schema import read_examples
from latent_sft_core.distributed import World, compute_device
from latent_sft_core.errors import loud_warning
from latent_sft_core.inference import decode
from latent_sft_core.io import atomic_outputs, file_digest, write_json
from latent_sft_core.layout import cot_sft_sequence
from latent_sft_core.modeling import load_base_model, load_pretrained_model, save_model
from latent_sft_core.scoring import answer_text, pass_at_1
from latent_sft_core.text import TextFormat, load_tokenizer, pipeline_token_ids, special_ids, tokenizer_fingerprint
from latent_sft_core.training import (
    SCRATCH_ROOT,
    CausalLMCollator,
    CausalLMTrainer,
    EmbeddingRowsLearningRate,
    SequenceDataset,
    check_sequence_lengths,
    finish_scratch,
    run_fingerprint,
    run_training,
    save_whole_weights,
    write_loss_curve,
)

log = logging.getLogger(__name__)


def tokenized_split(params: Params, raw_file: Path, tokenizer) -> list[ChunkedRow]:
    return chunk_examples(
        read_examples(raw_file), tokenizer, TextFormat(params.base.text), params.base.compression_rate, raw_file.stem
    )


def train_base_model(
    params: Params,
    raw_dir: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    loss_curve_path: Path,
    scratch_dir: Path = SCRATCH_ROOT / "base_model",
    pretrained_dir: Path = paths.PRETRAINED_DIR,
) -> dict | None:
    """CoT-SFT on the train split, greedy exact-match on validation rows; rank 0 writes model, metrics, loss
    curve and returns the metrics (the other processes of a distributed run return None)."""
    section = params.base_model
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = special_ids(tokenizer)
    model = load_base_model(params.base.model, section.tiny, tokenizer, params.base.seed, pretrained_dir)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("base model: %s with %.2fM parameters", type(model).__name__, n_params / 1e6)

    # the rows of the tokens added to a pretrained vocabulary start from the mean embedding: say how far they moved
    added_ids = pipeline_token_ids(tokenizer) if params.base.model.source != "tiny" else []
    added_before = model.get_input_embeddings().weight.detach()[added_ids].clone()
    result = None
    if not section.skip_sft:
        train_file = Path(raw_dir) / "train.parquet"
        rows = tokenized_split(params, train_file, tokenizer)
        sequences = [cot_sft_sequence(row, ids, with_chain=section.reasoning == "cot") for row in rows]
        check_sequence_lengths(train_file, [r.id for r in rows], [len(s.input_ids) for s in sequences],
                               section.train.max_seq_len, "base_model.train.max_seq_len")
        fingerprint = run_fingerprint(
            params=params.base_model.model_dump(),
            base=params.base.model_dump(include={"seed", "model", "text"}),
            train=file_digest(train_file),
            tokenizer=tokenizer_fingerprint(tokenizer),
        )
        faster_rows = [EmbeddingRowsLearningRate(model, added_ids, section.new_token_lr / section.train.lr)
                       ] if added_ids and section.new_token_lr is not None else []
        result = run_training(
            model, SequenceDataset(sequences), CausalLMCollator(ids.pad), section.train, scratch_dir,
            params.base.seed, fingerprint, trainer_cls=CausalLMTrainer, callbacks=faster_rows,
            deepspeed=section.deepspeed, compute=params.compute,
        )

    if result is not None and result.zero_stage == 3:  # each process holds a partition: gather the weights whole
        model = load_pretrained_model(save_whole_weights(result, scratch_dir))
    model.to(compute_device(params.compute))  # where training left it; decoded in its training dtype, saved as is
    metrics = {"parameters": n_params, **validation_metrics(params, raw_dir, tokenizer, model)}
    if not World.from_environment().is_main:
        return None
    if added_ids:
        moved = (model.get_input_embeddings().weight.detach()[added_ids] - added_before).norm(dim=-1)
        metrics["added_token_rows_moved"] = {
            token: round(float(distance), 6) for token, distance in zip(tokenizer.convert_ids_to_tokens(added_ids), moved)}
    if result is not None:
        metrics |= result.summary()
    with atomic_outputs() as outputs:
        save_model(model, tokenizer, outputs.path(out_dir))
        write_json(outputs.path(metrics_path), metrics)
        if result is not None:
            write_loss_curve(outputs.path(loss_curve_path), result)
    if result is not None:
        finish_scratch(scratch_dir)
    return metrics


def validation_metrics(params: Params, raw_dir: Path, tokenizer, model) -> dict:
    """Greedy Pass@1 on the first ``eval_rows`` validation rows (a quick signal; evaluation is its own stage)."""
    section = params.base_model
    val_file = Path(raw_dir) / "val.parquet"
    if section.eval_rows == 0 or not val_file.is_file():
        return {}
    rows = tokenized_split(params, val_file, tokenizer)[: section.eval_rows]
    if not rows:
        return {}
    decoding = DecodingParams(batch_size=section.eval_batch_size, max_new_tokens=section.max_new_tokens)
    decoded = decode(model, [row.prompt_ids for row in rows], special_ids(tokenizer), decoding, latent=None)
    predictions = [answer_text(d, tokenizer) for d in decoded]
    closed_rate = sum(d.closed for d in decoded) / len(decoded)
    if closed_rate == 0:
        loud_warning(log, f"base_model: none of {len(rows)} validation answers closed the reasoning with </think> "
                     f"within base_model.max_new_tokens={section.max_new_tokens}: val_pass@1 is 0 because nothing "
                     "was scored. The </think> row has not been learnt: train longer, or raise base_model.new_token_lr "
                     "(a pretrained model's added tokens start from the mean embedding).")
    return {"val_rows": len(rows), "val_pass@1": round(pass_at_1(predictions, [row.answer for row in rows]), 4),
            "val_closed_rate": round(closed_rate, 4)}
