"""Traffic split and version transitions of the policy service (pure logic)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from rlhf.policy.routing import RoutingError, RoutingState, bucket, fold_events
from rlhf.v1 import common_pb2, events_pb2, policy_pb2

KEYS = [f"user-{i}" for i in range(2000)]


def test_bucket_is_in_range_and_the_same_in_another_process():
    buckets = [bucket(k) for k in KEYS[:50]]
    assert all(0 <= b < 100 for b in buckets)
    # Python's hash() is salted per process; ours must not be: every replica routes a key alike.
    code = "from rlhf.policy.routing import bucket; print([bucket(f'user-{i}') for i in range(50)])"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout
    assert other.strip() == str(buckets)


@pytest.mark.parametrize("percent", [1, 10, 25, 50, 90])
def test_split_is_within_five_percent_over_2000_keys(percent):
    state = RoutingState(stable="v1").split("v2", percent)
    share = sum(state.route(k) == "v2" for k in KEYS) / len(KEYS) * 100
    assert abs(share - percent) <= 5, f"candidate got {share:.1f}% of keys, asked {percent}%"


def test_split_is_sticky_and_ramping_keeps_the_canary_users():
    s10 = RoutingState(stable="v1").split("v2", 10)
    s30 = s10.split("v2", 30)
    assert [s10.route(k) for k in KEYS] == [s10.route(k) for k in KEYS]  # same key, same version
    on_canary = {k for k in KEYS if s10.route(k) == "v2"}
    assert on_canary and all(s30.route(k) == "v2" for k in on_canary)


def test_zero_and_hundred_percent():
    state = RoutingState(stable="v1").split("v2", 0)
    assert {state.route(k) for k in KEYS[:200]} == {"v1"}
    assert state.standby == ("v2",)
    promoted = state.split("v2", 100)
    assert {promoted.route(k) for k in KEYS[:200]} == {"v2"}
    assert promoted.history == ("v1",) and promoted.standby == ()


def test_first_load_is_stable_whatever_its_percent():
    assert RoutingState().load("v1", 0) == RoutingState(stable="v1")
    assert RoutingState().route("anyone") is None


def test_candidate_replaces_candidate_and_roles():
    state = RoutingState(stable="v1").load("v2", 20).load("v3", 40)
    assert (state.stable, state.candidate, state.candidate_percent) == ("v1", "v3", 40)
    assert state.needed() == {"v1", "v3"}
    assert state.role("v1") == (policy_pb2.POLICY_ROLE_STABLE, 60)
    assert state.role("v3") == (policy_pb2.POLICY_ROLE_CANDIDATE, 40)
    assert state.previous == "v1"


def test_rollback_withdraws_the_candidate_then_returns_to_the_previous_stable():
    state = RoutingState(stable="v1").split("v2", 100).split("v3", 25)
    state = state.rollback()
    assert (state.stable, state.candidate) == ("v2", None)
    assert state.previous == "v1"
    state = state.rollback()
    assert state.stable == "v1" and state.history == () and state.needed() == {"v1"}
    with pytest.raises(RoutingError):
        state.rollback()


def test_stable_cannot_become_a_candidate():
    with pytest.raises(RoutingError) as e:
        RoutingState(stable="v1").split("v1", 50)
    assert e.value.field == "candidate_version"


def test_percent_out_of_range_names_the_field():
    with pytest.raises(RoutingError) as e:
        RoutingState(stable="v1").split("v2", 101)
    assert e.value.field == "traffic_percent"


def test_standby_limit_keeps_the_newest():
    state = RoutingState(stable="v1").load("a", 0).load("b", 0).load("c", 0)
    assert state.with_standby_limit(1).standby == ("c",)
    assert state.with_standby_limit(0).needed() == {"v1"}


def event(action, version, percent=0, previous=""):
    return events_pb2.ModelEvent(
        version=common_pb2.ModelVersion(name="policy", version=version, kind=common_pb2.MODEL_KIND_POLICY,
                                        uri=version),
        action=action, traffic_percent=percent, previous_version=previous,
    )


def test_folding_a_history_needs_only_the_end_state():
    history = [
        event(events_pb2.MODEL_ACTION_PUBLISHED, "v1", 100),
        event(events_pb2.MODEL_ACTION_PUBLISHED, "v2"),
        event(events_pb2.MODEL_ACTION_PROMOTED, "v2", 10),
        event(events_pb2.MODEL_ACTION_PROMOTED, "v2", 100),
        event(events_pb2.MODEL_ACTION_PUBLISHED, "v3"),
        event(events_pb2.MODEL_ACTION_PROMOTED, "v3", 30),
        event(events_pb2.MODEL_ACTION_ROLLED_BACK, "v2", previous="v3"),
        event(events_pb2.MODEL_ACTION_PUBLISHED, "v4", 50),
    ]
    state = fold_events(RoutingState(), history).with_standby_limit(1)
    assert (state.stable, state.candidate, state.candidate_percent) == ("v2", "v4", 50)
    assert state.needed() == {"v2", "v4"}
    assert state.previous == "v2"


def test_rolled_back_event_of_a_stable_version_and_its_repeat():
    state = fold_events(RoutingState(), [
        event(events_pb2.MODEL_ACTION_PUBLISHED, "v1", 100),
        event(events_pb2.MODEL_ACTION_PROMOTED, "v2", 100),
        event(events_pb2.MODEL_ACTION_ROLLED_BACK, "v1", previous="v2"),
    ])
    assert state.stable == "v1" and state.needed() == {"v1"} and "v2" not in state.history
    assert state.apply_event(event(events_pb2.MODEL_ACTION_ROLLED_BACK, "v1", previous="v2")) == state
