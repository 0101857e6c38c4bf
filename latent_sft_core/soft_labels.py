"""The soft-label cache: the encoder's alpha for every latent of every training row, in one Parquet file.

Stage 2 needs, per training row, the distribution alpha of each of its N latents (``soft_embedding.py``). The
reference pickles a Python list of ``(probs bf16, indices int64)`` tuples and unpickles all of it at start-up
(method notes 5.1, 10 item 16); here the labels are one memory-mapped Parquet file read by row group, so a
reader's memory does not grow with the data set.

Soft-label Parquet schema (one row per sample, in the order written):

==============  ====================  ==============================================================
column          type                  meaning
==============  ====================  ==============================================================
id              string                the sample's row id (as in the chunked data); unique
num_latents     int32                 N, the sample's latents (may be 0)
token_ids       list<int32>           top-k mode: N*k vocabulary ids, latent-major (latent 0's k ids,
                                      then latent 1's, ...); full and hidden modes: empty
probs           list<float16|float32> N*k probabilities in the same order; full mode: N*V values,
                                      value j of a latent is the probability of vocabulary id j;
                                      hidden mode: N*d values, each latent's hidden state
==============  ====================  ==============================================================

Hidden mode serves the paper's hidden-state ablation (``latent.kind: hidden_state``): the encoder's final
hidden state of each latent (what phase 1 fed the decoder) is the stage-2 target instead of alpha; k is then
the hidden size d, and the values are not probabilities (no sum or sign checks).

Probabilities are stored as given (alpha is already normalised over its k ids) and read back as float32
without renormalising. Rounding to float16 changes every value p by at most ``max(2^-11 p, 2^-25)``
(11 significant bits, i.e. about 3 decimal digits; subnormals below 2^-14), so a latent's stored sum differs
from its true sum by at most ``2^-11 + K * 2^-25`` for K values per latent: under 5e-4 at k = 10, under
4.4e-3 for a dense 128k vocabulary (tail mass below 2^-25 becomes 0). ``renormalise`` restores exact sums
for a consumer that needs them; ``prob_dtype="float32"`` stores the values exactly.

File metadata (Parquet key-value metadata, keys ``latent_sft.<field>`` of ``SoftLabelMeta`` plus
``latent_sft.format_version``): c, alpha mode, k (top-k, or V in full mode), vocabulary size when known,
temperature, projection, latent kind, probability dtype, tokenizer and encoder fingerprints, and the row and
latent counts. The counts are known only when the writer closes: they are added to the file footer then
(``ParquetWriter.add_key_value_metadata``), so they are in ``pq.read_metadata(path).metadata`` (which is
what ``SoftLabelReader`` reads) but not in the Arrow schema metadata stored at open time, which carries the
other fields only. Column chunks are zstd-compressed without dictionaries (random ids defeat them) and carry
page CRCs that the reader verifies, so a corrupted file is refused instead of yielding wrong labels.
"""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import TracebackType
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from latent_sft_core.config import LatentParams
from latent_sft_core.errors import ArtifactError
from latent_sft_core.io import atomic_path
from latent_sft_core.soft_embedding import SparseAlpha

FORMAT_VERSION = 1
META_PREFIX = "latent_sft."
META_FORMAT_VERSION = b"latent_sft.format_version"
COUNT_FIELDS = ("num_rows", "num_latents")  # known only at close: footer metadata only
PROB_TYPES = {"float16": pa.float16(), "float32": pa.float32()}
PROB_NUMPY = {"float16": np.float16, "float32": np.float32}
ROW_GROUP_ROWS = 256  # small groups: a random access decodes a whole group (~0.5 ms at N=8, k=10)
MAX_GROUP_VALUES = 1 << 26  # also close a group at 64M probabilities (dense alpha rows are large)
CACHED_GROUPS = 2
SUM_TOLERANCE = 1e-2  # a latent's probs must sum to 1 within this (bf16 alpha is ~4e-3 off; logits are not)
COMPRESSION = "zstd"
MAX_INT32 = np.iinfo(np.int32).max

AlphaMode = Literal["topk", "full", "hidden"]
ProbDtype = Literal["float16", "float32"]


def alpha_mode(latent_kind: str, top_k: int | None) -> AlphaMode:
    """How a run's latent targets are stored: hidden states, full-vocabulary alpha (``top_k=None``) or top-k."""
    if latent_kind == "hidden_state":
        return "hidden"
    return "full" if top_k is None else "topk"


