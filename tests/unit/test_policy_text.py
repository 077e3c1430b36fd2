"""Token ids to text: stop sequences cut the text and count tokens up to the stop; stream deltas add up to the text
and never show a stop sequence."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf.policy.text import SampleText

WORDS = ["<pad>", "<eos>", "<unk>", "the", "cat", "sat", "on", "mat", ".", "END", "E", "ND", "x"]


def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


TOK = tokenizer()


def ids(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


def stream(sample: SampleText, tokens: list[int]) -> list[str]:
    deltas = []
    for token in tokens:
        stopped = sample.add([token])
        deltas.append(sample.final_delta() if stopped else sample.delta())
        if stopped:
            break
    else:
        deltas.append(sample.final_delta())
    return [d for d in deltas if d]


def test_without_stop_sequences_the_text_is_the_decoded_ids():
    sample = SampleText(TOK)
    sample.add(ids("the cat sat") + [1])  # eos is counted, not shown
    assert sample.text == "the cat sat"
    assert sample.completion_tokens == 4
    assert not sample.stopped


def test_stop_sequence_cuts_the_text_and_counts_tokens_up_to_it():
    sample = SampleText(TOK, stop=["on the"])
    assert sample.add(ids("the cat sat on the mat .")) is True
    assert sample.text == "the cat sat "
    assert sample.completion_tokens == 5  # 'the cat sat on the'
    assert sample.add(ids("x")) is True and sample.completion_tokens == 5  # later tokens are ignored


def test_a_possible_start_of_a_stop_sequence_is_held_back():
    sample = SampleText(TOK, stop=["t END"])
    # After "the cat" the trailing "t" may begin "t END": only "the ca" is sent; then the stop completes.
    assert stream(sample, ids("the cat END x")) == ["the", " ca"]
    assert sample.text == "the ca" and sample.completion_tokens == 3
    # A held-back tail that does not become a stop is sent later.
    sample = SampleText(TOK, stop=["t END"])
    assert "".join(stream(sample, ids("the cat sat"))) == "the cat sat" == sample.text


def test_unary_and_streamed_text_agree():
    tokens = ids("the cat sat on the mat .") + [1]
    for stop in ([], ["mat"], ["sat on", "."], ["zzz"]):
        unary = SampleText(TOK, stop)
        unary.add(tokens)
        streamed = SampleText(TOK, stop)
        deltas = stream(streamed, tokens)
        assert "".join(deltas) == unary.text == streamed.streamed_text, stop
        assert streamed.completion_tokens == unary.completion_tokens


def test_punctuation_cleanup_keeps_deltas_consistent():
    sample = SampleText(TOK)
    deltas = stream(sample, ids("the cat sat on the mat ."))
    assert "".join(deltas) == "the cat sat on the mat."
