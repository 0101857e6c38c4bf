import pickle
from dataclasses import replace

import pyarrow.parquet as pq
import pytest
import torch

from bench.soft_label_cache import peak_memory_of_full_pass
from latent_sft_core.config import LatentParams
from latent_sft_core.errors import ArtifactError
from latent_sft_core.soft_embedding import SparseAlpha, alpha_from_logits
from latent_sft_core.soft_labels import (
    SoftLabelMeta,
    SoftLabelReader,
    SoftLabelWriter,
    bytes_per_latent,
    open_soft_labels,
    renormalise,
)

pytestmark = pytest.mark.unit

VOCAB = 128_256  # a Llama-3-sized vocabulary: ids need 17 bits, as in the paper's setting
K = 10
META = SoftLabelMeta(
    compression_rate=2,
    alpha_mode="topk",
    k=K,
    temperature=1.0,
    projection="input_embeddings",
    latent_kind="soft_embedding",
    tokenizer_fingerprint="tok-abc",
    encoder_fingerprint="enc-123",
    vocab_size=VOCAB,
)
RUN = dict(compression_rate=2, top_k=K, tokenizer_fingerprint="tok-abc", encoder_fingerprint="enc-123")


def sample_alpha(generator: torch.Generator, n: int, k: int = K, vocab: int = VOCAB):
    """Top-k alpha of n latents from random logits: (ids [n, k], probs [n, k])."""
    alpha = alpha_from_logits(torch.randn(n, vocab, generator=generator) * 3, top_k=k)
    return alpha.ids, alpha.probs


def fast_alpha(generator: torch.Generator, n: int, k: int = K):
    """Alpha-like rows without a vocabulary-sized softmax: random ids, sorted softmax probs [n, k]."""
    ids = torch.randint(0, VOCAB, (n, k), generator=generator)
    probs = torch.softmax((torch.randn(n, k, generator=generator) * 3).sort(dim=-1, descending=True).values, -1)
    return ids, probs


def write_cache(path, rows, n=8, meta=META, seed=0, **writer_args):
    """``rows`` rows of ``n`` latents each, generated in one go (per-row generation dominates otherwise)."""
    ids, probs = fast_alpha(torch.Generator().manual_seed(seed), rows * n)
    with SoftLabelWriter(path, meta, **writer_args) as writer:
        writer.write_alpha([f"row-{row}" for row in range(rows)], [n] * rows, SparseAlpha(ids, probs))
    return writer.meta


def test_round_trip_float16_and_float32(tmp_path):
    generator = torch.Generator().manual_seed(0)
    samples = {f"s{i}": sample_alpha(generator, n) for i, n in enumerate([3, 1, 5, 0, 2])}
    for dtype in ("float16", "float32"):
        path = tmp_path / f"{dtype}.parquet"
        with SoftLabelWriter(path, replace(META, prob_dtype=dtype), row_group_rows=2) as writer:
            writer.write_batch(list(samples), [s[0] for s in samples.values()], [s[1] for s in samples.values()])
        with SoftLabelReader(path) as reader:
            assert len(reader) == 5 and reader.ids() == list(samples)
            assert reader.meta == replace(META, prob_dtype=dtype, num_rows=5, num_latents=11)
            for index, (ids, probs) in enumerate(samples.values()):
                got_ids, got_probs = reader[index]
                assert got_ids.dtype == torch.int64 and got_probs.dtype == torch.float32
                assert torch.equal(got_ids, ids)
                if dtype == "float32":
                    assert torch.equal(got_probs, probs)
                else:
                    assert torch.equal(got_probs, probs.half().float())
                    assert torch.allclose(got_probs.sum(-1), torch.ones(len(probs)), atol=1e-3)
                    assert torch.allclose(renormalise(got_probs).sum(-1), torch.ones(len(probs)), atol=1e-6)


def test_rows_without_latents(tmp_path):
    path = tmp_path / "labels.parquet"
    with SoftLabelWriter(path, META) as writer:
        writer.write("empty", torch.zeros(0, K, dtype=torch.long), torch.zeros(0, K))
        writer.write("one", *fast_alpha(torch.Generator().manual_seed(1), 1))
        writer.write("empty-again", torch.zeros(0, K, dtype=torch.long), torch.zeros(0, K))
    reader = SoftLabelReader(path)
    assert reader.meta.num_latents == 1
    ids, probs = reader.by_id("empty-again")
    assert ids.shape == probs.shape == (0, K)
    assert reader[1][1].shape == (1, K)