def soft_label_schema(prob_dtype: ProbDtype) -> pa.Schema:
    """The Arrow schema of a soft-label file whose probabilities are stored as ``prob_dtype``."""
    return pa.schema(
        [
            ("id", pa.string()),
            ("num_latents", pa.int32()),
            ("token_ids", pa.list_(pa.int32())),
            ("probs", pa.list_(PROB_TYPES[prob_dtype])),
        ]
    )


@dataclass(frozen=True)
class SoftLabelMeta:
    """What a soft-label file was made from; a reader compares it with the run before using the labels.

    ``k`` is top_k in ``topk`` mode and the vocabulary size V in ``full`` mode. ``num_rows`` / ``num_latents``
    are filled in by the writer (values given to it are ignored).
    """

    compression_rate: int
    alpha_mode: AlphaMode
    k: int
    temperature: float
    projection: str
    latent_kind: str
    tokenizer_fingerprint: str
    encoder_fingerprint: str
    prob_dtype: ProbDtype = "float16"
    vocab_size: int | None = None
    num_rows: int = 0
    num_latents: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.compression_rate < 1:
            problems.append(f"compression_rate must be >= 1, got {self.compression_rate}")
        if self.alpha_mode not in ("topk", "full", "hidden"):
            problems.append(f"alpha_mode must be 'topk', 'full' or 'hidden', got {self.alpha_mode!r}")
        if self.k < 1:
            problems.append(f"k must be >= 1, got {self.k}")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if (self.latent_kind == "hidden_state") != (self.alpha_mode == "hidden"):
            problems.append(f"latent_kind {self.latent_kind!r} does not go with alpha_mode {self.alpha_mode!r} "
                            "(hidden_state latents are cached in hidden mode, soft embeddings as alpha)")
        if self.prob_dtype not in PROB_TYPES:
            problems.append(f"prob_dtype must be one of {sorted(PROB_TYPES)}, got {self.prob_dtype!r}")
        if self.vocab_size is not None and self.vocab_size < self.k:
            problems.append(f"vocab_size {self.vocab_size} is smaller than k={self.k}")
        if self.alpha_mode == "full" and self.vocab_size not in (None, self.k):
            problems.append(f"full alpha has k = vocab_size, got k={self.k}, vocab_size={self.vocab_size}")
        if self.num_rows < 0 or self.num_latents < 0:
            problems.append(f"counts must be >= 0, got {self.num_rows} rows, {self.num_latents} latents")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def for_run(
        cls,
        latent: LatentParams,
        *,
        compression_rate: int,
        top_k: int,
        vocab_size: int,
        tokenizer_fingerprint: str,
        encoder_fingerprint: str,
        prob_dtype: ProbDtype = "float16",
        hidden_size: int | None = None,
    ) -> SoftLabelMeta:
        """The metadata of labels made with these latent params (full mode when ``latent.full_vocab``, hidden
        mode, with ``hidden_size`` values per latent, for ``latent.kind: hidden_state``)."""
        mode = alpha_mode(latent.kind, None if latent.full_vocab else top_k)
        if mode == "hidden" and hidden_size is None:
            raise ValueError("hidden-state labels need the hidden size")
        return cls(
            compression_rate=compression_rate,
            alpha_mode=mode,
            k={"full": vocab_size, "topk": top_k, "hidden": hidden_size}[mode],
            temperature=latent.temperature,
            projection=latent.projection,
            latent_kind=latent.kind,
            tokenizer_fingerprint=tokenizer_fingerprint,
            encoder_fingerprint=encoder_fingerprint,
            prob_dtype=prob_dtype,
            vocab_size=vocab_size,
        )

    def to_metadata(self) -> dict[bytes, bytes]:
        """Parquet key-value metadata: ``latent_sft.<field>`` -> str(value) ('' for an unknown vocab size)."""
        metadata = {META_FORMAT_VERSION: str(FORMAT_VERSION).encode()}
        for field in fields(self):
            value = getattr(self, field.name)
            text = "" if value is None else repr(value) if isinstance(value, float) else str(value)
            metadata[(META_PREFIX + field.name).encode()] = text.encode()
        return metadata

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes]) -> SoftLabelMeta:
        """Parse ``to_metadata``'s output; ValueError names a missing or bad key or another format version."""
        version = metadata.get(META_FORMAT_VERSION, b"").decode()
        if version != str(FORMAT_VERSION):
            raise ValueError(f"soft-label format version {version or '?'}, this code reads {FORMAT_VERSION}")
        parsers = {"temperature": float, "compression_rate": int, "k": int, "num_rows": int, "num_latents": int}
        values: dict[str, object] = {}
        for field in fields(cls):
            key = META_PREFIX + field.name
            raw = metadata.get(key.encode())
            if raw is None:
                raise ValueError(f"metadata key {key} is missing")
            text = raw.decode()
            try:
                if field.name == "vocab_size":
                    values[field.name] = int(text) if text else None
                else:
                    values[field.name] = parsers.get(field.name, str)(text)
            except ValueError:
                raise ValueError(f"metadata key {key} has a bad value {text!r}") from None
        return cls(**values)


