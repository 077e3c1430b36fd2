"""A call's items as one reward-model version reads them: the prompts formatted, the pairs tokenized, in as few
tokenizer calls as the tokenizer allows and with exactly the text and ids the core produces.

* formatting: a tokenizer with a chat template renders every item of a call in one ``apply_chat_template`` call (a
  batch of conversations) instead of one call per item; the texts are those of ``core.tokenizer.format_prompt`` /
  ``format_chat``. A call with a conversation the template rejects is formatted item by item, so the error names the
  item. Without a chat template, the core's functions item by item (they are plain string joins then).
* tokenizing: a causal model with a fast (Rust) tokenizer encodes every prompt and response of a call in one
  ``encode_batch`` of the backend, without special tokens, and appends eos: ``RewardModel.tokenize_many(...,
  truncate=False)`` without the Python per-text work of the ``transformers`` wrapper (its batch encoding, its conversion
  of every encoding to lists), which is most of the time for short texts. The backend is used only while its state is
  the one that wrapper gives it for this call (no truncation, no padding, special tokens as the tokenizer's
  ``split_special_tokens``); an encoder (text pairs), a slow tokenizer, or a version whose check failed goes through the
  core's ``tokenize_many``.

:meth:`InputBuilder.check` compares both fast paths with the core on sample pairs when a version loads; a path that
differs is switched off for that version (logged), so a tokenizer this module does not foresee costs speed, never a
score.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from rlhf.core.models import RewardInput, RewardModel
from rlhf.core.tokenizer import format_chat, format_prompt
from rlhf.serving.errors import InvalidArgument

log = logging.getLogger(__name__)


class Item(Protocol):
    """What formatting reads of a validated item (rlhf.reward.service.ValidItem)."""

    prompt: str | None
    messages: tuple[tuple[str, str], ...]


def _conversation(item: Item) -> list[dict[str, str]]:
    if item.prompt is not None:
        return [{"role": "user", "content": item.prompt}]
    return [{"role": r, "content": c} for r, c in item.messages]


def format_one(tokenizer: Any, index: int, item: Item) -> str:
    """The core's formatting of ``item`` (``items[index]``); a conversation the chat template rejects is
    INVALID_ARGUMENT naming the item."""
    try:
        if item.prompt is not None:
            return format_prompt(tokenizer, item.prompt)
        return format_chat(tokenizer, _conversation(item))
    except Exception as e:  # a chat template may reject a conversation (roles that do not alternate)
        raise InvalidArgument(f"items[{index}].messages",
                              f"the reward model's chat template rejects this conversation: {e}") from None


class InputBuilder:
    """Formats and tokenizes items for one reward-model version (see the module's docstring)."""

    def __init__(self, model: RewardModel) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.batched_format = bool(getattr(self.tokenizer, "chat_template", None))
        self.fast_tokenize = self._backend() is not None

    # ------------------------------------------------------------------------------------------ formatting

    def format_many(self, items: Sequence[Item]) -> list[str]:
        """The formatted prompt of every item (InvalidArgument naming the first item the chat template rejects)."""
        tokenizer = self.tokenizer
        if self.batched_format and len(items) > 1:
            try:
                texts = tokenizer.apply_chat_template([_conversation(item) for item in items], tokenize=False,
                                                      add_generation_prompt=True)
            except Exception:  # noqa: BLE001 - item by item below: the error names the item
                texts = None
            if isinstance(texts, list) and len(texts) == len(items) and all(isinstance(t, str) for t in texts):
                return texts
        return [format_one(tokenizer, i, item) for i, item in enumerate(items)]

    # ------------------------------------------------------------------------------------------ tokenizing

    def _backend(self) -> Any | None:
        """The Rust tokenizer when its output is the core's for this call, else None."""
        model, tokenizer = self.model, self.tokenizer
        if model.pair_input or not getattr(tokenizer, "is_fast", False):
            return None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch"):
            return None
        try:
            if backend.truncation is not None or backend.padding is not None:
                return None
            if bool(backend.encode_special_tokens) != bool(getattr(tokenizer, "split_special_tokens", False)):
                return None
        except AttributeError:  # an older tokenizers without these properties
            return None
        return backend

    def tokenize_many(self, prompts: Sequence[str], responses: Sequence[str]) -> list[RewardInput]:
        """``RewardModel.tokenize_many(prompts, responses, truncate=False)``: every token kept."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        backend = self._backend() if self.fast_tokenize and prompts else None
        if backend is None:
            return self.model.tokenize_many(prompts, responses, truncate=False)
        encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        encodings = encode([*prompts, *responses], add_special_tokens=False)
        eos = self.tokenizer.eos_token_id
        tail = [eos] if eos is not None else []
        n = len(prompts)
        out = []
        for p, r in zip(encodings[:n], encodings[n:], strict=True):
            prompt_ids = p.ids
            out.append(RewardInput({"input_ids": [*prompt_ids, *r.ids, *tail]}, len(prompt_ids)))
        return out

    # ------------------------------------------------------------------------------------------ the check

    def check(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Compare the fast paths with the core on ``pairs`` (plain prompt, response); switch off one that differs."""
        from rlhf.reward.service import ValidItem

        items = [ValidItem(p, (), r) for p, r in pairs]
        want_texts = [format_one(self.tokenizer, i, item) for i, item in enumerate(items)]
        if self.batched_format and self.format_many(items) != want_texts:
            log.warning("batched chat-template formatting differs from the core's for %s; formatting item by item",
                        type(self.tokenizer).__name__)
            self.batched_format = False
        responses = [r for _, r in pairs]
        if self.fast_tokenize:
            want = self.model.tokenize_many(want_texts, responses, truncate=False)
            got = self.tokenize_many(want_texts, responses)
            if [(g.features, g.prompt_tokens) for g in got] != [(w.features, w.prompt_tokens) for w in want]:
                log.warning("the tokenizer backend's ids differ from the core's for %s; tokenizing through the core",
                            type(self.tokenizer).__name__)
                self.fast_tokenize = False
