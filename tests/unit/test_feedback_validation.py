"""Every validation rule of feedback events, on the pure function (the gRPC path is tested in integration)."""
from __future__ import annotations

import time

import pytest

from rlhf.feedback.validation import Limits, validate_event
from rlhf.serving.errors import InvalidArgument
from support.feedback_cases import LIMITS_FOR_CASES, invalid_events, thumbs_up, valid_events

NOW = 1_800_000_000.0
LIMITS = Limits(**LIMITS_FOR_CASES)
INVALID = invalid_events(NOW)


@pytest.mark.parametrize("ev", valid_events(NOW), ids=lambda e: e.WhichOneof("kind"))
def test_valid_events_pass(ev):
    validate_event(ev, LIMITS, NOW)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_events_name_the_field(name):
    ev, field = INVALID[name]
    with pytest.raises(InvalidArgument) as err:
        validate_event(ev, LIMITS, NOW)
    assert err.value.field == field, str(err.value)
    assert str(err.value).startswith(field + ": ")


def test_small_clock_skew_is_allowed():
    ev = thumbs_up(NOW)
    ev.created_at.FromSeconds(int(NOW) + 30)
    validate_event(ev, LIMITS, NOW)


def test_real_clock_now_is_valid():
    ev = thumbs_up(time.time())
    ev.created_at.GetCurrentTime()
    validate_event(ev, LIMITS, time.time())