def renormalise(probs: torch.Tensor) -> torch.Tensor:
    """probs [..., k] divided by their sum over the last axis: sums of 1 (to fp32 precision) after float16 rounding."""
    return probs / probs.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)


class SoftLabelWriter:
    """Streams soft labels to ``path``: at most ``row_group_rows`` rows are held before a row group is written.

    Use as a context manager. The file is written under a temporary name in the same directory and renamed
    onto ``path`` only when the block exits cleanly; on an exception the temporary file is removed and a
    previous file at ``path`` is left as it was. After the block, ``meta`` holds the final counts.
    """

    def __init__(self, path: Path | str, meta: SoftLabelMeta, row_group_rows: int = ROW_GROUP_ROWS) -> None:
        if row_group_rows < 1:
            raise ValueError(f"row_group_rows must be >= 1, got {row_group_rows}")
        self.path = Path(path)
        self.meta = replace(meta, num_rows=0, num_latents=0)
        self.row_group_rows = row_group_rows
        self._schema = soft_label_schema(meta.prob_dtype)
        self._id_limit = meta.vocab_size if meta.vocab_size is not None else MAX_INT32 + 1
        self._seen: set[str] = set()
        self._stack: ExitStack | None = None
        self._writer: pq.ParquetWriter | None = None
        self._clear_buffer()

    def __enter__(self) -> SoftLabelWriter:
        if self._stack is not None:
            raise RuntimeError(f"{self.path}: writer already open")
        with ExitStack() as stack:
            tmp = stack.enter_context(atomic_path(self.path))
            count_keys = {(META_PREFIX + name).encode() for name in COUNT_FIELDS}
            static = {key: value for key, value in self.meta.to_metadata().items() if key not in count_keys}
            self._writer = pq.ParquetWriter(
                tmp, self._schema.with_metadata(static), compression=COMPRESSION, use_dictionary=False,
                write_statistics=False, write_page_checksum=True,
            )
            stack.callback(self._writer.close)  # idempotent; on error the footer goes to the doomed temp file
            self._stack = stack.pop_all()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._stack = self._stack, None
        assert stack is not None and self._writer is not None
        if exc_type is not None:
            stack.__exit__(exc_type, exc, tb)  # closes the writer, removes the temporary file
            return
        try:
            self._flush()
            # the counts are only known now; the footer's key-value metadata is written by close()
            self._writer.add_key_value_metadata(
                {(META_PREFIX + name).encode(): str(getattr(self.meta, name)).encode() for name in COUNT_FIELDS}
            )
            self._writer.close()
        except BaseException as error:
            stack.__exit__(type(error), error, error.__traceback__)
            raise
        stack.__exit__(None, None, None)  # renames the finished file onto ``path``

    def write(self, sample_id: str, ids: torch.Tensor | None, probs: torch.Tensor) -> None:
        """Append one sample: ids [N, k] integer (None in full mode) and probs [N, k] (k = V in full mode).

        ValueError naming ``sample_id`` when shapes, k, ids or probs are not valid alpha for this file.
        """
        if self._writer is None or self._stack is None:
            raise RuntimeError(f"{self.path}: write() outside the writer's with-block")
        ids_np, probs_np = self._validated(sample_id, ids, probs)
        self._ids.append(sample_id)
        self._counts.append(probs_np.shape[0])
        self._token_ids.append(ids_np.reshape(-1))
        self._probs.append(probs_np.reshape(-1))
        self._buffered_values += probs_np.size
        self._seen.add(sample_id)
        self.meta = replace(
            self.meta, num_rows=self.meta.num_rows + 1, num_latents=self.meta.num_latents + probs_np.shape[0]
        )
        if len(self._ids) >= self.row_group_rows or self._buffered_values >= MAX_GROUP_VALUES:
            self._flush()

    def write_batch(
        self, sample_ids: Sequence[str], ids: Sequence[torch.Tensor | None], probs: Sequence[torch.Tensor]
    ) -> None:
        """Append several samples; ``ids[i]`` / ``probs[i]`` as in ``write``."""
        if not len(sample_ids) == len(ids) == len(probs):
            raise ValueError(f"write_batch got {len(sample_ids)} ids, {len(ids)} id tensors, {len(probs)} probs")
        for sample_id, sample_ids_tensor, sample_probs in zip(sample_ids, ids, probs):
            self.write(sample_id, sample_ids_tensor, sample_probs)

    def write_alpha(self, sample_ids: Sequence[str], num_latents: Sequence[int], alpha: SparseAlpha) -> None:
        """Append samples from a flattened alpha, as ``EncodedLatents.alpha`` holds it: ids/probs [M, k] in
        (sample, step) order with M = sum(num_latents); sample i owns the next ``num_latents[i]`` rows."""
        if len(sample_ids) != len(num_latents):
            raise ValueError(f"write_alpha got {len(sample_ids)} sample ids but {len(num_latents)} latent counts")
        if sum(num_latents) != alpha.probs.shape[0]:
            raise ValueError(f"latent counts sum to {sum(num_latents)} but alpha has {alpha.probs.shape[0]} rows")
        counts = list(num_latents)
        probs = alpha.probs.split(counts)
        ids = alpha.ids.split(counts) if alpha.ids is not None else [None] * len(counts)
        self.write_batch(sample_ids, ids, probs)

    def _validated(
        self, sample_id: str, ids: torch.Tensor | None, probs: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [N, k] or [0], probs [N, k] in the stored dtype) or ValueError naming the sample."""

        def bad(problem: str) -> ValueError:
            return ValueError(f"soft labels of sample {sample_id!r}: {problem}")

        if not isinstance(sample_id, str):
            raise bad(f"sample id must be a str, got {type(sample_id).__name__}")
        if sample_id in self._seen:
            raise bad("duplicate sample id")
        k = self.meta.k
        if probs.ndim != 2 or probs.shape[1] != k:
            raise bad(f"probs must be [N, {k}], got {list(probs.shape)}")
        probs_np = probs.detach().to("cpu", torch.float32).numpy()
        if not np.isfinite(probs_np).all():
            raise bad("probs contain NaN or inf")
        if self.meta.alpha_mode == "hidden":
            if ids is not None:
                raise bad("hidden-state labels take ids=None")
            return np.empty(0, dtype=np.int32), probs_np.astype(PROB_NUMPY[self.meta.prob_dtype])
        if (probs_np < 0).any():
            raise bad(f"probs contain negative values (min {probs_np.min()})")
        sums = probs_np.sum(axis=1, dtype=np.float64)
        if sums.size and np.abs(sums - 1).max() > SUM_TOLERANCE:
            raise bad(f"probs do not sum to 1 over the last axis (sums in [{sums.min():.4g}, {sums.max():.4g}])")
        if self.meta.alpha_mode == "full":
            if ids is not None:
                raise bad("full-vocabulary alpha takes ids=None (ids are implicit)")
            ids_np = np.empty(0, dtype=np.int32)
        else:
            if ids is None:
                raise bad("top-k alpha needs ids")
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise bad(f"ids must be an integer tensor, got {ids.dtype}")
            if ids.shape != probs.shape:
                raise bad(f"ids {list(ids.shape)} and probs {list(probs.shape)} differ in shape")
            wide = ids.detach().to("cpu", torch.int64).numpy()
            if wide.size and (wide.min() < 0 or wide.max() >= self._id_limit):
                raise bad(f"ids must be in [0, {self._id_limit}), got [{wide.min()}, {wide.max()}]")
            ids_np = wide.astype(np.int32)
        return ids_np, probs_np.astype(PROB_NUMPY[self.meta.prob_dtype])

    def _flush(self) -> None:
        """Write the buffered rows as one row group."""
        if not self._ids:
            return
        assert self._writer is not None
        columns = [
            pa.array(self._ids, pa.string()),
            pa.array(np.asarray(self._counts, dtype=np.int32)),
            _list_array(self._token_ids, pa.int32()),
            _list_array(self._probs, PROB_TYPES[self.meta.prob_dtype]),
        ]
        self._writer.write_table(pa.Table.from_arrays(columns, schema=self._schema), row_group_size=len(self._ids))
        self._clear_buffer()

    def _clear_buffer(self) -> None:
        self._ids: list[str] = []
        self._counts: list[int] = []
        self._token_ids: list[np.ndarray] = []
        self._probs: list[np.ndarray] = []
        self._buffered_values = 0


def _list_array(rows: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    """list<value_type> from flat per-row arrays (int32 offsets; pyarrow refuses an overflowing cast)."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([row.size for row in rows], out=offsets[1:])
    values = pa.array(np.concatenate(rows), value_type)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


