"""Probe a coordinator's standard gRPC health service (for container health checks).

    python -m fedmla.coordinator.healthcheck --address 127.0.0.1:50051 [--ca ca.crt [--cert c.crt --key c.key]]

Exit 0 when the service reports SERVING, 1 otherwise (message on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", ca: Path | None = None, timeout: float = 5.0,
          cert: Path | None = None, key: Path | None = None) -> str:
    """The serving status name reported for ``service`` at ``address``.

    ``ca`` turns on TLS; ``cert`` and ``key`` add a client certificate for mutual TLS.
    """
    if (cert is None) != (key is None):
        raise ValueError("--cert and --key go together")
    if ca is not None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes(),
            private_key=key.read_bytes() if key else None,
            certificate_chain=cert.read_bytes() if cert else None,
        )
        channel = grpc.secure_channel(address, creds)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50051", help="host:port of the coordinator's gRPC server")
    parser.add_argument("--service", default="", help="service name to ask about ('' = the whole server)")
    parser.add_argument("--ca", type=Path, help="CA certificate when the server uses TLS")
    parser.add_argument("--cert", type=Path, help="client certificate for mutual TLS")
    parser.add_argument("--key", type=Path, help="client private key for mutual TLS")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    try:
        status = check(args.address, args.service, args.ca, args.timeout, args.cert, args.key)
    except grpc.RpcError as err:
        print(f"health check of {args.address} failed: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:
        print(f"health check of {args.address} failed: {err}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"{args.address} reports {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
