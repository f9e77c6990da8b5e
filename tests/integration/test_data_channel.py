"""The data channel (Push and Pull on plain TCP beside gRPC, and on a Unix
socket for workers on the server's host): the same answers and the same
weights as gRPC, clear statuses for hostile frames, and nothing applied
from a push that does not end."""

from __future__ import annotations

import dataclasses
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ps_common import codec, data_channel, wire
from ps_common.errors import Code, InvalidArgument, PSError, ResourceExhausted
from ps_common.proto import ps_pb2 as pb
from ps_server import RunningServer, start_server
from ps_server.config import ServerConfig
from ps_server.harness import InProcessCluster
from ps_server.shard import Shard
from ps_server.shared_weights import SharedWeights
from ps_worker import ClientConfig, DistributedOptimizer, PSClient
from ps_worker.transport import ClientSecurity, socket_client
from tests.integration.conftest import StartCluster
from tests.support.raw_data_channel import data_call, data_pull
from tests.support.shard_state import assert_same, snapshot
from tests.support.training import SPLITTING, batches, loss_of, small_model, train_distributed

FUZZ = settings(
    max_examples=int(os.environ.get("PS_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[RunningServer, str]]:
    """One server after a step of one of two workers; its first key."""
    with InProcessCluster(num_servers=1) as cluster:
        model = small_model()
        with PSClient(cluster.addresses, 0, 2) as client:
            opt = DistributedOptimizer(torch.optim.Adam(model.parameters()), client,
                                       named_parameters=model.named_parameters(), mode="asp")  # fmt: skip
            (x, y), = batches(1, batch=4)  # fmt: skip
            loss_of(model, x, y).backward()
            opt.step()
            yield cluster.servers[0], cluster.servers[0].shard.job.keys[0].key


def _port(server: RunningServer) -> int:
    assert server.data_server is not None
    return server.data_server.port


def _calls(server: RunningServer) -> tuple[int, int]:
    """The calls the server's data channel took over TCP and over its Unix socket."""
    assert server.data_server is not None
    calls = server.data_server.calls()
    return calls["tcp"], calls["unix"]


def _unchanged(before: dict, server: RunningServer) -> None:  # type: ignore[type-arg]
    """The shard as `before`, but for the pulls _still_serving made."""
    after = snapshot(server.shard)
    for state in (before, after):
        state["counters"] = {k: v for k, v in state["counters"].items() if k not in ("pulls", "bytes_out")}
    assert_same(before, after)


def _still_serving(server: RunningServer) -> None:
    code, details, answers = data_pull(_port(server), pb.PullRequest(worker_id=0, step=0))
    assert code == Code.OK, details
    assert answers


def _weights(config: ClientConfig) -> list[torch.Tensor]:
    model = small_model()
    with InProcessCluster(num_servers=2) as cluster:
        train_distributed(cluster.addresses, model, torch.optim.Adam(model.parameters(), lr=1e-2),
                          batches(20, batch=8), config=config)  # fmt: skip
    return [p.detach().clone() for p in model.parameters()]


def test_data_channel_and_grpc_train_the_same_weights() -> None:
    over_unix_socket = _weights(SPLITTING)  # BSP pulls read from the shared weights
    sent_over_unix_socket = _weights(dataclasses.replace(SPLITTING, shared_weights=False))
    over_tcp = _weights(dataclasses.replace(SPLITTING, data_socket=False))
    over_grpc = _weights(dataclasses.replace(SPLITTING, data_channel=False))
    for other in (sent_over_unix_socket, over_tcp, over_grpc):
        assert all(torch.equal(a, b) for a, b in zip(over_unix_socket, other, strict=True))
    assert not torch.equal(over_unix_socket[0], small_model()[0].weight)  # it did train


@pytest.mark.parametrize("data_socket", [True, False])
def test_pushes_and_pulls_take_the_data_channel_when_offered(data_socket: bool) -> None:
    """On the server's host, through its Unix socket unless turned off; there,
    BSP pulls read the shared weights."""
    model = small_model()
    config = dataclasses.replace(ClientConfig(), data_socket=data_socket)
    with InProcessCluster(num_servers=1) as cluster:
        train_distributed(cluster.addresses, model, torch.optim.SGD(model.parameters(), lr=0.1), batches(3, 4),
                          config=config)  # fmt: skip
        shard = cluster.servers[0].shard
        data_server, pushes = cluster.servers[0].data_server, shard.counters["pushes"]
        assert pushes >= 3  # each step's push, in one request or more
        shares = 1 if data_socket else 0
        # Hello, Init, first pull, pushes, pulls, Leave, and on the Unix socket the Share before the first pull
        calls = _calls(cluster.servers[0])
        assert data_server is not None and sum(calls) == 1 + 1 + 1 + pushes + 3 + 1 + shares
        assert calls == ((0, sum(calls)) if data_socket else (sum(calls), 0))
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        assert shard.counters["bytes_shared"] == (weights * 4 if data_socket else 0)  # 4 pulls, none sent
        assert shard.counters["bytes_out"] == (0 if data_socket else weights * 4)
    with InProcessCluster(num_servers=1, config=ServerConfig(data_channel=False)) as cluster:
        assert cluster.servers[0].data_server is None
        train_distributed(cluster.addresses, model, torch.optim.SGD(model.parameters(), lr=0.1), batches(3, 4))


@pytest.mark.parametrize("over_a_link", [False, True])
def test_over_a_link_a_push_starts_sending_once_the_one_before_is_sent(
    start_cluster: StartCluster, monkeypatch, over_a_link: bool
) -> None:  # type: ignore[no-untyped-def]
    """Two pushes sending at once over a link would share its bandwidth; on
    this host the second goes at once."""
    monkeypatch.setattr(socket_client, "crosses_a_link", lambda sock: over_a_link)
    model = small_model()
    config = dataclasses.replace(SPLITTING, data_socket=False)
    cluster = start_cluster(num_servers=1)
    with PSClient(cluster.addresses, 0, 1, config) as client:
        client.init(list(model.named_parameters()), torch.optim.SGD(model.parameters(), lr=0.1))
        header = pb.PushHeader(worker_id=0, step=0)
        chunks = [chunk for piece in client.layout.pieces[0]
                  for chunk in codec.tensor_to_chunks(piece.key, torch.zeros(piece.numel))]  # fmt: skip
        frames = [wire.Frame(header=header, chunks=chunks[:1]), *(wire.Frame(chunks=[c]) for c in chunks[1:])]
        first_sending, first_may_end, second_started = threading.Event(), threading.Event(), threading.Event()

        def first() -> Iterator[wire.Frame]:
            yield frames[0]
            first_sending.set()  # its first frame has gone: it holds its turn
            first_may_end.wait(10)
            yield from frames[1:]

        def second() -> Iterator[wire.Frame]:
            second_started.set()
            yield from frames

        transport = _socket_transport(cluster.servers[0])
        # The second starts once the first is sending: started together, either may take the first turn.
        calls = [transport.push(first(), timeout=30)]
        assert first_sending.wait(10)
        calls.append(transport.push(second(), timeout=30))
        assert second_started.wait(0.5) is not over_a_link
        first_may_end.set()
        for call in calls:
            call.result(timeout=30)
        assert second_started.is_set()
        assert cluster.servers[0].shard.stats().keys[0].version == 1  # the repeat counted once
        transport.close()


def _socket_transport(server: RunningServer) -> socket_client.SocketTransport:
    """The server's data channel over TCP, as a worker on another host reaches it."""
    return socket_client.SocketTransport(server.address, "127.0.0.1", _port(server), "", ClientSecurity())


def test_only_tcp_to_another_host_crosses_a_link() -> None:
    unix, other_end = socket.socketpair()
    with unix, other_end, socket.create_server(("127.0.0.1", 0)) as listener:
        assert not socket_client.crosses_a_link(unix)
        with socket.create_connection(listener.getsockname()) as loopback:
            assert not socket_client.crosses_a_link(loopback)
        unconnected = socket.socket()
        with unconnected:
            assert not socket_client.crosses_a_link(unconnected)  # its first send will fail instead
        # TCP to another host: tests/test_multihost.py.


def test_a_push_waits_its_turn_over_a_link_for_its_deadline_at_most(start_cluster: StartCluster) -> None:
    cluster = start_cluster(num_servers=1)
    transport = _socket_transport(cluster.servers[0])
    link = type("Link", (), {"over_link": True})()
    with (
        transport._one_sending_over_a_link(link, timeout=1.0),  # type: ignore[arg-type]
        pytest.raises(PSError, match="waited 0.2s for the push before") as refused,
        transport._one_sending_over_a_link(link, timeout=0.2),  # type: ignore[arg-type]
    ):
        pass
    assert refused.value.code == Code.DEADLINE_EXCEEDED
    with transport._one_sending_over_a_link(link, timeout=0.2):  # type: ignore[arg-type]
        pass  # its turn, once the first has sent
    transport.close()


def test_pushes_over_a_link_train_the_same_weights(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    over_tcp = dataclasses.replace(SPLITTING, data_socket=False)  # each push in several requests
    here = _weights(over_tcp)
    monkeypatch.setattr(socket_client, "crosses_a_link", lambda sock: True)
    assert all(torch.equal(a, b) for a, b in zip(here, _weights(over_tcp), strict=True))


def _share(running: RunningServer, token: str = "") -> tuple[pb.DataHeader, bytes, list[int]]:
    """A Share call on the server's Unix socket: the answer and the descriptors passed with it."""
    assert running.data_server is not None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect("\0" + running.data_server.socket_name)
        data_channel.write(sock, pb.DataHeader(method="Share", last=True, auth_token=token))
        return data_channel.read_with_fds(sock, max_fds=1)


def test_shared_weights_are_the_weights_and_can_only_be_read(server) -> None:  # type: ignore[no-untyped-def]
    running, _ = server
    header, body, fds = _share(running)
    assert header.code == 0 and len(fds) == 1
    try:
        size = pb.ShareResponse.FromString(body).size
        with pytest.raises(PermissionError):
            mmap.mmap(fds[0], size)  # for writing too: refused
        shared = mmap.mmap(fds[0], size, prot=mmap.PROT_READ)
    finally:
        os.close(fds[0])
    shard = running.shard
    with shard.reading():
        for slot in shard.slots.values():
            where = shard.shared.range_of(slot.value)
            assert where is not None
            offset, nbytes = where
            seen = torch.frombuffer(bytearray(shared[offset : offset + nbytes]), dtype=slot.value.dtype)
            assert torch.equal(seen, slot.value.view(-1))


def test_weights_are_shared_only_on_the_unix_socket_and_only_where_they_hold_still(server) -> None:  # type: ignore[no-untyped-def]
    running, key = server
    code, details, _ = data_call(_port(running), "Share", [])
    assert code == Code.FAILED_PRECONDITION and "Unix socket" in details  # TCP: another host
    # The module's server runs ASP, where weights change under a reader: bytes, though the client asks.
    code, _, answers = data_pull(_port(running), pb.PullRequest(worker_id=0, step=0, shared=True))
    chunks = [chunk for answer in answers for chunk in pb.PullResponse.FromString(answer).chunks]
    assert code == Code.OK and chunks and not any(chunk.HasField("shared") for chunk in chunks)
    assert all(chunk.data for chunk in chunks if chunk.key == key)


def test_a_shared_range_outside_the_weights_is_refused() -> None:
    shared = memoryview(bytes(64))
    inside = codec.Chunk(key="k", dtype=pb.FLOAT32, shape=[16], shared=(0, 64))
    (resolved,) = socket_client._SharedReader(shared, None).resolved([inside])
    assert len(resolved.data) == 64 and resolved.shared is None
    with pytest.raises(InvalidArgument, match="past the end"):
        list(socket_client._SharedReader(shared, None).resolved([dataclasses.replace(inside, shared=(8, 64))]))


def test_a_shared_range_pulled_in_bf16_is_rounded_as_the_server_casts_what_it_sends() -> None:
    values = torch.randn(16) * 1e3
    shared = memoryview(values.numpy().tobytes())
    chunk = codec.Chunk(key="k", dtype=pb.FLOAT32, shape=[16], shared=(0, 64))
    (resolved,) = socket_client._SharedReader(shared, torch.bfloat16).resolved([chunk])
    (sent,) = codec.tensor_to_chunks("k", values, cast_to=torch.bfloat16)
    assert (resolved.dtype, bytes(resolved.data), resolved.shared) == (pb.BFLOAT16, bytes(sent.data), None)
    # Keys rounded one after the other share a buffer: each is read before the next.
    halves = [dataclasses.replace(chunk, key=k, shape=[8], shared=(32 * i, 32)) for i, k in enumerate("ab")]
    read = [bytes(c.data) for c in socket_client._SharedReader(shared, torch.bfloat16).resolved(halves)]
    assert b"".join(read) == bytes(sent.data)
    assert not torch.equal(values, values.to(torch.bfloat16).float())  # the rounding shows
    with pytest.raises(InvalidArgument, match="not whole elements"):
        list(socket_client._SharedReader(shared, torch.bfloat16).resolved([dataclasses.replace(chunk, shared=(0, 62))]))
    integers = codec.Chunk(key="i", dtype=pb.INT64, shape=[8], shared=(0, 64))
    (as_stored,) = socket_client._SharedReader(shared, torch.bfloat16).resolved([integers])
    assert (as_stored.dtype, bytes(as_stored.data)) == (pb.INT64, bytes(shared))


def test_init_receives_the_values_straight_into_the_shared_weights() -> None:
    options = pb.OptimizerSpec(name="SGD", groups=[codec.options_to_proto({"lr": 1.0})])
    job = pb.JobSpec(mode=pb.BSP, num_workers=1, optimizer=options,
                     keys=[pb.KeySpec(key=k, dtype=pb.FLOAT32, shape=[3]) for k in ("a", "b")])  # fmt: skip
    shard = Shard()
    allocate = shard.init_allocator(job)
    values = {}
    for key in ("a", "b"):
        values[key] = allocate(codec.Chunk(key=key, dtype=pb.FLOAT32, shape=[3])).copy_(torch.arange(3.0))
    shard.init(job, values)
    assert shard.shared is not None and shard.shared.holds(list(values.values()))
    assert all(shard.slots[k].value is values[k] for k in values)  # adopted, not copied
    again = shard.init_allocator(job)  # a repeated Init: received, then dropped
    assert shard.init(job, {k: again(codec.Chunk(key=k, dtype=pb.FLOAT32, shape=[3])) for k in values})
    assert shard.memory.receiving is None and all(shard.slots[k].value is values[k] for k in values)
    shard.close()


def test_a_job_too_large_to_map_is_refused_before_any_value_arrives() -> None:
    options = pb.OptimizerSpec(name="SGD", groups=[codec.options_to_proto({"lr": 1.0})])
    job = pb.JobSpec(mode=pb.BSP, num_workers=1, optimizer=options,
                     keys=[pb.KeySpec(key="w", dtype=pb.FLOAT32, shape=[2**60])])  # fmt: skip
    shard = Shard()
    with pytest.raises(ResourceExhausted, match="cannot be mapped"):
        shard.init_allocator(job)
    assert shard.job is None and shard.shared is None and shard.memory.receiving is None
    shard.close()


def test_shared_weights_hold_a_copy_of_each_tensor_aligned() -> None:
    tensors = [torch.arange(5, dtype=torch.float32), torch.zeros(0), torch.tensor([True, False]),
               torch.randn(3, 2, dtype=torch.float64)]  # fmt: skip
    shared = SharedWeights.holding(tensors)
    try:
        assert shared.holds(shared.views) and not shared.holds(tensors[:1])
        for original, view in zip(tensors, shared.views, strict=True):
            assert torch.equal(original.reshape(-1), view) and view.dtype == original.dtype
            where = shared.range_of(view)
            if original.numel():  # an empty tensor has no bytes to lie anywhere: pulls send its shape
                assert where is not None and where[0] % 64 == 0
        assert shared.range_of(tensors[0]) is None  # the original lies elsewhere
    finally:
        shared.close()


def test_unknown_method_oversize_frames_and_wrong_token_get_a_status(server) -> None:  # type: ignore[no-untyped-def]
    running, _ = server
    before = snapshot(running.shard)
    port = _port(running)
    assert data_call(port, "Frobnicate", [b""])[0] == Code.UNIMPLEMENTED
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, sock.makefile("rb") as stream:
        sock.sendall(struct.pack("<I", data_channel.HEADER_LIMIT + 1))
        header, _ = data_channel.Receiver(stream).read()
        assert Code(header.code) == Code.INVALID_ARGUMENT and "limit" in header.details
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, sock.makefile("rb") as stream:
        head = pb.DataHeader(method="Push", body_length=data_channel.BODY_LIMIT + 1).SerializeToString()
        sock.sendall(struct.pack("<I", len(head)) + head)
        header, _ = data_channel.Receiver(stream).read()
        assert Code(header.code) == Code.INVALID_ARGUMENT and "limit" in header.details
    _still_serving(running)
    _unchanged(before, running)


def test_the_data_channel_requires_the_token(start_cluster: StartCluster) -> None:
    cluster = start_cluster(num_servers=1, config=ServerConfig(auth_token="s3cret"))
    port = _port(cluster.servers[0])
    code, details, _ = data_pull(port, pb.PullRequest())
    assert code == Code.UNAUTHENTICATED and "token" in details
    assert data_call(port, "Pull", [pb.PullRequest().SerializeToString()], token="s3cret")[0] != (Code.UNAUTHENTICATED)
    for token, code in (
        ("wrong", Code.UNAUTHENTICATED),
        ("s3cret", Code.FAILED_PRECONDITION),
    ):
        header, _, fds = _share(cluster.servers[0], token)  # before Init, even the right token gets nothing
        assert Code(header.code) == code and fds == []


def test_a_push_cut_off_in_the_middle_applies_nothing(server) -> None:  # type: ignore[no-untyped-def]
    running, key = server
    before = snapshot(running.shard)
    spec = next(k for k in running.shard.job.keys if k.key == key)
    grad = torch.ones(spec.shape[0])
    request = pb.PushRequest(header=pb.PushHeader(worker_id=1, step=0),
                             chunks=[c.to_proto() for c in codec.tensor_to_chunks(key, grad)])  # fmt: skip
    with socket.create_connection(("127.0.0.1", _port(running)), timeout=10) as sock:
        data_channel.write(sock, pb.DataHeader(method="Push"), request.SerializeToString())
    # The connection closed before the message marked last: the server must not apply it.
    _still_serving(running)
    _unchanged(before, running)


def test_a_client_stalled_in_the_middle_of_a_push_is_cut_off_at_its_deadline(server, caplog) -> None:  # type: ignore[no-untyped-def]
    """Half a message, then silence with the connection open: the server closes
    it once the call's deadline passes, says so, and applies nothing."""
    running, _ = server
    before = snapshot(running.shard)
    head = pb.DataHeader(method="Push", timeout=0.5, body_length=1000).SerializeToString()
    with socket.create_connection(("127.0.0.1", _port(running)), timeout=10) as sock:
        sock.sendall(struct.pack("<I", len(head)) + head + b"\x0a" * 10)
        started = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server, without waiting for the rest
        assert time.monotonic() - started < 5
    assert "nothing sent or read for 0.5s" in caplog.text and "Push" in caplog.text
    _still_serving(running)
    _unchanged(before, running)


def test_a_cancelled_push_stream_applies_nothing(start_cluster: StartCluster) -> None:
    model = small_model()
    cluster = start_cluster(num_servers=1)
    with PSClient(cluster.addresses, 0, 1, SPLITTING) as client:
        opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), client,
                                   named_parameters=model.named_parameters(), overlap=True)  # fmt: skip
        before = snapshot(cluster.servers[0].shard)
        (x, y), = batches(1, batch=4)  # fmt: skip
        loss_of(model, x, y).backward()  # the hooks start a push
        opt.close()  # abandons it
        assert_same(before, snapshot(cluster.servers[0].shard))


def test_a_restarted_server_on_a_new_data_port_is_found_again() -> None:
    config = dataclasses.replace(ServerConfig(), host="127.0.0.1", port=0)
    first = start_server(config)
    model = small_model()
    opt_config = dataclasses.replace(SPLITTING, wait_log_interval=1.0)
    try:
        with PSClient([first.address], 0, 1, opt_config) as client:
            opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), client,
                                       named_parameters=model.named_parameters(), mode="asp")  # fmt: skip
            (x, y), = batches(1, batch=4)  # fmt: skip
            loss_of(model, x, y).backward()
            opt.step()
            old_port = _port(first)
            first.stop(grace=0)
            first = start_server(dataclasses.replace(config, port=first.port))
            assert _port(first) != old_port
            # The new server has no job: its Hello, asked again, gives the new port and the
            # call is answered there (not initialized), rather than failing to connect.
            with pytest.raises(Exception, match="not been initialized"):
                opt.step()
    finally:
        first.stop(grace=0)


