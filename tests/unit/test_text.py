import pytest

from latent_sft_core.config import TextParams
from latent_sft_core.errors import ArtifactError
from latent_sft_core.text import (
    LATENT,
    THINK_CLOSE,
    THINK_OPEN,
    TextFormat,
    encode,
    extend_model_tokenizer,
    load_tokenizer,
    special_ids,
    tokenizer_fingerprint,
    train_embedded_tokenizer,
)

pytestmark = pytest.mark.unit

TEXTS = [
    "Tom has 5 apples. He buys 37 more. How many apples does he have?\n",
    "<<5+37=42>> <<42-2=40>>",
    "Ann buys 3 bags of 4 pens.\n",
    "<<3*4=12>>",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_embedded_tokenizer(TEXTS, vocab_size=320, min_frequency=2)


def test_method_tokens_are_single_distinct_ids(tokenizer):
    ids = special_ids(tokenizer)
    values = [ids.think_open, ids.think_close, ids.latent, ids.pad, ids.end]
    assert len(set(values)) == 5
    for token, expected in ((THINK_OPEN, ids.think_open), (THINK_CLOSE, ids.think_close), (LATENT, ids.latent)):
        assert encode(tokenizer, token) == [expected]
    # inside running text too: never split into sub-tokens
    assert encode(tokenizer, f"x{THINK_CLOSE}y").count(ids.think_close) == 1


def test_numbers_split_into_runs_of_three_digits_and_text_round_trips(tokenizer):
    text = "Tom has 5 apples.\n<think><<5+37=42>> <<42-2=40>></think>40"
    ids = encode(tokenizer, text)
    assert tokenizer.decode(ids) == text
    numbers = lambda text: [t for t in tokenizer.convert_ids_to_tokens(encode(tokenizer, text))  # noqa: E731
                            if any(ch.isdigit() for ch in t)]
    assert numbers("<<5+37=42>>") == ["5", "37", "42"]  # frequent numbers: one token each
    # runs of at most three digits; a rare number falls back to smaller pieces inside its run
    runs = [piece for piece, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("1234567")]
    assert runs == ["123", "456", "7"]
    assert numbers("1234567") == [piece for run in runs for piece in numbers(run)]  # no token spans two runs


def test_no_bos_or_eos_added(tokenizer):
    ids = encode(tokenizer, "Tom")
    assert special_ids(tokenizer).end not in ids and len(ids) == 1


def test_save_and_reload_offline(tokenizer, tmp_path):
    tokenizer.save_pretrained(str(tmp_path))
    again = load_tokenizer(tmp_path)
    text = "Ann buys 3 bags of 4 pens.\n<think><<3*4=12>></think>12"
    assert encode(again, text) == encode(tokenizer, text)
    assert special_ids(again) == special_ids(tokenizer)
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tokenizer)


def test_fingerprint_changes_with_vocabulary(tokenizer):
    other = train_embedded_tokenizer(TEXTS + ["zebra zebra zebra"] * 10, vocab_size=320, min_frequency=2)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)


def test_load_tokenizer_rejects_empty_folder(tmp_path):
    with pytest.raises(ArtifactError, match="no tokenizer here"):
        load_tokenizer(tmp_path)


def test_extend_model_tokenizer_adds_single_tokens_and_pad():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "<": 2, "/": 3, "think": 4, ">": 5, "</s>": 6}, "[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    base = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="[UNK]")
    assert base.pad_token is None
    size = len(base)
    extended = extend_model_tokenizer(base)
    ids = special_ids(extended)
    assert len(extended) == size + 4  # three method tokens and a pad
    assert extended.convert_ids_to_tokens(ids.pad) == "<|pad|>"
    assert encode(extended, f"a {THINK_CLOSE} a") == [1, ids.think_close, 1]


def test_text_format_plain_and_answer_template():
    plain = TextFormat(TextParams())
    assert plain.prompt("What is 2+2?", None) == "What is 2+2?\n"
    boxed = TextFormat(TextParams(answer_template="The answer is \\boxed{{answer}}."))
    assert boxed.answer("18") == "The answer is \\boxed{18}."


def test_chat_template_needs_one(tokenizer):
    with pytest.raises(ArtifactError, match="no chat template"):
        TextFormat(TextParams(template="chat")).prompt("q", tokenizer)


def test_chat_template_renders_instruction_and_question(tokenizer):
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    try:
        prompt = TextFormat(TextParams(template="chat", instruction="Think.")).prompt("2+2?", tokenizer)
    finally:
        tokenizer.chat_template = None
    assert prompt == "[system]Think.\n[user]2+2?\n[assistant]"
