"""Soft-label cache: bytes per latent on disk, write throughput, and reader peak memory at 1x and 10x size.

Worst case for compression: top-10 ids drawn uniformly from a Llama-3-sized vocabulary (128,256), float16
probabilities, N = 8 latents per row. Writes its section of BENCHMARKS.md.

    python -m bench.soft_label_cache [--rows 20000]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
import tracemalloc
from pathlib import Path

import pyarrow as pa
import torch

from bench.report import machine_line, update_section
from latent_sft_core.config import LatentParams
from latent_sft_core.soft_labels import SoftLabelMeta, SoftLabelReader, SoftLabelWriter, bytes_per_latent

VOCAB, K, LATENTS_PER_ROW = 128_256, 10, 8


def write_cache(path: Path, rows: int, seed: int = 0) -> float:
    """Write ``rows`` rows of random top-k labels; return latents written per second."""
    meta = SoftLabelMeta.for_run(LatentParams(), compression_rate=2, top_k=K, vocab_size=VOCAB,
                                 tokenizer_fingerprint="bench", encoder_fingerprint="bench")
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    with SoftLabelWriter(path, meta) as writer:
        for row in range(rows):
            ids = torch.randint(0, VOCAB, (LATENTS_PER_ROW, K), generator=generator)
            probs = torch.softmax(torch.randn(LATENTS_PER_ROW, K, generator=generator), dim=-1)
            writer.write(f"row-{row}", ids, probs)
    return rows * LATENTS_PER_ROW / (time.perf_counter() - started)


def peak_memory_of_full_pass(path: Path) -> int:
    """Peak Python (tracemalloc) plus Arrow-pool bytes held while reading every row of ``path`` once."""
    reader = SoftLabelReader(path)
    gc.collect()
    arrow_base = pa.total_allocated_bytes()
    arrow_peak = 0
    tracemalloc.start()
    try:
        for index in range(len(reader)):
            reader[index]
            arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - arrow_base)
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return python_peak + arrow_peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000, help="rows of the 1x cache (10x is also measured)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-soft-labels-") as folder:
        for scale in (1, 10):
            path = Path(folder) / f"x{scale}.parquet"
            throughput = write_cache(path, args.rows * scale)
            results.append((scale, args.rows * scale, bytes_per_latent(path), throughput,
                            peak_memory_of_full_pass(path) / 2**20))
    table = "\n".join(f"| {s}x | {r:,} | {r * LATENTS_PER_ROW:,} | {b:.1f} | {t:,.0f} | {m:.2f} |"
                      for s, r, b, t, m in results)
    ratio = results[1][4] / results[0][4]
    update_section("soft_label_cache", f"""## Soft-label cache (Parquet)

`python -m bench.soft_label_cache` ({machine_line()}). Top-{K} ids uniform over {VOCAB:,} tokens (the worst
case for compression), float16 probabilities, {LATENTS_PER_ROW} latents per row, zstd.
Target: <= 64 bytes per latent at k = 10; reader memory flat in the cache size.

| size | rows | latents | bytes / latent | write latents / s | reader peak MiB (full pass) |
|---|---|---|---|---|---|
{table}

Reader peak at 10x / 1x: {ratio:.2f}.
""")
    print(table)


if __name__ == "__main__":
    main()
