"""``latent-sft data convert``: turn one GSM8k-Aug txt or jsonl file into a raw-schema Parquet file.

Uses the same readers as the ``prepare_data`` stage but is strict: any malformed row fails the whole
conversion (file, line and reason in the message) and no output file is written or replaced.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from latent_sft_core.config import FieldNames
from latent_sft_core.data.readers import FILE_FORMATS, FileFormat, ReadResult, format_row_errors, read_file
from latent_sft_core.data.schema import write_examples
from latent_sft_core.errors import DataError


def convert_file(source: FileFormat, input: Path, output: Path, fields: FieldNames, split: str = "train") -> ReadResult:
    """Read ``input`` as ``source`` and write its rows to ``output`` (Parquet, raw schema), atomically.

    ``fields`` names the jsonl columns (ignored for gsm8k_aug_txt). Returns what was read; raises DataError
    on the first file problem or listing the malformed rows, leaving ``output`` as it was.
    """
    result = read_file(source, input, split, fields)
    if result.errors:
        headline = f"{input}: {len(result.errors)} malformed row(s); nothing written:"
        raise DataError(format_row_errors(result.errors, headline))
    write_examples(output, result.examples)
    return result


def add_convert_command(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``convert`` on the ``latent-sft data`` subcommand group."""
    defaults = FieldNames()
    parser = subparsers.add_parser(
        "convert",
        help="convert a GSM8k-Aug txt or jsonl file to the raw Parquet schema",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", required=True, choices=FILE_FORMATS, help="format of INPUT")
    parser.add_argument("input", metavar="INPUT", type=Path, help="file to convert")
    parser.add_argument("output", metavar="OUTPUT.parquet", type=Path, help="Parquet file to write")
    parser.add_argument("--split", default="train", help="split name stored in the rows and ids (default: %(default)s)")
    parser.add_argument(
        "--question-field",
        type=_field_name,
        default=defaults.question,
        help="jsonl question key (default: %(default)s)",
    )
    parser.add_argument(
        "--cot-field", type=_field_name, default=defaults.cot, help="jsonl chain key (default: %(default)s)"
    )
    parser.add_argument(
        "--answer-field", type=_field_name, default=defaults.answer, help="jsonl answer key (default: %(default)s)"
    )
    parser.add_argument(
        "--id-field", type=_field_name, default=defaults.id, help="jsonl id key (default: ids are SPLIT-LINE)"
    )
    parser.set_defaults(handler=_run_convert)


def _field_name(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("a field name must not be empty")
    return text


def _run_convert(args: argparse.Namespace) -> None:
    fields = FieldNames(id=args.id_field, question=args.question_field, cot=args.cot_field, answer=args.answer_field)
    result = convert_file(args.source, args.input, args.output, fields, split=args.split)
    print(
        f"wrote {len(result.examples)} rows (split '{args.split}', {result.rows_read} lines read) "
        f"from {args.input} to {args.output}"
    )