def test_a_unix_socket_out_of_reach_leaves_the_worker_on_tcp(start_cluster: StartCluster) -> None:
    """A server's socket name that cannot be connected to (a worker on
    another host, in another network namespace, sees none of its names):
    the worker uses the TCP port, without an error."""
    cluster = start_cluster(num_servers=1)
    running = cluster.servers[0]
    running.service.data_socket = "ps-data-of-a-server-on-another-host"
    model = small_model()
    train_distributed(cluster.addresses, model, torch.optim.SGD(model.parameters(), lr=0.1), batches(2, 4))
    tcp, unix = _calls(running)
    assert tcp > 0 and unix == 0


@FUZZ
@given(frames=st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_random_frames_never_take_the_data_channel_down(server, frames: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    running, _ = server
    with socket.create_connection(("127.0.0.1", _port(running)), timeout=10) as sock, sock.makefile("rb") as stream:
        for frame in frames:
            sock.sendall(frame)
        sock.shutdown(socket.SHUT_WR)
        try:
            header, _ = data_channel.Receiver(stream).read()
            assert Code(header.code) not in (Code.INTERNAL, Code.UNKNOWN)
        except data_channel.Closed:
            pass  # too short to be a message: the server just closed
    _still_serving(running)


@FUZZ
@given(bodies=st.lists(st.binary(max_size=200), min_size=1, max_size=3), method=st.sampled_from(list(wire.METHODS)))
def test_random_bodies_get_a_status_and_change_nothing(server, bodies: list[bytes], method: str) -> None:  # type: ignore[no-untyped-def]
    running, _ = server
    before = snapshot(running.shard)
    code, _, _ = data_call(_port(running), method, bodies)
    assert code not in (Code.INTERNAL, Code.UNKNOWN)
    _still_serving(running)
    if code != Code.OK:
        _unchanged(before, running)


@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason="needs IPv6 with dual-stack sockets")
def test_a_server_on_every_ipv6_and_ipv4_address_serves_both_on_the_data_channel() -> None:
    running = start_server(dataclasses.replace(ServerConfig(), host="[::]", port=0))
    assert running.data_server is not None
    try:
        for address in (f"127.0.0.1:{running.port}", f"[::1]:{running.port}"):
            calls = sum(_calls(running))
            model = small_model()
            train_distributed([address], model, torch.optim.SGD(model.parameters(), lr=0.1), batches(1, 4),
                              mode="asp")  # fmt: skip
            assert sum(_calls(running)) > calls
    finally:
        running.stop(grace=0)


def test_connections_beyond_the_cap_are_told_to_retry_later(start_cluster: StartCluster) -> None:
    cluster = start_cluster(num_servers=1, config=ServerConfig(threads=1))  # a cap of 16 connections
    port = _port(cluster.servers[0])
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(16)]
    try:
        code, details, _ = data_pull(port, pb.PullRequest())  # accepted after the 16, in order
        assert code == Code.UNAVAILABLE and "retry later" in details
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while (code := data_pull(port, pb.PullRequest())[0]) == Code.UNAVAILABLE:
        assert time.monotonic() < deadline, "closed connections were never let go"
        time.sleep(0.05)
    assert code == Code.FAILED_PRECONDITION  # served again: no job yet


