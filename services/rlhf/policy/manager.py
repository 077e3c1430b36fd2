"""The loaded policy versions of one replica, the traffic split between them, and version swaps without a failed or
dropped request.

A change (LoadPolicy, SetTrafficSplit, Rollback, events of rlhf.models.v1) computes the next ``RoutingState`` and
reconciles to it, one change at a time:

1. load every version the new state needs and is not loaded yet (visible as LOADING; the backend returns once it
   is ready: torch generates a warm-up token, Triton reports the model ready);
2. switch the routing state (one assignment on the event loop: a request is routed either before or after it);
3. drain what is no longer needed: no new requests reach it, the ones it has finish there (up to
   ``drain_timeout_s``), then it is unloaded (Triton: its model names are unloaded).

Requests hold a lease on their version while they run (``acquire``); the drain waits for the leases.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable

from rlhf.policy import metrics
from rlhf.policy.backend import LoadedModel, PolicyBackend
from rlhf.policy.routing import RoutingError, RoutingState
from rlhf.serving.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from rlhf.v1 import common_pb2, events_pb2, policy_pb2

log = logging.getLogger(__name__)

LOADING, READY, DRAINING = policy_pb2.POLICY_STATE_LOADING, policy_pb2.POLICY_STATE_READY, policy_pb2.POLICY_STATE_DRAINING
ROLE_NAMES = {policy_pb2.POLICY_ROLE_STABLE: "stable", policy_pb2.POLICY_ROLE_CANDIDATE: "candidate",
              policy_pb2.POLICY_ROLE_STANDBY: "standby"}


@dataclasses.dataclass(eq=False)
class Slot:
    """A version on the backend: loading, serving, or draining before its unload."""

    version: common_pb2.ModelVersion
    state: int = LOADING
    model: LoadedModel | None = None
    in_flight: int = 0
    idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    drain: asyncio.Task | None = None
    unloading: bool = False


class Lease:
    """A request's hold on its version; ``release`` (or leaving the ``with`` block) lets a drain proceed."""

    def __init__(self, slot: Slot) -> None:
        self.slot = slot
        self.model: LoadedModel = slot.model  # type: ignore[assignment]
        self.version = slot.version.version
        self._released = False
        slot.in_flight += 1
        slot.idle.clear()
        metrics.IN_FLIGHT.labels(self.version).inc()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.slot.in_flight -= 1
        metrics.IN_FLIGHT.labels(self.version).dec()
        if self.slot.in_flight == 0:
            self.slot.idle.set()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class PolicyManager:
    def __init__(self, backend: PolicyBackend, *, artifact_root: str, model_name: str = "policy",
                 max_standby_versions: int = 1, drain_timeout_s: float = 120.0) -> None:
        self.backend = backend
        self.artifact_root = artifact_root
        self.model_name = model_name
        self.max_standby_versions = max_standby_versions
        self.drain_timeout_s = drain_timeout_s
        self.state = RoutingState()
        self.slots: dict[str, Slot] = {}
        self.catalog: dict[str, common_pb2.ModelVersion] = {}
        """Every version this replica has heard of (its uri is needed to load it again on a rollback)."""
        self._lock = asyncio.Lock()
        self._closed = False

    # ------------------------------------------------------------------------------------------ serving

    def acquire(self, routing_key: str, pinned: str = "") -> Lease:
        """The version that answers a request, held until the lease is released. Synchronous on purpose: routing and
        taking the lease happen with no switch in between."""
        if pinned:
            slot = self.slots.get(pinned)
            if slot is None or slot.state != READY:
                state = "is being unloaded" if slot is not None and slot.state == DRAINING else "is not loaded"
                raise NotFound(f"version: {pinned} {state} here; loaded: {sorted(self.ready_versions())}")
            return Lease(slot)
        version = self.state.route(routing_key)
        if version is None:
            raise Unavailable("no policy version is loaded yet; retry once the service reports SERVING")
        return Lease(self.slots[version])

    def ready_versions(self) -> list[str]:
        return [v for v, s in self.slots.items() if s.state == READY]

    async def check(self) -> None:
        """Health: the stable version is loaded and its backend answers."""
        stable = self.state.stable
        if stable is None:
            raise Unavailable("no policy version loaded yet")
        slot = self.slots[stable]
        await slot.model.check()  # type: ignore[union-attr]

    # ------------------------------------------------------------------------------------------ admin

    def resolve_path(self, uri: str) -> str:
        """A ModelVersion.uri as a local folder: absolute, or relative to the artifact root."""
        return uri if os.path.isabs(uri) else os.path.join(self.artifact_root, uri)

    def _remember(self, version: common_pb2.ModelVersion, field: str = "version") -> str:
        if not version.version:
            raise InvalidArgument(f"{field}.version", "required: the version id")
        known = self.catalog.get(version.version)
        if not version.uri:
            if known is None or not known.uri:
                raise InvalidArgument(f"{field}.uri", f"required: where the weights of {version.version} are")
            return version.version
        self.catalog[version.version] = version
        return version.version

    async def load(self, version: common_pb2.ModelVersion, traffic_percent: int) -> None:
        """LoadPolicy: load (unless loaded), check ready, then give it ``traffic_percent`` (100: stable)."""
        if not 0 <= traffic_percent <= 100:
            raise InvalidArgument("traffic_percent", f"is {traffic_percent}; must be in 0..100")
        name = self._remember(version)
        async with self._lock:
            await self._reconcile(self._next(lambda s: s.load(name, traffic_percent)))

    async def set_split(self, candidate: str, traffic_percent: int) -> None:
        """SetTrafficSplit: ``candidate`` gets ``traffic_percent``; 100 promotes it to stable."""
        if not candidate:
            raise InvalidArgument("candidate_version", "required")
        if not 0 <= traffic_percent <= 100:
            raise InvalidArgument("traffic_percent", f"is {traffic_percent}; must be in 0..100")
        async with self._lock:
            slot = self.slots.get(candidate)
            if slot is None or slot.state != READY:
                raise FailedPrecondition(
                    f"candidate_version: {candidate} is not loaded; load it with LoadPolicy first "
                    f"(loaded: {sorted(self.ready_versions())})"
                )
            await self._reconcile(self._next(lambda s: s.split(candidate, traffic_percent)))

    async def rollback(self) -> None:
        """Rollback: withdraw the candidate, else go back to the previous stable version (loading it again)."""
        async with self._lock:
            await self._reconcile(self._next(lambda s: s.rollback()))

    async def apply_events(self, events: Iterable[events_pb2.ModelEvent]) -> int:
        """Events of rlhf.models.v1 (other models' are ignored), folded into one change: a replica catching up on
        the topic's history loads what the end state needs only. Returns how many events were applied. A change
        that cannot be applied (a version that fails to load) leaves the state as it was."""
        async with self._lock:
            desired = self.state
            applied = 0
            for event in events:
                mv = event.version
                if mv.kind not in (common_pb2.MODEL_KIND_POLICY, common_pb2.MODEL_KIND_UNSPECIFIED) or (
                    mv.name and mv.name != self.model_name
                ):
                    metrics.MODEL_EVENTS.labels("ignored").inc()
                    continue
                try:
                    if mv.version and mv.uri:
                        self.catalog[mv.version] = mv
                    desired = desired.apply_event(event)
                    applied += 1
                except RoutingError as e:
                    metrics.MODEL_EVENTS.labels("failed").inc()
                    log.warning("model event %s for %s not applied: %s",
                                events_pb2.ModelAction.Name(event.action), mv.version, e)
            if desired == self.state:
                metrics.MODEL_EVENTS.labels("applied").inc(applied)
                return applied
            try:
                await self._reconcile(desired)
            except Exception as e:  # noqa: BLE001 - the follower goes on with the next events
                metrics.MODEL_EVENTS.labels("failed").inc(applied)
                log.error("model events not applied (the routing stays as it was): %s", e)
                return 0
            metrics.MODEL_EVENTS.labels("applied").inc(applied)
            return applied

    def _next(self, transition: Callable[[RoutingState], RoutingState]) -> RoutingState:
        """The state after a transition of an admin call; a transition the state does not allow is the caller's
        error (INVALID_ARGUMENT naming the field, else FAILED_PRECONDITION)."""
        try:
            return transition(self.state)
        except RoutingError as e:
            if e.field:
                raise InvalidArgument(e.field, str(e)) from None
            raise FailedPrecondition(str(e)) from None

    async def _reconcile(self, desired: RoutingState) -> None:
        """Load what ``desired`` needs, switch to it, drain and unload the rest. Called with the lock held."""
        if self._closed:
            raise Unavailable("the policy service is shutting down")
        desired = desired.with_standby_limit(self.max_standby_versions)
        needed = desired.needed()
        # 1. load (one at a time: two loads at once would need the memory of both at once)
        for version in sorted(needed, key=lambda v: v != desired.stable):
            await self._ensure_loaded(version)
        # 2. switch
        self.state = desired
        # 3. drain and unload what is no longer needed
        for version, slot in list(self.slots.items()):
            if version not in needed and slot.state != DRAINING:
                slot.state = DRAINING
                if slot.in_flight == 0:
                    slot.idle.set()
                slot.drain = asyncio.create_task(self._drain(slot), name=f"drain-{version}")
        self._publish_split()

    async def _ensure_loaded(self, version: str) -> None:
        slot = self.slots.get(version)
        if slot is not None and slot.state == READY:
            return
        if slot is not None and slot.state == DRAINING:
            if slot.drain is not None and not slot.unloading:
                slot.drain.cancel()  # needed again before it was unloaded: keep it
                with contextlib.suppress(asyncio.CancelledError):
                    await slot.drain
                if not slot.unloading:
                    slot.state, slot.drain = READY, None
                    return
            if slot.drain is not None:
                await asyncio.shield(slot.drain)  # let the unload finish, then load it again
        mv = self.catalog.get(version)
        if mv is None or not mv.uri:
            raise FailedPrecondition(f"version {version} has no known uri; load it with LoadPolicy giving version.uri")
        slot = Slot(version=mv)
        self.slots[version] = slot
        started = time.monotonic()
        try:
            slot.model = await self.backend.load(mv, self.resolve_path(mv.uri))
        except BaseException as e:
            self.slots.pop(version, None)
            metrics.VERSION_LOADS.labels(self.backend.name, "failed").inc()
            if isinstance(e, (asyncio.CancelledError, InvalidArgument, FailedPrecondition, Unavailable)):
                raise
            log.exception("loading %s from %s failed", version, mv.uri)
            raise FailedPrecondition(f"version {version} from {mv.uri!r} could not be loaded: {e}") from e
        slot.state = READY
        slot.idle.set()
        metrics.VERSION_LOADS.labels(self.backend.name, "ok").inc()
        metrics.VERSION_LOAD_SECONDS.labels(self.backend.name).observe(time.monotonic() - started)

    async def _drain(self, slot: Slot) -> None:
        version = slot.version.version
        try:
            await asyncio.wait_for(slot.idle.wait(), self.drain_timeout_s)
        except TimeoutError:
            log.warning("%s still had %d requests after %.0fs of draining; unloading it anyway",
                        version, slot.in_flight, self.drain_timeout_s)
        slot.unloading = True
        try:
            if slot.model is not None:
                await slot.model.unload()
            log.info("unloaded %s", version)
        except Exception:  # noqa: BLE001 - the slot is gone either way
            log.exception("unloading %s failed", version)
        finally:
            if self.slots.get(version) is slot:
                del self.slots[version]
            metrics.forget_version(version)

    def _publish_split(self) -> None:
        for version, slot in self.slots.items():
            if slot.state == DRAINING:
                metrics.forget_version(version)
                continue
            role, percent = self.state.role(version)
            for name in ROLE_NAMES.values():
                with contextlib.suppress(KeyError):
                    metrics.TRAFFIC_PERCENT.remove(version, name)
            metrics.TRAFFIC_PERCENT.labels(version, ROLE_NAMES[role]).set(percent)

    # ------------------------------------------------------------------------------------------ reading

    def describe(self) -> policy_pb2.GetPolicyResponse:
        out = policy_pb2.GetPolicyResponse(previous_version=self.state.previous or "")
        for version, slot in self.slots.items():
            role, percent = self.state.role(version) if slot.state == READY else (policy_pb2.POLICY_ROLE_UNSPECIFIED, 0)
            out.policies.append(policy_pb2.LoadedPolicy(
                version=slot.version, state=slot.state, role=role, traffic_percent=percent, backend=self.backend.name,
            ))
        return out

    # ------------------------------------------------------------------------------------------ shutdown

    async def close(self) -> None:
        """Unload everything (after in-flight calls finished: the host stops the server first)."""
        async with self._lock:
            self._closed = True
            drains = [s.drain for s in self.slots.values() if s.drain is not None]
            for slot in list(self.slots.values()):
                if slot.drain is None and slot.model is not None:
                    slot.state = DRAINING
                    slot.idle.set()
                    drains.append(asyncio.create_task(self._drain(slot)))
            self.state = RoutingState()
        if drains:
            await asyncio.gather(*drains, return_exceptions=True)
