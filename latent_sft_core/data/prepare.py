"""The ``prepare_data`` stage: read the configured source, validate it, write one Parquet file per split.

Output (``out_dir``, normally ``data/raw``): ``{split}.parquet`` in the raw schema (``data/schema.py``) for
every split, and ``report.json`` with, per split, the rows read, rejected (each with file, line and reason),
moved and kept, plus the source and the params used. For the ``hub`` source the downloaded files are kept
under ``out_dir/hub/``. Everything is written inside one temporary folder that replaces ``out_dir`` only
when complete: a failure leaves a previous ``out_dir`` as it was.

Order of operations: read every split -> reject bad rows (``on_bad_row``) -> move the last
``val_from_train`` train rows to val -> cap each split at ``max_rows`` -> check ids -> write.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from latent_sft_core.config import FileSourceParams, Params
from latent_sft_core.data.hub import download_hub_files, hub_file_label
from latent_sft_core.data.readers import ReadResult, RowError, format_row_errors, read_file
from latent_sft_core.data.schema import Example, write_examples
from latent_sft_core.data.synthetic import generate_synthetic
from latent_sft_core.errors import DataError
from latent_sft_core.io import atomic_dir, write_json

log = logging.getLogger(__name__)

REPORT_NAME = "report.json"
HUB_DOWNLOAD_DIR = "hub"


@dataclass
class SplitReport:
    """What happened to one split. ``file`` names what was read (None for generated or moved rows)."""

    split: str
    file: str | None
    rows_read: int
    rejected: list[RowError] = field(default_factory=list)
    moved_to_val: int = 0
    moved_from_train: int = 0
    dropped_by_max_rows: int = 0
    kept: int = 0

    def summary(self) -> str:
        """One line for the stage log."""
        parts = [f"{self.rows_read} read", f"{len(self.rejected)} rejected"]
        if self.moved_to_val:
            parts.append(f"{self.moved_to_val} moved to val")
        if self.moved_from_train:
            parts.append(f"{self.moved_from_train} moved from train")
        if self.dropped_by_max_rows:
            parts.append(f"{self.dropped_by_max_rows} over max_rows")
        return f"{self.split}: {self.kept} rows kept ({', '.join(parts)})"

    def to_json(self) -> dict[str, object]:
        return {
            "file": self.file,
            "rows_read": self.rows_read,
            "rejected": len(self.rejected),
            "rejected_rows": [{"file": bad.file, "line": bad.line, "reason": bad.reason} for bad in self.rejected],
            "moved_to_val": self.moved_to_val,
            "moved_from_train": self.moved_from_train,
            "dropped_by_max_rows": self.dropped_by_max_rows,
            "kept": self.kept,
        }


@dataclass
class DataReport:
    """The content of ``report.json``."""

    source: str
    splits: dict[str, SplitReport]
    params: dict[str, object]

    def to_json(self) -> dict[str, object]:
        return {
            "source": self.source,
            "params": self.params,
            "splits": {name: report.to_json() for name, report in self.splits.items()},
        }


def prepare_data(params: Params, out_dir: Path) -> DataReport:
    """Run the stage: write ``out_dir/{split}.parquet`` and ``out_dir/report.json`` (see the module docstring).

    Raises DataError (and writes nothing) on a malformed row when ``on_bad_row`` is ``error``, on a file
    problem, or on inconsistent settings.
    """
    settings = params.prepare_data
    source = params.base.data.source
    with atomic_dir(out_dir) as work_dir:
        reads, files = _read_source(params, work_dir)
        errors = [error for result in reads.values() for error in result.errors]
        if errors and settings.on_bad_row == "error":
            raise DataError(
                format_row_errors(
                    errors,
                    f"{len(errors)} malformed row(s); nothing written "
                    "(set prepare_data.on_bad_row to 'skip' to drop them):",
                )
            )
        for split, result in reads.items():
            if result.rows_read and not result.examples:
                # usually wrong field names or the wrong format, not a data set with no usable row
                raise DataError(format_row_errors(result.errors, f"split '{split}': every row was rejected:"))
        splits = {split: result.examples for split, result in reads.items()}
        reports = {
            split: SplitReport(split, files[split], result.rows_read, result.errors) for split, result in reads.items()
        }
        _move_train_to_val(splits, reports, settings.val_from_train)
        for split, examples in splits.items():
            if settings.max_rows is not None and len(examples) > settings.max_rows:
                reports[split].dropped_by_max_rows = len(examples) - settings.max_rows
                examples = examples[: settings.max_rows]
            _check_unique_ids(split, examples)
            reports[split].kept = write_examples(work_dir / f"{split}.parquet", examples)
        report = DataReport(source=source, splits=reports, params=_params_used(params))
        write_json(work_dir / REPORT_NAME, report.to_json())
    return report


def _read_source(params: Params, work_dir: Path) -> tuple[dict[str, ReadResult], dict[str, str | None]]:
    """Every split of the configured source, and the name of the file each came from."""
    settings = params.prepare_data
    source = params.base.data.source
    if source == "synthetic":
        generated = generate_synthetic(settings.synthetic, params.base.seed)
        return (
            {split: ReadResult(examples, rows_read=len(examples)) for split, examples in generated.items()},
            dict.fromkeys(generated),
        )
    if source == "hub":
        hub = settings.hub
        _require_files(hub, "hub")
        reads: dict[str, ReadResult] = {}
        labels: dict[str, str | None] = {}
        for split, path in download_hub_files(hub, work_dir / HUB_DOWNLOAD_DIR).items():
            label = labels[split] = hub_file_label(hub, hub.files[split])
            result = read_file(hub.format, path, split, hub.fields_for(split), source="hub")
            # name the repository file, not the temporary copy, in messages and the report
            result.errors = [replace(error, file=label) for error in result.errors]
            reads[split] = result
        return reads, labels
    section: FileSourceParams = getattr(settings, source)
    _require_files(section, source)
    # paths are relative to the working directory: the repository root when DVC runs the stage
    reads = {
        split: read_file(source, Path(path), split, section.fields_for(split)) for split, path in section.files.items()
    }
    return reads, dict(section.files)


def _require_files(section: FileSourceParams, name: str) -> None:
    if not section.files:
        raise DataError(f"prepare_data.{name}.files names no file: give one per split, e.g. "
                        "{train: data/train.jsonl, test: data/test.jsonl}")
    if "train" not in section.files:
        # an evaluation-only data set: chunk and evaluate run on it; the training stages say what is missing
        log.warning("prepare_data.%s.files has no 'train' file: this data set can only be evaluated "
                    "(prepare_data, chunk with the model's tokenizer, evaluate)", name)


def _move_train_to_val(splits: dict[str, list[Example]], reports: dict[str, SplitReport], count: int) -> None:
    """Move the last ``count`` train rows into an absent or empty val split (deterministic: file order)."""
    if count == 0:
        return
    if splits.get("val"):
        raise DataError(
            f"prepare_data.val_from_train is {count} but split 'val' already has {len(splits['val'])} rows; "
            "set val_from_train to 0 or drop the val split"
        )
    if "train" not in splits:
        raise DataError(f"prepare_data.val_from_train is {count} but there is no train split to move rows from")
    train = splits["train"]
    if count >= len(train):
        raise DataError(f"prepare_data.val_from_train ({count}) must be less than the {len(train)} train rows")
    splits["train"], moved = train[:-count], train[-count:]
    splits["val"] = [replace(example, split="val") for example in moved]
    reports["train"].moved_to_val = count
    reports.setdefault("val", SplitReport("val", file=None, rows_read=0)).moved_from_train = count


def _check_unique_ids(split: str, examples: list[Example]) -> None:
    seen: set[str] = set()
    for example in examples:
        if example.id in seen:
            raise DataError(f"split '{split}': id {example.id!r} appears more than once")
        seen.add(example.id)


def _params_used(params: Params) -> dict[str, object]:
    settings = params.prepare_data
    source = params.base.data.source
    return {
        "base.seed": params.base.seed,
        "base.data.source": source,
        "prepare_data.on_bad_row": settings.on_bad_row,
        "prepare_data.val_from_train": settings.val_from_train,
        "prepare_data.max_rows": settings.max_rows,
        f"prepare_data.{source}": getattr(settings, source).model_dump(mode="json"),
    }