def test_a_body_in_pieces_arrives_whole_through_partial_gather_writes() -> None:
    """More pieces than one sendmsg takes, through buffers far smaller than
    the body, so that writes stop halfway through pieces."""
    torch.manual_seed(3)
    pieces: list[bytes | memoryview] = []
    for size in torch.randint(1, 9000, (3000,)).tolist():
        pieces.append(memoryview(torch.randint(0, 256, (size,), dtype=torch.uint8).numpy()))
        pieces.append(b"")  # empty pieces are skipped
    expected = b"".join(bytes(p) for p in pieces)
    writer, reader = socket.socketpair()
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    received: list[tuple[pb.DataHeader, bytes]] = []

    def read() -> None:
        with reader, reader.makefile("rb") as stream:
            header, body = data_channel.Receiver(stream, body_limit=len(expected)).read()
            received.append((header, bytes(body)))

    thread = threading.Thread(target=read)
    thread.start()
    with writer:
        data_channel.write(writer, pb.DataHeader(method="Push"), pieces)
    thread.join(timeout=30)
    assert received[0][0].method == "Push" and received[0][0].body_length == len(expected)
    assert received[0][1] == expected


class _CuttingProxy:
    """A TCP proxy in front of a server's data port. Once `cut(how)` is
    called, the server's answers pass for `after` more bytes, then the
    connection stalls (held open, as when a link goes down: nothing more
    arrives) or is closed; connections after that one pass whole."""

    def __init__(self, upstream: int, after: int) -> None:
        self._upstream = upstream
        self._after = after
        self._how = ""
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.connections = 0
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self, how: str) -> None:
        self._how = how

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(("127.0.0.1", self._upstream))
            with self._lock:
                self.connections += 1
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        left = None  # bytes still to pass before the cut, once armed
        try:
            while data := source.recv(2**16):
                if answers and left is None and self._how:
                    left, how, self._how = self._after, self._how, ""
                if left is not None:
                    data = data[:left]
                    left -= len(data)
                sink.sendall(data)
                if left == 0:
                    if how == "close":
                        sink.shutdown(socket.SHUT_RDWR)
                    return  # stalled: nothing more of the answer arrives
        except OSError:
            pass

    def close(self) -> None:
        with self._lock:
            for sock in self._sockets:
                sock.close()


