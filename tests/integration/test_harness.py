import socket
import threading
import time

import torch

from ps_common.errors import PSError
from ps_server.harness import InProcessCluster
from ps_worker import ClientConfig, DistributedOptimizer, PSClient
from tests.support.training import batches, small_model, train_distributed


def _our_threads(seconds: float = 5.0) -> list[str]:
    """Threads of our own making (grpc keeps a few process-wide ones of its own)."""
    deadline = time.monotonic() + seconds
    while True:
        ours = [t.name for t in threading.enumerate() if t.name.startswith("ps-")]
        if not ours or time.monotonic() > deadline:
            return ours
        time.sleep(0.05)


def test_cluster_frees_its_ports_and_threads_on_exit() -> None:
    with InProcessCluster(num_servers=3) as cluster:
        ports = [s.port for s in cluster.servers]
        model = small_model()
        train_distributed(cluster.addresses, model, torch.optim.SGD(model.parameters(), lr=0.1), batches(3, 4))
        assert len(cluster.addresses) == 3
        assert any(t.name.startswith("ps-server") for t in threading.enumerate())
    assert cluster.addresses == []
    assert _our_threads() == []
    for port in ports:
        with socket.socket() as sock:
            # Connections the server closed linger in TIME_WAIT on its port; SO_REUSEADDR
            # lets us past them, while a listener still bound there makes bind fail.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen()


def test_stop_wakes_a_pull_waiting_at_a_barrier() -> None:
    cluster = InProcessCluster(num_servers=1).start()
    model = torch.nn.Linear(2, 1)
    client = PSClient(cluster.addresses, 0, 2, ClientConfig(wait_timeout=2, wait_log_interval=20))
    opt = DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), client, named_parameters=model.named_parameters()
    )
    model(torch.ones(1, 2)).sum().backward()
    failure: list[BaseException] = []

    def step() -> None:
        try:
            opt.step()  # waits for worker 1, who never comes
        except PSError as exc:
            failure.append(exc)

    waiter = threading.Thread(target=step)
    waiter.start()
    time.sleep(0.5)
    started = time.monotonic()
    cluster.stop()
    assert time.monotonic() - started < 5, "stopping must not wait for the barrier"
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    client.close()
    assert failure, "the waiting step should fail once the server is gone"
