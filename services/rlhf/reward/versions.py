"""The reward-model versions of one replica: the current one, version swaps without a failed request, rollbacks.

A change (LoadRewardModel, an event of rlhf.models.v1) runs one at a time:

1. load the version (in a worker thread: seconds for a checkpoint) and start its scoring engine;
2. probe it: a small batch of two items of different lengths must score, with finite scores, through the engine;
   a version that fails to load or to probe is discarded, counted and logged, and the current one keeps serving;
3. switch: one assignment on the event loop, so a call is routed either before or after it;
4. drain the previous version (the calls that hold it finish, up to ``drain_timeout_s``), then unload it.

Calls hold a lease on their version while they run; the drain waits for the leases.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterable

from rlhf.core.models import RewardModel
from rlhf.reward import metrics
from rlhf.reward.engine import ScoringEngine
from rlhf.reward.inputs import InputBuilder
from rlhf.serving.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from rlhf.v1 import common_pb2, events_pb2, reward_pb2

log = logging.getLogger(__name__)

PROBE = (("What is a probe?", "A probe checks that a model scores."),
         ("Is this version ready to score a longer text before it serves traffic?",
          "Yes: it scored two items of different lengths in one batch, and both scores were finite numbers."))


@dataclasses.dataclass(eq=False)
class LoadedReward:
    """One version, loaded, with its engine."""

    version: common_pb2.ModelVersion
    model: RewardModel
    engine: ScoringEngine
    context: int
    """Longest formatted prompt + response in tokens that this version scores."""
    in_flight: int = 0
    idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    draining: bool = False
    inputs: InputBuilder | None = None
    """Formats and tokenizes calls' items for this version (built from the model when not given)."""

    def __post_init__(self) -> None:
        if self.inputs is None:
            self.inputs = InputBuilder(self.model)

    @property
    def name(self) -> str:
        return self.version.version


class Lease:
    """A call's hold on its version; leaving the ``with`` block lets a drain proceed."""

    def __init__(self, loaded: LoadedReward) -> None:
        self.loaded = loaded
        loaded.in_flight += 1
        loaded.idle.clear()

    def __enter__(self) -> LoadedReward:
        return self.loaded

    def __exit__(self, *exc: object) -> None:
        self.loaded.in_flight -= 1
        if self.loaded.in_flight == 0:
            self.loaded.idle.set()


Loader = Callable[[common_pb2.ModelVersion, str], LoadedReward]
"""Loads a version from its local folder (blocking; run in a worker thread)."""


