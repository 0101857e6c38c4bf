"""The raw row schema: what ``prepare_data`` writes to ``data/raw/{split}.parquet`` and every later stage reads.

One Parquet file per split, one row per problem, every column required (no nulls):

=========  ==================  ========================================================================
column     type                meaning
=========  ==================  ========================================================================
id         string              unique within the split; from the source's id column, else
                               ``{split}-{line}`` (file sources) or ``{split}-{index}`` (synthetic)
split      string              the split the row belongs to (train, val, test, or an evaluation-only
                               name such as hard / reworded / two_step)
question   string              the problem text
cot        string              the reasoning chain. GSM8k-Aug style: calculator steps such as
                               ``<<48/2=24>> <<48+24=72>>`` separated by single spaces; may be empty
answer     string              the final answer exactly as the source gives it (``"18"``, ``"1,450,000"``)
source     string              where the row came from: synthetic / gsm8k_aug_txt / jsonl / hub
alt_cots   list<string>        other valid chains for the same problem (same answer, every step
                               correct); empty except where the synthetic evaluation splits fill it
=========  ==================  ========================================================================

Values are kept as in the source except for leading and trailing whitespace, so a converted file can be
compared with its origin line by line.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from latent_sft_core.errors import DataError
from latent_sft_core.io import atomic_path

RAW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("cot", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("alt_cots", pa.list_(pa.string()), nullable=False),
    ]
)


@dataclass(frozen=True)
class Example:
    """One row of the raw schema (see the module docstring for the meaning of each field)."""

    id: str
    split: str
    question: str
    cot: str
    answer: str
    source: str
    alt_cots: tuple[str, ...] = ()


def write_examples(path: Path | str, examples: Iterable[Example]) -> int:
    """Write ``examples`` as one Parquet file in ``RAW_SCHEMA``, atomically; return the number of rows."""
    rows = list(examples)
    columns = {name: [getattr(row, name) for row in rows] for name in RAW_SCHEMA.names}
    columns["alt_cots"] = [list(alt) for alt in columns["alt_cots"]]
    table = pa.Table.from_pydict(columns, schema=RAW_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return len(rows)


def read_examples(path: Path | str) -> list[Example]:
    """Read a Parquet file written in ``RAW_SCHEMA``; a DataError names the file when it is not one."""
    path = Path(path)
    if not path.exists():
        present = sorted(p.stem for p in path.parent.glob("*.parquet")) if path.parent.is_dir() else []
        why = "; a data set without a train file can only be evaluated" if path.stem == "train" else ""
        raise DataError(f"{path}: no such split (the folder has: {', '.join(present) or 'none'}){why}")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    if _columns(table.schema) != _columns(RAW_SCHEMA):
        raise DataError(
            f"{path}: columns do not match the raw schema "
            f"(expected {_describe(RAW_SCHEMA)}; got {_describe(table.schema)})"
        )
    for name in RAW_SCHEMA.names:
        if table.column(name).null_count:
            raise DataError(f"{path}: column '{name}' has null values")
    columns = table.to_pydict()
    return [
        Example(
            id=columns["id"][index],
            split=columns["split"][index],
            question=columns["question"][index],
            cot=columns["cot"][index],
            answer=columns["answer"][index],
            source=columns["source"][index],
            alt_cots=tuple(columns["alt_cots"][index]),
        )
        for index in range(table.num_rows)
    ]


def _columns(schema: pa.Schema) -> list[tuple[str, pa.DataType]]:
    # names and types only: nullability and metadata may differ in files written by other tools
    return [(field.name, field.type) for field in schema]


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{name}: {kind}" for name, kind in _columns(schema))
