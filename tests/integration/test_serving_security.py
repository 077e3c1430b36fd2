"""The shared server's security and request hygiene over a real gRPC server on a real socket: bearer-token scopes,
health open to probes, TLS and mutual TLS, and INVALID_ARGUMENT for request bytes that do not parse.

The policy and feedback services run for real (the feedback component over the in-process bus and cache, the
policy component on a tiny random-init model built once for the module); every other rlhf.v1 service is hosted as a
stub that answers UNIMPLEMENTED, so each classified method is checked on the wire. To host a real service instead of
its stub, add it to SERVICES. The unit tests of the decision itself: tests/unit/test_serving_access.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import pkgutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

import rlhf.v1
from rlhf.bus.memory import InMemoryBus
from rlhf.cache.memory import InMemoryCache
from rlhf.core.models import Manifest, ModelSize, build_causal_lm, build_reward_model, save_artifact
from rlhf.sim import world_texts
from rlhf.core.tokenizer import TokenizerConfig, train_tokenizer
from rlhf.feedback.config import FeedbackConfig
from rlhf.feedback.servicer import FeedbackComponent
from rlhf.policy.config import PolicyConfig
from rlhf.policy.servicer import PolicyComponent
from rlhf.reward.config import RewardConfig
from rlhf.reward.servicer import RewardComponent
from rlhf.serving import config as config_mod
from rlhf.serving import tls
from rlhf.serving.access import Scope, scope_of
from rlhf.serving.config import ServerConfig
from rlhf.serving.server import Component, ServiceHost
from rlhf.v1 import feedback_pb2, policy_pb2, reward_pb2
from support.certs import make_pki
from support.feedback_cases import thumbs_up
from support.hosting import HostThread

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

GARBAGE = b"\xff\xff\xff"  # field 31, wire type 7: no such wire type, so no message parses it
PRODUCT_TOKENS = ("product-token-one", "product-token-two")
ADMIN_TOKENS = ("admin-token-one", "admin-token-two")
TOKENS = dict(auth_token=",".join(PRODUCT_TOKENS), admin_token=",".join(ADMIN_TOKENS))
SERVER = dict(host="127.0.0.1", port=0, metrics_port=-1, health_interval_s=0.2, shutdown_grace_s=1.0)
REFUSED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]


# --------------------------------------------------------------------------------------------- what is hosted


@dataclasses.dataclass(frozen=True)
class Hosted:
    """A service run for real: its descriptor and its component for the server fields (and the module's models)."""

    descriptor: ServiceDescriptor
    make: Callable[[dict, Path], Component]


def make_feedback(server: dict, artifacts: Path) -> Component:
    config = FeedbackConfig(**server, bus_url="memory://", cache_url="memory://")
    return FeedbackComponent(config, bus=InMemoryBus(), cache=InMemoryCache())


def make_policy(server: dict, artifacts: Path) -> Component:
    config = PolicyConfig(
        **server, bus_url="memory://", cache_url="memory://", backend="torch", artifact_root=str(artifacts),
        model_path="policy", torch_num_threads=1, max_batch_size=4, default_max_new_tokens=4,
        follow_model_events=False, drain_timeout_s=5,
    )
    return PolicyComponent(config, bus=InMemoryBus(), cache=InMemoryCache())


def make_reward(server: dict, artifacts: Path) -> Component:
    config = RewardConfig(
        **server, bus_url="memory://", cache_url="memory://", artifact_root=str(artifacts), model_path="reward",
        torch_num_threads=1, follow_model_events=False, drain_timeout_s=5,
    )
    return RewardComponent(config, bus=InMemoryBus(), cache=InMemoryCache())


SERVICES = [
    Hosted(feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"], make_feedback),
    Hosted(policy_pb2.DESCRIPTOR.services_by_name["PolicyService"], make_policy),
    Hosted(reward_pb2.DESCRIPTOR.services_by_name["RewardService"], make_reward),
]


def rlhf_services() -> list[ServiceDescriptor]:
    """Every service of the rlhf.v1 API."""
    modules = [importlib.import_module(f"rlhf.v1.{m.name}") for m in pkgutil.iter_modules(rlhf.v1.__path__)
               if m.name.endswith("_pb2")]
    return [s for module in modules for s in module.DESCRIPTOR.services_by_name.values()]


class StubComponent(Component):
    """A service of the API this module does not run: every method answers UNIMPLEMENTED once it is reached (after
    the interceptors, so auth and parsing are as for a real one)."""

    def __init__(self, descriptor: ServiceDescriptor) -> None:
        self.descriptor = descriptor
        self.service_name = descriptor.full_name

    def register(self, server: grpc.aio.Server) -> None:
        handlers = {m.name: self._handler(m) for m in self.descriptor.methods}
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(self.service_name, handlers)])

    @staticmethod
    def _handler(method: MethodDescriptor) -> grpc.RpcMethodHandler:
        async def reached(request, context):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"stub of {method.full_name} reached")

        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(method.client_streaming, method.server_streaming)]
        request = message_factory.GetMessageClass(method.input_type)
        return make(reached, request_deserializer=request.FromString, response_serializer=lambda m: m.SerializeToString())


