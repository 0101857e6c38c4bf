"""What real models' tokenizers do differently, each built in code: a BOS added by default (Llama), pad = eos
(Qwen, SmolLM2), <think> / </think> already single tokens (DeepSeek-R1-Distill), digits one per token (SmolLM2,
Qwen) or in runs of three (Llama 3), a chat template without a system role, and untied embeddings."""

from __future__ import annotations

import logging

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from latent_sft_core.chunking import chunk_examples
from latent_sft_core.config import LatentParams, TextParams
from latent_sft_core.data.schema import Example
from latent_sft_core.errors import ArtifactError
from latent_sft_core.layout import cot_sft_sequence
from latent_sft_core.phase1_model import warn_on_untied_input_projection
from latent_sft_core.text import (
    EMBEDDED_PAD,
    LATENT,
    THINK_CLOSE,
    THINK_OPEN,
    TextFormat,
    encode,
    extend_model_tokenizer,
    pipeline_token_ids,
    special_ids,
)
from latent_sft_core.training import CausalLMCollator

pytestmark = pytest.mark.unit

WORDS = ["Tom", "has", "apples", "How", "many", "?", ".", "<", ">", "=", "*", "+", "user", "system", "assistant",
         ":", "\n", " "]
CHAT = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
NO_SYSTEM_ROLE = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                  "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")


def word_tokenizer(digits: str, specials: list[str], add_bos: bool = False, **tokens: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose numbers split into single digits (``digits="single"``) or runs of up to
    three (``"runs"``, with every number below 1000 in the vocabulary)."""
    numbers = [str(d) for d in range(10)] if digits == "single" else [str(n) for n in range(1000)]
    vocab = {token: index for index, token in enumerate([*specials, "[UNK]", *WORDS, *numbers])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    digit_split = (pre_tokenizers.Digits(individual_digits=True) if digits == "single"
                   else pre_tokenizers.Split(Regex(r"\d{1,3}"), behavior="isolated"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), digit_split,
                                                  pre_tokenizers.Punctuation()])
    if add_bos:
        core.post_processor = processors.TemplateProcessing(
            single=f"{tokens['bos_token']} $A", special_tokens=[(tokens["bos_token"], vocab[tokens["bos_token"]])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", **tokens)
    tokenizer.chat_template = CHAT
    return tokenizer


def chunked(tokenizer, cot: str = "<<12*34=408>>", c: int = 2):
    example = Example(id="r", split="train", question="How many apples?", cot=cot, answer="408", source="test")
    return chunk_examples([example], tokenizer, TextFormat(TextParams()), c)[0]


def test_a_tokenizer_that_adds_bos_by_default_gets_it_once_from_the_chat_template():
    bos = "<|begin_of_text|>"
    tokenizer = extend_model_tokenizer(word_tokenizer("runs", [bos, "<|eot_id|>"], add_bos=True, bos_token=bos,
                                                      eos_token="<|eot_id|>"))
    bos_id = tokenizer.convert_tokens_to_ids(bos)
    assert tokenizer("Tom has")["input_ids"][0] == bos_id  # what the tokenizer does by default
    assert bos_id not in encode(tokenizer, "Tom has")  # the pipeline never lets it add one
    prompt = TextFormat(TextParams(template="chat")).prompt("How many apples?", tokenizer)
    assert encode(tokenizer, prompt).count(bos_id) == 1 and encode(tokenizer, prompt)[0] == bos_id


def test_pad_equal_to_eos_keeps_the_end_of_every_answer_supervised():
    tokenizer = extend_model_tokenizer(word_tokenizer("single", ["<|endoftext|>"], eos_token="<|endoftext|>",
                                                      pad_token="<|endoftext|>"))
    ids = special_ids(tokenizer)
    assert ids.pad == ids.end and tokenizer.pad_token != EMBEDDED_PAD  # no second pad added
    assert pipeline_token_ids(tokenizer) == [ids.think_open, ids.think_close, ids.latent]
    short, long = chunked(tokenizer, "<<1+2=3>>"), chunked(tokenizer, "<<12*34=408>> <<408+1=409>>")
    batch = CausalLMCollator(ids.pad)([cot_sft_sequence(short, ids), cot_sft_sequence(long, ids)])
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    for row, length in enumerate(lengths):
        assert batch["labels"][row, length - 1] == ids.end  # the end token, although it is also the pad id
        assert (batch["labels"][row, length:] == -100).all()  # padding is not
    assert lengths[0] < lengths[1]


def test_think_tokens_the_model_already_has_keep_their_ids():
    tokenizer = word_tokenizer("single", ["</s>", THINK_OPEN, THINK_CLOSE], eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": [THINK_OPEN, THINK_CLOSE]})
    before = {token: tokenizer.convert_tokens_to_ids(token) for token in (THINK_OPEN, THINK_CLOSE)}
    size = len(tokenizer)
    extend_model_tokenizer(tokenizer)
    ids = special_ids(tokenizer)
    assert (ids.think_open, ids.think_close) == (before[THINK_OPEN], before[THINK_CLOSE]) == (1, 2)
    assert len(tokenizer) == size + 2 and ids.latent == size  # only <|latent|> and a pad are new
    assert tokenizer.convert_ids_to_tokens(ids.latent) == LATENT


@pytest.mark.parametrize(("digits", "number_tokens"), [("single", 3), ("runs", 1)])
def test_chunks_cover_the_chain_whether_digits_are_single_tokens_or_runs(digits, number_tokens):
    tokenizer = extend_model_tokenizer(word_tokenizer(digits, ["</s>"], eos_token="</s>"))
    assert len(encode(tokenizer, "408")) == number_tokens
    row = chunked(tokenizer, c=2)
    chunks = row.chunks()
    assert len(chunks) == -(-len(row.cot_ids) // 2)  # N = ceil(L / c)
    assert [token for chunk in chunks for token in chunk] == row.cot_ids
    assert tokenizer.decode(row.cot_ids).replace(" ", "") == "<<12*34=408>>"


def test_a_chat_template_without_a_system_role_is_named():
    tokenizer = word_tokenizer("single", ["</s>"], eos_token="</s>")
    tokenizer.chat_template = NO_SYSTEM_ROLE
    with pytest.raises(ArtifactError, match=r"chat template cannot render the system instruction.*System role not "
                                            r"supported; use template 'plain'"):
        TextFormat(TextParams(template="chat")).prompt("How many apples?", tokenizer)


@pytest.mark.parametrize(("tied", "projection", "warned"), [
    (False, "input_embeddings", True), (False, "lm_head", False), (True, "input_embeddings", False)])
def test_untied_embeddings_with_the_input_projection_are_a_loud_warning(tied, projection, warned, caplog):
    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, tie_word_embeddings=tied)
    with caplog.at_level(logging.WARNING):
        assert warn_on_untied_input_projection(LlamaForCausalLM(config), LatentParams(projection=projection), "m") is warned
    assert ("set latent.projection: lm_head" in caplog.text) is warned
