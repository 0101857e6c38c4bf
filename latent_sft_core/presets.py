"""Presets: the params of a known run (a model, its data and the reference's hyper-parameters) as a partial
``params.yaml`` in ``latent_sft_core/presets/<name>.yaml``.

``latent-sft preset apply NAME`` merges a preset into ``params.yaml`` (comments and key order kept), so that
``dvc repro`` runs it and ``dvc exp run`` records it as an experiment whose params ``dvc exp show`` lists.
The merged params are validated against the schema, and every local file the preset names must exist,
before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latent_sft_core.config import DEFAULT_PARAMS_PATH, Params, deep_merge, parse_params
from latent_sft_core.errors import ArtifactError, PipelineError
from latent_sft_core.io import atomic_path

PRESETS_DIR = Path(__file__).parent / "presets"


class PresetError(PipelineError):
    """An unknown preset, or one that does not fit the params file or names a missing file."""


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise PresetError(f"no preset {name!r}; presets: {', '.join(preset_names())}")
    return path


def load_preset(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The preset's partial params, as a plain mapping; ``extends: <preset>`` starts from another preset."""
    import yaml

    if name in _seen:
        raise PresetError(f"presets extend each other in a circle: {' -> '.join((*_seen, name))}")
    data = yaml.safe_load(preset_path(name).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise PresetError(f"{preset_path(name)}: a preset is a mapping of params sections")
    parent = data.pop("extends", None)
    return deep_merge(load_preset(parent, (*_seen, name)), data) if parent else data


def local_files(params: Params) -> dict[str, str]:
    """params key -> the local file or folder it names (what must exist before a run)."""
    files = {}
    model = params.base.model
    if model.source == "path":
        files["base.model.path"] = model.path
    elif model.source == "gguf":
        files["base.model.gguf_file"] = model.gguf_file
    source = params.base.data.source
    if source in ("gsm8k_aug_txt", "jsonl"):
        section = getattr(params.prepare_data, source)
        files |= {f"prepare_data.{source}.files.{split}": path for split, path in section.files.items()}
    return files


def preset_params(name: str, params_path: Path = DEFAULT_PARAMS_PATH) -> tuple[dict[str, Any], Params]:
    """(the preset, the params it gives on top of ``params_path``), checked: schema and local files."""
    import yaml

    preset = load_preset(name)
    current = yaml.safe_load(Path(params_path).read_text(encoding="utf-8")) or {}
    parse_params(current, params_path)  # the file itself must be valid first, so an error names the right culprit
    try:
        merged = parse_params(deep_merge(current, preset), source=f"{params_path} with preset {name}")
    except PipelineError as error:
        raise PresetError(str(error)) from None
    missing = {key: path for key, path in local_files(merged).items() if not Path(path).exists()}
    if missing:
        key, path = next(iter(missing.items()))
        hint = " (`make smollm2` fetches it)" if Path(path).name.startswith("SmolLM2") else ""
        raise ArtifactError(f"preset {name}: {key} names {path}, which does not exist{hint}")
    return preset, merged


def apply_preset(name: str, params_path: Path = DEFAULT_PARAMS_PATH) -> Params:
    """Merge preset ``name`` into ``params_path`` in place (comments kept); returns the resulting params."""
    from ruamel.yaml import YAML

    preset, merged = preset_params(name, params_path)
    round_trip = YAML()
    round_trip.preserve_quotes = True
    round_trip.width = 120
    # ruamel writes None as an empty value; params.yaml spells it null
    round_trip.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null"))
    document = round_trip.load(Path(params_path).read_text(encoding="utf-8"))
    _merge_into(document, preset)
    with atomic_path(params_path) as staged, staged.open("w", encoding="utf-8") as handle:
        round_trip.dump(document, handle)
    return merged


def _merge_into(document: Any, preset: dict[str, Any]) -> None:
    """``deep_merge`` on a ruamel document: nested mappings merged key by key, other values replaced."""
    for key, value in preset.items():
        if isinstance(value, dict) and isinstance(document.get(key), dict):
            _merge_into(document[key], value)
        else:
            document[key] = value
