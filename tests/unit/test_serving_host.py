"""The shared server plumbing on a real socket: health follows dependencies, reflection, status-code mapping,
metrics by code, message limits, graceful shutdown. Uses the feedback service over the in-process bus and cache
(the Kafka / Redis versions of these behaviours are in tests/integration)."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from rlhf.bus.base import BusUnavailable
from rlhf.bus.memory import InMemoryBus
from rlhf.cache.memory import InMemoryCache
from rlhf.feedback.config import FeedbackConfig
from rlhf.feedback.servicer import FeedbackComponent
from rlhf.serving.server import ServiceHost
from rlhf.v1 import feedback_pb2, feedback_pb2_grpc, reward_pb2, reward_pb2_grpc
from support.feedback_cases import thumbs_up
from support.hosting import HostThread

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ControllableBus(InMemoryBus):
    """The in-process bus, with a switch that makes it unreachable and an optional delay on durability."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.delay_s = 0.0
        self._pool = concurrent.futures.ThreadPoolExecutor(4)

    def ping(self, timeout_s: float = 2.0) -> None:
        if self.down:
            raise BusUnavailable("switched off by the test")
        super().ping(timeout_s)

    def send(self, topic, value, key=None, headers=()):
        if self.down:
            fut = concurrent.futures.Future()
            fut.set_exception(BusUnavailable("switched off by the test"))
            return fut
        if self.delay_s:
            return self._pool.submit(lambda: (time.sleep(self.delay_s), super(ControllableBus, self).send(
                topic, value, key=key, headers=headers).result())[1])
        return super().send(topic, value, key=key, headers=headers)


def host_factory(bus, **overrides):
    values = dict(port=0, metrics_port=-1, bus_url="memory://", cache_url="memory://", health_interval_s=0.1)
    values.update(overrides)
    config = FeedbackConfig(**values)
    return lambda: ServiceHost(config, [FeedbackComponent(config, bus=bus, cache=InMemoryCache())])


@pytest.fixture
def bus():
    return ControllableBus()


def health(channel, service=""):
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def wait_health(channel, want, service="", timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health(channel, service) == want:
            return
        time.sleep(0.05)
    raise AssertionError(f"health of {service!r} never became {want}")


def test_health_follows_the_bus(bus):
    with HostThread(host_factory(bus)) as host, host.channel() as channel:
        wait_health(channel, SERVING)
        wait_health(channel, SERVING, "rlhf.v1.FeedbackService")
        bus.down = True
        wait_health(channel, NOT_SERVING)
        wait_health(channel, NOT_SERVING, "rlhf.v1.FeedbackService")
        bus.down = False
        wait_health(channel, SERVING)


def test_unknown_service_health_is_not_found(bus):
    with HostThread(host_factory(bus)) as host, host.channel() as channel:
        with pytest.raises(grpc.RpcError) as err:
            health(channel, "no.such.Service")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(bus):
    with HostThread(host_factory(bus)) as host, host.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        [reply] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"rlhf.v1.FeedbackService", "grpc.health.v1.Health"} <= names


def eventually(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.02)


def _handled(code: str, method: str = "Submit") -> float:
    return REGISTRY.get_sample_value("grpc_server_handled_total", {
        "grpc_type": "unary", "grpc_service": "rlhf.v1.FeedbackService", "grpc_method": method, "grpc_code": code,
    }) or 0.0


