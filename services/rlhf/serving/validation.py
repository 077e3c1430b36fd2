"""Checks of request fields that more than one service shares (a conversation is checked the same way by the policy
service and the reward service). Every rejection is an :class:`InvalidArgument` naming the field."""
from __future__ import annotations

from rlhf.core.data import ROLES  # one list of chat roles, for JSONL files and for requests
from rlhf.serving.errors import InvalidArgument
from rlhf.v1 import common_pb2

__all__ = ["ROLES", "utf8_len", "check_text", "check_conversation"]


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def check_text(text: str, field: str, max_bytes: int) -> str:
    """A non-blank text of at most ``max_bytes`` UTF-8 bytes."""
    if not text.strip():
        raise InvalidArgument(field, "must not be empty")
    size = utf8_len(text)
    if size > max_bytes:
        raise InvalidArgument(field, f"is {size} bytes; at most {max_bytes}")
    return text


def check_conversation(conversation: common_pb2.Conversation, field: str, *, max_messages: int,
                       max_text_bytes: int) -> tuple[tuple[str, str], ...]:
    """(role, content) per message of ``conversation`` (the request field ``field``, e.g. ``messages``)."""
    count = len(conversation.messages)
    if not 1 <= count <= max_messages:
        raise InvalidArgument(f"{field}.messages", f"has {count} messages; give 1..{max_messages}")
    out = []
    for i, message in enumerate(conversation.messages):
        if message.role not in ROLES:
            raise InvalidArgument(f"{field}.messages[{i}].role", f"is {message.role!r}; use one of {ROLES}")
        check_text(message.content, f"{field}.messages[{i}].content", max_text_bytes)
        out.append((message.role, message.content))
    return tuple(out)
