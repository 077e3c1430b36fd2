"""Which version answers a request: the traffic split between a stable and a candidate version, sticky per routing key,
and the transitions of that split (load, promote, roll back, model events). Pure logic, no I/O.

Routing: ``bucket(key)`` hashes a routing key to 0..99 with BLAKE2b (not Python's ``hash``, which is salted per
process), so every replica sends a key to the same version. The candidate answers the keys whose bucket is below its
percentage: raising the percentage only adds keys, so a user who saw the canary keeps seeing it while it ramps up.

``RoutingState`` is immutable; each transition returns a new state, which the manager applies after loading what it
needs (load, check ready, switch, then drain and unload what is no longer needed).
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable

from rlhf.v1 import events_pb2, policy_pb2

BUCKETS = 100
MAX_HISTORY = 8
"""Previous stable versions remembered for Rollback."""


def bucket(routing_key: str) -> int:
    """0..99, the same for a key on every replica and in every process."""
    digest = hashlib.blake2b(routing_key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


class RoutingError(ValueError):
    """A transition that the current state does not allow; ``field`` names the request field at fault, if any."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class RoutingState:
    stable: str | None = None
    """Gets the traffic the candidate does not get. None until a first version is loaded."""
    candidate: str | None = None
    """Gets ``candidate_percent`` of the routing keys."""
    candidate_percent: int = 0
    standby: tuple[str, ...] = ()
    """Loaded without traffic (pinned requests only), oldest first."""
    history: tuple[str, ...] = ()
    """Previous stable versions, oldest first: Rollback returns to the last one."""

    # ------------------------------------------------------------------------------------------ reading

    def route(self, routing_key: str) -> str | None:
        """The version that answers ``routing_key``; None when nothing is stable yet."""
        if self.candidate is not None and self.candidate_percent > 0 and bucket(routing_key) < self.candidate_percent:
            return self.candidate
        return self.stable

    def needed(self) -> set[str]:
        """Versions that must stay loaded."""
        return {v for v in (self.stable, self.candidate, *self.standby) if v is not None}

    def role(self, version: str) -> tuple[int, int]:
        """(PolicyRole, traffic percent) of a version."""
        if version == self.stable:
            share = 100 - (self.candidate_percent if self.candidate is not None else 0)
            return policy_pb2.POLICY_ROLE_STABLE, share
        if version == self.candidate:
            return policy_pb2.POLICY_ROLE_CANDIDATE, self.candidate_percent
        return policy_pb2.POLICY_ROLE_STANDBY, 0

    @property
    def previous(self) -> str | None:
        """Where Rollback sends traffic: the stable version while a candidate exists, else the previous stable."""
        if self.candidate is not None:
            return self.stable
        return self.history[-1] if self.history else None

    # ------------------------------------------------------------------------------------------ transitions

    def load(self, version: str, percent: int) -> RoutingState:
        """A version loaded with ``percent`` of traffic (LoadPolicy, PUBLISHED). The first version becomes stable
        whatever its percentage: something has to answer routed requests."""
        _check_percent(percent)
        if self.stable is None or self.stable == version:
            return dataclasses.replace(self, stable=version, standby=_without(self.standby, version))
        return self.split(version, percent)

    def split(self, version: str, percent: int) -> RoutingState:
        """``version`` gets ``percent`` of traffic (SetTrafficSplit, PROMOTED): 100 makes it stable (the old stable
        goes to the history), 1..99 makes it the candidate (replacing another candidate), 0 leaves it loaded without
        traffic."""
        _check_percent(percent)
        if self.stable is None:
            return self.load(version, percent)
        if version == self.stable:
            if percent == 100:
                return self
            raise RoutingError(
                f"{version} is the stable version; give another version traffic to take traffic from it",
                "candidate_version",
            )
        standby = _without(self.standby, version)
        if percent == 100:
            other_candidate = self.candidate if self.candidate != version else None
            return RoutingState(
                stable=version,
                candidate=other_candidate,
                candidate_percent=self.candidate_percent if other_candidate else 0,
                standby=standby,
                history=(*_without(self.history, version), self.stable)[-MAX_HISTORY:],
            )
        if percent == 0:
            if self.candidate == version:
                return dataclasses.replace(self, candidate=None, candidate_percent=0, standby=(*standby, version))
            return dataclasses.replace(self, standby=(*standby, version))
        return dataclasses.replace(self, candidate=version, candidate_percent=percent, standby=standby)

    def rollback(self) -> RoutingState:
        """Withdraw the candidate when there is one, else return to the previous stable version. The withdrawn version
        is no longer needed (the manager unloads it)."""
        if self.candidate is not None:
            return dataclasses.replace(self, candidate=None, candidate_percent=0)
        if not self.history:
            raise RoutingError("there is no previous version to roll back to")
        target = self.history[-1]
        return dataclasses.replace(
            self, stable=target, history=self.history[:-1], standby=_without(self.standby, target)
        )

    def rolled_back_to(self, target: str, withdrawn: str) -> RoutingState:
        """A ROLLED_BACK event: traffic went back to ``target``; ``withdrawn`` is withdrawn. Idempotent."""
        if withdrawn and withdrawn == self.candidate:
            state = dataclasses.replace(self, candidate=None, candidate_percent=0)
            return state if not target or target == state.stable else state.split(target, 100)
        if not target:
            raise RoutingError("a ROLLED_BACK event needs the version traffic went back to")
        if target == self.stable:
            return self
        candidate = None if self.candidate in (target, withdrawn) else self.candidate
        return RoutingState(
            stable=target,
            candidate=candidate,
            candidate_percent=self.candidate_percent if candidate else 0,
            standby=_without(_without(self.standby, target), withdrawn),
            history=_without(_without(self.history, target), withdrawn),
        )

    def apply_event(self, event: events_pb2.ModelEvent) -> RoutingState:
        """The state after one event of rlhf.models.v1."""
        version = event.version.version
        if event.action == events_pb2.MODEL_ACTION_PUBLISHED:
            return self.load(version, min(event.traffic_percent, 100))
        if event.action == events_pb2.MODEL_ACTION_PROMOTED:
            return self.split(version, min(event.traffic_percent, 100))
        if event.action == events_pb2.MODEL_ACTION_ROLLED_BACK:
            return self.rolled_back_to(version, event.previous_version)
        raise RoutingError(f"unknown model action {event.action}")

    def with_standby_limit(self, limit: int) -> RoutingState:
        """Keep at most ``limit`` standby versions (the newest)."""
        if len(self.standby) <= limit:
            return self
        return dataclasses.replace(self, standby=self.standby[len(self.standby) - limit:] if limit else ())


def fold_events(state: RoutingState, events: Iterable[events_pb2.ModelEvent]) -> RoutingState:
    """The state after a sequence of events: a replica catching up on the topic's history loads only what the
    end state needs, not every version ever published."""
    for event in events:
        state = state.apply_event(event)
    return state


def _check_percent(percent: int) -> None:
    if not 0 <= percent <= 100:
        raise RoutingError(f"must be in 0..100, got {percent}", "traffic_percent")


def _without(versions: tuple[str, ...], version: str | None) -> tuple[str, ...]:
    return tuple(v for v in versions if v != version)
