"""Health, reflection, metrics and ps-ctl against an in-process cluster."""

from __future__ import annotations

import dataclasses
import re
import urllib.request

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ps_server.config import ServerConfig
from ps_server.harness import InProcessCluster
from ps_worker.ctl import main as ctl_main
from ps_worker.demo.metrics import WorkerMetrics
from tests.integration.conftest import StartCluster
from tests.support.training import SPLITTING, batches, small_model, train_distributed

WITH_METRICS = dataclasses.replace(ServerConfig(), metrics_port=0)


def _train(addresses: list[str], steps: int = 3) -> None:
    model = small_model()
    one_request = dataclasses.replace(SPLITTING, push_request_bytes=2**20)  # one push request per step
    train_distributed(
        addresses, model, torch.optim.SGD(model.parameters(), lr=0.1), batches(steps, 4), config=one_request
    )


def test_health_is_serving_while_up_and_not_serving_after_stop() -> None:
    cluster = InProcessCluster(num_servers=1).start()
    server = cluster.servers[0]
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "ps.v1.ParameterServer"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
    cluster.stop()
    assert server.grpc_server.health() == "NOT_SERVING"


def test_reflection_lists_the_parameter_server_service(start_cluster: StartCluster) -> None:
    cluster = start_cluster(num_servers=1)
    with grpc.insecure_channel(cluster.addresses[0]) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in response.list_services_response.service}
        assert {"ps.v1.ParameterServer", "grpc.health.v1.Health"} <= names


def test_server_metrics_follow_prometheus_conventions() -> None:
    with InProcessCluster(num_servers=2, config=WITH_METRICS) as cluster:
        _train(cluster.addresses, steps=3)
        text = urllib.request.urlopen(f"http://127.0.0.1:{cluster.servers[0].metrics_port}/metrics", timeout=5).read()
    metrics = text.decode()
    for line in ("ps_pushes_total 3.0", "ps_updates_total 3.0", "ps_shard_version 3.0", "ps_connected_workers 1.0"):
        assert line in metrics, line
    for name in ("ps_received_bytes_total", "ps_sent_bytes_total", "ps_update_duration_seconds_bucket",
                 "ps_push_staleness_updates_bucket", "ps_rejected_requests_total", "ps_pull_cast_bytes"):  # fmt: skip
        assert name in metrics, name
    # The pushed gradients' buffers wait in the pool for the next push.
    pooled = re.search(r"^ps_buffer_pool_idle_bytes (\S+)$", metrics, re.MULTILINE)
    assert pooled is not None and float(pooled.group(1)) > 0
    # The worker runs on the servers' host: its BSP pulls read the shared weights.
    shared = re.search(r"^ps_shared_bytes_total (\S+)$", metrics, re.MULTILINE)
    assert shared is not None and float(shared.group(1)) > 0
    # ...through its Unix socket, and nothing came by TCP.
    unix = re.search(r'^ps_data_channel_calls_total\{socket="unix"\} (\S+)$', metrics, re.MULTILINE)
    assert unix is not None and float(unix.group(1)) > 0
    assert 'ps_data_channel_calls_total{socket="tcp"} 0.0' in metrics


def test_worker_metrics_are_served() -> None:
    metrics = WorkerMetrics()
    metrics.samples.inc(32)
    metrics.step_seconds.observe(0.01)
    port = metrics.serve(0, host="127.0.0.1")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    metrics.close()
    assert "ps_worker_samples_total 32.0" in text and "ps_worker_step_duration_seconds_count 1.0" in text


def test_ps_ctl_status_and_health(capsys) -> None:  # type: ignore[no-untyped-def]
    with InProcessCluster(num_servers=2) as cluster:
        servers = ",".join(cluster.addresses)
        assert ctl_main(["health", "--servers", servers]) == 0
        _train(cluster.addresses)
        assert ctl_main(["status", "--servers", servers]) == 0
        out = capsys.readouterr().out
        assert "BSP" in out and "SERVING" in out and "1/1" in out
    assert ctl_main(["health", "--servers", servers, "--timeout", "0.5"]) == 1
    assert "unreachable" in capsys.readouterr().out
