"""The trainer service on a real Kafka broker: feedback and served responses become a durable dataset, reward models
are trained, gated and published, the reward service loads them; dead letters; rollbacks; status and metrics.

The trainer reads the platform's topics from the start (a consumer group per test), so records of other tests are on
them too: every assertion counts only this test's records (ids with a prefix of the test's own).
"""
from __future__ import annotations

import contextlib
import time
import uuid

import grpc
import pytest

from rlhf.bus import topics
from rlhf.bus.kafka import KafkaBus, KafkaConfig
from rlhf.core.models import Manifest, ModelSize, build_causal_lm, save_artifact
from rlhf.core.tokenizer import TokenizerConfig, train_tokenizer
from rlhf.reward.config import RewardConfig
from rlhf.reward.servicer import RewardComponent
from rlhf.serving.server import ServiceHost
from rlhf.sim import world_texts
from rlhf.trainer import convert
from rlhf.trainer.config import TrainerConfig
from rlhf.trainer.dataset import Dataset
from rlhf.trainer.servicer import TrainerComponent
from rlhf.v1 import common_pb2, events_pb2, reward_pb2, reward_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from support.hosting import HostThread
from support.waiting import wait_for
from support.kafka_read import SESSION_START_S, read_topic
from support.trainer_records import (
    feedback_record, pairwise, ranking, served, simulated_rankings, split_prefix,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny random-init causal LM (the 'SFT policy' the first reward model starts from)."""
    root = tmp_path_factory.mktemp("trainer-base")
    tokenizer = train_tokenizer(world_texts(), TokenizerConfig(kind="word"))
    model = build_causal_lm(tokenizer, ModelSize(arch="llama", n_layer=1, n_embd=32, n_head=2, max_positions=256),
                            seed=0)
    save_artifact(str(root / "sft"), model, tokenizer, Manifest(kind="sft", version="sft-test"))
    return root / "sft"


@pytest.fixture
def bus(kafka_bootstrap):
    bus = KafkaBus(KafkaConfig(bootstrap_servers=kafka_bootstrap))
    bus.ensure_topics(topics.platform_topics(partitions=3))
    yield bus
    bus.close(10)


def produce(bus, responses=(), events=(), raw_feedback=()) -> None:
    """Served responses and feedback records onto the platform's topics, durably."""
    if responses:
        outcomes = bus.send_batch(topics.RESPONSES, [(r.SerializeToString(), r.response_id.encode())
                                                     for r in responses]).result(60)
        assert not [o for o in outcomes if isinstance(o, Exception)]
    records = [(feedback_record(e).SerializeToString(), e.event_id.encode()) for e in events]
    records += [(raw, b"raw") for raw in raw_feedback]
    if records:
        outcomes = bus.send_batch(topics.FEEDBACK, records).result(60)
        assert not [o for o in outcomes if isinstance(o, Exception)]


def trainer_config(tmp_path, kafka_bootstrap, base_model, **overrides) -> TrainerConfig:
    values = dict(
        # The topics are shared with every other test: read only what arrives after joining (the first assignment's
        # positions are stored in the dataset; from then on its offsets decide, as in production).
        host="127.0.0.1", port=0, metrics_port=0, health_interval_s=0.5,
        bus_url=f"kafka://{kafka_bootstrap}?auto_offset_reset=latest",
        cache_url="memory://", dataset_path=str(tmp_path / "trainer" / "dataset.sqlite"),
        group_id=f"trainer-test-{uuid.uuid4().hex[:8]}", artifact_root=str(tmp_path / "artifacts"),
        reward_base_path=str(base_model), reward_model_name=f"reward-test-{uuid.uuid4().hex[:8]}",
        min_new_comparisons=0, min_comparisons=10, heldout_share=0.25, min_heldout=5, rm_epochs=3,
        rm_batch_size=8, rm_learning_rate=3e-4, housekeeping_s=0.5, torch_num_threads=1,
    )
    values.update(overrides)
    return TrainerConfig(**values)


@contextlib.contextmanager
def trainer(config: TrainerConfig):
    """The trainer in this process, once its consumer holds its partitions and the dataset knows where it starts."""
    component = TrainerComponent(config)
    with HostThread(lambda: ServiceHost(config, [component])) as host:
        channel = host.channel()

        def joined() -> bool:
            lag, stored = component.consumer.lag, component.dataset.stored_offsets()
            return bool(lag) and {t for t, _ in lag} == {topics.FEEDBACK, topics.RESPONSES} and set(lag) <= set(stored)

        wait_for(joined, timeout=60, what="the trainer joined its group")
        yield host, trainer_pb2_grpc.TrainerServiceStub(channel), component
        channel.close()


def collect(kafka_bootstrap: str, topic: str, parse, keep, want: int, timeout_s: float = 30.0) -> list:
    """The records of ``topic`` (written this session) that ``keep(parse(value))`` accepts, once ``want`` are seen."""
    found: list = []

    def stop() -> bool:
        return len(found) >= want

    from google.protobuf.message import DecodeError

    for _, value in read_topic(kafka_bootstrap, topic, stop, timeout_s, settle_s=0.5, since_s=SESSION_START_S):
        try:
            record = parse(value)
        except DecodeError:  # another test's deliberately unparsable record
            continue
        if keep(record):
            found.append(record)
    return found


def stored_events(component: TrainerComponent, prefix: str) -> dict[str, str]:
    return {e: s for e, s in component.dataset.feedback_events() if e.startswith(prefix)}


# --------------------------------------------------------------------------------------------- the loop of part 1


def test_feedback_becomes_a_gated_reward_model_that_the_reward_service_loads(tmp_path, kafka_bootstrap, base_model,
                                                                             bus, prometheus):
    prefix = split_prefix("gate", 60, share=0.25, at_least=10)
    responses, events = simulated_rankings(60, k=3, seed=1, prefix=prefix)
    config = trainer_config(tmp_path, kafka_bootstrap, base_model, min_new_comparisons=60)
    reward_config = RewardConfig(
        host="127.0.0.1", port=0, metrics_port=-1, health_interval_s=0.3, bus_url=f"kafka://{kafka_bootstrap}",
        cache_url="memory://", artifact_root=config.artifact_root, model_name=config.reward_model_name,
        torch_num_threads=1, score_cache_ttl_s=0)
    with trainer(config) as (host, stub, component), \
            HostThread(lambda: ServiceHost(reward_config, [RewardComponent(reward_config)])) as reward_host:
        produce(bus, responses, events)
        # 1. the dataset: every event once, converted (a ranking of 3 is one comparison)
        wait_for(lambda: len(stored_events(component, prefix)) == 60, what="60 events stored")
        assert set(stored_events(component, prefix).values()) == {"used"}
        # 2. 60 new comparisons: a candidate is trained by itself, gated against the untrained start, published
        published = wait_for(lambda: [v for v in stub.ListVersions(trainer_pb2.ListVersionsRequest(
            kind=common_pb2.MODEL_KIND_REWARD)).versions if v.labels["status"] == "published"], timeout=180,
            what="a published reward model")
        first = published[0]
        wait_for(lambda: stub.GetStatus(trainer_pb2.GetStatusRequest()).stage != trainer_pb2.STAGE_REWARD_MODEL,
                 what="the training finished")
        assert float(first.labels["heldout_accuracy"]) > 0.5 >= float(first.labels["incumbent_accuracy"]) - 1e-9
        assert first.parent_version == "sft" and first.data_refs and first.uri.startswith("reward/")
        status = stub.GetStatus(trainer_pb2.GetStatusRequest())
        assert status.reward_model_version == first.version and status.consuming
        assert status.dataset["rankings"] >= 60 and status.new_comparisons == 0
        assert {lag.topic for lag in status.lag} == {topics.FEEDBACK, topics.RESPONSES}
        # the manifest says where it came from
        from rlhf.core.models import read_manifest

        manifest = read_manifest(str(tmp_path / "artifacts" / first.uri))
        assert manifest.kind == "reward" and manifest.parent == "sft"
        assert manifest.data["comparisons"] >= 60 and set(manifest.data["dataset_offsets"]) >= {
            f"{topics.FEEDBACK}/0", f"{topics.RESPONSES}/0"}
        # 3. the reward service follows rlhf.models.v1 and serves it
        reward = reward_pb2_grpc.RewardServiceStub(reward_host.channel())
        wait_for(lambda: reward.GetRewardModel(reward_pb2.GetRewardModelRequest()).version.version == first.version,
                 what="the reward service loads the published version")
        # 4. by hand: too few comparisons is FAILED_PRECONDITION with the count
        with pytest.raises(grpc.RpcError) as err:
            stub.TrainRewardModel(trainer_pb2.TrainRewardModelRequest(min_comparisons=100_000), timeout=60)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "comparisons" in err.value.details()
        # 5. the gate: a candidate trained on label-flipped comparisons (the held-out ones keep their true labels)
        #    is rejected, and the current version stays
        def training_id(base: str) -> str:  # an event id that the fixed hash puts on the training side
            return next(i for i in (f"{base}-flip{n}" for n in range(1000))
                        if not convert.heldout((i,), config.heldout_share))

        flipped = []
        for e in events:
            ids = list(e.ranking.response_ids)
            if not convert.heldout((e.event_id,), config.heldout_share):
                first_id = training_id(e.event_id)
                flipped.append(ranking(first_id, *reversed(ids)))
                flipped.append(ranking(training_id(first_id), *reversed(ids)))
        produce(bus, events=flipped)
        wait_for(lambda: len(stored_events(component, prefix)) == 60 + len(flipped), what="flipped events stored")
        # more than min_new_comparisons new comparisons: a training starts by itself, and the gate rejects it
        rejected = wait_for(lambda: [v for v in stub.ListVersions(trainer_pb2.ListVersionsRequest()).versions
                                     if v.labels["status"] == "rejected"], timeout=300, what="a rejected candidate")
        assert float(rejected[0].labels["heldout_accuracy"]) < float(rejected[0].labels["incumbent_accuracy"])
        assert rejected[0].parent_version == first.version
        versions = stub.ListVersions(trainer_pb2.ListVersionsRequest()).versions
        assert [v.labels["status"] for v in versions[:2]] == ["rejected", "published"]  # newest first
        assert stub.GetStatus(trainer_pb2.GetStatusRequest()).reward_model_version == first.version
        time.sleep(1.0)
        assert reward.GetRewardModel(reward_pb2.GetRewardModelRequest()).version.version == first.version
        # 6. only one published version: nothing to roll back to
        with pytest.raises(grpc.RpcError) as err:
            stub.Rollback(trainer_pb2.RollbackRequest(kind=common_pb2.MODEL_KIND_REWARD))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # 7. the metrics, scraped by a real Prometheus
        with prometheus.target("trainer-gate", f"127.0.0.1:{host.host.metrics_port}"):
            for expr in ('rlhf_trainer_records_stored_total{job="trainer-gate",kind="ranking"} >= 60',
                         'rlhf_trainer_reward_trainings_total{job="trainer-gate",outcome="published"} >= 1',
                         'rlhf_trainer_reward_trainings_total{job="trainer-gate",outcome="rejected"} >= 1',
                         'rlhf_trainer_reward_heldout_accuracy{job="trainer-gate"} > 0.5',
                         'rlhf_trainer_seconds_since_reward_published{job="trainer-gate"} >= 0',
                         'rlhf_trainer_dataset_size{job="trainer-gate",kind="rankings"} >= 60',
                         'rlhf_trainer_consumer_lag{job="trainer-gate",topic="rlhf.feedback.v1"} >= 0'):
                prometheus.wait_for(expr)


def test_a_rollback_republishes_the_previous_version(tmp_path, kafka_bootstrap, base_model, bus):
    prefix = split_prefix("rollback", 40, share=0.25, at_least=7)
    responses, events = simulated_rankings(40, k=3, seed=2, prefix=prefix)
    config = trainer_config(tmp_path, kafka_bootstrap, base_model, gate_tolerance=1.0, rm_epochs=1)
    with trainer(config) as (_, stub, component):
        produce(bus, responses, events)
        wait_for(lambda: len(stored_events(component, prefix)) == 40, what="events stored")
        first = stub.TrainRewardModel(trainer_pb2.TrainRewardModelRequest(), timeout=600)
        second = stub.TrainRewardModel(trainer_pb2.TrainRewardModelRequest(), timeout=600)
        assert first.published and second.published  # a tolerance of 1 lets anything through
        assert second.version.parent_version == first.version.version  # trained further from the current one
        back = stub.Rollback(trainer_pb2.RollbackRequest(kind=common_pb2.MODEL_KIND_REWARD))
        assert back.version.version == first.version.version
        assert stub.GetStatus(trainer_pb2.GetStatusRequest()).reward_model_version == first.version.version
        with pytest.raises(grpc.RpcError) as err:
            stub.Promote(trainer_pb2.PromoteRequest(version="no-such-version", traffic_percent=100))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        promoted = stub.Promote(trainer_pb2.PromoteRequest(version=second.version.version, traffic_percent=100))
        assert promoted.version.version == second.version.version
    models = collect(kafka_bootstrap, topics.MODELS, events_pb2.ModelEvent.FromString,
                     lambda e: e.version.name == config.reward_model_name, want=4)
    mine = [(e.action, e.version.version) for e in models]
    assert mine == [(events_pb2.MODEL_ACTION_PUBLISHED, first.version.version),
                    (events_pb2.MODEL_ACTION_PUBLISHED, second.version.version),
                    (events_pb2.MODEL_ACTION_ROLLED_BACK, first.version.version),
                    (events_pb2.MODEL_ACTION_PROMOTED, second.version.version)]


# --------------------------------------------------------------------------------------------- bad input


def test_unusable_events_go_to_the_dead_letter_topic_with_their_reason(tmp_path, kafka_bootstrap, base_model, bus):
    prefix = f"dlq-{uuid.uuid4().hex[:6]}"
    responses = [served(f"{prefix}-a", "how do I cook rice", "rinse it"),
                 served(f"{prefix}-b", "plan a picnic", "bring food"),
                 served(f"{prefix}-c", "plan a picnic", "bring water")]
    events = [pairwise(f"{prefix}-cross", f"{prefix}-a", f"{prefix}-b"),  # two prompts
              ranking(f"{prefix}-orphan", f"{prefix}-b", f"{prefix}-never-served"),  # waits, then times out
              pairwise(f"{prefix}-good", f"{prefix}-b", f"{prefix}-c")]
    config = trainer_config(tmp_path, kafka_bootstrap, base_model, join_timeout_s=3.0)
    with trainer(config) as (_, stub, component):
        produce(bus, responses, events, raw_feedback=[b"\xff\xfe " + prefix.encode()])
        wait_for(lambda: stored_events(component, prefix).get(f"{prefix}-orphan") == "dead", timeout=60,
                 what="the orphan dead-lettered after its join timeout")
        states = stored_events(component, prefix)
        assert states == {f"{prefix}-cross": "dead", f"{prefix}-orphan": "dead", f"{prefix}-good": "used"}
        mine = [c for c in component.dataset.comparisons() if any(s.startswith(prefix) for s in c.comparison.sources)]
        assert [c.comparison.sources for c in mine] == [(f"{prefix}-good",)]  # the dead are not trained on
        wait_for(lambda: component.dataset.dead_letters() == [], what="the outbox published")

    letters = collect(kafka_bootstrap, topics.FEEDBACK_DLQ, events_pb2.DeadLetter.FromString,
                      lambda d: d.event_id.startswith(prefix) or prefix.encode() in d.payload, want=3)
    found = {d.event_id if d.event_id.startswith(prefix) else "unparsable": d for d in letters}
    assert len(found) == 3, sorted(found)
    assert "different prompts" in found[f"{prefix}-cross"].reason
    assert f"{prefix}-never-served" in found[f"{prefix}-orphan"].reason
    assert "within 3s" in found[f"{prefix}-orphan"].reason
    assert "cannot parse" in found["unparsable"].reason
    assert found[f"{prefix}-cross"].source_topic == topics.FEEDBACK
    original = events_pb2.FeedbackRecord.FromString(found[f"{prefix}-cross"].payload)
    assert original.event.event_id == f"{prefix}-cross"  # the payload is the record, unchanged


def test_a_restarted_trainer_resumes_from_its_own_offsets(tmp_path, kafka_bootstrap, base_model, bus):
    """The dataset's offsets win over Kafka's committed ones: a trainer whose group committed past everything
    still reads what its dataset lacks, and one whose commits were lost reads nothing twice."""
    import sqlite3

    prefix = f"resume-{uuid.uuid4().hex[:6]}"
    responses, events = simulated_rankings(30, k=2, seed=3, prefix=prefix)
    config = trainer_config(tmp_path, kafka_bootstrap, base_model)
    backup = tmp_path / "backup.sqlite"
    with trainer(config) as (_, _, component):
        produce(bus, responses, events[:15])
        wait_for(lambda: len(stored_events(component, prefix)) == 15, what="15 events")
        source = sqlite3.connect(config.dataset_path)
        with sqlite3.connect(backup) as copy:
            source.backup(copy)  # the dataset after 15 events
        source.close()
        produce(bus, events=events[15:])
        wait_for(lambda: len(stored_events(component, prefix)) == 30, what="30 events")
    # The group has committed past all 30; the dataset goes back to its backup of 15 (a restored volume).
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / "trainer" / f"dataset.sqlite{suffix}").unlink(missing_ok=True)
    (tmp_path / "trainer" / "dataset.sqlite").write_bytes(backup.read_bytes())
    with trainer(config) as (_, _, component):
        wait_for(lambda: len(stored_events(component, prefix)) == 30, what="the 15 the backup lacked, read again")
        mine = [c for c in component.dataset.comparisons() if c.comparison.sources[0].startswith(prefix)]
        assert sorted(c.comparison.sources[0] for c in mine) == sorted(e.event_id for e in events)  # once each