def test_empty_cache(tmp_path):
    path = tmp_path / "labels.parquet"
    with SoftLabelWriter(path, META):
        pass
    reader = SoftLabelReader(path)
    assert len(reader) == 0 and reader.ids() == []
    with pytest.raises(IndexError):
        reader[0]
    with pytest.raises(ValueError, match="no latents"):
        bytes_per_latent(path)


def test_many_row_groups_random_access(tmp_path):
    path = tmp_path / "labels.parquet"
    generator = torch.Generator().manual_seed(2)
    samples = [fast_alpha(generator, n) for n in torch.randint(0, 6, (100,), generator=generator).tolist()]
    with SoftLabelWriter(path, META, row_group_rows=7) as writer:
        writer.write_batch([f"row-{i}" for i in range(100)], [s[0] for s in samples], [s[1] for s in samples])
    assert pq.ParquetFile(path).num_row_groups == 15
    reader = SoftLabelReader(path)
    order = torch.randperm(100, generator=generator).tolist()
    for index in order + [-1, -100]:
        ids, probs = reader[index]
        assert torch.equal(ids, samples[index][0]) and torch.equal(probs, samples[index][1].half().float())
    for index in order[:20]:
        assert torch.equal(reader.by_id(f"row-{index}")[0], samples[index][0])
    with pytest.raises(IndexError):
        reader[100]
    with pytest.raises(KeyError, match="row-100"):
        reader.by_id("row-100")
    clone = pickle.loads(pickle.dumps(reader))  # as a DataLoader worker receives it
    assert torch.equal(clone[42][0], samples[42][0])


def test_write_alpha_splits_a_flat_batch(tmp_path):
    path = tmp_path / "labels.parquet"
    alpha = alpha_from_logits(torch.randn(6, 50, generator=torch.Generator().manual_seed(3)), top_k=K)
    with SoftLabelWriter(path, replace(META, vocab_size=50)) as writer:
        writer.write_alpha(["a", "b", "c"], [2, 0, 4], alpha)
    reader = SoftLabelReader(path)
    assert torch.equal(reader.by_id("c")[0], alpha.ids[2:])
    assert reader.by_id("b")[0].shape == (0, K)


def test_full_vocabulary_round_trip(tmp_path):
    vocab = 300
    meta = SoftLabelMeta.for_run(
        LatentParams(full_vocab=True), compression_rate=2, top_k=K, vocab_size=vocab,
        tokenizer_fingerprint="tok-abc", encoder_fingerprint="enc-123",
    )
    assert (meta.alpha_mode, meta.k) == ("full", vocab)
    generator = torch.Generator().manual_seed(4)
    dense = [alpha_from_logits(torch.randn(n, vocab, generator=generator), top_k=None).probs for n in (2, 0, 3)]
    path = tmp_path / "full.parquet"
    with SoftLabelWriter(path, meta) as writer:
        writer.write_batch(["a", "b", "c"], [None] * 3, dense)
        with pytest.raises(ValueError, match="'d'.*ids=None"):
            writer.write("d", torch.zeros(1, vocab, dtype=torch.long), dense[0][:1])
    assert pq.read_table(path, columns=["token_ids"]).column(0).to_pylist() == [[], [], []]
    reader = open_soft_labels(path, **{**RUN, "top_k": None}, vocab_size=vocab)
    for index, probs in enumerate(dense):
        ids, got = reader[index]
        assert ids is None and torch.equal(got, probs.half().float())
    assert torch.allclose(reader[2][1].sum(-1), torch.ones(3), atol=1e-3)
    with pytest.raises(ArtifactError, match="alpha_mode=full.*alpha_mode=topk"):
        open_soft_labels(path, **RUN)