def components(server: dict, artifacts: Path, hosted: Sequence[Hosted] = SERVICES) -> list[Component]:
    """The real components of ``hosted`` and a stub for every other rlhf.v1 service."""
    real = {h.descriptor.full_name for h in hosted}
    return [*(h.make(server, artifacts) for h in hosted),
            *(StubComponent(s) for s in rlhf_services() if s.full_name not in real)]


def methods(scope: Scope | None = None) -> list:
    """pytest params of every rlhf.v1 method (of one scope), with ids like ``PolicyService.LoadPolicy``."""
    return [pytest.param(m, id=f"{s.name}.{m.name}") for s in rlhf_services() for m in s.methods
            if scope is None or scope_of(path(m)) is scope]


# --------------------------------------------------------------------------------------------- calls on the wire


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def bearer(token: str | None) -> list[tuple[str, str]] | None:
    return None if token is None else [("authorization", f"Bearer {token}")]


def call(channel: grpc.Channel, method: MethodDescriptor, requests: Sequence[bytes] = (b"",),
         token: str | None = None, timeout: float = 10.0) -> tuple[grpc.StatusCode, str]:
    """Call ``method`` with raw request bytes (b"" is a valid empty message); the status code and details."""
    kwargs = dict(metadata=bearer(token), timeout=timeout)
    name = path(method)
    try:
        match (method.client_streaming, method.server_streaming):
            case (False, False):
                channel.unary_unary(name)(requests[0], **kwargs)
            case (False, True):
                list(channel.unary_stream(name)(requests[0], **kwargs))
            case (True, False):
                channel.stream_unary(name)(iter(requests), **kwargs)
            case (True, True):
                list(channel.stream_stream(name)(iter(requests), **kwargs))
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def grpc_type(method: MethodDescriptor) -> str:
    return {(False, False): "unary", (True, False): "client_stream", (False, True): "server_stream",
            (True, True): "bidi_stream"}[(method.client_streaming, method.server_streaming)]


def handled(method: MethodDescriptor, code: str) -> float:
    return REGISTRY.get_sample_value("grpc_server_handled_total", {
        "grpc_type": grpc_type(method), "grpc_service": method.containing_service.full_name,
        "grpc_method": method.name, "grpc_code": code}) or 0.0


def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.02)


def health(channel: grpc.Channel, token: str | None = None) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), metadata=bearer(token), timeout=5).status


