"""The canary controller on a real dataset (SQLite): the newest saved version becomes the canary, older ones are
superseded; after promote_after served responses a worse canary is rolled back and a good one promoted, with the
events the policy service follows; Promote and Rollback by hand."""
from __future__ import annotations

import time

import pytest

from rlhf.bus import topics
from rlhf.bus.base import Message
from rlhf.trainer.canary import CanaryController, CanarySettings
from rlhf.trainer.dataset import Dataset
from rlhf.v1 import events_pb2


def served(dataset: Dataset, version: str, texts: list[str], offset: int) -> None:
    messages = []
    for i, text in enumerate(texts):
        record = events_pb2.ServedResponse(response_id=f"{version}-{offset + i}", prompt_id="p", prompt="q",
                                           input_prompt="how do I water a plant", text=text, policy_version=version)
        messages.append(Message(topic=topics.RESPONSES, partition=0, offset=offset + i, key=b"k",
                                value=record.SerializeToString(), timestamp_ms=0))
    dataset.store(messages)


def score(prompts, responses) -> list[float]:
    """A stand-in reward model: helpful answers mention water; noised weights write garbage."""
    return [1.0 if "water" in r else -1.0 for r in responses]


@pytest.fixture
def setup(tmp_path):
    dataset = Dataset(str(tmp_path / "d.sqlite"))
    events: list[events_pb2.ModelEvent] = []
    controller = CanaryController(CanarySettings(canary_percent=10, promote_after=4), dataset, events.append, score)
    dataset.put_version("sft", "policy", "stable", {"uri": "sft"})
    controller.set_stable("sft")
    return dataset, controller, events


def save(dataset: Dataset, version: str) -> None:
    dataset.put_version(version, "policy", "saved", {"uri": f"policy/{version}", "parent": "sft",
                                                      "reward_model_version": "rm-1"})
    time.sleep(0.01)  # newest first by creation time


def status(dataset: Dataset, version: str) -> str:
    return dataset.version(version, kind="policy")["status"]


def test_a_worse_canary_is_rolled_back_and_stable_keeps_its_traffic(setup):
    dataset, controller, events = setup
    save(dataset, "v1")
    save(dataset, "v2")
    controller.tick()
    assert status(dataset, "v1") == "superseded" and status(dataset, "v2") == "canary"
    assert events[-1].action == events_pb2.MODEL_ACTION_PROMOTED and events[-1].traffic_percent == 10
    assert events[-1].version.version == "v2" and events[-1].version.uri == "policy/v2"
    served(dataset, "sft", ["pour water slowly"] * 6, 0)
    served(dataset, "v2", ["zx qq zx"] * 3, 100)
    assert controller.tick() is None  # 3 < promote_after
    served(dataset, "v2", ["zx qq zx"], 200)
    decision = controller.tick()
    assert decision is not None and not decision.promoted and decision.canary_mean < decision.stable_mean
    assert events[-1].action == events_pb2.MODEL_ACTION_ROLLED_BACK
    assert events[-1].version.version == "sft" and events[-1].previous_version == "v2"
    assert status(dataset, "v2") == "rolled_back" and controller.stable() == "sft" and controller.canary() is None


def test_a_canary_as_good_as_stable_is_promoted_and_can_be_rolled_back_by_hand(setup):
    dataset, controller, events = setup
    save(dataset, "v1")
    controller.tick()
    served(dataset, "sft", ["pour water slowly"] * 4, 0)
    served(dataset, "v1", ["water it every day"] * 4, 100)
    decision = controller.tick()
    assert decision.promoted
    assert events[-1].action == events_pb2.MODEL_ACTION_PROMOTED and events[-1].traffic_percent == 100
    assert controller.stable() == "v1" and status(dataset, "sft") == "superseded"
    assert controller.rollback() == "sft"
    assert events[-1].action == events_pb2.MODEL_ACTION_ROLLED_BACK and events[-1].previous_version == "v1"
    assert controller.stable() == "sft" and status(dataset, "v1") == "rolled_back"
    with pytest.raises(LookupError):
        controller.rollback()
    with pytest.raises(KeyError):
        controller.promote("nope")