def test_hidden_state_targets_round_trip(tmp_path):
    """The hidden-state ablation stores each latent's hidden state: any real values, no ids, width d."""
    hidden_size = 6
    meta = SoftLabelMeta.for_run(
        LatentParams(kind="hidden_state"), compression_rate=2, top_k=K, vocab_size=VOCAB,
        tokenizer_fingerprint="tok-abc", encoder_fingerprint="enc-123", prob_dtype="float32", hidden_size=hidden_size,
    )
    assert (meta.alpha_mode, meta.k, meta.latent_kind) == ("hidden", hidden_size, "hidden_state")
    values = [torch.randn(n, hidden_size, generator=torch.Generator().manual_seed(n)) * 5 for n in (3, 0, 2)]
    path = tmp_path / "hidden.parquet"
    with SoftLabelWriter(path, meta) as writer:
        writer.write_batch(["a", "b", "c"], [None] * 3, values)
        with pytest.raises(ValueError, match="'d'.*ids=None"):
            writer.write("d", torch.zeros(1, hidden_size, dtype=torch.long), values[0][:1])
    reader = open_soft_labels(path, **RUN, latent_kind="hidden_state")
    for index, expected in enumerate(values):
        ids, got = reader[index]
        assert ids is None and torch.equal(got, expected)  # float32: exact; negative values kept
    with pytest.raises(ArtifactError, match="alpha_mode=hidden.*alpha_mode=topk"):
        open_soft_labels(path, **RUN)
    write_cache(tmp_path / "topk.parquet", 2)
    with pytest.raises(ArtifactError, match="alpha_mode=topk.*alpha_mode=hidden"):
        open_soft_labels(tmp_path / "topk.parquet", **RUN, latent_kind="hidden_state")
    with pytest.raises(ValueError, match="latent_kind 'soft_embedding' does not go with alpha_mode 'hidden'"):
        replace(meta, latent_kind="soft_embedding")


def test_metadata_round_trip():
    metadata = META.to_metadata()
    assert all(key.startswith(b"latent_sft.") for key in metadata)
    assert SoftLabelMeta.from_metadata(metadata) == META
    odd = replace(META, temperature=0.7, vocab_size=None, prob_dtype="float32", num_rows=3, num_latents=9)
    assert SoftLabelMeta.from_metadata(odd.to_metadata()) == odd
    with pytest.raises(ValueError, match="latent_sft.encoder_fingerprint is missing"):
        SoftLabelMeta.from_metadata({k: v for k, v in metadata.items() if k != b"latent_sft.encoder_fingerprint"})
    with pytest.raises(ValueError, match="format version 99"):
        SoftLabelMeta.from_metadata({**metadata, b"latent_sft.format_version": b"99"})
    with pytest.raises(ValueError, match="hidden_state"):
        replace(META, latent_kind="hidden_state")


def test_final_counts_reach_the_footer(tmp_path):
    path = tmp_path / "labels.parquet"
    meta = write_cache(path, rows=30, n=3, row_group_rows=8)
    assert (meta.num_rows, meta.num_latents) == (30, 90)
    footer = pq.read_metadata(path).metadata
    assert (footer[b"latent_sft.num_rows"], footer[b"latent_sft.num_latents"]) == (b"30", b"90")
    assert SoftLabelReader(path).meta == replace(META, num_rows=30, num_latents=90)
    # the schema written at open carries no (then unknown) counts, so nothing stale can be read from it
    assert b"latent_sft.num_rows" not in pq.read_schema(path).metadata


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"compression_rate": 4}, "compression_rate"),
        ({"top_k": 8}, "k"),
        ({"top_k": None}, "alpha_mode"),
        ({"tokenizer_fingerprint": "tok-other"}, "tokenizer_fingerprint"),
        ({"encoder_fingerprint": "enc-other"}, "encoder_fingerprint"),
        ({"vocab_size": 32000}, "vocab_size"),
        ({"temperature": 0.5}, "temperature"),
        ({"projection": "lm_head"}, "projection"),
    ],
)
def test_mismatched_cache_is_refused(tmp_path, change, field):
    path = tmp_path / "labels.parquet"
    write_cache(path, rows=2, n=1)
    cached = getattr(META, field)
    wanted = {"alpha_mode": "full", "k": 8}.get(field, next(iter(change.values())))
    with pytest.raises(ArtifactError) as error:
        open_soft_labels(path, **{**RUN, **change})
    message = str(error.value)
    assert str(path) in message and f"{field}={cached}" in message and f"{field}={wanted}" in message
    assert len(open_soft_labels(path, **RUN, vocab_size=VOCAB, temperature=1.0, projection="input_embeddings")) == 2


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "labels.parquet"
    with pytest.raises(RuntimeError, match="boom"):
        with SoftLabelWriter(path, META, row_group_rows=2) as writer:
            writer.write_batch(["a", "b", "c"], *zip(*[fast_alpha(torch.Generator(), 2) for _ in range(3)]))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    write_cache(path, rows=3, n=1)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="'bad'"):
        with SoftLabelWriter(path, META) as writer:
            writer.write("good", *fast_alpha(torch.Generator(), 1))
            writer.write("bad", None, torch.full((1, K), 0.1))
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == before


