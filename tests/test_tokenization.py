"""Tests for llama4x.tokenization: special-token layout, BOS convention, exact round trip, save/load, validation."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from llama4x.data import python_docs_texts
from llama4x.tokenization import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, special_token_ids, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(python_docs_texts()[:20], vocab_size=1024)


def test_special_tokens_get_the_first_ids_in_order(tokenizer):
    assert special_token_ids(tokenizer) == {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    assert set(SPECIAL_TOKENS) <= set(tokenizer.all_special_tokens)


def test_vocab_size_is_respected_and_merges_are_learned(tokenizer):
    assert len(SPECIAL_TOKENS) + 256 < len(tokenizer) <= 1024
    text = "def function(self, value):\n    return value"
    assert len(tokenizer.encode(text, add_special_tokens=False)) < len(text.encode("utf-8")) / 2


def test_bos_is_prepended_by_default_and_eos_is_not(tokenizer):
    with_special = tokenizer("return x")["input_ids"]
    bare = tokenizer("return x", add_special_tokens=False)["input_ids"]
    assert with_special == [tokenizer.bos_token_id, *bare]
    assert tokenizer.eos_token_id not in with_special


def test_special_tokens_in_text_are_single_ids(tokenizer):
    ids = tokenizer.encode("a<|image|>b<|eot|>", add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("<|image|>") in ids
    assert tokenizer.convert_tokens_to_ids("<|eot|>") in ids


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_decode_encode_roundtrips_arbitrary_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    if not any(token in text for token in SPECIAL_TOKENS):  # skipping special tokens drops literal ones too
        assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text


@pytest.mark.parametrize("text", ["", " ", "  leading spaces", "tabs\tand\nnewlines\r\n", "héllo 世界 🙂 \u200b\x00"])
def test_decode_encode_roundtrips_edge_cases(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_save_and_reload_with_auto_tokenizer_keeps_behaviour(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "for i in range(10):\n    print(i)  # 🙂"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.decode(reloaded.encode(text, add_special_tokens=False)) == text
    assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id) == (0, 1, 2)
    assert special_token_ids(reloaded) == special_token_ids(tokenizer)


def test_padding_goes_on_the_left_with_the_pad_token(tokenizer):
    batch = tokenizer(["a", "a b c d"], padding=True)
    short, long = batch["input_ids"]
    assert len(short) == len(long)
    assert short[0] == tokenizer.pad_token_id and batch["attention_mask"][0][0] == 0


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "  Be brief.\n"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What digit is this? "}]},
        {"role": "assistant", "content": " 7\n"},
        {"role": "user", "content": "And this?"},
        {"role": "system", "content": " Answer with one digit. "},
    ],
]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_renders_as_llama4s_published_template(tokenizer, messages, add_generation_prompt):
    from transformers.models.llama4.processing_llama4 import chat_template as llama4_template

    ours = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    llama4 = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=llama4_template
    )
    assert ours == llama4


@pytest.mark.parametrize("messages", CONVERSATIONS[1:] + [[{"role": "user", "content": "Sum:\n\n"}]])
def test_a_generation_prompt_is_a_prefix_of_the_tokens_of_the_conversation_it_starts(tokenizer, messages):
    """What the model sees when asked to answer is what it saw in training on whole conversations: the "\n\n" after
    the assistant header (or ending a turn) is one piece whatever follows it."""

    def ids(conversation, **kwargs):
        return tokenizer.apply_chat_template(conversation, return_dict=True, **kwargs)["input_ids"]

    answered = [*messages, {"role": "assistant", "content": "7"}]
    ends = [end for end, message in enumerate(answered) if message["role"] == "assistant"]
    for end in ends:
        prompt = ids(answered[:end], add_generation_prompt=True)
        assert ids(answered[: end + 1])[: len(prompt)] == prompt


@pytest.mark.parametrize(
    "messages, kwargs, message",
    [
        ([{"role": "tool", "content": "42"}], {}, "got tool"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"type": "function"}]}], {}, "with tool calls"),
        ([{"role": "user", "content": "hi"}], {"tools": [{"type": "function"}]}, "tools are not supported"),
    ],
)
def test_tool_messages_calls_and_definitions_are_refused_rather_than_dropped(tokenizer, messages, kwargs, message):
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match=message):
        tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.mark.parametrize("vocab_size", [10, len(SPECIAL_TOKENS) + 256, 100.5])
def test_too_small_vocab_size_is_rejected(vocab_size):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["some text"], vocab_size=vocab_size)


@pytest.mark.parametrize("texts", [[], [""], "a plain string"])
def test_empty_texts_are_rejected(texts):
    with pytest.raises(ValueError, match="texts"):
        train_tokenizer(texts)


def test_non_string_texts_are_rejected():
    with pytest.raises(ValueError, match="str"):
        train_tokenizer(["fine", 3])


def test_bad_min_frequency_is_rejected():
    with pytest.raises(ValueError, match="min_frequency"):
        train_tokenizer(["some text"], min_frequency=0)


def test_special_token_ids_names_a_missing_token(tokenizer):
    with pytest.raises(ValueError, match="<|nope|>"):
        special_token_ids(tokenizer, ["<|nope|>"])
