from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedmla.coordinator.healthcheck import main


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_serving_exits_zero_and_not_serving_exits_one(health_server, capsys):
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert main(["--address", address]) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main(["--address", address]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err


def test_unreachable_address_is_reported(capsys):
    assert main(["--address", "127.0.0.1:1", "--timeout", "2"]) == 1
    assert "127.0.0.1:1" in capsys.readouterr().err
