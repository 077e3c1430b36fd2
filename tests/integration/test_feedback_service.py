"""FeedbackService end to end: a real gRPC server on a real socket, a real Kafka broker, a real Redis,
a real Prometheus. The topic is the platform's own (rlhf.feedback.v1); every test uses fresh event ids and
reads back only its own."""
from __future__ import annotations

import contextlib
import threading
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf import keys
from rlhf.bus import topics
from rlhf.cache import cache_from_url
from rlhf.feedback.config import FeedbackConfig
from rlhf.feedback.servicer import FeedbackComponent
from rlhf.feedback.validation import record_size_bound, shared_record_bytes
from rlhf.serving.server import ServiceHost
from rlhf.v1 import common_pb2, events_pb2, feedback_pb2, feedback_pb2_grpc
from support.hosting import HostThread
from support.feedback_cases import LIMITS_FOR_CASES, invalid_events, stream_submit
from support.kafka_read import read_feedback

pytestmark = pytest.mark.integration

STATUS = feedback_pb2.SubmitStatus


def make_event(event_id: str | None = None, response_id: str = "resp-x", **kind) -> feedback_pb2.FeedbackEvent:
    ev = feedback_pb2.FeedbackEvent(
        event_id=event_id or f"ev-{uuid.uuid4().hex}", product="test", annotator_id="annotator-1", **kind
    )
    if not kind:
        ev.rating.response_id = response_id
        ev.rating.thumb = feedback_pb2.THUMB_UP
    ev.created_at.GetCurrentTime()
    return ev


def feedback_config(kafka_bootstrap: str, redis_url: str, **overrides) -> FeedbackConfig:
    values = dict(
        host="127.0.0.1", port=0, metrics_port=0, bus_url=f"kafka://{kafka_bootstrap}", cache_url=redis_url,
        health_interval_s=0.5, publish_timeout_s=8.0, topic_partitions=3, **LIMITS_FOR_CASES,
    )
    values.update(overrides)
    return FeedbackConfig(**values)


@contextlib.contextmanager
def feedback_service(kafka_bootstrap: str, redis_url: str, **overrides):
    config = feedback_config(kafka_bootstrap, redis_url, **overrides)
    with HostThread(lambda: ServiceHost(config, [FeedbackComponent(config)])) as host:
        yield host


@pytest.fixture(scope="module")
def service(kafka_bootstrap, redis_url):
    with feedback_service(kafka_bootstrap, redis_url) as host:
        yield host


@pytest.fixture
def stub(service):
    with service.channel() as channel:
        yield feedback_pb2_grpc.FeedbackServiceStub(channel)


def test_submitted_event_arrives_on_kafka_as_protobuf(stub, kafka_bootstrap):
    event = make_event(response_id="never-served-1")
    reply = stub.Submit(feedback_pb2.SubmitRequest(event=event), timeout=20)
    assert reply.status == STATUS.SUBMIT_STATUS_ACCEPTED
    assert reply.event_id == event.event_id
    assert list(reply.unknown_response_ids) == ["never-served-1"]

    records = read_feedback(kafka_bootstrap, {event.event_id})
    assert len(records) == 1
    record = records[0]
    assert record.event == event
    assert list(record.unknown_response_ids) == ["never-served-1"]
    assert record.responses_unchecked is False
    assert record.received_at.seconds > 0


def test_served_response_is_joined(stub, kafka_bootstrap, redis_url, service):
    """A response id with a served-response record is known: not marked, and its prompt id keys the event."""
    rid = f"resp-{uuid.uuid4().hex}"
    served = events_pb2.ServedResponse(response_id=rid, prompt_id="prompt-42", text="hi", policy_version="p1")
    cache = cache_from_url(redis_url)
    service.call(cache.set(keys.served_response(rid), served.SerializeToString(), 60))
    service.call(cache.close())

    event = make_event(pairwise=feedback_pb2.PairwisePreference(chosen_response_id=rid,
                                                                rejected_response_id="resp-unknown"))
    reply = stub.Submit(feedback_pb2.SubmitRequest(event=event), timeout=20)
    assert reply.status == STATUS.SUBMIT_STATUS_ACCEPTED
    assert list(reply.unknown_response_ids) == ["resp-unknown"]
    [(key, record)] = read_feedback(kafka_bootstrap, {event.event_id}, with_keys=True)
    assert key == b"prompt-42"
    assert list(record.unknown_response_ids) == ["resp-unknown"]