@dataclass(frozen=True)
class _DecodedGroup:
    """One row group as flat numpy arrays; row r's values are ``probs[offsets[r]:offsets[r + 1]]``."""

    num_latents: np.ndarray  # [rows] int32
    offsets: np.ndarray  # [rows + 1] int64, same for token_ids (top-k) and probs
    token_ids: np.ndarray  # [sum N*k] int32 (empty in full mode)
    probs: np.ndarray  # [sum N*k] float16/float32


class SoftLabelReader:
    """Random access to a soft-label file without loading it: the file is memory-mapped and read one row group
    at a time, keeping the last ``CACHED_GROUPS`` decoded groups. Picklable (it reopens the file), so it can sit
    in a DataLoader dataset. Any unreadable, incomplete or inconsistent file raises ArtifactError naming it.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: no soft-label file here; run the soft-label cache stage")
        try:
            self._file = pq.ParquetFile(self.path, memory_map=True, pre_buffer=False, page_checksum_verification=True)
            footer = self._file.metadata
            self.meta = SoftLabelMeta.from_metadata(footer.metadata or {})
        except (OSError, pa.ArrowException, ValueError) as error:
            raise self._broken(error) from None
        expected = soft_label_schema(self.meta.prob_dtype)
        actual = self._file.schema_arrow
        for field in expected:
            if actual.get_field_index(field.name) < 0 or actual.field(field.name).type != field.type:
                found = actual.field(field.name).type if actual.get_field_index(field.name) >= 0 else "missing"
                raise self._broken(f"column {field.name} should be {field.type}, found {found}")
        if footer.num_rows != self.meta.num_rows:
            raise self._broken(f"{footer.num_rows} rows but the metadata records {self.meta.num_rows}")
        sizes = [footer.row_group(g).num_rows for g in range(footer.num_row_groups)]
        self._group_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
        self._cache: OrderedDict[int, _DecodedGroup] = OrderedDict()
        self._index_of: dict[str, int] | None = None

    def __len__(self) -> int:
        return self.meta.num_rows

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(ids LongTensor [N, k], or None in full and hidden modes, values FloatTensor [N, k]) of row ``index``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.path}: index {index} out of range for {len(self)} rows")
        index %= len(self)
        group_index = bisect.bisect_right(self._group_starts, index) - 1
        group = self._group(group_index)
        row = index - self._group_starts[group_index]
        start, end = group.offsets[row], group.offsets[row + 1]
        shape = (int(group.num_latents[row]), self.meta.k)
        # astype copies: the tensors own their memory and do not pin the cached group
        probs = torch.from_numpy(group.probs[start:end].astype(np.float32)).view(shape)
        if self.meta.alpha_mode != "topk":
            return None, probs
        return torch.from_numpy(group.token_ids[start:end].astype(np.int64)).view(shape), probs

    def ids(self) -> list[str]:
        """All sample ids in file order (reads only the id column)."""
        try:
            return self._file.read(columns=["id"]).column("id").to_pylist()
        except (OSError, pa.ArrowException) as error:
            raise self._broken(error) from None

    def by_id(self, sample_id: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The labels of the row with this id (an id index is built on first use); KeyError if absent."""
        if self._index_of is None:
            ids = self.ids()
            self._index_of = {sample_id: index for index, sample_id in enumerate(ids)}
            if len(self._index_of) != len(ids):
                raise self._broken("duplicate sample ids")
        if sample_id not in self._index_of:
            raise KeyError(f"{self.path}: no soft labels for sample {sample_id!r}")
        return self[self._index_of[sample_id]]

    def close(self) -> None:
        self._cache.clear()
        self._file.close()

    def __enter__(self) -> SoftLabelReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, str]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["path"])

    def _group(self, group_index: int) -> _DecodedGroup:
        """A decoded row group, from the small LRU cache or the file."""
        if group_index in self._cache:
            self._cache.move_to_end(group_index)
            return self._cache[group_index]
        try:
            table = self._file.read_row_group(group_index, columns=["num_latents", "token_ids", "probs"])
        except (OSError, pa.ArrowException) as error:
            raise self._broken(f"row group {group_index}: {error}") from None
        token_ids = table.column("token_ids").combine_chunks()
        probs = table.column("probs").combine_chunks()
        num_latents = table.column("num_latents").to_numpy()
        offsets = probs.offsets.to_numpy().astype(np.int64)
        token_offsets = token_ids.offsets.to_numpy()
        expected = num_latents.astype(np.int64) * self.meta.k
        ids_expected = expected if self.meta.alpha_mode == "topk" else np.zeros_like(expected)
        if not (np.array_equal(np.diff(offsets), expected) and np.array_equal(np.diff(token_offsets), ids_expected)):
            raise self._broken(f"row group {group_index}: list lengths do not match num_latents * k={self.meta.k}")
        # offsets index into .values whatever the arrays' own offset, so rebase both on their first entry
        group = _DecodedGroup(
            num_latents=num_latents,
            offsets=offsets - offsets[0],
            token_ids=token_ids.values.to_numpy()[token_offsets[0] : token_offsets[-1]],
            probs=probs.values.to_numpy()[offsets[0] : offsets[-1]],
        )
        self._cache[group_index] = group
        if len(self._cache) > CACHED_GROUPS:
            self._cache.popitem(last=False)
        return group

    def _broken(self, problem: object) -> ArtifactError:
        return ArtifactError(f"{self.path}: not a usable soft-label file ({problem}); rerun the soft-label cache stage")