class RewardVersions:
    def __init__(self, loader: Loader, *, artifact_root: str, model_name: str = "reward",
                 drain_timeout_s: float = 60.0) -> None:
        self.loader = loader
        self.artifact_root = artifact_root
        self.model_name = model_name
        self.drain_timeout_s = drain_timeout_s
        self.current: LoadedReward | None = None
        self.loaded: dict[str, LoadedReward] = {}
        self.catalog: dict[str, common_pb2.ModelVersion] = {}
        """Every version this replica has heard of, with its uri (a rollback names a version only)."""
        self._drains: set[asyncio.Task] = set()
        self._lock = asyncio.Lock()
        self._closed = False

    # ------------------------------------------------------------------------------------------ serving

    def acquire(self, pinned: str = "") -> Lease:
        """The version that answers a call, held until the lease is released (synchronous: routing and taking the
        lease happen with no switch in between)."""
        if pinned:
            loaded = self.loaded.get(pinned)
            if loaded is None or loaded.draining:
                raise NotFound(f"version: {pinned} is not loaded here; loaded: {sorted(self.ready_versions())}")
            return Lease(loaded)
        if self.current is None:
            raise Unavailable("no reward model is loaded yet; retry once the service reports SERVING")
        return Lease(self.current)

    def ready_versions(self) -> list[str]:
        return [v for v, loaded in self.loaded.items() if not loaded.draining]

    async def check(self) -> None:
        """Health: a current version is loaded."""
        if self.current is None:
            raise Unavailable("no reward model loaded yet")

    # ------------------------------------------------------------------------------------------ changes

    def resolve_path(self, uri: str) -> str:
        return uri if os.path.isabs(uri) else os.path.join(self.artifact_root, uri)

    async def load(self, version: common_pb2.ModelVersion) -> None:
        """LoadRewardModel: load, probe, switch, drain the previous one. FAILED_PRECONDITION when it cannot."""
        if not version.version:
            raise InvalidArgument("version.version", "required: the version id")
        if not version.uri and version.version not in self.catalog:
            raise InvalidArgument("version.uri", f"required: where the weights of {version.version} are")
        if version.uri:
            self._remember(version)
        async with self._lock:
            await self._switch_to(version.version)

    async def apply_events(self, events: Iterable[events_pb2.ModelEvent]) -> int:
        """Events of rlhf.models.v1, folded: the last PUBLISHED / PROMOTED / ROLLED_BACK version of this model name
        becomes current (a replica catching up on the topic loads only the end state). A version that fails to load
        leaves the current one serving. Returns how many events were this model's."""
        desired: str | None = None
        applied = 0
        for event in events:
            mv = event.version
            if mv.kind != common_pb2.MODEL_KIND_REWARD or (mv.name and mv.name != self.model_name):
                metrics.MODEL_EVENTS.labels("ignored").inc()
                continue
            if not mv.version:
                metrics.MODEL_EVENTS.labels("failed").inc()
                continue
            if mv.uri:
                self._remember(mv)
            if event.action in (events_pb2.MODEL_ACTION_PUBLISHED, events_pb2.MODEL_ACTION_PROMOTED,
                                events_pb2.MODEL_ACTION_ROLLED_BACK):
                desired = mv.version
                applied += 1
            else:
                metrics.MODEL_EVENTS.labels("ignored").inc()
        if desired is None:
            return 0
        async with self._lock:
            if self.current is not None and self.current.name == desired:
                metrics.MODEL_EVENTS.labels("applied").inc(applied)
                return applied
            try:
                await self._switch_to(desired)
            except Exception as e:  # noqa: BLE001 - the follower goes on with the next events
                metrics.MODEL_EVENTS.labels("failed").inc(applied)
                log.error("reward-model events not applied (%s stays current): %s",
                          self.current.name if self.current else "no version", e)
                return 0
        metrics.MODEL_EVENTS.labels("applied").inc(applied)
        return applied

    def _remember(self, version: common_pb2.ModelVersion) -> None:
        mv = common_pb2.ModelVersion()
        mv.CopyFrom(version)
        if not mv.name:
            mv.name = self.model_name
        mv.kind = common_pb2.MODEL_KIND_REWARD
        self.catalog[mv.version] = mv

    async def _switch_to(self, name: str) -> None:
        """Steps 1-4 for ``name`` (in the catalog). Called with the lock held."""
        if self._closed:
            raise Unavailable("the reward service is shutting down")
        if self.current is not None and self.current.name == name:
            return
        loaded = self.loaded.get(name)
        if loaded is None or loaded.draining:
            version = self.catalog.get(name)
            if version is None or not version.uri:
                raise FailedPrecondition(f"version {name} has no known uri; load it with LoadRewardModel giving the uri")
            loaded = await self._load_and_probe(version)
        previous, self.current = self.current, loaded  # 3. switch
        metrics.MODEL_INFO.labels(name).set(1)
        log.info("reward model %s is current (was %s)", name, previous.name if previous else "none")
        if previous is not None:
            self._drain(previous)

    async def _load_and_probe(self, version: common_pb2.ModelVersion) -> LoadedReward:
        """Steps 1-2."""
        path = self.resolve_path(version.uri)
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            loaded = await loop.run_in_executor(None, self.loader, version, path)
        except Exception as e:  # noqa: BLE001 - reported to the caller, counted, the current one stays
            metrics.VERSION_LOADS.labels("failed").inc()
            log.exception("loading reward model %s from %s failed", version.version, path)
            raise FailedPrecondition(f"version {version.version} from {version.uri!r} could not be loaded: {e}") from e
        try:
            await self._probe(loaded)
        except Exception as e:  # noqa: BLE001
            metrics.VERSION_LOADS.labels("failed").inc()
            log.error("reward model %s failed its probe batch: %s", version.version, e)
            await loop.run_in_executor(None, loaded.engine.close)
            raise FailedPrecondition(f"version {version.version} failed its probe batch: {e}") from e
        loaded.idle.set()
        self.loaded[version.version] = loaded
        metrics.VERSION_LOADS.labels("ok").inc()
        metrics.VERSION_LOAD_SECONDS.observe(time.monotonic() - started)
        return loaded

    async def _probe(self, loaded: LoadedReward) -> None:
        from rlhf.core.tokenizer import format_prompt

        tokenizer = loaded.model.tokenizer
        items = [loaded.model.tokenize(format_prompt(tokenizer, p), r) for p, r in PROBE]
        scores = await asyncio.wait_for(asyncio.gather(*loaded.engine.submit(items)), timeout=60)
        bad = [s for s in scores if not math.isfinite(s)]
        if bad:
            raise ValueError(f"scores {scores} are not all finite")

    def _drain(self, loaded: LoadedReward) -> None:
        """4. in the background: wait for its calls, then unload."""
        loaded.draining = True
        metrics.MODEL_INFO.labels(loaded.name).set(0)
        task = asyncio.create_task(self._unload_when_idle(loaded), name=f"drain-{loaded.name}")
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _unload_when_idle(self, loaded: LoadedReward) -> None:
        if loaded.in_flight == 0:
            loaded.idle.set()
        try:
            await asyncio.wait_for(loaded.idle.wait(), self.drain_timeout_s)
        except TimeoutError:
            log.warning("%s still had %d calls after %.0fs of draining; unloading it anyway",
                        loaded.name, loaded.in_flight, self.drain_timeout_s)
        await asyncio.get_running_loop().run_in_executor(None, loaded.engine.close)
        if self.loaded.get(loaded.name) is loaded:
            del self.loaded[loaded.name]
        metrics.forget_version(loaded.name)
        log.info("unloaded reward model %s", loaded.name)

    # ------------------------------------------------------------------------------------------ reading

    def describe(self) -> reward_pb2.GetRewardModelResponse:
        out = reward_pb2.GetRewardModelResponse()
        if self.current is not None:
            out.version.CopyFrom(self.current.version)
        for loaded in self.loaded.values():
            out.loaded.append(loaded.version)
        return out

    # ------------------------------------------------------------------------------------------ shutdown

    async def close(self) -> None:
        """Unload everything (after in-flight calls finished: the host stops the server first)."""
        async with self._lock:
            self._closed = True
            current, self.current = self.current, None
            if current is not None and not current.draining:
                self._drain(current)
        drains = list(self._drains)
        if drains:
            with contextlib.suppress(Exception):
                await asyncio.gather(*drains, return_exceptions=True)