def test_truncated_or_corrupt_file_is_refused(tmp_path):
    path = tmp_path / "labels.parquet"
    write_cache(path, rows=40, n=4, row_group_rows=10)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated.parquet"):
        SoftLabelReader(truncated)
    corrupt = tmp_path / "corrupt.parquet"
    flipped = bytearray(data)
    flipped[100] ^= 0xFF  # inside the first row group's pages: the page CRC catches it
    corrupt.write_bytes(bytes(flipped))
    reader = SoftLabelReader(corrupt)
    with pytest.raises(ArtifactError, match="corrupt.parquet"):
        reader[0]
    with pytest.raises(ArtifactError, match="no soft-label file"):
        SoftLabelReader(tmp_path / "missing.parquet")
    miscounted = tmp_path / "miscounted.parquet"
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({**pq.read_metadata(path).metadata, b"latent_sft.num_rows": b"41"}), miscounted)
    with pytest.raises(ArtifactError, match="40 rows but the metadata records 41"):
        SoftLabelReader(miscounted)


def bad_inputs():
    ids, probs = fast_alpha(torch.Generator().manual_seed(5), 2)
    nan = probs.clone()
    nan[0, 0] = float("nan")
    return [
        (ids[:, :5], probs, "differ in shape"),
        (ids[:, :5], probs[:, :5], r"probs must be \[N, 10\]"),
        (ids, probs[0], r"probs must be \[N, 10\]"),
        (None, probs, "needs ids"),
        (ids.float(), probs, "integer tensor"),
        (ids.clone().fill_(VOCAB), probs, r"ids must be in \[0, 128256\)"),
        (ids - VOCAB, probs, r"ids must be in \[0, 128256\)"),
        (ids, nan, "NaN or inf"),
        (ids, probs - 0.5, "negative"),
        (ids, probs * 3, "sum to 1"),
    ]


@pytest.mark.parametrize(("ids", "probs", "problem"), bad_inputs())
def test_bad_input_is_refused_naming_the_sample(tmp_path, ids, probs, problem):
    with pytest.raises(ValueError, match=rf"sample 'row-7'.*{problem}"):
        with SoftLabelWriter(tmp_path / "labels.parquet", META) as writer:
            writer.write("row-7", ids, probs)
    assert not (tmp_path / "labels.parquet").exists()


def test_duplicate_ids_are_refused(tmp_path):
    with SoftLabelWriter(tmp_path / "labels.parquet", META) as writer:
        writer.write("row-7", *fast_alpha(torch.Generator(), 1))
        with pytest.raises(ValueError, match="'row-7'.*duplicate"):
            writer.write("row-7", *fast_alpha(torch.Generator(), 1))


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """A small and a 10x larger cache of N=8, k=10 rows with 17-bit ids (the benchmark's shape)."""
    root = tmp_path_factory.mktemp("caches")
    write_cache(root / "small.parquet", rows=2_000)
    write_cache(root / "big.parquet", rows=20_000, seed=1)
    return root / "small.parquet", root / "big.parquet"


def test_reading_memory_does_not_grow_with_the_cache(caches):
    small, big = caches
    peak_memory_of_full_pass(small)  # warm-up: first-use allocations of pyarrow and torch are not the cache's
    small_peak, big_peak = peak_memory_of_full_pass(small), peak_memory_of_full_pass(big)
    decoded_big = 20_000 * 8 * K * (4 + 2)  # what loading the big cache would hold
    # the big cache has 10x the rows: memory that grew with the data would be ~10x, flat memory stays near 1x
    assert big_peak <= 4 * small_peak, (small_peak, big_peak)
    assert big_peak < decoded_big / 10, (big_peak, decoded_big)


def test_bytes_per_latent_at_k10(caches):
    assert bytes_per_latent(caches[1]) <= 64
