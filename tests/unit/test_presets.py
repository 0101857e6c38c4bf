import pytest
import yaml

from latent_sft_core import presets
from latent_sft_core.cli import main as cli_main
from latent_sft_core.config import deep_merge, load_params, parse_params
from latent_sft_core.errors import ArtifactError
from latent_sft_core.presets import PresetError, apply_preset, load_preset, preset_names, preset_params
from tests.support import REPO_ROOT

pytestmark = pytest.mark.unit

REPO_PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
PAPER_LORA = {"rank": 64, "alpha": 128, "dropout": 0.1}


def preset_on_repo_params(name: str):
    return parse_params(deep_merge(REPO_PARAMS, load_preset(name)), source=name)


def test_the_presets_are_the_paper_runs_and_a_cpu_run():
    assert preset_names() == ["llama-3.2-1b-gsm8k-c2", "llama-3.2-1b-gsm8k-c4", "qwen2.5-math-7b-openr1-c16",
                              "smollm2-135m-cpu"]


@pytest.mark.parametrize("c", [2, 4])
def test_llama_gsm8k_presets_carry_the_reference_v2_gsm8k_settings(c):
    params = preset_on_repo_params(f"llama-3.2-1b-gsm8k-c{c}")
    assert (params.base.compression_rate, params.base.top_k) == (c, 10)
    assert (params.base.model.source, params.base.model.repo_id) == ("hub", "meta-llama/Llama-3.2-1B-Instruct")
    assert params.prepare_data.hub.files["train"] == "GSM8k-Aug-train.jsonl"
    assert set(params.prepare_data.hub.split_fields) == {"test", "gsm_hard", "svamp", "multiarith"}
    for stage in (params.train_encoder, params.train_decoder, params.train_joint):
        assert (stage.train.lr, stage.train.epochs, stage.train.batch_size * stage.train.grad_accum) == (1e-4, 10, 512)
        assert stage.diversity_weight == 0.0  # the paper's L_sup
    for lora in (params.train_encoder.encoder_lora, params.train_decoder.decoder_lora,
                 params.train_joint.encoder_lora, params.train_joint.decoder_lora, params.train_latent.lora):
        assert {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout} == PAPER_LORA
    assert "embed_tokens" in params.train_encoder.encoder_lora.targets  # kept from params.yaml: the latent row
    latent = params.train_latent
    assert (latent.finetune, latent.train.lr, latent.train.epochs) == ("lora", 3e-4, 70)
    assert latent.train.batch_size * latent.train.grad_accum == 512
    assert latent.gumbel.enabled and (latent.gumbel.scale, latent.gumbel.tau) == (1.0, 1.0)
    assert latent.deepspeed.enabled and latent.deepspeed.zero_stage == 2 and params.compute.dtype == "bfloat16"
    assert params.evaluate.decoding.max_new_tokens == 128
    assert (params.evaluate.decoding.sampling.temperature, params.evaluate.decoding.sampling.top_p) == (0.6, 0.95)


def test_the_c2_preset_is_the_c4_preset_with_c_changed():
    c2, c4 = load_preset("llama-3.2-1b-gsm8k-c2"), load_preset("llama-3.2-1b-gsm8k-c4")
    assert c2 == deep_merge(c4, {"base": {"compression_rate": 2}}) and "extends" not in c2


def test_the_qwen_preset_carries_the_reference_v2_math_settings():
    params = preset_on_repo_params("qwen2.5-math-7b-openr1-c16")
    assert (params.base.compression_rate, params.base.top_k, params.base.model.repo_id) == (16, 10, "Qwen/Qwen2.5-Math-7B")
    assert params.prepare_data.hub.files["train"] == "OpenR1-Math-220k-v-train-4k.jsonl"
    joint = params.train_joint.train
    assert (joint.lr, joint.epochs, joint.batch_size * joint.grad_accum) == (1e-5, 10, 64)
    latent = params.train_latent.train
    assert (latent.lr, latent.epochs, latent.batch_size * latent.grad_accum) == (2e-5, 50, 256)
    assert params.train_latent.gumbel.enabled and params.compute.dtype == "bfloat16"
    assert params.evaluate.decoding.max_new_tokens == 4096
    assert params.latent.projection == "lm_head"  # untied embeddings


def test_the_cpu_preset_runs_smollm2_from_its_gguf_on_the_synthetic_data():
    params = preset_on_repo_params("smollm2-135m-cpu")
    assert params.base.model.source == "gguf" and params.base.model.gguf_file.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert params.base.data.source == "synthetic" and params.base.text.template == "chat"
    assert params.base_model.new_token_lr > params.base_model.train.lr


def test_apply_merges_the_preset_into_the_params_file_keeping_its_comments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".cache" / "models").mkdir(parents=True)
    (tmp_path / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    params_file = tmp_path / "params.yaml"
    original = (REPO_ROOT / "params.yaml").read_text()
    params_file.write_text(original)

    applied = apply_preset("smollm2-135m-cpu", params_file)
    assert load_params(params_file) == applied == preset_on_repo_params("smollm2-135m-cpu")
    text = params_file.read_text()
    assert text.splitlines()[0] == original.splitlines()[0]  # the header comment
    assert "    source: gguf             # tiny (built from base_model.tiny) | path | gguf | hub" in text
    changed = [line for line in text.splitlines() if line not in original.splitlines()]
    assert len(changed) < 60 and all(": null" not in line or "#" in line for line in changed)
    assert "path: null" in text  # None stays spelled null


def test_a_preset_naming_a_missing_file_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    params_file = tmp_path / "params.yaml"
    params_file.write_text((REPO_ROOT / "params.yaml").read_text())
    before = params_file.read_bytes()
    with pytest.raises(ArtifactError, match=r"preset smollm2-135m-cpu: base\.model\.gguf_file names "
                                            r"\.cache/models/SmolLM2-135M-Instruct\.Q4_1\.gguf, which does not exist "
                                            r"\(`make smollm2` fetches it\)"):
        apply_preset("smollm2-135m-cpu", params_file)
    with pytest.raises(SystemExit) as exit_status:
        cli_main(["preset", "apply", "smollm2-135m-cpu", "--params", str(params_file)])
    assert exit_status.value.code == 2 and "error: preset smollm2-135m-cpu: base.model.gguf_file" in capsys.readouterr().err
    assert params_file.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_unknown_invalid_and_circular_presets_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(presets, "PRESETS_DIR", tmp_path)
    (tmp_path / "typo.yaml").write_text("base:\n  top_k: ten\n")
    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    with pytest.raises(PresetError, match=r"no preset 'nope'; presets: a, b, typo"):
        load_preset("nope")
    with pytest.raises(PresetError, match=r"params\.yaml with preset typo: invalid parameters\n  base\.top_k"):
        preset_params("typo", REPO_ROOT / "params.yaml")
    with pytest.raises(PresetError, match="presets extend each other in a circle: a -> b -> a"):
        load_preset("a")