# --------------------------------------------------------------------------------------------- crashes


def _trainer_process(config: TrainerConfig, log_path):
    import subprocess
    import sys

    args = [sys.executable, "-m", "rlhf", "trainer", "--port", str(config.port), "--metrics-port", "-1",
            "--bus-url", config.bus_url, "--cache-url", "memory://", "--dataset-path", config.dataset_path,
            "--group-id", config.group_id, "--artifact-root", config.artifact_root, "--min-new-comparisons", "0",
            "--max-records", str(config.max_records), "--housekeeping-s", "0.5", "--health-interval-s", "0.5"]
    return subprocess.Popen(args, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115


def _serving(port: int, timeout: float = 60.0) -> trainer_pb2.TrainerStatus:
    """The trainer's status once it serves and has joined its group (its dataset knows where it starts)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.GetStatus(trainer_pb2.GetStatusRequest(), timeout=2)
                if {lag.topic for lag in status.lag} == {topics.FEEDBACK, topics.RESPONSES}:
                    return status
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"the trainer on port {port} did not serve within {timeout}s")


@pytest.mark.slow
def test_a_trainer_killed_while_consuming_loses_and_doubles_nothing(tmp_path, kafka_bootstrap, base_model, bus):
    """SIGKILL five times at random moments while records stream in; at the end the dataset holds every event of
    the topic exactly once, and what they became exactly once too."""
    import random
    import signal
    import socket
    import sqlite3

    from support.trainer_records import demonstration

    prefix = f"crash-{uuid.uuid4().hex[:6]}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = trainer_config(tmp_path, kafka_bootstrap, base_model, port=port, max_records=100)
    rng = random.Random(7)
    log_path = tmp_path / "trainer.log"
    proc = _trainer_process(config, log_path)
    produced_rankings: list[str] = []
    produced_demos: list[str] = []
    try:
        _serving(port)
        for chunk in range(6):
            responses, rankings = simulated_rankings(150, k=2, seed=100 + chunk, prefix=f"{prefix}-{chunk}")
            demos = [demonstration(f"{prefix}-{chunk}-d{i}", "fix a tap", f"turn the water off {i}")
                     for i in range(300)]
            produce(bus, responses, rankings + demos)
            produced_rankings += [e.event_id for e in rankings]
            produced_demos += [e.event_id for e in demos]
            if chunk == 5:
                break
            time.sleep(rng.uniform(0.2, 1.5))  # somewhere in the middle of consuming the chunk
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            proc = _trainer_process(config, log_path)
            _serving(port)

        def stored() -> dict[str, int]:
            with sqlite3.connect(config.dataset_path) as db:
                return dict(db.execute("SELECT state, count(*) FROM feedback WHERE event_id LIKE ? GROUP BY state",
                                       (f"{prefix}-%",)).fetchall())

        total = len(produced_rankings) + len(produced_demos)
        wait_for(lambda: sum(stored().values()) == total and stored().get("used") == total, timeout=120,
                 what=f"all {total} events stored and used")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    # counted against the topic: every event of this test on rlhf.feedback.v1 is in the dataset once
    on_topic = collect(kafka_bootstrap, topics.FEEDBACK, events_pb2.FeedbackRecord.FromString,
                       lambda r: r.event.event_id.startswith(prefix), want=total, timeout_s=60)
    with sqlite3.connect(config.dataset_path) as db:
        in_dataset = [e for (e,) in db.execute("SELECT event_id FROM feedback WHERE event_id LIKE ?", (f"{prefix}-%",))]
        comparisons = [json_sources for (json_sources,) in db.execute(
            "SELECT sources FROM comparisons WHERE sources LIKE ?", (f'%"{prefix}-%',))]
    assert sorted({r.event.event_id for r in on_topic}) == sorted(in_dataset)
    assert len(in_dataset) == len(set(in_dataset)) == total
    assert len(comparisons) == len(produced_rankings)  # each ranking became one comparison, once
    reader = Dataset(config.dataset_path)
    demos = [d.source for d in reader.demonstrations() if d.source.startswith(f"{prefix}-")]
    reader.close()
    assert sorted(demos) == sorted(produced_demos)  # each demonstration once
    assert log_path.read_text(errors="replace").count("serving rlhf.v1.TrainerService") == 6  # 5 restarts


def test_redis_down_for_a_while_loses_no_feedback(tmp_path, kafka_bootstrap, base_model, private_redis):
    """Feedback streamed through the feedback service while its Redis is stopped and restarted: no service fails,
    and the trainer's dataset gets every acknowledged event."""
    from rlhf.feedback.config import FeedbackConfig
    from rlhf.feedback.servicer import FeedbackComponent
    from rlhf.v1 import feedback_pb2, feedback_pb2_grpc
    from support.trainer_records import demonstration

    prefix = f"redis-{uuid.uuid4().hex[:6]}"
    feedback_config = FeedbackConfig(host="127.0.0.1", port=0, metrics_port=-1, health_interval_s=0.3,
                                     bus_url=f"kafka://{kafka_bootstrap}", cache_url=private_redis.url)
    config = trainer_config(tmp_path, kafka_bootstrap, base_model, cache_url=private_redis.url)
    acked: list[str] = []
    with trainer(config) as (_, stub, component), \
            HostThread(lambda: ServiceHost(feedback_config, [FeedbackComponent(feedback_config)])) as fb_host:
        feedback = feedback_pb2_grpc.FeedbackServiceStub(fb_host.channel())

        def submit(phase: str, n: int = 40) -> None:
            events = [demonstration(f"{prefix}-{phase}-{i}", "fix a tap", f"turn the water off ({phase} {i})")
                      for i in range(n)]
            replies = [a for r in feedback.SubmitStream(iter([feedback_pb2.SubmitStreamRequest(events=events)]),
                                                        timeout=60) for a in r.acks]
            assert {a.status for a in replies} == {feedback_pb2.SUBMIT_STATUS_ACCEPTED}, replies[:2]
            acked.extend(a.event_id for a in replies)

        submit("before")
        private_redis.stop()
        submit("down")
        time.sleep(1.0)
        assert stub.GetStatus(trainer_pb2.GetStatusRequest()).consuming
        private_redis.start()
        submit("after")
        wait_for(lambda: len(stored_events(component, prefix)) == 120, what="all 120 acknowledged events stored")
        assert sorted(stored_events(component, prefix)) == sorted(acked)
        assert set(stored_events(component, prefix).values()) == {"used"}