def test_status_codes_and_metrics(bus):
    with HostThread(host_factory(bus)) as host, host.channel() as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        before = {c: _handled(c) for c in ("OK", "INVALID_ARGUMENT", "UNAVAILABLE")}
        assert stub.Submit(feedback_pb2.SubmitRequest(event=thumbs_up(time.time())), timeout=5).status == 1
        with pytest.raises(grpc.RpcError) as err:
            stub.Submit(feedback_pb2.SubmitRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        bus.down = True
        with pytest.raises(grpc.RpcError) as err:
            stub.Submit(feedback_pb2.SubmitRequest(event=thumbs_up(time.time())), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "retry" in err.value.details()
        # the interceptor counts a call as its status goes out, so the client may see it a moment earlier
        eventually(lambda: _handled("OK") == before["OK"] + 1)
        eventually(lambda: _handled("INVALID_ARGUMENT") == before["INVALID_ARGUMENT"] + 1)
        eventually(lambda: _handled("UNAVAILABLE") == before["UNAVAILABLE"] + 1)
        started = REGISTRY.get_sample_value("grpc_server_started_total", {
            "grpc_type": "unary", "grpc_service": "rlhf.v1.FeedbackService", "grpc_method": "Submit"})
        assert started and started >= 3
        assert REGISTRY.get_sample_value("grpc_server_handling_seconds_count", {
            "grpc_type": "unary", "grpc_service": "rlhf.v1.FeedbackService", "grpc_method": "Submit"}) >= 3


def test_unexpected_errors_are_internal_without_details(bus, monkeypatch):
    with HostThread(host_factory(bus)) as host, host.channel() as channel:
        component = host.host.components[0]

        async def boom(events):
            raise RuntimeError("secret detail")

        monkeypatch.setattr(component.ingestor, "submit_batch", boom)
        with pytest.raises(grpc.RpcError) as err:
            feedback_pb2_grpc.FeedbackServiceStub(channel).Submit(
                feedback_pb2.SubmitRequest(event=thumbs_up(time.time())), timeout=5)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in err.value.details()


def test_oversized_message_is_rejected(bus):
    with HostThread(host_factory(bus, max_message_bytes=4096)) as host, host.channel() as channel:
        event = thumbs_up(time.time())
        event.metadata["blob"] = "x" * 5000
        with pytest.raises(grpc.RpcError) as err:
            feedback_pb2_grpc.FeedbackServiceStub(channel).Submit(feedback_pb2.SubmitRequest(event=event), timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_graceful_shutdown_lets_in_flight_calls_finish(bus):
    bus.delay_s = 1.0
    host = HostThread(host_factory(bus)).start()
    channel = host.channel()
    stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
    results = []

    def call():
        results.append(stub.Submit(feedback_pb2.SubmitRequest(event=thumbs_up(time.time())), timeout=10))

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.3)  # the call is in flight, waiting for the bus
    host.stop(grace_s=5.0)
    caller.join(10)
    assert results and results[0].status == feedback_pb2.SUBMIT_STATUS_ACCEPTED
    with bus.consumer(["rlhf.feedback.v1"], "test-reader") as consumer:
        assert len(consumer.poll(timeout_s=0.5)) == 1
    with pytest.raises(grpc.RpcError) as err:
        stub.Submit(feedback_pb2.SubmitRequest(event=thumbs_up(time.time())), timeout=2)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    channel.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rlhf_up_serves_and_stops_on_sigterm(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf", "up", "--port", str(port), "--metrics-port", "0",
                             "--artifact-root", str(tmp_path / "artifacts")], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            wait_health(channel, SERVING, timeout=30)
            reply = feedback_pb2_grpc.FeedbackServiceStub(channel).Submit(
                feedback_pb2.SubmitRequest(event=thumbs_up(time.time())), timeout=10)
            assert reply.status == feedback_pb2.SUBMIT_STATUS_ACCEPTED
            # the reward service is embedded too, on a tiny random-init reward model built on first start
            reward = reward_pb2_grpc.RewardServiceStub(channel)
            scored = reward.Score(reward_pb2.ScoreRequest(items=[
                reward_pb2.ScoreItem(prompt="how do I cook rice", response="simmer it ."),
                reward_pb2.ScoreItem(prompt="plan a picnic", response="bring food and a blanket to the park ."),
            ]), timeout=30)
            assert scored.reward_model_version == "reward-init" and len(scored.scores) == 2
            assert scored.scores[0] != scored.scores[1]
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="rlhf.v1.RewardService"), timeout=5)
            assert health.status == SERVING
        assert (tmp_path / "artifacts" / "reward-init" / "manifest.json").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    except BaseException:
        proc.kill()
        sys.stderr.write(proc.stdout.read())  # what the service said, for the failure report
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "rlhf embedded: gRPC on" in proc.stdout.read()

