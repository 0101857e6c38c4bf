"""Fetch a data set's split files from a Hugging Face dataset repository.

Files go through the normal Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``), so a second run, or a run
with ``HF_HUB_OFFLINE=1`` after one online run, reuses them; a copy lands in the stage's own folder so the
stage's output records exactly what was read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError

from latent_sft_core.config import HubParams
from latent_sft_core.errors import DataError


def hub_file_label(hub: HubParams, filename: str) -> str:
    """How messages and reports name a file of the repository: ``owner/name@revision:path``."""
    return f"{hub.repo_id}@{hub.revision}:{filename}"


def download_hub_files(hub: HubParams, dest_dir: Path) -> dict[str, Path]:
    """Download every file of ``hub.files`` and copy it to ``dest_dir`` (keeping its path inside the repo).

    Returns split -> local copy. Any failure (no network, unknown repo, revision or file, offline mode
    without a cached copy) is a DataError naming repository, revision and file.
    """
    if not hub.files:
        raise DataError(f"prepare_data.hub.files is empty: name the file of each split in {hub.repo_id}")
    local: dict[str, Path] = {}
    for split, filename in hub.files.items():
        try:
            cached = hf_hub_download(hub.repo_id, filename, repo_type="dataset", revision=hub.revision)
        # OSError covers the hub's HTTP errors, offline mode and missing cache entries; ValueError a
        # malformed repo id; EntryNotFoundError a file the repository does not have
        except (OSError, ValueError, EntryNotFoundError) as error:
            raise DataError(f"cannot download {hub_file_label(hub, filename)}: {error}") from None
        copy = dest_dir / filename
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, copy)
        local[split] = copy
    return local
