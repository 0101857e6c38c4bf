"""Readers for file sources, shared by the ``prepare_data`` stage and the ``latent-sft data convert`` command.

A reader never stops at a malformed row: it returns the good rows and one ``RowError`` (file, line, reason)
per bad one, so callers decide between failing (``on_bad_row: error``) and skipping. Problems with the
file as a whole (missing, unreadable, no rows at all) raise a DataError at once.

Rules common to both formats:

- lines are numbered from 1; blank (whitespace-only) lines are skipped without a report and are not counted
  as rows, so a trailing newline or a blank line at the end is fine;
- a UTF-8 byte-order mark at the start of the file is ignored; a line that is not valid UTF-8 is a bad row;
- values keep their exact text apart from leading and trailing whitespace;
- question and answer must not be empty; the chain may be empty.

GSM8k-Aug txt (``read_gsm8k_aug_txt``): one problem per line, ``question||chain #### answer``, with exactly
one ``||`` and exactly one ``####`` after it. The chain is the calculator steps (``<<16-3-4=9>> <<9*2=18>>``)
or nothing (``question|| #### 26``). The answer must be a number: an optional minus sign, digits with
optional thousands commas, an optional decimal part (``18``, ``-5``, ``0.5``, ``1,450,000``); it is kept as
written. Ids are ``{split}-{line}``.

jsonl (``read_jsonl``): one JSON object per line; the question, chain and answer columns are named by
``FieldNames`` (an optional id column too, else ids are ``{split}-{line}``); other keys are ignored.
question and chain must be JSON strings; answer and id may also be JSON numbers (integers or decimals, not
booleans), which are stored as their decimal text (``18`` -> ``"18"``) because numeric answer columns are
common in public math sets. A chain wrapped in literal ``<think>`` / ``</think>`` loses them (spec 1.1).
An id that repeats within the file is a bad row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from latent_sft_core.config import FieldNames
from latent_sft_core.data.schema import Example
from latent_sft_core.errors import DataError
from latent_sft_core.text import THINK_CLOSE, THINK_OPEN

FileFormat = Literal["gsm8k_aug_txt", "jsonl"]
FILE_FORMATS: tuple[FileFormat, ...] = ("gsm8k_aug_txt", "jsonl")

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# how many bad rows an error message lists before summarising the rest
_ERRORS_SHOWN = 20


@dataclass(frozen=True)
class RowError:
    """One rejected row: where it is and why."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class ReadResult:
    """The good rows of a file, how many non-blank lines it had, and one error per rejected line."""

    examples: list[Example] = field(default_factory=list)
    rows_read: int = 0
    errors: list[RowError] = field(default_factory=list)


class _BadRow(Exception):
    """Raised by a line parser; the reader turns it into a RowError for that line."""


def format_row_errors(errors: list[RowError], headline: str) -> str:
    """A DataError message: the headline, then the first bad rows one per line, then how many more."""
    lines = [headline, *(f"  {error}" for error in errors[:_ERRORS_SHOWN])]
    if len(errors) > _ERRORS_SHOWN:
        lines.append(f"  ... and {len(errors) - _ERRORS_SHOWN} more")
    return "\n".join(lines)


def _lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """(line number, text) for every non-blank line; text is None when the line is not valid UTF-8."""
    try:
        handle = path.open("rb")
    except OSError as error:
        raise DataError(f"{path}: cannot read file ({error.strerror})") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # byte-order mark written by some Windows editors
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, None
                continue
            if text.strip():
                yield number, text


def _read(path: Path | str, parse: Callable[[str, int], Example]) -> ReadResult:
    path = Path(path)
    result = ReadResult()
    for number, text in _lines(path):
        result.rows_read += 1
        try:
            if text is None:
                raise _BadRow("not valid UTF-8")
            result.examples.append(parse(text, number))
        except _BadRow as bad:
            result.errors.append(RowError(str(path), number, str(bad)))
    if result.rows_read == 0:
        raise DataError(f"{path}: file has no rows")
    return result


def _require(value: str, what: str) -> str:
    if not value:
        raise _BadRow(f"empty {what}")
    return value


def read_gsm8k_aug_txt(path: Path | str, split: str, *, source: str = "gsm8k_aug_txt") -> ReadResult:
    """Read a GSM8k-Aug txt file (``question||chain #### answer`` per line); see the module docstring."""

    def parse(text: str, number: int) -> Example:
        parts = text.split("||")
        if len(parts) != 2:
            raise _BadRow(f"expected exactly one '||' between question and chain, found {len(parts) - 1}")
        question, rest = parts
        pieces = rest.split("####")
        if len(pieces) != 2:
            raise _BadRow(f"expected exactly one '####' before the answer, found {len(pieces) - 1}")
        cot, answer = pieces
        answer = _require(answer.strip(), "answer")
        if not _NUMBER.fullmatch(answer):
            raise _BadRow(f"answer is not a number: {answer!r}")
        return Example(
            id=f"{split}-{number}",
            split=split,
            question=_require(question.strip(), "question"),
            cot=cot.strip(),
            answer=answer,
            source=source,
        )

    return _read(path, parse)


def read_jsonl(path: Path | str, split: str, fields: FieldNames, *, source: str = "jsonl") -> ReadResult:
    """Read a jsonl file with the columns named by ``fields``; see the module docstring for the rules."""
    seen_ids: dict[str, int] = {}

    def parse(text: str, number: int) -> Example:
        try:
            row = json.loads(text, parse_constant=_reject_non_finite)
        except json.JSONDecodeError as error:
            raise _BadRow(f"invalid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(row, dict):
            raise _BadRow(f"expected a JSON object, got {_json_type(row)}")
        row_id = f"{split}-{number}"
        if fields.id is not None:
            row_id = _require(_text_field(row, fields.id, numbers_allowed=True), "id")
            if row_id in seen_ids:
                raise _BadRow(f"duplicate id {row_id!r} (first on line {seen_ids[row_id]})")
            seen_ids[row_id] = number
        return Example(
            id=row_id,
            split=split,
            question=_require(_text_field(row, fields.question, numbers_allowed=False), "question"),
            cot=_strip_think(_text_field(row, fields.cot, numbers_allowed=False)),
            answer=_require(_text_field(row, fields.answer, numbers_allowed=True), "answer"),
            source=source,
        )

    return _read(path, parse)


def read_file(
    file_format: FileFormat, path: Path | str, split: str, fields: FieldNames, *, source: str | None = None
) -> ReadResult:
    """Read ``path`` with the reader for ``file_format``; ``source`` labels the rows (default: the format)."""
    label = source or file_format
    if file_format == "gsm8k_aug_txt":
        return read_gsm8k_aug_txt(path, split, source=label)
    return read_jsonl(path, split, fields, source=label)


def _text_field(row: dict[str, object], name: str, *, numbers_allowed: bool) -> str:
    if name not in row:
        raise _BadRow(f"missing field '{name}'")
    value = row[name]
    if isinstance(value, str):
        return value.strip()
    if numbers_allowed and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    wanted = "a string or a number" if numbers_allowed else "a string"
    raise _BadRow(f"field '{name}' must be {wanted}, got {_json_type(value)}")


def _reject_non_finite(constant: str) -> float:
    # Python's json accepts NaN / Infinity, which are not JSON and not answers
    raise _BadRow(f"invalid JSON ({constant} is not a JSON value)")


def _strip_think(cot: str) -> str:
    if cot.startswith(THINK_OPEN):
        cot = cot[len(THINK_OPEN) :]
    if cot.endswith(THINK_CLOSE):
        cot = cot[: -len(THINK_CLOSE)]
    return cot.strip()


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
