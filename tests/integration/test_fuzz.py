"""Hostile bytes and hostile-but-well-formed messages against every RPC:
the server never crashes, keeps serving, and never answers INTERNAL or
UNKNOWN to a message that parses."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ps_common import PROTOCOL_VERSION
from ps_common.proto import ps_pb2 as pb
from ps_server.harness import InProcessCluster
from ps_worker import DistributedOptimizer, PSClient
from tests.support.training import small_model

SERVICE = "/ps.v1.ParameterServer/"
UNARY = ["Hello", "Stats", "Checkpoint", "Leave"]
CLIENT_STREAM = ["Init", "Push", "SetState"]
SERVER_STREAM = ["Pull", "GetState"]
FUZZ = settings(
    max_examples=int(os.environ.get("PS_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[grpc.Channel, str]]:
    with InProcessCluster(num_servers=1) as cluster:
        model = small_model()
        with PSClient(cluster.addresses, 0, 2) as client:
            DistributedOptimizer(
                torch.optim.Adam(model.parameters()), client, named_parameters=model.named_parameters()
            )
            key = cluster.servers[0].shard.job.keys[0].key
            with grpc.insecure_channel(cluster.addresses[0]) as channel:
                yield channel, key


def _call(channel: grpc.Channel, method: str, payloads: list[bytes]) -> grpc.StatusCode:
    """Send raw bytes as the request(s); the status the server answered."""
    try:
        if method in UNARY:
            channel.unary_unary(SERVICE + method)(payloads[0], timeout=5)
        elif method in CLIENT_STREAM:
            channel.stream_unary(SERVICE + method)(iter(payloads), timeout=5)
        else:
            list(channel.unary_stream(SERVICE + method)(payloads[0], timeout=5))
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _still_serving(channel: grpc.Channel) -> None:
    stats = pb.StatsResponse.FromString(channel.unary_unary(SERVICE + "Stats")(b"", timeout=5))
    assert stats.initialized


@FUZZ
@given(
    method=st.sampled_from(UNARY + CLIENT_STREAM + SERVER_STREAM),
    payloads=st.lists(st.binary(max_size=200), min_size=1, max_size=4),
)
def test_random_bytes_never_take_the_server_down(server, method: str, payloads: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    channel, _ = server
    _call(channel, method, payloads)
    _still_serving(channel)


@pytest.mark.parametrize("method", UNARY + CLIENT_STREAM + SERVER_STREAM)
def test_bytes_that_do_not_parse_get_invalid_argument(server, method: str) -> None:  # type: ignore[no-untyped-def]
    channel, _ = server
    assert _call(channel, method, [b"\xff\xff\xff"]) == grpc.StatusCode.INVALID_ARGUMENT  # a truncated varint
    _still_serving(channel)


def _chunks(key: str) -> st.SearchStrategy[pb.TensorChunk]:
    return st.builds(
        pb.TensorChunk,
        key=st.sampled_from([key, "", "nope", key + "x"]),
        dtype=st.integers(-2, 15),
        shape=st.lists(st.integers(-3, 300), max_size=3),
        offset=st.integers(-5, 300),
        data=st.binary(max_size=64),
        absent=st.booleans(),
        sparse=st.booleans(),
        indices=st.binary(max_size=16),
        length=st.integers(-5, 300),
    )


@FUZZ
@given(data=st.data())
def test_well_formed_but_invalid_pushes_get_a_proper_status(server, data) -> None:  # type: ignore[no-untyped-def]
    channel, key = server
    header = pb.PushHeader(
        worker_id=data.draw(st.integers(-2, 3)),
        step=data.draw(st.integers(-2, 5)),
        prune_thresholds=data.draw(st.dictionaries(st.sampled_from([key, "x"]), st.floats(), max_size=2)),
    )
    chunks = data.draw(st.lists(_chunks(key), max_size=4))
    messages = [pb.PushRequest(header=header, chunks=chunks[:1]), pb.PushRequest(chunks=chunks[1:])]
    if data.draw(st.booleans()):
        messages.append(pb.PushRequest(header=header))  # a second header
    code = _call(channel, "Push", [m.SerializeToString() for m in messages])
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    _still_serving(channel)


@FUZZ
@given(data=st.data())
def test_well_formed_but_invalid_pulls_and_inits_get_a_proper_status(server, data) -> None:  # type: ignore[no-untyped-def]
    channel, key = server
    pull = pb.PullRequest(worker_id=data.draw(st.integers(-2, 3)), step=data.draw(st.integers(-3, 3)),
                          keys=data.draw(st.lists(st.sampled_from([key, "nope"]), max_size=2)),
                          wait_seconds=0.05, masks=data.draw(st.booleans()))  # fmt: skip
    assert _call(channel, "Pull", [pull.SerializeToString()]) not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    job = pb.JobSpec(
        mode=data.draw(st.integers(-1, 4)), num_workers=data.draw(st.integers(-1, 3)),
        staleness=data.draw(st.integers(-1, 2)),
        optimizer=pb.OptimizerSpec(name=data.draw(st.sampled_from(["Adam", "SGD", "Nope", ""]))),
        keys=[pb.KeySpec(key=key, dtype=data.draw(st.integers(-1, 13)),
                         shape=data.draw(st.lists(st.integers(-2, 9), max_size=2)))],
    )  # fmt: skip
    init = [pb.InitRequest(header=pb.InitHeader(protocol_version=PROTOCOL_VERSION, worker_id=0, job=job))]
    init += [pb.InitRequest(chunks=data.draw(st.lists(_chunks(key), max_size=2)))]
    code = _call(channel, "Init", [m.SerializeToString() for m in init])
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    _still_serving(channel)
