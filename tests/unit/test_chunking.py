import math
from functools import partial

import pyarrow.parquet as pq
import pytest
import torch

from latent_sft_core.chunking import chunk_bounds, read_chunked, rows_to_table, split_stats
from latent_sft_core.errors import ArtifactError
from latent_sft_core.layout import IGNORE_INDEX, cot_sft_sequence, labels_from_roles, pad_sequences
from latent_sft_core.masks import Role
from tests.support import SPECIAL_IDS, chunked_row

pytestmark = pytest.mark.unit

IDS = SPECIAL_IDS


@pytest.mark.parametrize(
    ("length", "c", "expected"),
    [
        (0, 4, [0]),  # empty chain: N = 0
        (3, 4, [0, 3]),  # L < c: one short chunk
        (8, 4, [0, 4, 8]),  # L = k*c: all chunks full
        (9, 4, [0, 4, 8, 9]),  # remainder chunk of one token
        (5, 1, [0, 1, 2, 3, 4, 5]),  # c = 1: a latent per token
        (1, 2, [0, 1]),
    ],
)
def test_chunk_bounds_edge_cases(length, c, expected):
    bounds = chunk_bounds(length, c)
    assert bounds == expected
    assert len(bounds) - 1 == math.ceil(length / c)
    assert all(0 < b - a <= c for a, b in zip(bounds, bounds[1:]))


def test_chunk_bounds_rejects_bad_arguments():
    with pytest.raises(ValueError):
        chunk_bounds(3, 0)
    with pytest.raises(ValueError):
        chunk_bounds(-1, 2)


make_row = partial(chunked_row, answer=(12,), row_id="r1")


def test_chunks_cover_the_chain_in_order():
    row = make_row([20, 21, 22, 23, 24], c=2)
    assert row.chunks() == [[20, 21], [22, 23], [24]]
    assert row.num_chunks == 3
    assert make_row([]).chunks() == [] and make_row([]).num_chunks == 0


def test_cot_sft_sequence_and_roles():
    sequence = cot_sft_sequence(make_row([20, 21, 22]), IDS)
    assert sequence.input_ids == [10, 11, 2, 20, 21, 22, 3, 12, 1]
    P, C, A = Role.PROMPT, Role.CHUNK, Role.ANSWER
    assert sequence.roles == [P, P, P, C, C, C, A, A, A]
    empty = cot_sft_sequence(make_row([]), IDS)
    assert empty.input_ids == [10, 11, 2, 3, 12, 1]
    assert empty.roles == [P, P, P, A, A, A]
    no_cot = cot_sft_sequence(make_row([20, 21, 22]), IDS, with_chain=False)  # the no-CoT baseline's layout
    assert no_cot.input_ids == empty.input_ids and no_cot.roles == empty.roles


def test_padding_and_labels_from_roles():
    batch = pad_sequences([cot_sft_sequence(make_row([20, 21]), IDS), cot_sft_sequence(make_row([]), IDS)], IDS.pad)
    assert batch["input_ids"].tolist() == [[10, 11, 2, 20, 21, 3, 12, 1], [10, 11, 2, 3, 12, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 6 + [0, 0]]
    assert batch["roles"][1, 6:].tolist() == [Role.PAD, Role.PAD]
    labels = labels_from_roles(batch["input_ids"], batch["roles"])
    I = IGNORE_INDEX
    assert labels.tolist() == [[I, I, I, 20, 21, 3, 12, 1], [I, I, I, 3, 12, 1, I, I]]
    assert labels.dtype == torch.long


def test_chunked_parquet_round_trip_and_metadata_checks(tmp_path):
    rows = [make_row([20, 21, 22], row_id="a", alt=[[22, 21, 20]]), make_row([], row_id="b")]
    path = tmp_path / "test.parquet"
    meta = {b"latent_sft.compression_rate": b"2", b"latent_sft.tokenizer": b"abc"}
    pq.write_table(rows_to_table(rows, meta), path)
    assert read_chunked(path, compression_rate=2, tokenizer_id="abc") == rows
    assert pq.read_table(path).column("num_chunks").to_pylist() == [2, 0]
    with pytest.raises(ArtifactError, match="compression_rate=2 but this run expects 4"):
        read_chunked(path, compression_rate=4)
    with pytest.raises(ArtifactError, match="tokenizer=abc but this run expects xyz"):
        read_chunked(path, tokenizer_id="xyz")


def test_read_chunked_refuses_garbage(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(ArtifactError, match="bad.parquet"):
        read_chunked(path)


def test_split_stats():
    stats = split_stats([make_row([1, 2, 3, 4, 5], c=2), make_row([1], c=2)], IDS)
    assert stats == {"rows": 2, "mean_chain_tokens": 3.0, "mean_num_chunks": 2.0, "max_cot_sft_tokens": 11}