def test_thousand_streamed_events_arrive_exactly_once(stub, kafka_bootstrap):
    events = [make_event() for _ in range(1000)]
    replies = stream_submit(stub, events, per_message=37)  # messages of 37 events: batches end mid-way
    assert len(replies) == 1000
    assert {r.status for r in replies} == {STATUS.SUBMIT_STATUS_ACCEPTED}
    assert sorted(r.sequence for r in replies) == list(range(1000))
    assert {r.event_id for r in replies} == {e.event_id for e in events}

    records = read_feedback(kafka_bootstrap, {e.event_id for e in events}, settle_s=2.0)
    ids = [r.event.event_id for r in records]
    assert len(ids) == 1000 and set(ids) == {e.event_id for e in events}


def test_duplicate_event_id_is_published_once(stub, kafka_bootstrap):
    event = make_event()
    first = stub.Submit(feedback_pb2.SubmitRequest(event=event), timeout=20)
    second = stub.Submit(feedback_pb2.SubmitRequest(event=event), timeout=20)
    assert first.status == STATUS.SUBMIT_STATUS_ACCEPTED
    assert second.status == STATUS.SUBMIT_STATUS_DUPLICATE

    # the same id several times on one stream, concurrently in flight
    twice = make_event()
    # in one message, and in messages of their own processed concurrently
    replies = stream_submit(stub, [twice] * 3, per_message=3) + stream_submit(stub, [twice] * 2, per_message=1)
    assert sorted(r.status for r in replies) == [STATUS.SUBMIT_STATUS_ACCEPTED] + [STATUS.SUBMIT_STATUS_DUPLICATE] * 4

    records = read_feedback(kafka_bootstrap, {event.event_id, twice.event_id}, settle_s=2.0)
    assert sorted(r.event.event_id for r in records) == sorted([event.event_id, twice.event_id])


def test_duplicate_across_replicas_is_published_once(kafka_bootstrap, redis_url, stub):
    """Two replicas share Redis: the second one sees the first one's event id."""
    event = make_event()
    assert stub.Submit(feedback_pb2.SubmitRequest(event=event), timeout=20).status == STATUS.SUBMIT_STATUS_ACCEPTED
    with feedback_service(kafka_bootstrap, redis_url, replica_id="replica-2") as other:
        with other.channel() as channel:
            reply = feedback_pb2_grpc.FeedbackServiceStub(channel).Submit(
                feedback_pb2.SubmitRequest(event=event), timeout=20)
    assert reply.status == STATUS.SUBMIT_STATUS_DUPLICATE
    assert len(read_feedback(kafka_bootstrap, {event.event_id}, settle_s=1.0)) == 1


