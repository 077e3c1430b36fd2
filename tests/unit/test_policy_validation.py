"""GenerateRequest validation: every rejection names its field; defaults resolve as the proto documents."""
from __future__ import annotations

import pytest

from rlhf.policy.config import PolicyConfig
from rlhf.policy.validation import check_prompt_tokens, validate_generate
from rlhf.serving.errors import InvalidArgument
from rlhf.v1 import common_pb2, policy_pb2

CONFIG = PolicyConfig(max_new_tokens_limit=64, default_max_new_tokens=16, max_num_samples=4, max_text_bytes=100,
                      max_messages=3, max_stop_sequences=2, max_stop_bytes=8, max_id_bytes=20)


def req(**kwargs) -> policy_pb2.GenerateRequest:
    sampling = kwargs.pop("sampling", {})
    if "prompt" not in kwargs and "messages" not in kwargs:
        kwargs["prompt"] = "hello"
    return policy_pb2.GenerateRequest(sampling=common_pb2.SamplingParams(**sampling), **kwargs)


def conversation(*pairs) -> common_pb2.Conversation:
    return common_pb2.Conversation(messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in pairs])


INVALID = {
    "no input": (policy_pb2.GenerateRequest(), "prompt"),
    "empty prompt": (req(prompt=""), "prompt"),
    "blank prompt": (req(prompt="  \n"), "prompt"),
    "prompt too long": (req(prompt="x" * 101), "prompt"),
    "no messages": (req(messages=conversation()), "messages.messages"),
    "too many messages": (req(messages=conversation(*[("user", "hi")] * 4)), "messages.messages"),
    "bad role": (req(messages=conversation(("user", "hi"), ("robot", "beep"))), "messages.messages[1].role"),
    "empty content": (req(messages=conversation(("user", ""))), "messages.messages[0].content"),
    "long content": (req(messages=conversation(("user", "é" * 51))), "messages.messages[0].content"),
    "max_new_tokens": (req(sampling={"max_new_tokens": 65}), "sampling.max_new_tokens"),
    "temperature high": (req(sampling={"temperature": 2.5}), "sampling.temperature"),
    "temperature negative": (req(sampling={"temperature": -0.1}), "sampling.temperature"),
    "temperature nan": (req(sampling={"temperature": float("nan")}), "sampling.temperature"),
    "top_p high": (req(sampling={"top_p": 1.01}), "sampling.top_p"),
    "top_p negative": (req(sampling={"top_p": -0.5}), "sampling.top_p"),
    "top_k": (req(sampling={"top_k": 1001}), "sampling.top_k"),
    "too many stops": (req(sampling={"stop": ["a", "b", "c"]}), "sampling.stop"),
    "empty stop": (req(sampling={"stop": ["a", ""]}), "sampling.stop[1]"),
    "long stop": (req(sampling={"stop": ["123456789"]}), "sampling.stop[0]"),
    "too many samples": (req(num_samples=5), "num_samples"),
    "long routing key": (req(routing_key="k" * 21), "routing_key"),
    "long prompt id": (req(prompt_id="p" * 21), "prompt_id"),
    "long version": (req(version="v" * 21), "version"),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_request_names_its_field(name):
    request, field = INVALID[name]
    with pytest.raises(InvalidArgument) as e:
        validate_generate(request, CONFIG)
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}: ")


def test_defaults():
    valid = validate_generate(req(), CONFIG)
    s = valid.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (16, 1.0, 1.0, 0, None, ())
    assert valid.num_samples == 1 and valid.input_field == "prompt"


def test_greedy_needs_another_value_set_and_seed_zero_is_a_seed():
    s = validate_generate(req(sampling={"temperature": 0.0, "top_k": 5, "seed": 0}), CONFIG).sampling
    assert (s.temperature, s.top_k, s.seed) == (0.0, 5, 0)
    s = validate_generate(req(sampling={"temperature": 0.7, "top_p": 0.9}), CONFIG).sampling
    assert (s.temperature, s.top_p) == (pytest.approx(0.7), pytest.approx(0.9))


def test_messages_are_kept_in_order():
    valid = validate_generate(req(messages=conversation(("system", "be brief"), ("user", "hi"))), CONFIG)
    assert valid.prompt is None and valid.messages == (("system", "be brief"), ("user", "hi"))
    assert valid.input_field == "messages"


def test_prompt_tokens_against_the_context():
    valid = validate_generate(req(sampling={"max_new_tokens": 50}), CONFIG)
    assert check_prompt_tokens(valid, 10, 128) == 50
    assert check_prompt_tokens(valid, 100, 128) == 28  # cut to the room left: finishes with LENGTH
    assert check_prompt_tokens(valid, 100, 0) == 50  # no known context
    for tokens in (128, 500, 0):
        with pytest.raises(InvalidArgument) as e:
            check_prompt_tokens(valid, tokens, 128)
        assert e.value.field == "prompt"