def test_prune_deletes_old_inactive_version_folders_and_keeps_rollback_targets(tmp_path):
    dataset = Dataset(str(tmp_path / "d.sqlite"))
    root = tmp_path / "artifacts"
    controller = CanaryController(CanarySettings(promote_after=1, keep_versions=2), dataset, lambda e: None,
                                  lambda p, r: [1.0] * len(r))
    dataset.put_version("sft", "policy", "stable", {"uri": str(tmp_path / "elsewhere" / "sft")})
    (tmp_path / "elsewhere" / "sft").mkdir(parents=True)
    controller.set_stable("sft")

    def saved(version: str) -> None:
        (root / "policy" / version).mkdir(parents=True)
        (root / "policy" / version / "model.safetensors").write_bytes(b"x")
        save(dataset, version)

    for i in range(1, 8):  # v1..v7: each tick supersedes the older saved ones and makes the newest the canary
        saved(f"v{i}")
        if i in (3, 6):
            controller.tick()
            controller.promote(f"v{i}")  # v3 and then v6 stable; sft and v3 become earlier stables
    saved("v8")
    controller.tick()  # v7 superseded, v8 the canary
    pruned = controller.prune(str(root))

    statuses = {v["version"]: (v["status"], bool(v.get("pruned"))) for v in dataset.versions(kind="policy")}
    # inactive, newest first: earlier stables v3, sft (both kept: 2); the rest v7, v5, v4, v2, v1 (v7, v5 kept)
    assert sorted(pruned) == ["v1", "v2", "v4"], statuses
    for version in ("v1", "v2", "v4"):
        assert not (root / "policy" / version).exists() and statuses[version][1]
    for version in ("v3", "v5", "v6", "v7", "v8"):
        assert (root / "policy" / version / "model.safetensors").exists(), version
    assert (tmp_path / "elsewhere" / "sft").exists()  # kept: one of the two newest earlier stables
    assert statuses["v6"] == ("stable", False) and statuses["v8"] == ("canary", False)
    assert controller.prune(str(root)) == []  # nothing more until more versions go inactive
    # rollback goes to the newest earlier stable that was kept
    controller.rollback()  # withdraws the canary v8
    assert controller.rollback() == "v3"


def test_keep_versions_zero_keeps_every_folder(setup, tmp_path):
    dataset, _, events = setup
    controller = CanaryController(CanarySettings(keep_versions=0), dataset, events.append, score)
    for i in range(4):
        save(dataset, f"v{i}")
    controller.tick()
    assert controller.prune(str(tmp_path)) == []


def test_prune_reads_the_versions_again_only_after_a_status_changed(setup, tmp_path):
    dataset, controller, _ = setup
    reads = []
    versions = dataset.versions
    dataset.versions = lambda *a, **k: reads.append(k) or versions(*a, **k)
    controller.prune(str(tmp_path))
    assert len(reads) == 1
    controller.prune(str(tmp_path))
    controller.prune(str(tmp_path))
    assert len(reads) == 1  # nothing changed: nothing read
    save(dataset, "v1")
    controller.tick()  # v1 becomes the canary: a status changed
    reads.clear()
    controller.prune(str(tmp_path))
    assert len(reads) == 1


def test_rollback_finds_the_earlier_stable_behind_more_than_a_thousand_newer_versions(setup):
    """A day of PPO saves thousands of versions: the earlier stable one and the stable's own record are found however
    many came after them (a search of the newest 1,000 used to say there was nothing to roll back to)."""
    dataset, controller, events = setup
    save(dataset, "v1")
    controller.tick()
    served(dataset, "sft", ["pour water slowly"] * 4, 0)
    served(dataset, "v1", ["water it every day"] * 4, 100)
    assert controller.tick().promoted and controller.stable() == "v1"
    for i in range(1200):  # superseded canaries, many with the same creation time
        dataset.put_version(f"w{i:04d}", "policy", "superseded", {"uri": f"policy/w{i:04d}"})
    assert controller.rollback() == "sft"
    assert events[-1].version.version == "sft" and events[-1].version.uri == "sft"
    assert controller.stable() == "sft" and status(dataset, "v1") == "rolled_back"
