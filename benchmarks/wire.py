"""Push + pull of a whole fp32 model through our servers, against a plain
socket echoing the same bytes over loopback."""

from __future__ import annotations

import socket
import threading

import torch

from benchmarks.common import Row, median_seconds, server_processes
from ps_worker import ClientConfig, DistributedOptimizer, PSClient

TARGET = 0.7


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    received = 0
    while received < len(view):
        received += sock.recv_into(view[received:])


def raw_tcp_seconds(nbytes: int, repeats: int) -> float:
    """Send `nbytes` to an echo peer and read them back: the floor for push + pull."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    rounds = repeats + 1

    def echo() -> None:
        conn, _ = listener.accept()
        buffer = memoryview(bytearray(nbytes))
        with conn:
            for _ in range(rounds):
                _recv_exactly(conn, buffer)
                conn.sendall(buffer)

    thread = threading.Thread(target=echo)
    thread.start()
    payload = memoryview(bytearray(nbytes))
    back = memoryview(bytearray(nbytes))
    with socket.create_connection(("127.0.0.1", port)) as sock:

        def round_trip() -> None:
            sock.sendall(payload)
            _recv_exactly(sock, back)

        seconds = median_seconds(round_trip, repeats)
    thread.join()
    listener.close()
    return seconds


def ours_seconds(nbytes: int, servers: int, repeats: int) -> float:
    weights = torch.nn.Parameter(torch.zeros(nbytes // 4))
    with server_processes(servers) as addresses, PSClient(addresses, 0, 1, ClientConfig(timeout=120)) as client:
        opt = DistributedOptimizer(torch.optim.SGD([weights], lr=0.0), client, named_parameters=[("w", weights)],
                                   mode="asp")  # fmt: skip
        weights.grad = torch.ones_like(weights)
        return median_seconds(opt.step, repeats)


def run(quick: bool) -> list[Row]:
    sizes = [64] if quick else [64, 256]
    rows = []
    for mib in sizes:
        nbytes = mib * 2**20
        repeats = 3 if quick else 5
        raw = raw_tcp_seconds(nbytes, repeats)
        for servers in (1, 2):
            ours = ours_seconds(nbytes, servers, repeats)
            rows.append(Row(
                name=f"wire: push+pull {mib} MiB fp32, {servers} server(s) vs raw TCP echo",
                ours=round(2 * nbytes / ours / 1e9, 3), baseline=round(2 * nbytes / raw / 1e9, 3), unit="GB/s",
                ratio=round(raw / ours, 3), target=TARGET,
            ))  # fmt: skip
    return rows
