"""Training records of the three stages and their JSONL loaders (real data, or the built-in task's written out).

One JSON object a line:

    {"prompt": str, "response": str}                                   a demonstration (supervised stage)
    {"prompt": str, "chosen": str, "rejected": str, "margin"?: number} a preference pair
    {"prompt": str, "responses": [str, ...], "ranking": [int, ...]}    a ranking of K >= 2 responses;
                                                                       ``ranking`` lists indices into ``responses``,
                                                                       best first, each exactly once

Prompt files (PPO's prompts, `load_prompts`) take ``{"prompt": str}`` or ``{"messages": [{"role", "content"}, ...]}``
(a conversation the policy continues, formatted with the model's chat template), or any record above (its prompt).

Blank lines are skipped; other keys are ignored. A bad line raises `DataError` naming the file, the line and the field.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

RecordKind = Literal["demonstration", "pair", "ranking"]


class DataError(ValueError):
    """A JSONL line that is not a valid record; the message names file, line and field."""

    def __init__(self, path: str, line: int, field: str | None, problem: str) -> None:
        where = f"{path}:{line}" + (f": field '{field}'" if field else "")
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.field = path, line, field


@dataclass(frozen=True)
class Demonstration:
    prompt: str  # the user's message, not formatted
    response: str  # the ideal answer


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None
    """How much better ``chosen`` is (e.g. from a graded preference); trains with a margin (Llama 2, eq. 2)."""

    def as_ranking(self) -> Ranking:
        return Ranking(self.prompt, (self.chosen, self.rejected), (0, 1), margin=self.margin)


@dataclass(frozen=True)
class Ranking:
    prompt: str
    responses: tuple[str, ...]
    ranking: tuple[int, ...]
    """Indices into ``responses``, best first."""
    margin: float | None = None
    """For a ranking of two from a pair with a margin; unused for longer rankings."""
    annotator: str | None = None
    """Who ranked (a pseudonymous id), where known."""
    messages: tuple[tuple[str, str], ...] = ()
    """For a conversation: its (role, content) turns, formatted with the model's chat template instead of
    ``prompt`` (which then only names it)."""

    @property
    def ordered(self) -> tuple[str, ...]:
        """The responses best first."""
        return tuple(self.responses[i] for i in self.ranking)

    def pairs(self) -> Iterator[tuple[str, str]]:
        """Every (better, worse) pair the ranking implies: C(K, 2) of them."""
        ordered = self.ordered
        for i in range(len(ordered)):
            for j in range(i + 1, len(ordered)):
                yield ordered[i], ordered[j]


Record = Demonstration | PreferencePair | Ranking


def _require_str(obj: dict[str, Any], field: str, path: str, line: int) -> str:
    if field not in obj:
        raise DataError(path, line, field, "is missing")
    value = obj[field]
    if not isinstance(value, str):
        raise DataError(path, line, field, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(path, line, field, "must not be empty")
    return value


def _parse_demonstration(obj: dict[str, Any], path: str, line: int) -> Demonstration:
    return Demonstration(_require_str(obj, "prompt", path, line), _require_str(obj, "response", path, line))


def _parse_pair(obj: dict[str, Any], path: str, line: int) -> PreferencePair:
    prompt = _require_str(obj, "prompt", path, line)
    chosen = _require_str(obj, "chosen", path, line)
    rejected = _require_str(obj, "rejected", path, line)
    margin = obj.get("margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, int | float) or not math.isfinite(margin):
            raise DataError(path, line, "margin", f"must be a finite number, got {margin!r}")
        margin = float(margin)
    return PreferencePair(prompt, chosen, rejected, margin)


def _parse_ranking(obj: dict[str, Any], path: str, line: int) -> Ranking:
    prompt = _require_str(obj, "prompt", path, line)
    if "responses" not in obj:
        raise DataError(path, line, "responses", "is missing")
    responses = obj["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError(path, line, "responses", "must be a list of at least 2 strings")
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            raise DataError(path, line, f"responses[{i}]", "must be a non-empty string")
    if "ranking" not in obj:
        raise DataError(path, line, "ranking", "is missing")
    ranking = obj["ranking"]
    if not isinstance(ranking, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking):
        raise DataError(path, line, "ranking", "must be a list of integer indices into 'responses'")
    if sorted(ranking) != list(range(len(responses))):
        raise DataError(
            path, line, "ranking",
            f"must list each index 0..{len(responses) - 1} of 'responses' exactly once (best first), got {ranking}",
        )
    return Ranking(prompt, tuple(responses), tuple(ranking))


_PARSERS = {"demonstration": _parse_demonstration, "pair": _parse_pair, "ranking": _parse_ranking}


def detect_kind(obj: dict[str, Any]) -> RecordKind | None:
    """Which record a JSON object is, by its keys."""
    if "responses" in obj or "ranking" in obj:
        return "ranking"
    if "chosen" in obj or "rejected" in obj:
        return "pair"
    if "response" in obj:
        return "demonstration"
    return None


def _objects(lines: Iterable[str], path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, JSON object) of every non-blank line."""
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, number, None, f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(path, number, None, f"must be a JSON object, got {type(obj).__name__}")
        yield number, obj


