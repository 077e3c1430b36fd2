"""TLS for the services: server credentials from a ServerConfig, channel credentials for the clients of a service.

Server: ``tls_cert_file`` + ``tls_key_file`` serve every service of the host over TLS; ``tls_client_ca_file`` adds
mutual TLS (a client must present a certificate signed by that CA). Client: :func:`channel_credentials` trusts a CA
file (or the system roots) and optionally presents a client certificate, e.g. for the trainer calling the policy
service::

    creds = channel_credentials(ca_file="ca.pem", cert_file="trainer.pem", key_file="trainer-key.pem")
    channel = grpc.aio.secure_channel("policy:50052", creds)

A file that cannot be read, holds no certificate (or key) or a key that is not the certificate's is a
:class:`ConfigError` naming the flag: checked here with the standard library's ``ssl``, because gRPC only says
"Failed to bind to address" when it cannot use them.
"""
from __future__ import annotations

import ssl

import grpc

from rlhf.serving.config import ConfigError, ServerConfig

_PEM_BEGIN = b"-----BEGIN "


def read_pem(path: str, name: str) -> bytes:
    """The bytes of a PEM file; ``name`` is the config field (or argument) that named it, for the error."""
    flag = f"--{name.replace('_', '-')}"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path!r} ({exc.strerror}) (flag {flag})") from None
    if _PEM_BEGIN not in data:
        raise ConfigError(f"{name}: {path!r} is not PEM (no '-----BEGIN' block) (flag {flag})")
    return data


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials of the server, or None when the config asks for none (plaintext)."""
    if not config.tls:  # ServerConfig has checked that cert and key come together
        return None
    cert = read_pem(config.tls_cert_file, "tls_cert_file")
    key = read_pem(config.tls_key_file, "tls_key_file")
    client_ca = read_pem(config.tls_client_ca_file, "tls_client_ca_file") if config.tls_client_ca_file else None
    check_certificates(cert, "tls_cert_file")
    if client_ca is not None:
        check_certificates(client_ca, "tls_client_ca_file")
    check_key(config.tls_cert_file, config.tls_key_file)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def check_certificates(pem: bytes, name: str) -> None:
    """ConfigError naming ``name`` unless ``pem`` holds certificates that parse."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{name}: not a PEM certificate ({exc}) (flag --{name.replace('_', '-')})") from None


def check_key(cert_file: str, key_file: str, names: tuple[str, str] = ("tls_cert_file", "tls_key_file")) -> None:
    """ConfigError naming the key's flag unless ``key_file`` is the (unencrypted) private key of ``cert_file``."""
    try:
        # A password callback so that an encrypted key fails here instead of prompting on the terminal.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file, password=lambda: b"")
    except ssl.SSLError as exc:
        raise ConfigError(f"{names[1]}: not the unencrypted PEM private key of {names[0]} {cert_file!r} ({exc}) "
                          f"(flag --{names[1].replace('_', '-')})") from None


def channel_credentials(ca_file: str = "", cert_file: str = "", key_file: str = "", *,
                        names: tuple[str, str, str] = ("ca_file", "cert_file", "key_file")) -> grpc.ChannelCredentials:
    """Credentials of a client: trust ``ca_file`` (empty: the system's roots) and, for a mutual-TLS service, present
    ``cert_file`` with its ``key_file`` (both or neither). ``names`` are the caller's names for the three (its
    config fields), used in errors."""
    ca_name, cert_name, key_name = names
    if bool(cert_file) != bool(key_file):
        missing = key_name if cert_file else cert_name
        raise ConfigError(f"{missing} is missing: a client certificate needs both {cert_name} and {key_name} "
                          f"(flag --{missing.replace('_', '-')})")
    root = read_pem(ca_file, ca_name) if ca_file else None
    if root is not None:
        check_certificates(root, ca_name)
    if cert_file:
        check_certificates(read_pem(cert_file, cert_name), cert_name)
        check_key(cert_file, key_file, (cert_name, key_name))
    return grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=read_pem(key_file, key_name) if key_file else None,
        certificate_chain=read_pem(cert_file, cert_name) if cert_file else None,
    )
