"""Writes benchmark results into BENCHMARKS.md, each benchmark between its own markers."""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def machine_line() -> str:
    """Where and when a figure was measured."""
    today = datetime.date.today().isoformat()
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, {today}"


def update_section(name: str, markdown: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the block between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` (appended if absent)."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text.rstrip()}\n\n{block}\n"
    path.write_text(text)
