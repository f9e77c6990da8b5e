"""TLS, mutual TLS and the shared token, with certificates made by the test."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from ps_common import data_channel
from ps_common.errors import PSError
from ps_common.proto import ps_pb2 as pb
from ps_server import RunningServer
from ps_server.config import ServerConfig
from ps_worker import ClientConfig
from ps_worker.ctl import main as ctl_main
from ps_worker.transport import ClientSecurity
from tests.integration.conftest import StartCluster
from tests.support.raw_data_channel import data_pull
from tests.support.training import batches, small_model, train_distributed

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command to make certificates"
)
FAST_FAIL = {"timeout": 5, "wait_timeout": 2, "wait_log_interval": 1}


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=test-ca", cwd=d)  # fmt: skip
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(extension + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    return d


def _train(addresses: list[str], config: ClientConfig) -> None:
    model = small_model()
    train_distributed(addresses, model, torch.optim.SGD(model.parameters(), lr=0.1), batches(3, 4), config=config)


def test_wrong_token_is_unauthenticated_and_the_right_one_trains(start_cluster: StartCluster) -> None:
    server = dataclasses.replace(ServerConfig(), auth_token="s3cret")
    cluster = start_cluster(num_servers=2, config=server)
    with pytest.raises(PSError, match="UNAUTHENTICATED"):
        _train(cluster.addresses, ClientConfig(auth_token="wrong", **FAST_FAIL))  # type: ignore[arg-type]
    with pytest.raises(PSError, match="UNAUTHENTICATED"):
        _train(cluster.addresses, ClientConfig(**FAST_FAIL))  # type: ignore[arg-type]
    _train(cluster.addresses, ClientConfig(auth_token="s3cret"))
    # Probes carry no token: health stays open.
    assert ctl_main(["health", "--servers", ",".join(cluster.addresses)]) == 0


def test_tls_client_trains_and_a_plaintext_client_is_refused(start_cluster: StartCluster, pki: Path) -> None:
    server = dataclasses.replace(ServerConfig(), tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"))
    cluster = start_cluster(num_servers=1, config=server)
    data_server = cluster.servers[0].data_server
    assert data_server is not None
    _train(cluster.addresses, ClientConfig(tls_ca=str(pki / "ca.pem")))
    assert _data_channel_calls(cluster.servers[0]) > 0  # push and pull took the data channel, under TLS
    with pytest.raises(PSError):
        _train(cluster.addresses, ClientConfig(**FAST_FAIL))  # type: ignore[arg-type]
    with pytest.raises((ConnectionError, OSError)):  # plain TCP at the TLS data port: no answer
        data_pull(data_server.port, pb.PullRequest())


def test_mutual_tls_refuses_a_client_without_certificate(start_cluster: StartCluster, pki: Path) -> None:
    server = dataclasses.replace(ServerConfig(), tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                                 tls_client_ca=str(pki / "ca.pem"))  # fmt: skip
    cluster = start_cluster(num_servers=1, config=server)
    with pytest.raises(PSError, match="UNAVAILABLE|DEADLINE"):
        _train(cluster.addresses, ClientConfig(tls_ca=str(pki / "ca.pem"), **FAST_FAIL))  # type: ignore[arg-type]
    _train(cluster.addresses, ClientConfig(tls_ca=str(pki / "ca.pem"), tls_cert=str(pki / "client.pem"),
                                           tls_key=str(pki / "client.key")))  # fmt: skip
    data_server = cluster.servers[0].data_server
    assert data_server is not None and _data_channel_calls(cluster.servers[0]) > 0
    # At the data port too, TLS without a client certificate gets no answer.
    context = ClientSecurity(tls_ca=str(pki / "ca.pem")).tls_context()
    assert context is not None
    sock = socket.create_connection(("127.0.0.1", data_server.port), timeout=10)
    with pytest.raises((ConnectionError, OSError)), context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        data_channel.write(tls, pb.DataHeader(method="Pull", last=True), pb.PullRequest().SerializeToString())
        data_channel.Receiver(tls.makefile("rb")).read()
    sock.close()


def test_insecure_server_off_loopback_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    from ps_server.security import ServerSecurity

    with caplog.at_level("WARNING"):
        assert ServerSecurity(dataclasses.replace(ServerConfig(), host="0.0.0.0")).tls is None
    assert "WITHOUT TLS" in caplog.text
    caplog.clear()
    ServerSecurity(ServerConfig())
    assert "WITHOUT TLS" not in caplog.text


def _data_channel_calls(server: RunningServer) -> int:
    assert server.data_server is not None
    return sum(server.data_server.calls().values())