# --------------------------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """A tiny random-init policy under ``<root>/policy`` and a reward model on it under ``<root>/reward`` (seconds, no
    download)."""
    root = tmp_path_factory.mktemp("artifacts")
    tokenizer = train_tokenizer(world_texts(), TokenizerConfig(kind="word"))
    model = build_causal_lm(tokenizer, ModelSize(arch="gpt2", n_layer=1, n_embd=16, n_head=2, max_positions=128), seed=0)
    save_artifact(str(root / "policy"), model, tokenizer, Manifest(kind="base", version="security-test"))
    save_artifact(str(root / "reward"), build_reward_model(model, tokenizer), tokenizer,
                  Manifest(kind="reward", version="security-test-reward"))
    return root


@contextlib.contextmanager
def serving(artifacts: Path, hosted: Sequence[Hosted] = SERVICES, **fields) -> Iterator[HostThread]:
    server = {**SERVER, **fields}
    config = ServerConfig(**server)
    with HostThread(lambda: ServiceHost(config, components(server, artifacts, hosted))) as host:
        yield host


@pytest.fixture(scope="module")
def open_host(artifacts):
    with serving(artifacts) as host:
        yield host


@pytest.fixture(scope="module")
def secured_host(artifacts):
    with serving(artifacts, **TOKENS) as host:
        yield host


@pytest.fixture
def open_channel(open_host):
    with open_host.channel() as channel:
        yield channel


@pytest.fixture
def channel(secured_host):
    with secured_host.channel() as channel:
        yield channel


# --------------------------------------------------------------------------------------------- unparsable requests


@pytest.mark.parametrize("method", methods())
def test_unparsable_request_is_invalid_argument_naming_the_type(open_channel, method):
    before = handled(method, "INVALID_ARGUMENT")
    code, details = call(open_channel, method, [GARBAGE])
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    where = "requests[0]" if method.client_streaming else "request"
    assert details == f"{where}: cannot parse the bytes as {method.input_type.full_name}"
    # the metrics interceptor counts it as it sends the status: the client may see it a moment earlier
    eventually(lambda: handled(method, "INVALID_ARGUMENT") == before + 1)


def test_a_stream_answers_the_messages_before_the_one_that_does_not_parse(open_channel):
    submit = open_channel.stream_stream("/rlhf.v1.FeedbackService/SubmitStream",
                                        response_deserializer=feedback_pb2.SubmitStreamResponse.FromString)
    event = thumbs_up(time.time())
    good = feedback_pb2.SubmitStreamRequest(events=[event]).SerializeToString()
    answers = []
    with pytest.raises(grpc.RpcError) as err:
        for answer in submit(iter([good, GARBAGE, good]), timeout=10):
            answers.append(answer)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "requests[1]: cannot parse the bytes as rlhf.v1.SubmitStreamRequest"
    assert [(a.event_id, a.status) for answer in answers for a in answer.acks] == [
        (event.event_id, feedback_pb2.SUBMIT_STATUS_ACCEPTED)]


def test_parsed_requests_still_reach_the_servicer(open_channel):
    request = feedback_pb2.SubmitRequest(event=thumbs_up(time.time())).SerializeToString()
    reply = open_channel.unary_unary("/rlhf.v1.FeedbackService/Submit")(request, timeout=10)
    assert feedback_pb2.SubmitResponse.FromString(reply).status == feedback_pb2.SUBMIT_STATUS_ACCEPTED
    assert call(open_channel, policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].methods_by_name["GetPolicy"]) \
        == (grpc.StatusCode.OK, "")


# --------------------------------------------------------------------------------------------- tokens


def test_health_answers_without_a_token(channel):
    assert health(channel) in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert health(channel, token="not-a-token") is not None  # a probe's stray header does not matter either
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert next(watch).status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
    watch.cancel()


def test_reflection_needs_a_token(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with pytest.raises(grpc.RpcError) as err:
        list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    [reply] = list(stub.ServerReflectionInfo(iter([request]), metadata=bearer(PRODUCT_TOKENS[0]), timeout=5))
    assert "rlhf.v1.PolicyService" in {s.name for s in reply.list_services_response.service}


@pytest.mark.parametrize("method", methods(Scope.PRODUCT) + methods(Scope.ADMIN))
def test_no_token_or_an_unknown_one_is_unauthenticated(channel, method):
    before = handled(method, "UNAUTHENTICATED")
    for token in (None, "not-a-token"):
        code, details = call(channel, method, token=token)
        assert code == grpc.StatusCode.UNAUTHENTICATED, (token, details)
        assert "authorization: Bearer <token>" in details
    eventually(lambda: handled(method, "UNAUTHENTICATED") == before + 2)


@pytest.mark.parametrize("method", methods(Scope.ADMIN))
def test_a_product_token_is_refused_on_admin_calls(channel, method):
    code, details = call(channel, method, token=PRODUCT_TOKENS[0])
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "admin_token" in details


@pytest.mark.parametrize("method", methods(Scope.PRODUCT))
def test_a_product_token_is_accepted_on_product_calls(channel, method):
    code, details = call(channel, method, token=PRODUCT_TOKENS[1])
    assert code not in REFUSED, details


@pytest.mark.parametrize("method", methods(Scope.PRODUCT) + methods(Scope.ADMIN))
def test_an_admin_token_is_accepted_on_every_call(channel, method):
    code, details = call(channel, method, token=ADMIN_TOKENS[1])
    assert code not in REFUSED, details


def test_every_token_of_a_rotated_list_is_accepted(channel):
    policy = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"]
    for token in (*PRODUCT_TOKENS, *ADMIN_TOKENS):
        assert call(channel, policy.methods_by_name["GetPolicy"], token=token) == (grpc.StatusCode.OK, "")
    for token in ADMIN_TOKENS:
        code, details = call(channel, policy.methods_by_name["LoadPolicy"], token=token)  # an empty request
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("version:"), details


def test_a_real_call_with_a_product_token(channel):
    submit = channel.unary_unary("/rlhf.v1.FeedbackService/Submit",
                                 request_serializer=feedback_pb2.SubmitRequest.SerializeToString,
                                 response_deserializer=feedback_pb2.SubmitResponse.FromString)
    request = feedback_pb2.SubmitRequest(event=thumbs_up(time.time()))
    assert submit(request, metadata=bearer(PRODUCT_TOKENS[0]), timeout=10).status == feedback_pb2.SUBMIT_STATUS_ACCEPTED


def test_unparsable_bytes_without_a_token_are_unauthenticated(channel):
    """Auth comes before parsing: an anonymous caller learns nothing from the parser."""
    submit = feedback_pb2.DESCRIPTOR.services_by_name["FeedbackService"]
    for method in submit.methods:
        assert call(channel, method, [GARBAGE])[0] == grpc.StatusCode.UNAUTHENTICATED
        assert call(channel, method, [GARBAGE], token=PRODUCT_TOKENS[0])[0] == grpc.StatusCode.INVALID_ARGUMENT


POLICY = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"]
STUBS_ONLY: Sequence[Hosted] = ()  # no model, no bus: these servers answer with stubs only
REACHED = grpc.StatusCode.UNIMPLEMENTED


def test_without_an_admin_token_admin_calls_are_refused_with_a_warning(artifacts, caplog):
    caplog.set_level(logging.WARNING, logger="rlhf")
    with serving(artifacts, STUBS_ONLY, auth_token=PRODUCT_TOKENS[0]) as host, host.channel() as channel:
        assert call(channel, POLICY.methods_by_name["GetPolicy"], token=PRODUCT_TOKENS[0])[0] == REACHED
        for token in (PRODUCT_TOKENS[0], None):
            code, details = call(channel, POLICY.methods_by_name["LoadPolicy"], token=token)
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert "set admin_token" in details
    assert any(r.levelno == logging.WARNING and "admin_token" in r.getMessage() for r in caplog.records)


def test_with_only_an_admin_token_product_calls_are_open(artifacts):
    with serving(artifacts, STUBS_ONLY, admin_token=ADMIN_TOKENS[0]) as host, host.channel() as channel:
        assert call(channel, POLICY.methods_by_name["GetPolicy"])[0] == REACHED
        assert call(channel, POLICY.methods_by_name["LoadPolicy"])[0] == grpc.StatusCode.UNAUTHENTICATED
        assert call(channel, POLICY.methods_by_name["LoadPolicy"], token="product-ish")[0] \
            == grpc.StatusCode.UNAUTHENTICATED
        assert call(channel, POLICY.methods_by_name["LoadPolicy"], token=ADMIN_TOKENS[0])[0] == REACHED


def test_without_tokens_every_call_is_open(artifacts):
    with serving(artifacts, STUBS_ONLY) as host, host.channel() as channel:
        for method in POLICY.methods:
            assert call(channel, method)[0] == REACHED


def test_no_log_line_contains_a_token(artifacts, caplog):
    caplog.set_level(logging.DEBUG)
    sent = "sent-but-unknown-token"
    with serving(artifacts, STUBS_ONLY, **TOKENS) as host, host.channel() as channel:
        for token in (*PRODUCT_TOKENS, *ADMIN_TOKENS, sent, None):
            for method in POLICY.methods:
                call(channel, method, token=token)
                call(channel, method, [GARBAGE], token=token)
        logging.getLogger("rlhf.test").info("config: %s", config_mod.describe(host.host.config))
    assert caplog.records, "nothing was logged: the check would prove nothing"
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "auth: product calls need" in logged
    for token in (*PRODUCT_TOKENS, *ADMIN_TOKENS, sent):
        assert token not in logged


# --------------------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), "good")


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("other-pki"), "other")


def server_tls(pki, mutual: bool = False) -> dict:
    files = dict(tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.server.key))
    return {**files, "tls_client_ca_file": str(pki.ca)} if mutual else files


def secure_call(host: HostThread, credentials: grpc.ChannelCredentials, token: str | None = None) -> grpc.StatusCode:
    with grpc.secure_channel(host.address, credentials) as channel:
        try:
            health(channel)
        except grpc.RpcError as err:
            return err.code()
        return call(channel, POLICY.methods_by_name["GetPolicy"], token=token)[0]


def test_tls_serves_clients_that_trust_its_ca(artifacts, pki):
    with serving(artifacts, STUBS_ONLY, **server_tls(pki), **TOKENS) as host:
        assert secure_call(host, tls.channel_credentials(str(pki.ca)), token=PRODUCT_TOKENS[0]) == REACHED
        assert secure_call(host, tls.channel_credentials(str(pki.ca))) == grpc.StatusCode.UNAUTHENTICATED


def test_tls_refuses_clients_that_trust_another_ca_or_speak_plaintext(artifacts, pki, other_pki):
    with serving(artifacts, STUBS_ONLY, **server_tls(pki)) as host:
        assert secure_call(host, tls.channel_credentials(str(other_pki.ca))) == grpc.StatusCode.UNAVAILABLE
        with host.channel() as plaintext:
            with pytest.raises(grpc.RpcError) as err:
                health(plaintext)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_from_its_ca(artifacts, pki, other_pki):
    with serving(artifacts, STUBS_ONLY, **server_tls(pki, mutual=True)) as host:
        ca = str(pki.ca)
        assert secure_call(host, tls.channel_credentials(ca, str(pki.client.cert), str(pki.client.key))) == REACHED
        assert secure_call(host, tls.channel_credentials(ca)) == grpc.StatusCode.UNAVAILABLE
        assert secure_call(host, tls.channel_credentials(ca, str(other_pki.client.cert), str(other_pki.client.key))) \
            == grpc.StatusCode.UNAVAILABLE


def test_a_port_in_use_says_so(artifacts, pki):
    with serving(artifacts, STUBS_ONLY) as taken:
        port = int(taken.address.rsplit(":", 1)[1])
        for fields in ({}, server_tls(pki)):
            host = ServiceHost(ServerConfig(**{**SERVER, **fields, "port": port}), components({}, artifacts, STUBS_ONLY))
            with pytest.raises(RuntimeError, match=r"could not bind gRPC port .* choose another with --port"):
                taken.call(host.start())
