"""The chunk stage: tokenise prompt, chain and answer separately and cut the chain into c-token chunks.

Chunked Parquet schema (one file per split, ``data/chunked/{split}.parquet``):

==============  ====================  ==========================================================
column          type                  meaning
==============  ====================  ==========================================================
id              string                row id from the raw data
question        string                the question as in the raw data
answer          string                the gold answer (for scoring)
prompt_ids      list<int32>           the rendered prompt (template applied), without ``<think>``
cot_ids         list<int32>           the chain t_1..t_L, without ``<think>`` / ``</think>``
answer_ids      list<int32>           the rendered answer, without the end token
chunk_bounds    list<int32>           0 = b_0 < b_1 < ... < b_N = L; chunk S_i = cot_ids[b_{i-1}:b_i]
num_chunks      int32                 N = ceil(L / c); 0 for an empty chain
alt_cot_ids     list<list<int32>>     alternative valid chains (empty unless the data provides them)
==============  ====================  ==========================================================

File metadata: ``latent_sft.compression_rate``, ``latent_sft.tokenizer`` (fingerprint) and
``latent_sft.text_template``, so a later stage can refuse data chunked for another run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from latent_sft_core.config import Params
from latent_sft_core.data.schema import Example, read_examples
from latent_sft_core.errors import ArtifactError
from latent_sft_core.io import atomic_outputs, write_json
from latent_sft_core.layout import cot_sft_sequence
from latent_sft_core.text import (
    SpecialIds,
    TextFormat,
    encode_batch,
    load_tokenizer,
    special_ids,
    tokenizer_fingerprint,
)

CHUNKED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("cot_ids", pa.list_(pa.int32())),
        ("answer_ids", pa.list_(pa.int32())),
        ("chunk_bounds", pa.list_(pa.int32())),
        ("num_chunks", pa.int32()),
        ("alt_cot_ids", pa.list_(pa.list_(pa.int32()))),
    ]
)
META_COMPRESSION_RATE = b"latent_sft.compression_rate"
META_TOKENIZER = b"latent_sft.tokenizer"
META_TEMPLATE = b"latent_sft.text_template"
TOKENIZE_BATCH = 4096


def chunk_bounds(length: int, compression_rate: int) -> list[int]:
    """Boundaries of fixed chunks of ``compression_rate`` tokens over ``length`` tokens; the last may be shorter.

    ``chunk_bounds(5, 2) == [0, 2, 4, 5]`` (N = 3); ``chunk_bounds(0, c) == [0]`` (N = 0).
    """
    if compression_rate < 1:
        raise ValueError(f"compression_rate must be >= 1, got {compression_rate}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    return [*range(0, length, compression_rate), length] if length else [0]


@dataclass(frozen=True)
class ChunkedRow:
    id: str
    question: str
    answer: str
    prompt_ids: list[int]
    cot_ids: list[int]
    answer_ids: list[int]
    chunk_bounds: list[int]
    alt_cot_ids: list[list[int]]

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_bounds) - 1

    def chunks(self) -> list[list[int]]:
        """S_1..S_N as lists of ids."""
        return [self.cot_ids[a:b] for a, b in zip(self.chunk_bounds, self.chunk_bounds[1:])]


def chunk_examples(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    text_format: TextFormat,
    compression_rate: int,
    description: str = "tokenising",
) -> list[ChunkedRow]:
    """Tokenise prompt, chain and answer of every example separately (batched) and chunk the chains."""
    rows: list[ChunkedRow] = []
    starts = range(0, len(examples), TOKENIZE_BATCH)
    for start in tqdm(starts, desc=description, unit="batch", disable=len(starts) < 2):
        batch = examples[start : start + TOKENIZE_BATCH]
        prompts = encode_batch(tokenizer, [text_format.prompt(e.question, tokenizer) for e in batch])
        chains = encode_batch(tokenizer, [e.cot for e in batch])
        answers = encode_batch(tokenizer, [text_format.answer(e.answer) for e in batch])
        for example, prompt_ids, cot_ids, answer_ids in zip(batch, prompts, chains, answers):
            rows.append(
                ChunkedRow(
                    id=example.id,
                    question=example.question,
                    answer=example.answer,
                    prompt_ids=prompt_ids,
                    cot_ids=cot_ids,
                    answer_ids=answer_ids,
                    chunk_bounds=chunk_bounds(len(cot_ids), compression_rate),
                    alt_cot_ids=encode_batch(tokenizer, list(example.alt_cots)),
                )
            )
    return rows


def rows_to_table(rows: Sequence[ChunkedRow], metadata: dict[bytes, bytes]) -> pa.Table:
    columns = {name: [getattr(row, name) for row in rows] for name in CHUNKED_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=CHUNKED_SCHEMA.with_metadata(metadata))


def read_chunked(path: Path | str, compression_rate: int | None = None, tokenizer_id: str | None = None) -> list[ChunkedRow]:
    """Read a chunked split; refuse it when its c or tokenizer differ from what the caller expects."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as error:
        raise ArtifactError(f"{path}: not a readable chunked Parquet file ({error}); rerun the chunk stage") from None
    missing = set(CHUNKED_SCHEMA.names) - set(table.column_names)
    if missing:
        raise ArtifactError(f"{path}: missing columns {sorted(missing)}; rerun the chunk stage")
    meta = table.schema.metadata or {}
    expected = {META_COMPRESSION_RATE: compression_rate, META_TOKENIZER: tokenizer_id}
    for key, want in expected.items():
        got = meta.get(key, b"").decode()
        if want is not None and got != str(want):
            raise ArtifactError(
                f"{path}: chunked with {key.decode()}={got or '?'} but this run expects {want}; rerun the chunk stage"
            )
    data = table.select([n for n in CHUNKED_SCHEMA.names if n != "num_chunks"]).to_pylist()
    return [ChunkedRow(**row) for row in data]


