"""Service configuration: one frozen dataclass per service, read from flags and environment in one place.

Every field carries ``metadata={"help": ...}``. :func:`load` builds a config from, in order of precedence:
command-line flags (``--max-text-bytes 4096``), environment variables (``RLHF_FEEDBACK_MAX_TEXT_BYTES=4096``
for a config whose ``env_prefix`` is ``RLHF_FEEDBACK_``), then the platform-wide variable (``RLHF_BUS_URL``, so one
setting reaches every service), then the field's default. Values are parsed with the
field's type and checked once by the dataclass' ``__post_init__``; nothing is written back after that.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag, the variable and what to do."""


def field(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field with its documentation (shown by ``--help``)."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """What every gRPC service shares. Services extend it with their own fields."""

    env_prefix: typing.ClassVar[str] = "RLHF_"

    host: str = field("127.0.0.1", "Address the gRPC server binds; 0.0.0.0 in a container.")
    port: int = field(50051, "gRPC port; 0 picks a free one (the bound port is logged).")
    metrics_port: int = field(9464, "Port of the HTTP /metrics endpoint for Prometheus; 0 picks a free one; -1 disables it.")
    auth_token: str = field(
        "",
        "Product token(s), comma-separated to rotate: when set, product calls (generate, submit feedback, score, "
        "read state, reflection) must carry `authorization: Bearer <token>` metadata with one of them or an admin "
        "token. Health checks never need a token. Scopes: rlhf.serving.access. Prefer the environment "
        "(RLHF_AUTH_TOKEN) to the flag, which shows in the process list.",
    )
    admin_token: str = field(
        "",
        "Admin token(s), comma-separated to rotate: admin calls (LoadPolicy, SetTrafficSplit, rollbacks, training "
        "runs, Promote, LoadRewardModel) need one of them; accepted on product calls too. Empty while auth_token "
        "is set: admin calls are refused. Both empty: every call is open (development only). Prefer the "
        "environment (RLHF_ADMIN_TOKEN) to the flag.",
    )
    tls_cert_file: str = field(
        "", "PEM certificate (chain) of the server; with tls_key_file, every service is served over TLS only."
    )
    tls_key_file: str = field("", "PEM private key of tls_cert_file.")
    tls_client_ca_file: str = field(
        "",
        "PEM CA certificate(s) that sign client certificates: when set, clients must present one (mutual TLS). "
        "Needs tls_cert_file and tls_key_file.",
    )
    max_message_bytes: int = field(4 * 1024 * 1024, "Largest gRPC message accepted or sent, in bytes.")
    shutdown_grace_s: float = field(10.0, "On SIGTERM, seconds in-flight calls get to finish before they are cancelled.")
    health_interval_s: float = field(2.0, "Seconds between dependency checks that drive grpc.health.v1 status.")
    replica_id: str = field("", "Name of this replica in records and logs; defaults to the host name.")

    def __post_init__(self) -> None:
        _check(self.port >= 0, "port", "must be >= 0")
        _check(self.metrics_port >= -1, "metrics_port", "must be >= -1")
        _check(self.max_message_bytes >= 1024, "max_message_bytes", "must be at least 1024")
        _check(self.shutdown_grace_s >= 0, "shutdown_grace_s", "must be >= 0")
        _check(self.health_interval_s > 0, "health_interval_s", "must be > 0")
        # Tokens: the messages never include a token (they reach logs and terminals).
        for name, raw, tokens in (("auth_token", self.auth_token, self.auth_tokens),
                                  ("admin_token", self.admin_token, self.admin_tokens)):
            _check(not raw.strip() or bool(tokens), name, "has no token (a comma-separated list of tokens)")
            _check(all(33 <= ord(c) <= 126 for t in tokens for c in t), name,
                   "must hold printable ASCII without spaces (what gRPC metadata can carry)")
        _check(not set(self.auth_tokens) & set(self.admin_tokens), "admin_token",
               "shares a token with auth_token: a product token would be an admin token; use different tokens")
        # TLS: both or neither of cert and key; mutual TLS on top of TLS; files readable now rather than at bind.
        _check(bool(self.tls_cert_file) == bool(self.tls_key_file),
               "tls_key_file" if self.tls_cert_file else "tls_cert_file",
               "is missing: TLS needs both tls_cert_file and tls_key_file (PEM), or neither")
        _check(not self.tls_client_ca_file or bool(self.tls_cert_file), "tls_client_ca_file",
               "needs tls_cert_file and tls_key_file (mutual TLS is TLS plus client certificates)")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            _check(not path or (os.path.isfile(path) and os.access(path, os.R_OK)), name,
                   f"{path!r} is not a readable file")

    @property
    def replica(self) -> str:
        return self.replica_id or os.uname().nodename

    @property
    def auth_tokens(self) -> tuple[str, ...]:
        """The product tokens (auth_token split at commas)."""
        return tuple(t.strip() for t in self.auth_token.split(",") if t.strip())

    @property
    def admin_tokens(self) -> tuple[str, ...]:
        """The admin tokens (admin_token split at commas)."""
        return tuple(t.strip() for t in self.admin_token.split(",") if t.strip())

    @property
    def tls(self) -> bool:
        """Whether the server is served over TLS."""
        return bool(self.tls_cert_file)


@dataclasses.dataclass(frozen=True)
class ServiceConfig(ServerConfig):
    """What every service on the bus and the cache shares (declared once here; the defaults are the addresses
    ``deploy/local/infra.py`` gives Kafka and Redis on loopback, so ``infra.py up`` and a service agree with no flag)."""

    bus_url: str = field(
        "kafka://127.0.0.1:19092",
        "The message bus: kafka://host:port[,host:port][?field=value...] (distributed; fields of "
        "rlhf.bus.kafka.KafkaConfig, e.g. ?security_protocol=SASL_SSL) or memory:// (embedded, one process).",
    )
    cache_url: str = field(
        "redis://127.0.0.1:16379/0",
        "The cache: redis://host:port/db (rediss:// for TLS) or memory:// (embedded, one process).",
    )
    create_topics: bool = field(True, "Create the platform's topics at start when they do not exist.")
    topic_partitions: int = field(3, "Partitions of topics created at start (consumers in one group scale to this).")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(bool(self.bus_url), "bus_url", "must not be empty (memory:// for one process)")
        _check(bool(self.cache_url), "cache_url", "must not be empty (memory:// for one process)")
        _check(self.topic_partitions >= 1, "topic_partitions", "must be >= 1")


def _check(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{name} {what} (flag --{name.replace('_', '-')})")


def _parse(tp: Any, raw: str, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw == "" and len(args) < len(typing.get_args(tp)):
            return None
        tp = args[0]
    if tp is bool:
        low = raw.strip().lower()
        if low in {"1", "true", "yes", "on"}:
            return True
        if low in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{name}: expected true/false, got {raw!r}")
    if tp in (int, float, str):
        try:
            return tp(raw)
        except ValueError:
            raise ConfigError(f"{name}: expected {tp.__name__}, got {raw!r}") from None
    if typing.get_origin(tp) is tuple:
        return tuple(s.strip() for s in raw.split(",") if s.strip())
    raise TypeError(f"config field {name} has unsupported type {tp!r}")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per field of ``cls`` (default None so that unset flags fall through to env/default)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} (environment: {cls.env_prefix}<FIELD>)")
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f"cfg_{f.name}",
            default=None,
            metavar=getattr(hints[f.name], "__name__", "value").upper(),
            help=f"{f.metadata.get('help', '')} (default: {default!r})",
        )


def load(cls: type[C], args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None,
         defaults: Mapping[str, Any] | None = None, **overrides: Any) -> C:
    """Build ``cls`` from flags (``args`` from a parser given :func:`add_arguments`), environment and defaults.

    Precedence: ``overrides`` (fixed by the caller), then the flag, then the environment, then ``defaults`` (a
    caller's own defaults, e.g. the embedded platform's), then the field's default.
    """
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        flag = getattr(args, f"cfg_{f.name}", None) if args is not None else None
        env_names = [f"{cls.env_prefix}{f.name.upper()}", f"RLHF_{f.name.upper()}"]  # type: ignore[attr-defined]
        env_name = next((n for n in env_names if n in env), env_names[0])
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif flag is not None:
            values[f.name] = _parse(hints[f.name], flag, f"--{f.name.replace('_', '-')}")
        elif env_name in env:
            values[f.name] = _parse(hints[f.name], env[env_name], env_name)
        elif defaults and f.name in defaults:
            values[f.name] = defaults[f.name]
    unknown = (set(overrides) | set(defaults or ())) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return cls(**values)


def describe(config: Any, secret_fields: Sequence[str] = ("auth_token", "admin_token")) -> dict[str, Any]:
    """The config as a dict for logs, with secrets masked."""
    out = dataclasses.asdict(config)
    for name in secret_fields:
        if out.get(name):
            out[name] = "***"
    return out
