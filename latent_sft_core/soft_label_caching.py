"""The cache_soft_labels stage: the merged encoder's alpha for every latent of every row, as Parquet.

(For the hidden-state ablation, ``latent.kind: hidden_state``, the encoder's hidden state of every latent.)

One packed encoder forward (induction mask) per batch; the top-k (or full) alpha at the LATENT positions is
streamed into ``data/soft_labels/{split}.parquet`` (schema: ``latent_sft_core/soft_labels.py``). The file
metadata names c, k, the alpha settings and fingerprints of the tokenizer and of the encoder, so stage 2
refuses labels made for another run.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from latent_sft_core.chunking import read_chunked
from latent_sft_core.config import Params, check_top_k
from latent_sft_core.distributed import process_group
from latent_sft_core.errors import ArtifactError
from latent_sft_core.io import atomic_outputs, write_json
from latent_sft_core.latent_health import AlphaHealth, report_health
from latent_sft_core.modeling import for_inference, load_pretrained_model
from latent_sft_core.phase1_model import encode_rows
from latent_sft_core.soft_embedding import SparseAlpha
from latent_sft_core.soft_labels import SoftLabelMeta, SoftLabelWriter, bytes_per_latent
from latent_sft_core.text import load_tokenizer, special_ids, tokenizer_fingerprint
from latent_sft_core.training import dir_digest

log = logging.getLogger(__name__)


def encoder_fingerprint(merged_dir: Path) -> str:
    """Identity of the merged stage-1 encoder, recorded in the labels and checked by stage 2."""
    return dir_digest(Path(merged_dir) / "encoder")[:16]


@torch.no_grad()
def cache_soft_labels(params: Params, merged_dir: Path, chunked_dir: Path, out_dir: Path, metrics_path: Path) -> dict | None:
    """Write the soft labels of every split in ``cache_soft_labels.splits``; returns and writes metrics (rank 0;
    the other processes of a distributed run return None)."""
    section = params.cache_soft_labels
    merged_dir = Path(merged_dir)
    tokenizer = load_tokenizer(merged_dir / "encoder")
    ids = special_ids(tokenizer)
    encoder = for_inference(load_pretrained_model(merged_dir / "encoder"), params.compute)
    decoder = for_inference(load_pretrained_model(merged_dir / "decoder"), params.compute)
    check_top_k(params, decoder.get_input_embeddings().num_embeddings, merged_dir / "decoder")
    meta = SoftLabelMeta.for_run(
        params.latent,
        compression_rate=params.base.compression_rate,
        top_k=params.base.top_k,
        vocab_size=decoder.get_input_embeddings().num_embeddings,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        encoder_fingerprint=encoder_fingerprint(merged_dir),
        prob_dtype=section.prob_dtype,
        hidden_size=decoder.config.hidden_size,
    )
    with process_group() as world, atomic_outputs() if world.is_main else nullcontext() as outputs:
        # under several processes every process encodes its share of the batches and rank 0 writes them all
        labels_dir = outputs.folder(out_dir) if world.is_main else None
        metrics = {split: _cache_split(params, Path(chunked_dir) / f"{split}.parquet", meta, encoder, decoder, ids,
                                       None if labels_dir is None else labels_dir / f"{split}.parquet")
                   for split in section.splits}
        if not world.is_main:
            return None
        write_json(outputs.path(metrics_path), metrics)
    return metrics


def _cache_split(params: Params, source: Path, meta: SoftLabelMeta, encoder, decoder, ids, out_file: Path | None) -> dict:
    """Encode one chunked split; write its soft labels to ``out_file`` (None: compute only, on ranks other than 0)
    and return its metrics."""
    section = params.cache_soft_labels
    split = source.stem
    if not source.is_file():
        raise ArtifactError(f"{source}: no such chunked split (cache_soft_labels.splits names '{split}')")
    rows = read_chunked(source, params.base.compression_rate, meta.tokenizer_fingerprint)[: section.max_rows]
    started = time.perf_counter()
    health = AlphaHealth(params.base.top_k)
    with SoftLabelWriter(out_file, meta, section.row_group_rows) if out_file is not None else nullcontext() as writer:
        batches = encode_rows(encoder, decoder, params.latent, params.base.top_k, rows, ids, section.batch_size)
        total = -(-len(rows) // section.batch_size)
        for batch, latents in tqdm(batches, total=total, desc=f"soft labels {split}", unit="batch"):
            if writer is not None:
                # the hidden-state ablation's targets are the hidden states themselves (hidden mode, no ids)
                targets = SparseAlpha(ids=None, probs=latents.hidden) if latents.alpha is None else latents.alpha
                writer.write_alpha([row.id for row in batch], [row.num_chunks for row in batch], targets)
            if params.latent.kind == "soft_embedding":
                health.update(latents.alpha, [chunk for row in batch for chunk in row.chunks()])
    seconds = time.perf_counter() - started
    latents_total = sum(row.num_chunks for row in rows)
    metrics = {
        "rows": len(rows),
        "latents": latents_total,
        "bytes_per_latent": round(bytes_per_latent(out_file), 2) if latents_total and out_file is not None else None,
        "latents_per_second": round(latents_total / seconds, 1) if seconds else None,
    }
    if params.latent.kind == "soft_embedding":
        metrics["latent_health"] = health.summary(params.collapse_guard)
        if out_file is not None:
            report_health(f"cache_soft_labels {split}", metrics["latent_health"], params.collapse_guard)
    log.info("%s: %s", split, metrics)
    return metrics