def chunk_dataset(params: Params, raw_dir: Path, tokenizer_dir: Path, out_dir: Path, metrics_path: Path) -> dict:
    """The chunk stage: every ``raw_dir/*.parquet`` split to ``out_dir/{split}.parquet`` plus stats."""
    raw_files = sorted(Path(raw_dir).glob("*.parquet"))
    if not raw_files:
        raise ArtifactError(f"{raw_dir}: no split files (*.parquet); run the prepare_data stage")
    tokenizer = load_tokenizer(tokenizer_dir)
    text_format = TextFormat(params.base.text)
    c = params.base.compression_rate
    metadata = {
        META_COMPRESSION_RATE: str(c).encode(),
        META_TOKENIZER: tokenizer_fingerprint(tokenizer).encode(),
        META_TEMPLATE: params.base.text.template.encode(),
    }
    stats: dict[str, dict[str, float]] = {}
    with atomic_outputs() as outputs:
        folder = outputs.folder(out_dir)
        for raw_file in raw_files:
            split = raw_file.stem
            rows = chunk_examples(read_examples(raw_file), tokenizer, text_format, c, description=split)
            pq.write_table(rows_to_table(rows, metadata), folder / f"{split}.parquet")
            stats[split] = split_stats(rows, special_ids(tokenizer))
        write_json(outputs.path(metrics_path), {"compression_rate": c, **stats})
    return stats


def split_stats(rows: Sequence[ChunkedRow], ids: SpecialIds) -> dict[str, float]:
    """Mean chain tokens, mean N, and the longest CoT-SFT sequence of a split."""
    count = max(len(rows), 1)
    return {
        "rows": len(rows),
        "mean_chain_tokens": round(sum(len(r.cot_ids) for r in rows) / count, 3),
        "mean_num_chunks": round(sum(r.num_chunks for r in rows) / count, 3),
        "max_cot_sft_tokens": max((len(cot_sft_sequence(r, ids).input_ids) for r in rows), default=0),
    }
