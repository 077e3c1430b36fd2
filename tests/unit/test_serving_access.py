"""Who may call what (rlhf.serving.access) and the security settings of ServerConfig (tokens, TLS files), without a
server. The same behaviour over a real socket: tests/integration/test_serving_security.py."""
from __future__ import annotations

import importlib
import pkgutil

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

import rlhf.v1
from rlhf.feedback.config import FeedbackConfig
from rlhf.serving import access, tls
from rlhf.serving import config as config_mod
from rlhf.serving.access import ACCESS, AccessPolicy, Scope, bearer_token, scope_of
from rlhf.serving.config import ConfigError, ServerConfig
from support.certs import make_pki

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


def served_methods() -> set[str]:
    """Every method of every service in the rlhf.v1 descriptors, plus health and reflection."""
    files = [health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR]
    for info in pkgutil.iter_modules(rlhf.v1.__path__):
        if info.name.endswith("_pb2"):
            files.append(importlib.import_module(f"rlhf.v1.{info.name}").DESCRIPTOR)
    return {f"/{service.full_name}/{method.name}"
            for file in files for service in file.services_by_name.values() for method in service.methods}


# Entries the table may hold before their method is in the descriptors (nothing else may be missing there).
NOT_YET_GENERATED = {
    "/rlhf.v1.RewardService/LoadRewardModel",  # being added to reward.proto
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",  # grpcio-reflection serves v1alpha only today
}

