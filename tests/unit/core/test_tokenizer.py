"""The trained tokenizer: round trips, special tokens, the chat template, save/load as a Hugging Face tokenizer."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from rlhf.sim import world_texts
from rlhf.core.tokenizer import (
    ASSISTANT,
    TokenizerConfig,
    encode_prompt_response,
    format_prompt,
    load_tokenizer,
    train_tokenizer,
)

TEXTS = [
    "How do I store cleaning chemicals?",
    "Keep every product in its original labeled bottle. Don't mix bleach and ammonia!",
    "Wear gloves, open a window, and read the label first.",
]


@pytest.fixture(scope="module", params=["word", "bpe"])
def tokenizer(request):
    return train_tokenizer(TEXTS * 3 + world_texts(), TokenizerConfig(kind=request.param, vocab_size=2000))


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_distinct_and_single(tokenizer):
    special = [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id]
    assert None not in special and len(set(special)) == 4
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # so the reward model's last-token pooling sees the eos
    ids = tokenizer(f"<bos><|user|>hi{ASSISTANT}", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.convert_tokens_to_ids(ASSISTANT)


def test_chat_template_and_prompt_boundary(tokenizer):
    prompt = format_prompt(tokenizer, TEXTS[0])
    assert prompt == f"<bos><|user|>{TEXTS[0]}{ASSISTANT}"
    prompt_ids, response_ids = encode_prompt_response(tokenizer, prompt, TEXTS[1])
    assert prompt_ids[-1] == tokenizer.convert_tokens_to_ids(ASSISTANT)
    assert response_ids[-1] == tokenizer.eos_token_id
    # Tokenizing prompt and response apart gives the same ids as the joined text: the boundary is a special token.
    joined = tokenizer(prompt + TEXTS[1], add_special_tokens=False)["input_ids"]
    assert joined == prompt_ids + response_ids[:-1]
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": TEXTS[0]}, {"role": "assistant", "content": TEXTS[1]}], tokenize=False
    )
    assert full == prompt + TEXTS[1] + "<eos>"


def test_save_and_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    for loaded in (load_tokenizer(str(tmp_path)), AutoTokenizer.from_pretrained(tmp_path)):
        for text in TEXTS:
            assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<pad>", "<bos>", "<eos>")
        assert loaded.padding_side == "left"
        assert format_prompt(loaded, "hi") == format_prompt(tokenizer, "hi")


def test_world_vocabulary_is_small_and_complete():
    tokenizer = train_tokenizer(world_texts())
    assert 200 <= len(tokenizer) <= 2000
    for text in world_texts():
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_unknown_words_become_unk_in_word_mode():
    tokenizer = train_tokenizer(TEXTS)
    assert tokenizer.unk_token_id in tokenizer("a zebra")["input_ids"]
