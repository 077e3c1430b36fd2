"""Policy versions from the learner to traffic: canary, automatic promotion or rollback, and the same by hand.

The learner saves a version every ``publish_every`` updates (``saved``). ``CanaryController.tick`` (the trainer's
housekeeping, every few seconds):

1. with no canary: the newest saved version newer than stable becomes the canary — PROMOTED on rlhf.models.v1 with
   ``canary_percent`` of routing keys (the policy service loads it and splits traffic); older saved ones are
   ``superseded``;
2. with a canary that has served ``promote_after`` responses since it started: the reward service scores a sample
   of its served responses and of stable's over the same period; the canary is promoted (PROMOTED 100) if its mean is
   at least stable's minus ``tolerance``, else rolled back (ROLLED_BACK to stable).

State lives in the dataset (versions table, state keys), so a restarted trainer goes on where it was.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import statistics
import time
from collections.abc import Callable, Sequence

from rlhf.trainer.dataset import Dataset
from rlhf.v1 import common_pb2, events_pb2

log = logging.getLogger(__name__)

SAVED, CANARY, STABLE, ROLLED_BACK, SUPERSEDED = "saved", "canary", "stable", "rolled_back", "superseded"
STATE_KEY = "policy.canary"
STABLE_KEY = "policy.stable"

Score = Callable[[Sequence[str], Sequence[str]], list[float]]
Publish = Callable[[events_pb2.ModelEvent], None]


@dataclasses.dataclass(frozen=True)
class CanarySettings:
    canary_percent: int = 10
    promote_after: int = 50
    tolerance: float = 0.0
    sample: int = 200
    """Most served responses of each version scored for a decision."""
    model_name: str = "policy"
    keep_versions: int = 5
    """Folders of inactive versions kept (`CanaryController.prune`); 0 keeps every folder."""


@dataclasses.dataclass(frozen=True)
class Decision:
    version: str
    promoted: bool
    canary_mean: float
    stable_mean: float
    canary_responses: int
    stable_responses: int
    reason: str


def policy_version_proto(record: dict, name: str = "policy") -> common_pb2.ModelVersion:
    """A policy version's record as the API's ModelVersion."""
    from rlhf.trainer.reward import version_to_proto

    return version_to_proto({"name": name, "kind": "policy", **record})


class CanaryController:
    def __init__(self, settings: CanarySettings, dataset: Dataset, publish: Publish, score: Score) -> None:
        self.s = settings
        self.dataset = dataset
        self.publish = publish
        self.score = score
        self.decisions: list[Decision] = []
        self.on_served: Callable[[dict, float], None] | None = None
        """Called with a version's record when it first gets traffic (freshness metrics)."""
        self._statuses_changed = True
        """Whether a version's status changed since the last prune (only then can one more be pruned)."""

    # ------------------------------------------------------------------------------------------ state

    def canary(self) -> dict | None:
        raw = self.dataset.get_state(STATE_KEY)
        return json.loads(raw) if raw else None

    def stable(self) -> str:
        return self.dataset.get_state(STABLE_KEY) or ""

    def set_stable(self, version: str) -> None:
        self.dataset.set_state(STABLE_KEY, version)

    def _record(self, version: str) -> dict | None:
        return self.dataset.version(version, kind="policy")

    def _set_status(self, record: dict, status: str, **extra: object) -> None:
        rest = {k: v for k, v in record.items() if k not in ("version", "kind", "status", "created_at")}
        rest.update(extra)
        self.dataset.put_version(record["version"], "policy", status, rest)
        self._statuses_changed = True

    def _event(self, record: dict, action: int, percent: int = 0, previous: str = "") -> None:
        event = events_pb2.ModelEvent(version=policy_version_proto(record, self.s.model_name), action=action,
                                      traffic_percent=percent, previous_version=previous)
        event.at.GetCurrentTime()
        self.publish(event)

    # ------------------------------------------------------------------------------------------ automatic

    def tick(self, now: float | None = None) -> Decision | None:
        now = time.time() if now is None else now
        canary = self.canary()
        if canary is None:
            self._start_next(now)
            return None
        served = self.dataset.served_count(canary["version"], canary["started_at"])
        if served < self.s.promote_after:
            return None
        return self._decide(canary, now)

    def _start_next(self, now: float) -> None:
        saved = self.dataset.versions(kind="policy", status=SAVED, limit=1000)  # newest first
        if not saved:
            return
        newest, older = saved[0], saved[1:]
        for record in older:
            self._set_status(record, SUPERSEDED)
        self.start_canary(newest, self.s.canary_percent, now)

    def start_canary(self, record: dict, percent: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._event(record, events_pb2.MODEL_ACTION_PROMOTED, percent=percent, previous=self.stable())
        self._set_status(record, CANARY)
        self.dataset.set_state(STATE_KEY, json.dumps({"version": record["version"], "started_at": now,
                                                      "percent": percent}))
        log.info("policy %s is the canary with %d%% of traffic (stable: %s)", record["version"], percent,
                 self.stable() or "?")
        if self.on_served is not None:
            self.on_served(record, now)

    def _decide(self, canary: dict, now: float) -> Decision:
        version, since = canary["version"], canary["started_at"]
        stable = self.stable()
        ours = self.dataset.served_responses(version, since, self.s.sample)
        theirs = self.dataset.served_responses(stable, since, self.s.sample) if stable else []
        canary_mean = statistics.fmean(self.score([p for p, _ in ours], [r for _, r in ours])) if ours else 0.0
        stable_mean = (statistics.fmean(self.score([p for p, _ in theirs], [r for _, r in theirs]))
                       if theirs else float("-inf"))
        promoted = canary_mean >= stable_mean - self.s.tolerance
        reason = (f"mean reward of {len(ours)} served responses {canary_mean:.3f} vs stable {stable or '?'}'s "
                  f"{stable_mean:.3f} on {len(theirs)} (tolerance {self.s.tolerance})")
        decision = Decision(version, promoted, canary_mean, stable_mean, len(ours), len(theirs), reason)
        if promoted:
            self.promote(version)
        else:
            self.rollback()
        self.decisions.append(decision)
        log.info("canary %s %s: %s", version, "promoted" if promoted else "rolled back", reason)
        return decision

    # ------------------------------------------------------------------------------------------ retention

    def prune(self, artifact_root: str) -> list[str]:
        """Delete the folders of inactive policy versions beyond the newest ``keep_versions`` of each kind: earlier
        stable versions (rollback targets, newest first) and the rest (superseded before serving, rolled back).
        Stable, the canary and saved versions are never touched; a pruned version keeps its record (``pruned``), and
        rollback skips it. Returns the versions pruned."""
        if self.s.keep_versions <= 0 or not self._statuses_changed:
            return []  # (nothing became inactive since the last prune: no need to read every record again)
        self._statuses_changed = False
        inactive = [v for v in self.dataset.versions(kind="policy", limit=100_000)
                    if v["status"] in (SUPERSEDED, ROLLED_BACK) and not v.get("pruned")]
        earlier_stable = [v for v in inactive if v.get("was_stable") and v["status"] == SUPERSEDED]
        rest = [v for v in inactive if not (v.get("was_stable") and v["status"] == SUPERSEDED)]
        root = os.path.realpath(artifact_root)
        pruned = []
        for record in earlier_stable[self.s.keep_versions:] + rest[self.s.keep_versions:]:
            uri = record.get("uri", "")
            path = os.path.realpath(uri if os.path.isabs(uri) else os.path.join(root, uri)) if uri else ""
            if path and path != root and os.path.commonpath([root, path]) == root:  # only what the learner wrote
                shutil.rmtree(path, ignore_errors=True)
            self._set_status(record, record["status"], pruned=True)
            pruned.append(record["version"])
        self._statuses_changed = False  # (marking them pruned is no change that frees another)
        if pruned:
            log.info("pruned %d inactive policy version folder(s), oldest %s", len(pruned), pruned[-1])
        return pruned

    # ------------------------------------------------------------------------------------------ by hand

    def promote(self, version: str, percent: int = 100) -> dict:
        """``version`` gets ``percent`` of traffic (100: stable). KeyError for an unknown version."""
        record = self._record(version)
        if record is None:
            raise KeyError(version)
        if percent < 100:
            self.start_canary(record, percent)
            return record
        previous = self.stable()
        self._event(record, events_pb2.MODEL_ACTION_PROMOTED, percent=100, previous=previous)
        self._set_status(record, STABLE)
        canary = self.canary()
        if canary is not None:
            self.dataset.set_state(STATE_KEY, "")
        self.set_stable(version)
        if previous:
            old = self._record(previous)
            if old is not None and old["status"] == STABLE:
                self._set_status(old, SUPERSEDED, was_stable=True)
        return record

    def rollback(self) -> str:
        """Withdraw the canary (traffic back to stable), else go back to the previous stable version; the version
        traffic went back to. LookupError when there is nothing to roll back."""
        canary = self.canary()
        stable = self.stable()
        if canary is not None:
            record = self._record(canary["version"]) or {"version": canary["version"]}
            target = self._record(stable) or {"version": stable}
            self._event(target, events_pb2.MODEL_ACTION_ROLLED_BACK, previous=canary["version"])
            self._set_status(record, ROLLED_BACK)
            self.dataset.set_state(STATE_KEY, "")
            return stable
        target = next((v for v in self.dataset.iter_versions(kind="policy", status=SUPERSEDED)
                       if v.get("was_stable") and not v.get("pruned")), None)
        if not stable or target is None:
            raise LookupError("no policy canary and no earlier stable version to roll back to")
        self._event(target, events_pb2.MODEL_ACTION_ROLLED_BACK, previous=stable)
        current = self._record(stable)
        if current is not None:
            self._set_status(current, ROLLED_BACK)
        self._set_status(target, STABLE)
        self.set_stable(target["version"])
        return target["version"]