@pytest.mark.parametrize("how", ["stall", "close"])
def test_a_pull_cut_off_in_the_middle_of_a_tensor_is_retried_and_arrives_whole(
    start_cluster: StartCluster, how: str
) -> None:
    """The link goes down while a tensor's data streams in: the worker's
    deadline (a stall) or the closed connection ends that attempt with a
    status the client retries, and the next attempt reads the weights whole."""
    weights = {"w": torch.randn(2**18)}  # 1 MiB: its data is read straight from the connection
    config = ClientConfig(timeout=1.0, wait_log_interval=0.5, wait_timeout=30, data_socket=False)
    cluster = start_cluster(num_servers=1)
    with PSClient(cluster.addresses, 0, 1, config) as client:
        running = cluster.servers[0]
        proxy = _CuttingProxy(_port(running), after=2**19)
        running.service.data_port = proxy.port
        try:
            client.init(list(weights.items()), torch.optim.SGD(weights.values(), lr=0.1))
            proxy.cut(how)
            into = {"w": torch.zeros(2**18)}
            started = time.monotonic()
            client.pull(into, step=0)
            assert torch.equal(into["w"], weights["w"])
            assert proxy.connections == 2  # the attempt cut off, and the one that read it whole
            assert time.monotonic() - started < 10
        finally:
            proxy.close()
