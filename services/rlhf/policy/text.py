"""From a sample's token ids to its text: stop sequences and stream deltas, the same for every backend.

The text of a sample is ``tokenizer.decode(ids, skip_special_tokens=True)`` (what ``rlhf.core.generation
.decode_responses`` returns), cut before the first stop sequence when one appears. A stream sends the text in deltas
whose concatenation is that text: the stable part only, holding back a trailing U+FFFD (an incomplete UTF-8 sequence of
a byte-level tokenizer) and any tail that could still become a stop sequence, so a stop sequence is never streamed.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


class SampleText:
    """One sample's tokens and text. ``add`` tokens as they come; ``delta`` hands out the new stable text."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self._text = ""
        self._sent = ""
        self._stop_at: int | None = None  # index in _text where the first stop sequence starts
        self._stop_tokens = 0  # tokens consumed when the stop sequence was complete

    # ------------------------------------------------------------------------------------------ input

    @property
    def stopped(self) -> bool:
        """A stop sequence appeared: the sample is over (later tokens are ignored)."""
        return self._stop_at is not None

    def add(self, ids: Iterable[int]) -> bool:
        """Append tokens; True when a stop sequence is complete (then the sample is over)."""
        if self.stopped:
            return True
        ids = list(ids)
        if not ids:
            return False
        if not self.stop:
            self.ids.extend(ids)
            self._text = self._decode()
            return False
        for token in ids:  # one at a time, so completion_tokens counts up to the token that completed the stop
            self.ids.append(token)
            self._text = self._decode()
            found = [i for i in (self._text.find(s) for s in self.stop) if i >= 0]
            if found:
                self._stop_at = min(found)
                self._stop_tokens = len(self.ids)
                return True
        return False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    # ------------------------------------------------------------------------------------------ output

    @property
    def text(self) -> str:
        """The sample's text so far (final once the sample finished): cut before a stop sequence."""
        return self._text if self._stop_at is None else self._text[: self._stop_at]

    @property
    def completion_tokens(self) -> int:
        """Tokens of the response: up to the one that completed a stop sequence, EOS included when it ended it."""
        return self._stop_tokens if self.stopped else len(self.ids)

    def delta(self) -> str:
        """The text that became stable since the last call ('' when none)."""
        visible = self.text if self.stopped else self._stable(self._text)
        if len(visible) <= len(self._sent) or not visible.startswith(self._sent):
            return ""
        out, self._sent = visible[len(self._sent):], visible
        return out

    def final_delta(self) -> str:
        """The rest of the text once the sample finished; the deltas then add up to ``streamed_text``."""
        text = self.text
        out = text[len(self._sent):] if text.startswith(self._sent) else text[len(self._sent):]
        self._sent += out
        return out

    @property
    def streamed_text(self) -> str:
        """What the deltas handed out add up to (equal to ``text`` unless a decoder rewrote text already sent)."""
        return self._sent

    def _stable(self, text: str) -> str:
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        hold = 0
        for k in range(min(len(text), self._longest_stop - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                hold = k
                break
        return text[: len(text) - hold]