def test_every_validation_rule_is_invalid_argument_naming_the_field(stub):
    cases = invalid_events()
    for name, (event, field) in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            stub.Submit(feedback_pb2.SubmitRequest(event=event), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert err.value.details().startswith(field + ": "), (name, err.value.details())

    with pytest.raises(grpc.RpcError) as err:
        stub.Submit(feedback_pb2.SubmitRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("event:")

    # on a stream, a bad event is answered REJECTED with the same message and the stream goes on
    good = make_event()
    requests = [feedback_pb2.SubmitRequest(event=e) for e, _ in cases.values()] + [feedback_pb2.SubmitRequest(event=good)]
    replies = stream_submit(stub, [r.event for r in requests], per_message=5)
    fields = [f for _, f in cases.values()]
    assert len(replies) == len(requests)
    for reply, field in zip(replies, fields):
        assert reply.status == STATUS.SUBMIT_STATUS_REJECTED
        assert reply.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert reply.error_message.startswith(field + ": ")
    assert replies[-1].status == STATUS.SUBMIT_STATUS_ACCEPTED


def test_oversized_stream_message_is_rejected_whole(kafka_bootstrap, redis_url):
    with feedback_service(kafka_bootstrap, redis_url, max_events_per_message=5, max_in_flight=5) as host, \
            host.channel() as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        events = [make_event() for _ in range(8)]
        acks = stream_submit(stub, events[:6], per_message=6) + stream_submit(stub, events[6:], per_message=2)
    assert [a.status for a in acks[:6]] == [STATUS.SUBMIT_STATUS_REJECTED] * 6
    assert all(a.error_message.startswith("events: has 6 events; at most 5") for a in acks[:6])
    assert [a.status for a in acks[6:]] == [STATUS.SUBMIT_STATUS_ACCEPTED] * 2


def conversation_event(texts: int, response_bytes: int, text_bytes: int = 32 * 1024) -> feedback_pb2.FeedbackEvent:
    """A demonstration of ``texts`` turns of ``text_bytes`` each and a response of ``response_bytes``."""
    turns = [common_pb2.ChatMessage(role="user" if i % 2 == 0 else "assistant", content="x" * text_bytes)
             for i in range(texts)]
    return make_event(demonstration=feedback_pb2.Demonstration(
        messages=common_pb2.Conversation(messages=turns), response="y" * response_bytes))


def test_event_over_the_bus_record_limit_is_invalid_argument_one_at_the_limit_reaches_kafka(
        kafka_bootstrap, redis_url):
    """Kafka takes records of at most 1 MiB (max_request_size_bytes; the broker's message.max.bytes): an event
    whose record would be larger is INVALID_ARGUMENT naming it (on a stream: a REJECTED ack of its own, and the
    stream goes on), not FAILED "retry" forever; the largest event that fits is accepted and on the topic."""
    with feedback_service(kafka_bootstrap, redis_url, max_text_bytes=32 * 1024) as host, \
            host.channel() as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        config = host.host.components[0].config
        limit, shared = config.record_limit_bytes, shared_record_bytes(config.replica)
        assert limit == 1024 * 1024 - 4096  # the default broker's and producer's 1 MiB, less room for the key

        # 31 turns of 32 KiB and the response that fills the record up to the limit, exactly
        event = conversation_event(31, 0)
        fill = limit - record_size_bound(event.ByteSize(), [], shared)
        while record_size_bound(conversation_event(31, fill).ByteSize(), [], shared) > limit:
            fill -= 1
        largest, over = conversation_event(31, fill), conversation_event(31, fill + 1)
        assert record_size_bound(over.ByteSize(), [], shared) == limit + 1

        with pytest.raises(grpc.RpcError) as err:
            stub.Submit(feedback_pb2.SubmitRequest(event=over), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == (
            f"event: serialized size 0.996 MiB ({limit + 1} bytes on the bus) exceeds the limit of 0.996 MiB "
            f"({limit} bytes): send shorter texts or fewer messages")
        # what the dashboards test once sent: 40 valid turns of 32 KiB, 1.25 MiB
        with pytest.raises(grpc.RpcError) as err:
            stub.Submit(feedback_pb2.SubmitRequest(event=conversation_event(40, 10)), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("event: serialized size 1.25 MiB")

        reply = stub.Submit(feedback_pb2.SubmitRequest(event=largest), timeout=30)
        assert reply.status == STATUS.SUBMIT_STATUS_ACCEPTED

        # a stream: the oversized event between two small ones is answered on its own
        small = [make_event(), make_event()]
        too_big = conversation_event(64, 10)
        acks = stream_submit(stub, [small[0], too_big, small[1]], per_message=3)
        assert [a.status for a in acks] == [STATUS.SUBMIT_STATUS_ACCEPTED, STATUS.SUBMIT_STATUS_REJECTED,
                                            STATUS.SUBMIT_STATUS_ACCEPTED]
        assert acks[1].event_id == too_big.event_id
        assert acks[1].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert acks[1].error_message.startswith("event: serialized size 2 MiB")
        # and a stream that carries only the oversized one (a message of its own) gets its ack too
        [ack] = stream_submit(stub, [over], per_message=1)
        assert ack.status == STATUS.SUBMIT_STATUS_REJECTED and ack.error_message.startswith("event: serialized")

    records = read_feedback(kafka_bootstrap, {largest.event_id, over.event_id, too_big.event_id,
                                              *(e.event_id for e in small)}, settle_s=2.0)
    assert sorted(r.event.event_id for r in records) == sorted([largest.event_id, *(e.event_id for e in small)])
    [on_topic] = [r for r in records if r.event.event_id == largest.event_id]
    assert on_topic.event == largest
    assert limit - 8 <= on_topic.ByteSize() <= limit


def test_cache_down_degrades_but_accepts(kafka_bootstrap):
    """Redis unreachable: events are still accepted (marked unchecked), duplicates still caught on this replica."""
    with feedback_service(kafka_bootstrap, "redis://127.0.0.1:1/0") as host, host.channel() as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        event = make_event()
        assert stub.Submit(feedback_pb2.SubmitRequest(event=event), timeout=30).status == STATUS.SUBMIT_STATUS_ACCEPTED
        assert stub.Submit(feedback_pb2.SubmitRequest(event=event), timeout=30).status == STATUS.SUBMIT_STATUS_DUPLICATE
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    [record] = read_feedback(kafka_bootstrap, {event.event_id})
    assert record.responses_unchecked is True


def test_token_required_when_configured(kafka_bootstrap, redis_url):
    with feedback_service(kafka_bootstrap, redis_url, auth_token="s3cret") as host, host.channel() as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        request = feedback_pb2.SubmitRequest(event=make_event())
        with pytest.raises(grpc.RpcError) as err:
            stub.Submit(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            stub.Submit(request, timeout=10, metadata=[("authorization", "Bearer wrong")])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            stream_submit(stub, [request.event], timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Submit(request, timeout=20, metadata=[("authorization", "Bearer s3cret")])
        assert ok.status == STATUS.SUBMIT_STATUS_ACCEPTED
        # probes need no token
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_prometheus_scrapes_handled_total(service, stub, prometheus):
    for _ in range(3):
        stub.Submit(feedback_pb2.SubmitRequest(event=make_event()), timeout=20)
    with pytest.raises(grpc.RpcError):
        stub.Submit(feedback_pb2.SubmitRequest(), timeout=10)
    job = f"feedback-{uuid.uuid4().hex[:8]}"
    with prometheus.target(job, f"127.0.0.1:{service.host.metrics_port}"):
        ok = prometheus.wait_for(
            f'grpc_server_handled_total{{job="{job}",grpc_service="rlhf.v1.FeedbackService",'
            f'grpc_method="Submit",grpc_code="OK"}}', timeout=30)
        assert float(ok[0]["value"][1]) >= 3
        bad = prometheus.wait_for(
            f'grpc_server_handled_total{{job="{job}",grpc_method="Submit",grpc_code="INVALID_ARGUMENT"}}', timeout=30)
        assert float(bad[0]["value"][1]) >= 1
        accepted = prometheus.wait_for(
            f'rlhf_feedback_events_total{{job="{job}",kind="rating",outcome="accepted"}}', timeout=30)
        assert float(accepted[0]["value"][1]) >= 3
        assert prometheus.wait_for(f'rlhf_feedback_publish_seconds_count{{job="{job}"}}', timeout=30)


def _health(channel, service_name=""):
    try:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service_name), timeout=5).status
    except grpc.RpcError as exc:  # pragma: no cover - diagnostic
        return exc.code()


def _wait_health(channel, want, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _health(channel) == want and _health(channel, "rlhf.v1.FeedbackService") == want:
            return
        time.sleep(0.2)
    raise AssertionError(f"health never became {want}; last {_health(channel)}")


@pytest.mark.slow
def test_broker_outage_mid_stream_loses_no_acknowledged_event(kafka_bootstrap, redis_url, kafka_broker):
    """Stop the broker while a stream is flowing: every event gets an answer, failed ones say so, and every
    acknowledged one is on the topic after the broker is back. Health follows the broker."""
    with feedback_service(kafka_bootstrap, redis_url, publish_timeout_s=4.0) as host, host.channel() as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        _wait_health(channel, health_pb2.HealthCheckResponse.SERVING)
        events = [make_event() for _ in range(600)]
        stopped = threading.Event()

        def requests():
            for i in range(0, len(events), 20):
                if i == 200:
                    kafka_broker.stop()
                    stopped.set()
                if i >= 200 and i % 100 == 0:
                    time.sleep(0.2)
                yield feedback_pb2.SubmitStreamRequest(events=events[i:i + 20])

        replies = stream_submit(stub, events, requests=requests(), timeout=180)
        assert stopped.is_set()
        assert len(replies) == len(events)
        by_status = {}
        for r in replies:
            by_status.setdefault(r.status, []).append(r)
        assert set(by_status) <= {STATUS.SUBMIT_STATUS_ACCEPTED, STATUS.SUBMIT_STATUS_FAILED}
        failed = by_status.get(STATUS.SUBMIT_STATUS_FAILED, [])
        assert failed, "the outage should have failed some events"
        assert all(r.error_code == grpc.StatusCode.UNAVAILABLE.value[0] and r.error_message for r in failed)
        _wait_health(channel, health_pb2.HealthCheckResponse.NOT_SERVING)
        with pytest.raises(grpc.RpcError) as err:
            stub.Submit(feedback_pb2.SubmitRequest(event=make_event()), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

        kafka_broker.start()
        _wait_health(channel, health_pb2.HealthCheckResponse.SERVING, timeout=90)
        # retrying the failed events with the same ids now succeeds
        retry = [e for e in events if e.event_id in {r.event_id for r in failed}]
        again = stream_submit(stub, retry, per_message=50)
        assert {r.status for r in again} <= {STATUS.SUBMIT_STATUS_ACCEPTED, STATUS.SUBMIT_STATUS_DUPLICATE}

    acked = {r.event_id for r in by_status.get(STATUS.SUBMIT_STATUS_ACCEPTED, [])}
    assert acked
    on_topic = {r.event.event_id for r in read_feedback(kafka_bootstrap, {e.event_id for e in events}, settle_s=3.0)}
    assert acked <= on_topic, f"{len(acked - on_topic)} acknowledged events are missing"
    assert on_topic == {e.event_id for e in events}