def open_soft_labels(
    path: Path | str,
    *,
    compression_rate: int,
    top_k: int | None,
    tokenizer_fingerprint: str,
    encoder_fingerprint: str,
    vocab_size: int | None = None,
    temperature: float | None = None,
    projection: str | None = None,
    latent_kind: str = "soft_embedding",
) -> SoftLabelReader:
    """A reader for ``path`` after checking that the cache was made for this run.

    ``top_k=None`` expects full-vocabulary alpha; ``latent_kind="hidden_state"`` expects hidden-state labels. ``vocab_size``, ``temperature`` and ``projection`` are
    compared when given (``vocab_size`` only with a cache that recorded it). ArtifactError names the file, the
    field, the cache's value and the expected one.
    """
    reader = SoftLabelReader(path)
    meta = reader.meta
    expected: list[tuple[str, object, object]] = [
        ("compression_rate", meta.compression_rate, compression_rate),
        ("alpha_mode", meta.alpha_mode, alpha_mode(latent_kind, top_k)),
        ("tokenizer_fingerprint", meta.tokenizer_fingerprint, tokenizer_fingerprint),
        ("encoder_fingerprint", meta.encoder_fingerprint, encoder_fingerprint),
    ]
    if top_k is not None and latent_kind != "hidden_state":
        expected.append(("k", meta.k, top_k))
    if vocab_size is not None and meta.vocab_size is not None:
        expected.append(("vocab_size", meta.vocab_size, vocab_size))
    if temperature is not None:
        expected.append(("temperature", meta.temperature, temperature))
    if projection is not None:
        expected.append(("projection", meta.projection, projection))
    for field, got, want in expected:
        if got != want:
            reader.close()
            raise ArtifactError(
                f"{reader.path}: soft labels were cached with {field}={got} but this run expects {field}={want}; "
                "rerun the soft-label cache stage"
            )
    return reader


def bytes_per_latent(path: Path | str) -> float:
    """File size over the number of latents stored (the cache's storage cost per latent)."""
    path = Path(path)
    try:
        meta = SoftLabelMeta.from_metadata(pq.read_metadata(path).metadata or {})
    except (OSError, pa.ArrowException, ValueError) as error:
        raise ArtifactError(f"{path}: not a usable soft-label file ({error})") from None
    if meta.num_latents == 0:
        raise ValueError(f"{path}: holds no latents, bytes per latent is undefined")
    return os.path.getsize(path) / meta.num_latents
