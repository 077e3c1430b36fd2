#!/opt/venv/bin/python
"""Check grpc.health.v1 of one or more services: exit 0 when every one answers SERVING, else 1.

    grpc-health [--wait S] [--timeout S] [--service NAME] [--tls --ca F [--cert F --key F] [--server-name N]] ADDR...

ADDR is host:port. Used by the image's users where a native gRPC probe cannot be: the chart's `helm test` Job,
Kubernetes exec probes when the services serve TLS (the kubelet's gRPC probe speaks plaintext only), and the compose
file's healthchecks. Health checks need no token (the services exempt grpc.health.v1 from authentication).
Needs grpcio and grpcio-health-checking, which the package depends on.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, args: argparse.Namespace) -> str:
    """"SERVING", another status name, or the error that stopped the call."""
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.tls and args.server_name else []
    if args.tls:
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(args.ca).read_bytes() if args.ca else None,
            private_key=Path(args.key).read_bytes() if args.key else None,
            certificate_chain=Path(args.cert).read_bytes() if args.cert else None,
        )
        channel = grpc.secure_channel(address, creds, options=options)
    else:
        channel = grpc.insecure_channel(address)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as e:
        return f"{e.code().name}: {e.details()}"
    finally:
        channel.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="grpc-health", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("addresses", nargs="+", metavar="ADDR", help="host:port of a gRPC server")
    p.add_argument("--service", default="", help="health service name; empty (default): the whole server")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per check (default 3)")
    p.add_argument("--wait", type=float, default=0.0,
                   help="keep checking for up to this many seconds until all serve (default 0: check once)")
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--ca", help="CA bundle (PEM) that signed the servers' certificates; default: the system's")
    p.add_argument("--cert", help="client certificate (PEM), when the servers require one")
    p.add_argument("--key", help="private key (PEM) of --cert")
    p.add_argument("--server-name", default="", help="name to verify in the servers' certificates")
    args = p.parse_args(argv)
    if bool(args.cert) != bool(args.key):
        p.error("--cert and --key go together")
    deadline = time.monotonic() + args.wait
    while True:
        results = {address: check(address, args) for address in args.addresses}
        if all(status == "SERVING" for status in results.values()) or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    for address, status in results.items():
        print(f"{address}: {status}", flush=True)
    return 0 if all(status == "SERVING" for status in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