# The classification the platform promises (the list), written out independently of the table.
PRODUCT = {
    "/rlhf.v1.PolicyService/Generate", "/rlhf.v1.PolicyService/GenerateStream", "/rlhf.v1.PolicyService/GetPolicy",
    "/rlhf.v1.FeedbackService/Submit", "/rlhf.v1.FeedbackService/SubmitStream",
    "/rlhf.v1.RewardService/Score", "/rlhf.v1.RewardService/GetRewardModel",
    "/rlhf.v1.TrainerService/GetStatus", "/rlhf.v1.TrainerService/ListVersions",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
}
ADMIN = {
    "/rlhf.v1.PolicyService/LoadPolicy", "/rlhf.v1.PolicyService/SetTrafficSplit", "/rlhf.v1.PolicyService/Rollback",
    "/rlhf.v1.RewardService/LoadRewardModel",
    "/rlhf.v1.TrainerService/StartRun", "/rlhf.v1.TrainerService/PauseRun", "/rlhf.v1.TrainerService/ResumeRun",
    "/rlhf.v1.TrainerService/TrainRewardModel", "/rlhf.v1.TrainerService/Promote", "/rlhf.v1.TrainerService/Rollback",
}
OPEN = {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"}


# --------------------------------------------------------------------------------------------- the table


def test_every_served_method_is_classified():
    missing = sorted(served_methods() - set(ACCESS))
    assert not missing, f"classify these in rlhf/serving/access.py ACCESS (else they are admin-only): {missing}"


def test_the_table_names_only_methods_that_exist():
    unknown = sorted(set(ACCESS) - served_methods() - NOT_YET_GENERATED)
    assert not unknown, f"ACCESS names methods no descriptor has (a typo?): {unknown}"


def test_the_scopes_are_the_promised_ones():
    assert {m for m, s in ACCESS.items() if s is Scope.PRODUCT} == PRODUCT
    assert {m for m, s in ACCESS.items() if s is Scope.ADMIN} == ADMIN
    assert {m for m, s in ACCESS.items() if s is Scope.OPEN} == OPEN


def test_an_unclassified_method_is_admin():
    assert scope_of("/rlhf.v1.PolicyService/DeleteEverything") is Scope.ADMIN
    policy = AccessPolicy(["product"], ["admin"])
    assert policy.check("/rlhf.v1.PolicyService/DeleteEverything", meta("product")).code == PERMISSION_DENIED
    assert policy.check("/rlhf.v1.PolicyService/DeleteEverything", meta("admin")) is None


def test_the_table_cannot_be_changed_at_run_time():
    with pytest.raises(TypeError):
        ACCESS["/rlhf.v1.PolicyService/LoadPolicy"] = Scope.PRODUCT  # type: ignore[index]


# --------------------------------------------------------------------------------------------- the decision


def meta(token: str | None, scheme: str = "Bearer") -> tuple[tuple[str, str], ...]:
    return () if token is None else (("authorization", f"{scheme} {token}"),)


GENERATE = "/rlhf.v1.PolicyService/Generate"
LOAD = "/rlhf.v1.PolicyService/LoadPolicy"
HEALTH = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
BOTH = (["p1", "p2"], ["a1", "a2"])  # product tokens, admin tokens
ONLY_PRODUCT = (["p1", "p2"], [])
ONLY_ADMIN = ([], ["a1", "a2"])
NONE = ([], [])


@pytest.mark.parametrize("tokens, method, sent, want", [
    # both scopes configured
    (BOTH, HEALTH, None, None),
    (BOTH, HEALTH, "wrong", None),
    (BOTH, GENERATE, None, UNAUTHENTICATED),
    (BOTH, GENERATE, "wrong", UNAUTHENTICATED),
    (BOTH, GENERATE, "p1", None),
    (BOTH, GENERATE, "p2", None),
    (BOTH, GENERATE, "a2", None),
    (BOTH, REFLECTION, None, UNAUTHENTICATED),
    (BOTH, REFLECTION, "p1", None),
    (BOTH, LOAD, None, UNAUTHENTICATED),
    (BOTH, LOAD, "wrong", UNAUTHENTICATED),
    (BOTH, LOAD, "p1", PERMISSION_DENIED),
    (BOTH, LOAD, "a1", None),
    (BOTH, LOAD, "a2", None),
    # only product tokens: admin calls are refused, whoever asks
    (ONLY_PRODUCT, GENERATE, "p1", None),
    (ONLY_PRODUCT, GENERATE, None, UNAUTHENTICATED),
    (ONLY_PRODUCT, LOAD, "p1", PERMISSION_DENIED),
    (ONLY_PRODUCT, LOAD, None, PERMISSION_DENIED),
    (ONLY_PRODUCT, HEALTH, None, None),
    # only admin tokens: product calls are open
    (ONLY_ADMIN, GENERATE, None, None),
    (ONLY_ADMIN, GENERATE, "wrong", None),
    (ONLY_ADMIN, LOAD, None, UNAUTHENTICATED),
    (ONLY_ADMIN, LOAD, "wrong", UNAUTHENTICATED),
    (ONLY_ADMIN, LOAD, "a2", None),
    # nothing configured: open
    (NONE, LOAD, None, None),
    (NONE, GENERATE, None, None),
])
def test_decision(tokens, method, sent, want):
    refusal = AccessPolicy(*tokens).check(method, meta(sent))
    assert (refusal and refusal.code) == want, refusal


def test_enabled_only_with_a_token():
    assert not AccessPolicy(*NONE).enabled
    assert AccessPolicy(*ONLY_ADMIN).enabled and AccessPolicy(*ONLY_PRODUCT).enabled


@pytest.mark.parametrize("tokens, method, sent, needles", [
    (BOTH, GENERATE, None, ["authorization: Bearer <token>", "no token was sent", GENERATE]),
    (BOTH, GENERATE, "wrong", ["authorization: Bearer <token>", "not one of them"]),
    (BOTH, LOAD, None, ["authorization: Bearer <token>", "admin_token"]),
    (BOTH, LOAD, "p1", ["admin call", "product token", "admin_token"]),
    (ONLY_PRODUCT, LOAD, "p1", ["set admin_token", "--admin-token", "RLHF_ADMIN_TOKEN"]),
])
def test_refusals_say_what_to_do_and_never_echo_a_token(tokens, method, sent, needles):
    refusal = AccessPolicy(*tokens).check(method, meta(sent))
    for needle in needles:
        assert needle in refusal.message
    for token in [*tokens[0], *tokens[1], "wrong"]:
        assert token not in refusal.message.replace(method, "")


@pytest.mark.parametrize("matching", [None, "p1", "p3", "a1", "a2"])
@pytest.mark.parametrize("method", [GENERATE, LOAD])
def test_every_configured_token_is_compared_whichever_matches(monkeypatch, matching, method):
    """No early exit: the time of a check does not say which token (or how much of one) matched."""
    calls = []
    real = access.hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(access.hmac, "compare_digest", counting)
    AccessPolicy(["p1", "p2", "p3"], ["a1", "a2"]).check(method, meta(matching))
    assert len(calls) == 5
    assert {n for pair in calls for n in pair} == {32}  # digests: equal lengths whatever was sent


@pytest.mark.parametrize("metadata, want", [
    ((("authorization", "Bearer abc"),), b"abc"),
    ((("authorization", "bearer abc"),), b"abc"),
    ((("authorization", "BEARER  abc "),), b"abc"),
    ((("authorization", b"Bearer abc"),), b"abc"),
    ((("x-other", "1"), ("authorization", "Bearer abc"), ("authorization", "Bearer def")), b"abc"),
    ((("authorization", "Basic abc"),), b""),
    ((("authorization", "abc"),), b""),
    ((), b""),
    (None, b""),
])
def test_bearer_token(metadata, want):
    assert bearer_token(metadata) == want


def test_summary_counts_tokens_but_shows_none():
    text = AccessPolicy(["p1-secret", "p2-secret"], ["a1-secret"]).summary()
    assert "2 product token(s)" in text and "1 admin token(s)" in text and "secret" not in text
    assert "admin calls are refused" in AccessPolicy(["p1"], []).summary()
    assert "product calls are open" in AccessPolicy([], ["a1"]).summary()
    assert "every call is open" in AccessPolicy().summary()


# --------------------------------------------------------------------------------------------- token settings


def test_tokens_are_comma_separated_lists():
    config = ServerConfig(auth_token=" p1, p2 ,", admin_token="a1")
    assert config.auth_tokens == ("p1", "p2") and config.admin_tokens == ("a1",)
    assert ServerConfig().auth_tokens == () and ServerConfig().admin_tokens == ()


def test_tokens_come_from_the_platform_environment():
    config = config_mod.load(FeedbackConfig, env={"RLHF_AUTH_TOKEN": "p1,p2", "RLHF_ADMIN_TOKEN": "a1"})
    assert config.auth_tokens == ("p1", "p2") and config.admin_tokens == ("a1",)
    assert AccessPolicy.from_config(config).check(LOAD, meta("a1")) is None


@pytest.mark.parametrize("fields, needle", [
    (dict(auth_token=" , "), "auth_token has no token"),
    (dict(admin_token=","), "admin_token has no token"),
    (dict(auth_token="has space-secret"), "auth_token must hold printable ASCII"),
    (dict(admin_token="naïve-secret"), "admin_token must hold printable ASCII"),
    (dict(auth_token="p1,same-secret", admin_token="same-secret"), "admin_token shares a token with auth_token"),
])
def test_bad_tokens_are_config_errors_that_do_not_echo_them(fields, needle):
    with pytest.raises(ConfigError) as err:
        ServerConfig(**fields)
    assert needle in str(err.value)
    assert "secret" not in str(err.value)


def test_describe_masks_both_tokens():
    described = config_mod.describe(FeedbackConfig(auth_token="p1-secret,p2-secret", admin_token="a1-secret"))
    assert described["auth_token"] == "***" and described["admin_token"] == "***"
    assert "secret" not in repr(described)


# --------------------------------------------------------------------------------------------- TLS settings


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("fields, pattern", [
    (dict(tls_cert_file="CERT"), r"^tls_key_file is missing: .*\(flag --tls-key-file\)$"),
    (dict(tls_key_file="KEY"), r"^tls_cert_file is missing: .*\(flag --tls-cert-file\)$"),
    (dict(tls_client_ca_file="CA"), r"^tls_client_ca_file needs tls_cert_file .*\(flag --tls-client-ca-file\)$"),
    (dict(tls_cert_file="/no/cert.pem", tls_key_file="KEY"),
     r"^tls_cert_file '/no/cert.pem' is not a readable file \(flag --tls-cert-file\)$"),
    (dict(tls_cert_file="CERT", tls_key_file="DIR"), r"^tls_key_file '.*' is not a readable file \(flag --tls-key-file\)$"),
    (dict(tls_cert_file="CERT", tls_key_file="KEY", tls_client_ca_file="/no/ca.pem"),
     r"^tls_client_ca_file '/no/ca.pem' is not a readable file \(flag --tls-client-ca-file\)$"),
])
def test_tls_settings_are_checked_and_name_the_flag(pki, tmp_path, fields, pattern):
    files = {"CERT": str(pki.server.cert), "KEY": str(pki.server.key), "CA": str(pki.ca), "DIR": str(tmp_path)}
    with pytest.raises(ConfigError, match=pattern):
        ServerConfig(**{name: files.get(value, value) for name, value in fields.items()})


def test_server_credentials(pki):
    assert tls.server_credentials(ServerConfig()) is None
    plain = ServerConfig(tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.server.key))
    mutual = ServerConfig(tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.server.key),
                          tls_client_ca_file=str(pki.ca))
    assert plain.tls and mutual.tls and not ServerConfig().tls
    assert isinstance(tls.server_credentials(plain), grpc.ServerCredentials)
    assert isinstance(tls.server_credentials(mutual), grpc.ServerCredentials)


