"""A small tokenizer trained here with `tokenizers`, wrapped as a Hugging Face fast tokenizer.

The project's built-in models are trained from nothing, so they need a tokenizer that is trained from nothing too
(no hub downloads). What comes out is an ordinary `PreTrainedTokenizerFast`: `save_pretrained` writes
`tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja`, and `AutoTokenizer.from_pretrained` loads it back.

Two kinds:

- ``"word"``: one token per word or punctuation mark. The smallest vocabulary and the shortest sequences for a closed
  language such as the built-in task's (`rlhf.sim`); words never seen in training become ``<unk>``.
  Decoding joins words with spaces and glues punctuation back ("place ." -> "place."), so ordinary text round-trips.
- ``"bpe"``: byte-level BPE (GPT-2 style). Any text round-trips exactly; needs a larger vocabulary for whole words.

The chat template is deliberately plain: ``<bos><|user|>question<|assistant|>answer<eos>``. Role markers are special
tokens, so a prompt ends on a token boundary and a response can be tokenized on its own and appended
(what generation and the trainers do).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, USER, ASSISTANT, SYSTEM)

# Jinja, rendered by `tokenizer.apply_chat_template`. Messages are {"role": "system"|"user"|"assistant", "content": str}.
# An assistant turn ends with <eos> so that a model learns to stop.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TokenizerConfig:
    """How to train the tokenizer."""

    kind: Literal["word", "bpe"] = "word"
    """``"word"``: one token per word (smallest, for closed languages); ``"bpe"``: byte-level BPE (any text, exact round trip)."""
    vocab_size: int = 4096
    """Upper bound on the vocabulary, special tokens included. A word-level vocabulary is often smaller (every word seen
    at least ``min_frequency`` times); byte-level BPE needs ~2x the number of distinct words to keep words whole."""
    min_frequency: int = 1
    """Words (or BPE merges) seen fewer times than this are left out of the vocabulary."""
    padding_side: Literal["left", "right"] = "left"
    """Left padding, so that a batch of prompts ends at the same position and generation appends to all rows at once.
    The trainers build their own padded batches and do not depend on this."""
    model_max_length: int = 512
    """What the wrapped tokenizer reports as its maximum length (it truncates to it only when asked)."""


def _word_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Split on whitespace, then isolate every punctuation mark except the apostrophe, so "don't" stays one word and
    # "place." becomes "place" ".". (The stock Whitespace pre-tokenizer would make "don ' t".)
    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[^\w\s']"), behavior="isolated")]
    )


def _train_backend(texts: Iterable[str], config: TokenizerConfig) -> Tokenizer:
    if config.kind == "word":
        backend = Tokenizer(models.WordLevel(unk_token=UNK))
        backend.pre_tokenizer = _word_pre_tokenizer()
        # WordPiece's decoder joins tokens with spaces and, with cleanup, removes the space before punctuation.
        backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        trainer = trainers.WordLevelTrainer(
            vocab_size=config.vocab_size, min_frequency=config.min_frequency, special_tokens=list(SPECIAL_TOKENS)
        )
    elif config.kind == "bpe":
        backend = Tokenizer(models.BPE())
        # add_prefix_space=False: a response tokenized on its own starts without a leading space, as it is written.
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:  # pragma: no cover - guarded by the Literal, kept for callers without a type checker
        raise ValueError(f"TokenizerConfig.kind must be 'word' or 'bpe', got {config.kind!r}")
    backend.train_from_iterator(texts, trainer=trainer)
    return backend


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig | None = None) -> PreTrainedTokenizerFast:
    """Train a tokenizer on ``texts`` and wrap it with pad/unk/bos/eos tokens, role tokens and the chat template."""
    config = config or TokenizerConfig()
    backend = _train_backend(texts, config)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
        padding_side=config.padding_side,
        model_max_length=config.model_max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved with ``save_pretrained`` (ours or any other Hugging Face tokenizer in a local folder)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a tokenizer without a pad token (GPT-2's, many Llama ones) its eos token as pad, as is usual."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; add one before padding batches")
        tokenizer.pad_token = tokenizer.eos_token


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text a policy continues for a user ``prompt``: the chat template with the generation prompt, or the prompt
    itself for a tokenizer without a chat template (a plain pretrained LM)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def format_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The text a policy continues for a conversation (``[{"role", "content"}, ...]``): the chat template with the
    generation prompt, or, for a tokenizer without one, a ``role: content`` line per message and ``assistant:``.
    A template may refuse a conversation (roles that do not alternate): its exception propagates."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase, prompt_text: str, response: str, add_eos: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids of an already formatted prompt and of its response, tokenized apart as generation produces them.

    Tokenizing the two apart (rather than the joined string) keeps the boundary where generation puts it, so the
    supervised and reward stages see the same ids that the policy will produce. ``add_eos`` ends the response with eos.
    """
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        response_ids = [*response_ids, tokenizer.eos_token_id]
    return list(prompt_ids), list(response_ids)
