from pathlib import Path

import pytest
import yaml

from latent_sft_core.config import ModelSourceParams, Params, ParamsError, load_params, parse_params
from tests.support import MICRO_PARAMS, REPO_ROOT

pytestmark = pytest.mark.unit


def test_repository_params_file_validates():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.base.data.source == "synthetic"
    assert params.base.model.source == "tiny"
    assert params.base.compression_rate == 4 and params.base.top_k == 10


def test_micro_params_validate():
    params = parse_params(MICRO_PARAMS)
    assert params.base_model.tiny.hidden_size == 32
    assert params.prepare_data.synthetic.train_size == 256


def test_empty_file_gives_defaults(tmp_path):
    (tmp_path / "p.yaml").write_text("")
    assert load_params(tmp_path / "p.yaml") == Params()


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"base": {"compresion_rate": 2}}))
    with pytest.raises(ParamsError) as error:
        load_params(path)
    assert str(path) in str(error.value)
    assert "base.compresion_rate: unknown key" in str(error.value)


def test_unknown_section_is_named():
    with pytest.raises(ParamsError, match="train_encodr: unknown key"):
        parse_params({"train_encodr": {}})


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ParamsError) as error:
        parse_params({"base": {"data": {"source": "csv"}}})
    message = str(error.value)
    assert "base.data.source" in message and "'csv'" in message
    for allowed in ("synthetic", "gsm8k_aug_txt", "jsonl", "hub"):
        assert allowed in message


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"base": {"compression_rate": 0}}, "base.compression_rate"),
        ({"base": {"top_k": "ten"}}, "base.top_k"),
        ({"base_model": {"train": {"lr": -1}}}, "base_model.train.lr"),
        ({"prepare_data": {"synthetic": {"min_steps": 4, "max_steps": 2}}}, "min_steps must be <= max_steps"),
        ({"prepare_data": {"synthetic": {"hard_max_factor": 9}}}, "hard_max_factor must be > min(9, max_operand)"),
        ({"base_model": {"tiny": {"hidden_size": 30, "num_heads": 4}}}, "divisible"),
        ({"base": {"model": {"source": "path"}}}, "model.path is required"),
        ({"base": {"model": {"source": "gguf", "path": "/models/x"}}}, "model.gguf_file is required"),
        ({"base": {"model": {"source": "hub"}}}, "model.repo_id is required"),
        ({"base": {"model": {"source": "ollama"}}}, "base.model.source"),
        ({"base": {"text": {"answer_template": "no slot"}}}, "{answer}"),
        ({"prepare_data": {"on_bad_row": "ignore"}}, "prepare_data.on_bad_row"),
        ({"base_model": {"skip_sft": True}}, "skip_sft needs a pretrained base.model.source"),
        ({"latent": {"kind": "hidden_state"}, "evaluate": {"decoding": {"gumbel": {"enabled": True}}}},
         "evaluate.decoding.gumbel: Gumbel noise perturbs alpha"),
        ({"evaluate": {"ecr_k": [1, 200]}}, "ecr_k values must be in 1..analysis_top_k (100)"),
        ({"evaluate": {"models": ["cot_sft", "cot_sft"]}}, "models lists a model twice"),
        ({"train_decoder": {"decoder_lora": {}, "diversity_weight": 0.1}},
         "train_decoder.diversity_weight: the diversity and chunk-anchor terms act on the alpha of a trained encoder"),
        ({"train_decoder": {"decoder_lora": {}, "chunk_anchor_weight": 0.1}},
         "train_decoder.chunk_anchor_weight: the diversity and chunk-anchor terms act on the alpha"),
        ({"latent": {"kind": "hidden_state"}},
         "train_encoder.diversity_weight, train_encoder.chunk_anchor_weight, train_joint.diversity_weight, "
         "train_joint.chunk_anchor_weight: the diversity and chunk-anchor terms act"),
        ({"train_latent": {"hidden_state_stop_weight": 1.0}},
         "train_latent.hidden_state_stop_weight: the stop term is for latent.kind 'hidden_state'"),
        ({"train_latent": {"hidden_state_stop_weight": -1.0}}, "train_latent.hidden_state_stop_weight"),
        ({"train_joint": {"diversity_weight": -0.1}}, "train_joint.diversity_weight"),
        ({"train_joint": {"chunk_anchor_weight": -0.1}}, "train_joint.chunk_anchor_weight"),
    ],
)
def test_bad_values_name_the_key(section, expected):
    with pytest.raises(ParamsError) as error:
        parse_params(section)
    assert expected in str(error.value)


def test_not_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(path)


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("base: {seed: [\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path)
    with pytest.raises(ParamsError, match="cannot read"):
        load_params(tmp_path / "missing.yaml")


def test_params_file_spells_out_the_schema_defaults():
    """params.yaml shows every default of the schema, so the two cannot drift apart."""
    assert load_params(REPO_ROOT / "params.yaml") == Params()
    on_disk = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert on_disk == Params().model_dump(mode="json")


def test_the_checkpoint_of_each_pretrained_source():
    imported = Path("models/pretrained")
    assert ModelSourceParams(source="path", path="/m/llama").checkpoint_dir(imported) == Path("/m/llama")
    assert ModelSourceParams(source="gguf", gguf_file="/m/x.gguf").checkpoint_dir(imported) == imported
    assert ModelSourceParams(source="hub", repo_id="o/n").checkpoint_dir(imported) == imported
    with pytest.raises(ValueError, match="'tiny' has no pretrained checkpoint"):
        ModelSourceParams().checkpoint_dir(imported)