def parse_lines(lines: Iterable[str], path: str = "<lines>", kind: RecordKind | None = None) -> list[Record]:
    """Parse JSONL ``lines``; with ``kind`` every line must be that record, else each line's kind is detected."""
    return [record for _, record in parse_numbered(lines, path, kind)]


def parse_numbered(
    lines: Iterable[str], path: str = "<lines>", kind: RecordKind | None = None
) -> list[tuple[int, Record]]:
    """Like `parse_lines`, each record with its line number (for messages about a record found bad later)."""
    records: list[tuple[int, Record]] = []
    for number, obj in _objects(lines, path):
        line_kind = detect_kind(obj)
        if kind is not None and line_kind not in (kind, None):
            raise DataError(path, number, None, f"expected a {kind} record, found a {line_kind} record")
        line_kind = kind or line_kind
        if line_kind is None:
            raise DataError(
                path, number, None,
                "cannot tell the record kind: expected 'response' (demonstration), 'chosen'/'rejected' (pair) "
                "or 'responses'/'ranking' (ranking)",
            )
        records.append((number, _PARSERS[line_kind](obj, path, number)))
    return records


def load_jsonl(path: str | os.PathLike[str], kind: RecordKind | None = None) -> list[Record]:
    """Records from a JSONL file (see the module docstring)."""
    with open(path, encoding="utf-8") as f:
        return parse_lines(f, str(path), kind)


def load_numbered(path: str | os.PathLike[str], kind: RecordKind | None = None) -> list[tuple[int, Record]]:
    """(line number, record) of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        return parse_numbered(f, str(path), kind)


def load_demonstrations(path: str | os.PathLike[str]) -> list[Demonstration]:
    return load_jsonl(path, "demonstration")  # type: ignore[return-value]


def load_pairs(path: str | os.PathLike[str]) -> list[PreferencePair]:
    return load_jsonl(path, "pair")  # type: ignore[return-value]


def load_rankings(path: str | os.PathLike[str]) -> list[Ranking]:
    """Rankings and pairs (a pair is a ranking of two) from one file."""
    out: list[Ranking] = []
    for record in load_jsonl(path):
        if isinstance(record, Demonstration):
            raise ValueError(f"{path}: a demonstration among rankings; keep them in separate files")
        out.append(record.as_ranking() if isinstance(record, PreferencePair) else record)
    return out


ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user" or "assistant"
    content: str


@dataclass(frozen=True)
class PromptRecord:
    """One prompt a policy continues: a user message, or a conversation (formatted with the chat template)."""

    prompt: str | None = None
    messages: tuple[Message, ...] | None = None

    def chat(self) -> list[dict[str, str]]:
        """The conversation as chat-template messages (a plain prompt is one user turn)."""
        if self.messages is None:
            return [{"role": "user", "content": self.prompt or ""}]
        return [{"role": m.role, "content": m.content} for m in self.messages]

    @property
    def text(self) -> str:
        """A readable one-string form (the prompt, or the last message)."""
        return self.prompt if self.prompt is not None else (self.messages[-1].content if self.messages else "")


def _parse_prompt(obj: dict[str, Any], path: str, line: int) -> PromptRecord:
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(path, line, "messages", "must be a non-empty list of {\"role\", \"content\"} objects")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise DataError(path, line, f"messages[{i}]", f"must be an object, got {type(m).__name__}")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise DataError(path, line, f"messages[{i}].role", f"must be one of {list(ROLES)}, got {role!r}")
            if not isinstance(content, str) or not content.strip():
                raise DataError(path, line, f"messages[{i}].content", "must be a non-empty string")
            out.append(Message(role, content))
        if out[-1].role == "assistant":
            raise DataError(path, line, f"messages[{len(out) - 1}].role",
                            "the last message of a prompt must not be the assistant's (the policy writes that turn)")
        return PromptRecord(messages=tuple(out))
    if "prompt" not in obj:
        raise DataError(path, line, "prompt", "is missing (a prompt file takes 'prompt' or 'messages')")
    return PromptRecord(prompt=_require_str(obj, "prompt", path, line))


def load_prompts_numbered(path: str | os.PathLike[str]) -> list[tuple[int, PromptRecord]]:
    """(line number, prompt) of every line of a prompt file (see the module docstring)."""
    with open(path, encoding="utf-8") as f:
        return [(n, _parse_prompt(obj, str(path), n)) for n, obj in _objects(f, str(path))]


def load_prompts(path: str | os.PathLike[str]) -> list[PromptRecord]:
    return [record for _, record in load_prompts_numbered(path)]


def to_json(record: Record) -> dict[str, Any]:
    """The JSONL object of a record (what the loaders read back)."""
    if isinstance(record, Ranking):
        return {"prompt": record.prompt, "responses": list(record.responses), "ranking": list(record.ranking)}
    data = asdict(record)
    return {k: v for k, v in data.items() if v is not None}


def write_jsonl(path: str | os.PathLike[str], records: Iterable[Record]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(to_json(record)) + "\n")
