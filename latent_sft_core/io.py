"""Atomic outputs: a stage's results appear at their final paths only when all of them are complete.

Writers get a staging path next to each destination (same directory, so the final rename is atomic on one
file system). When the block succeeds every staged output replaces its destination; on any error all of them
are removed and every destination is left untouched. A stage with several outputs (model, metrics, loss
curve) stages them in one ``atomic_outputs`` block, so a failure while writing the last one leaves none of
them behind, and DVC never finds a new model beside old metrics.

A SIGKILL skips every cleanup: its staging folders (``.{name}.XXXXXXXX.tmp``) are removed by the next write
to the same destination.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_SUFFIX = ".tmp"
# tempfile's random part: 8 characters of [a-z0-9_]
_STAGING_NAME = r"\.{name}\.[a-z0-9_]{{8}}" + re.escape(STAGING_SUFFIX)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _replace(source: Path, dest: Path) -> None:
    """Move ``source`` onto ``dest``; a folder at ``dest`` is swapped out first (rename cannot overwrite one)."""
    if dest.is_dir() and not dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old")
        _remove(old)
        os.replace(dest, old)
        os.replace(source, dest)
        _remove(old)
    else:
        os.replace(source, dest)


def remove_stale_staging(dest: Path) -> None:
    """Remove the staging folders of ``dest`` left by a killed run (stages never run twice at once)."""
    pattern = re.compile(_STAGING_NAME.format(name=re.escape(dest.name)))
    for leftover in dest.parent.iterdir():
        if pattern.fullmatch(leftover.name):
            _remove(leftover)


class StagedOutputs:
    """The outputs of one ``atomic_outputs`` block: each destination with the folder holding its staged copy."""

    def __init__(self) -> None:
        self.staged: list[tuple[Path, Path]] = []  # (staging folder, destination)

    def path(self, dest: Path | str) -> Path:
        """Where to write ``dest`` (a file or a folder, not created yet); it is moved onto ``dest`` at the end."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(dest)
        holder = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=STAGING_SUFFIX, dir=dest.parent))
        self.staged.append((holder, dest))
        return holder / dest.name

    def folder(self, dest: Path | str) -> Path:
        """An empty folder to fill in place of the folder ``dest``."""
        folder = self.path(dest)
        folder.mkdir()
        return folder


@contextmanager
def atomic_outputs() -> Iterator[StagedOutputs]:
    """Stage several outputs; all replace their destinations when the block succeeds, none when it fails.

    Every path asked for must have been written by the end of the block (a missing one is an error).
    """
    outputs = StagedOutputs()
    try:
        yield outputs
        unwritten = [str(dest) for holder, dest in outputs.staged if not (holder / dest.name).exists()]
        if unwritten:
            raise RuntimeError(f"outputs not written by the stage: {', '.join(unwritten)}")
        for holder, dest in outputs.staged:
            _replace(holder / dest.name, dest)
    finally:
        for holder, _ in outputs.staged:
            _remove(holder)


@contextmanager
def atomic_path(dest: Path | str) -> Iterator[Path]:
    """Yield a path (not created yet) to write ``dest`` to; it replaces ``dest`` when the block succeeds."""
    with atomic_outputs() as outputs:
        yield outputs.path(dest)


@contextmanager
def atomic_dir(dest: Path | str) -> Iterator[Path]:
    """Yield an empty folder to fill; it replaces ``dest`` when the block succeeds."""
    with atomic_outputs() as outputs:
        yield outputs.folder(dest)


def write_json(path: Path | str, data: object) -> None:
    """Write ``data`` as indented, key-sorted JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def file_digest(path: Path | str) -> str:
    """SHA-256 (hex) of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