def test_a_file_that_is_not_pem_names_its_flag(pki, tmp_path):
    not_pem = tmp_path / "cert.der"
    not_pem.write_bytes(b"\x30\x82\x01\x00 binary")
    config = ServerConfig(tls_cert_file=str(not_pem), tls_key_file=str(pki.server.key))
    with pytest.raises(ConfigError, match=r"tls_cert_file: .* is not PEM .*\(flag --tls-cert-file\)"):
        tls.server_credentials(config)


def test_a_file_gone_after_the_config_was_checked_names_its_flag(pki, tmp_path):
    key = tmp_path / "key.pem"
    key.write_bytes(pki.server.key.read_bytes())
    config = ServerConfig(tls_cert_file=str(pki.server.cert), tls_key_file=str(key))
    key.unlink()
    with pytest.raises(ConfigError, match=r"tls_key_file: cannot read .*\(flag --tls-key-file\)"):
        tls.server_credentials(config)


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("other-pki"), "other")


@pytest.mark.parametrize("cert, key, ca, pattern", [
    ("server.key", "server.key", None, r"^tls_cert_file: not a PEM certificate .*\(flag --tls-cert-file\)$"),
    ("server.cert", "other.key", None, r"^tls_key_file: not the unencrypted PEM private key of tls_cert_file .*"
                                       r"\(flag --tls-key-file\)$"),
    ("server.cert", "server.cert", None, r"^tls_key_file: not the unencrypted PEM private key"),
    ("server.cert", "server.key", "server.key", r"^tls_client_ca_file: not a PEM certificate"),
])
def test_certificates_and_keys_that_grpc_could_not_use_name_their_flag(pki, other_pki, cert, key, ca, pattern):
    """gRPC itself only says "Failed to bind to address" for these."""
    files = {"server.cert": str(pki.server.cert), "server.key": str(pki.server.key),
             "other.key": str(other_pki.server.key)}
    config = ServerConfig(tls_cert_file=files[cert], tls_key_file=files[key], tls_client_ca_file=files.get(ca, ""))
    with pytest.raises(ConfigError, match=pattern):
        tls.server_credentials(config)


def test_channel_credentials(pki):
    assert isinstance(tls.channel_credentials(str(pki.ca)), grpc.ChannelCredentials)
    assert isinstance(tls.channel_credentials(), grpc.ChannelCredentials)  # the system's roots
    assert isinstance(tls.channel_credentials(str(pki.ca), str(pki.client.cert), str(pki.client.key)),
                      grpc.ChannelCredentials)
    with pytest.raises(ConfigError, match="key_file is missing"):
        tls.channel_credentials(str(pki.ca), cert_file=str(pki.client.cert))
    with pytest.raises(ConfigError, match=r"policy_tls_ca: cannot read .*\(flag --policy-tls-ca\)"):
        tls.channel_credentials("/no/ca.pem", names=("policy_tls_ca", "policy_tls_cert", "policy_tls_key"))
    with pytest.raises(ConfigError, match="key_file: not the unencrypted PEM private key of cert_file"):
        tls.channel_credentials(str(pki.ca), str(pki.client.cert), str(pki.server.key))
