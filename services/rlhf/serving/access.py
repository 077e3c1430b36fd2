"""Who may call what: the scope of every method the services serve, and the bearer-token decision.

Three scopes:

- ``OPEN``: grpc.health.v1. Kubernetes' native gRPC probes send no metadata, so health answers without a token.
- ``PRODUCT``: what an application calls to serve its users: generate, submit feedback, score, read state; and
  server reflection (it lists the API, which is no secret, but it is not for anonymous callers either).
- ``ADMIN``: what changes which model serves or how the platform trains: load, traffic split, rollback, training
  runs, promotion.

The table :data:`ACCESS` is the one place a method is classified. A method not in it is ``ADMIN`` (deny by
default): a new RPC is refused to product tokens until someone classifies it here, and
tests/unit/test_serving_access.py fails until then.

Tokens (see :class:`AccessPolicy`): ``auth_token`` holds the product token(s), ``admin_token`` the admin token(s),
each a comma-separated list so that a token can be rotated (add the new one, move the clients, drop the old one).
An admin token is accepted on product calls too. Neither set: everything is open (development).
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import types
from collections.abc import Iterable, Mapping, Sequence

import grpc

from rlhf.serving.config import ServerConfig


class Scope(enum.Enum):
    OPEN = "open"
    PRODUCT = "product"
    ADMIN = "admin"


def _methods(service: str, scope: Scope, *names: str) -> dict[str, Scope]:
    return {f"/{service}/{name}": scope for name in names}


#: Full method name ("/rlhf.v1.PolicyService/LoadPolicy") -> scope.
ACCESS: Mapping[str, Scope] = types.MappingProxyType({
    **_methods("grpc.health.v1.Health", Scope.OPEN, "Check", "Watch"),
    # v1 is what current clients (grpcurl) try first; grpcio-reflection serves v1alpha today.
    **_methods("grpc.reflection.v1alpha.ServerReflection", Scope.PRODUCT, "ServerReflectionInfo"),
    **_methods("grpc.reflection.v1.ServerReflection", Scope.PRODUCT, "ServerReflectionInfo"),
    **_methods("rlhf.v1.PolicyService", Scope.PRODUCT, "Generate", "GenerateStream", "GetPolicy"),
    **_methods("rlhf.v1.PolicyService", Scope.ADMIN, "LoadPolicy", "SetTrafficSplit", "Rollback"),
    **_methods("rlhf.v1.FeedbackService", Scope.PRODUCT, "Submit", "SubmitStream"),
    **_methods("rlhf.v1.RewardService", Scope.PRODUCT, "Score", "GetRewardModel"),
    **_methods("rlhf.v1.RewardService", Scope.ADMIN, "LoadRewardModel"),
    **_methods("rlhf.v1.TrainerService", Scope.PRODUCT, "GetStatus", "ListVersions"),
    **_methods("rlhf.v1.TrainerService", Scope.ADMIN,
               "StartRun", "PauseRun", "ResumeRun", "TrainRewardModel", "Promote", "Rollback"),
})


def scope_of(method: str) -> Scope:
    """The scope of a full method name; ``ADMIN`` when it is not classified (deny by default)."""
    return ACCESS.get(method, Scope.ADMIN)


BEARER_HINT = "send metadata `authorization: Bearer <token>`"


class Refusal:
    """Why a call is refused: the status code and a message that says what to do (never a token)."""

    __slots__ = ("code", "message")

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"Refusal({self.code.name}, {self.message!r})"


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> bytes:
    """The token of the first ``authorization: Bearer <token>`` entry (the scheme is case-insensitive, RFC 6750);
    b"" when there is none."""
    for key, value in metadata or ():
        if key == "authorization":
            raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
            scheme, _, token = raw.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return b""


def _digest(token: bytes) -> bytes:
    # Digests of equal length: compare_digest then takes the same time whatever the length of the token sent.
    return hashlib.sha256(token).digest()


def _matches(digest: bytes, configured: Sequence[bytes]) -> bool:
    """Constant time: compares against every configured token, no early exit."""
    found = False
    for candidate in configured:
        found |= hmac.compare_digest(digest, candidate)
    return found


class AccessPolicy:
    """The token decision of one server. Built once at start; :meth:`check` runs on every call."""

    def __init__(self, product_tokens: Sequence[str] = (), admin_tokens: Sequence[str] = ()) -> None:
        self._product = tuple(_digest(t.encode()) for t in product_tokens)
        self._admin = tuple(_digest(t.encode()) for t in admin_tokens)

    @classmethod
    def from_config(cls, config: ServerConfig) -> "AccessPolicy":
        return cls(config.auth_tokens, config.admin_tokens)

    @property
    def enabled(self) -> bool:
        """False when no token is configured: every call is open."""
        return bool(self._product or self._admin)

    def summary(self) -> str:
        """A line for the start log (counts, never tokens)."""
        if not self.enabled:
            return "auth: off (no auth_token or admin_token): every call is open"
        product = (f"product calls need a product or admin token ({len(self._product)} product token(s))"
                   if self._product else "product calls are open (no auth_token)")
        admin = (f"admin calls need an admin token ({len(self._admin)} admin token(s))"
                 if self._admin else "admin calls are refused (no admin_token)")
        return f"auth: {product}; {admin}; health is open"

    def check(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> Refusal | None:
        """None when the call may go ahead, else the refusal."""
        scope = scope_of(method)
        if scope is Scope.OPEN or not self.enabled or (scope is Scope.PRODUCT and not self._product):
            return None
        token = bearer_token(metadata)
        digest = _digest(token)
        is_admin = _matches(digest, self._admin)
        is_product = _matches(digest, self._product)
        sent = "no token was sent" if not token else "the token sent is not one of them"
        if scope is Scope.PRODUCT:
            if is_admin or is_product:
                return None
            return Refusal(grpc.StatusCode.UNAUTHENTICATED,
                           f"{method} needs a token of the service's auth_token or admin_token ({sent}): "
                           f"{BEARER_HINT}")
        if is_admin:
            return None
        if not self._admin:
            return Refusal(grpc.StatusCode.PERMISSION_DENIED,
                           f"{method} is an admin call and this service has no admin token: set admin_token "
                           "(flag --admin-token, env RLHF_ADMIN_TOKEN) on the service to allow admin calls")
        if is_product:
            return Refusal(grpc.StatusCode.PERMISSION_DENIED,
                           f"{method} is an admin call: the token sent is a product token (auth_token); "
                           "send an admin token (admin_token)")
        return Refusal(grpc.StatusCode.UNAUTHENTICATED,
                       f"{method} is an admin call: it needs a token of the service's admin_token ({sent}): "
                       f"{BEARER_HINT}")
