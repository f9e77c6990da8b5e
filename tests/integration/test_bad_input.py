"""Bad requests get a clear status and leave the server exactly as it was."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch

from ps_common import PROTOCOL_VERSION, codec
from ps_common.errors import InvalidArgument
from ps_common.proto import ps_pb2 as pb
from ps_common.proto import ps_pb2_grpc
from ps_server.harness import InProcessCluster
from ps_server.shard import Shard
from ps_worker import DistributedOptimizer, PSClient
from tests.integration.conftest import StartCluster
from tests.support.shard_state import assert_same, snapshot
from tests.support.training import SPLITTING, batches, loss_of, small_model


@pytest.fixture
def trained() -> Iterator[tuple[Shard, ps_pb2_grpc.ParameterServerStub, pb.KeySpec]]:
    """One server after two Adam steps of one of two workers (so state is non-trivial)."""
    with InProcessCluster(num_servers=1) as cluster:
        model = small_model()
        client = PSClient(cluster.addresses, 0, 2)
        opt = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), client,
                                   named_parameters=model.named_parameters(), mode="asp")  # fmt: skip
        for x, y in batches(2, batch=4):
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
        shard = cluster.servers[0].shard
        with grpc.insecure_channel(cluster.addresses[0]) as channel:
            yield shard, ps_pb2_grpc.ParameterServerStub(channel), shard.job.keys[0]
        client.close()


def _push(stub: ps_pb2_grpc.ParameterServerStub, chunks: list[pb.TensorChunk], worker: int = 1, step: int = 0) -> Any:
    header = pb.PushRequest(header=pb.PushHeader(worker_id=worker, step=step))
    return stub.Push(iter([header, *[pb.PushRequest(chunks=[c]) for c in chunks]]), timeout=10)


def _grad(spec: pb.KeySpec, dtype: torch.dtype = torch.float32, numel: int | None = None, fill: float = 1.0):  # type: ignore[no-untyped-def]
    return [
        c.to_proto() for c in codec.tensor_to_chunks(spec.key, torch.full((numel or spec.shape[0],), fill, dtype=dtype))
    ]


def _sparse(spec: pb.KeySpec, indices: list[int], values: list[float], key: str | None = None,
            length: int | None = None) -> list[pb.TensorChunk]:  # fmt: skip
    """A top-k push: `values` at `indices`, as the servers keep it (sparse)."""
    chunks = codec.sparse_to_chunks(
        key or spec.key, torch.tensor(indices), torch.tensor(values), length or spec.shape[0]
    )
    protos = [c.to_proto() for c in chunks]
    assert all(c.sparse for c in protos)
    return protos


BAD_PUSHES: dict[str, tuple[Callable[[pb.KeySpec], list[pb.TensorChunk]], dict[str, Any], grpc.StatusCode, str]] = {
    "wrong shape": (lambda s: _grad(s, numel=s.shape[0] + 1), {}, grpc.StatusCode.INVALID_ARGUMENT, "shape"),
    "wrong dtype": (lambda s: _grad(s, dtype=torch.float64), {}, grpc.StatusCode.INVALID_ARGUMENT, "FLOAT64"),
    "unknown key": (
        lambda s: [c.to_proto() for c in codec.tensor_to_chunks("nope", torch.ones(3))],
        {},
        grpc.StatusCode.NOT_FOUND,
        "nope",
    ),
    "NaN gradient": (lambda s: _grad(s, fill=float("nan")), {}, grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    "Inf gradient": (lambda s: _grad(s, fill=float("inf")), {}, grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
    "worker id out of range": (_grad, {"worker": 7}, grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
    "negative step": (_grad, {"step": -1}, grpc.StatusCode.INVALID_ARGUMENT, "negative"),
    "oversize stream": (
        lambda s: [
            *_grad(s),
            pb.TensorChunk(key=s.key, dtype=pb.FLOAT32, shape=s.shape, offset=s.shape[0], data=b"\0" * 4),
        ],
        {},
        grpc.StatusCode.INVALID_ARGUMENT,
        "overruns",
    ),  # fmt: skip
    "sparse NaN": (lambda s: _sparse(s, [0, 2], [1.0, float("nan")]), {}, grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    "sparse wrong shape": (
        lambda s: _sparse(s, [0], [1.0], length=s.shape[0] + 1),
        {},
        grpc.StatusCode.INVALID_ARGUMENT,
        "shape",
    ),
    "sparse unknown key": (lambda s: _sparse(s, [0], [1.0], key="nope"), {}, grpc.StatusCode.NOT_FOUND, "nope"),
    "sparse indices out of order": (
        lambda s: [
            pb.TensorChunk(
                key=s.key,
                dtype=pb.FLOAT32,
                shape=s.shape,
                sparse=True,
                length=s.shape[0],
                indices=torch.tensor([2, 0], dtype=torch.int32).numpy().tobytes(),
                data=torch.tensor([1.0, 1.0]).numpy().tobytes(),
            )
        ],
        {},
        grpc.StatusCode.INVALID_ARGUMENT,
        "ascending",
    ),  # fmt: skip
    "truncated stream": (
        lambda s: [_grad(s)[0].__class__(key=s.key, dtype=pb.FLOAT32, shape=s.shape, data=b"\0" * 4)],
        {},
        grpc.StatusCode.INVALID_ARGUMENT,
        "complete",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(BAD_PUSHES))
def test_bad_push_is_refused_and_changes_nothing(trained, case: str) -> None:  # type: ignore[no-untyped-def]
    shard, stub, spec = trained
    make_chunks, kwargs, code, message = BAD_PUSHES[case]
    before = snapshot(shard)
    with pytest.raises(grpc.RpcError) as info:
        _push(stub, make_chunks(spec), **kwargs)
    assert info.value.code() == code
    assert message in info.value.details()
    assert_same(before, snapshot(shard))


def test_push_without_header_is_refused(trained) -> None:  # type: ignore[no-untyped-def]
    shard, stub, spec = trained
    before = snapshot(shard)
    with pytest.raises(grpc.RpcError) as info:
        stub.Push(iter([pb.PushRequest(chunks=_grad(spec))]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "header" in info.value.details()
    assert_same(before, snapshot(shard))


@pytest.mark.parametrize("dtype", [pb.FLOAT16, pb.INT8, 99])
def test_pull_in_an_unsupported_dtype_is_refused(trained, dtype: int) -> None:  # type: ignore[no-untyped-def]
    shard, stub, _ = trained
    before = snapshot(shard)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Pull(pb.PullRequest(worker_id=0, step=2, dtype=dtype), timeout=10))  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pull dtype must be DTYPE_UNSPECIFIED (as stored) or BFLOAT16" in info.value.details()
    assert_same(before, snapshot(shard))


def _init_request(job: pb.JobSpec, values: dict[str, torch.Tensor]) -> Iterator[pb.InitRequest]:
    yield pb.InitRequest(header=pb.InitHeader(protocol_version=PROTOCOL_VERSION, worker_id=0, job=job))
    for key, value in values.items():
        for chunk in codec.tensor_to_chunks(key, value):
            yield pb.InitRequest(chunks=[chunk.to_proto()])


def test_second_init_with_a_different_shape_or_optimizer_is_refused(trained) -> None:  # type: ignore[no-untyped-def]
    shard, stub, _ = trained
    before = snapshot(shard)
    reshaped = copy.deepcopy(shard.job)
    reshaped.keys[0].shape[0] += 1
    if reshaped.keys[0].parts:  # fused: its parameters' sizes add up to its own
        reshaped.keys[0].parts.add(tensor="extra", tensor_shape=[1])
    other_optimizer = copy.deepcopy(shard.job)
    other_optimizer.optimizer.name = "SGD"
    for job in (reshaped, other_optimizer):
        values = {k.key: torch.zeros(k.shape[0]) for k in job.keys}
        with pytest.raises(grpc.RpcError) as info:
            stub.Init(_init_request(job, values), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "already initialized with a different job" in info.value.details()
    assert_same(before, snapshot(shard))


def test_identical_second_init_keeps_the_trained_values(trained) -> None:  # type: ignore[no-untyped-def]
    shard, stub, _ = trained
    before = snapshot(shard)
    values = {k.key: torch.zeros(k.shape[0]) for k in shard.job.keys}
    assert stub.Init(_init_request(shard.job, values), timeout=10).already_initialized
    assert_same(before, snapshot(shard))


def test_requests_before_init_fail_with_failed_precondition(start_cluster: StartCluster) -> None:
    cluster = start_cluster(num_servers=1)
    with grpc.insecure_channel(cluster.addresses[0]) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        spec = pb.KeySpec(key="w", dtype=pb.FLOAT32, shape=[3])
        for call in (lambda: _push(stub, _grad(spec)), lambda: list(stub.Pull(pb.PullRequest(), timeout=5))):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "not been initialized" in info.value.details()


@pytest.mark.parametrize(
    "job_change, message",
    [
        (lambda j: setattr(j.optimizer, "name", "LBFGS"), "not supported"),
        (lambda j: j.optimizer.groups[0].options["lr"].CopyFrom(pb.Value(number=-1.0)), "refused its hyperparameters"),
        (lambda j: setattr(j, "num_workers", 0), "at least one worker"),
        (lambda j: setattr(j.keys[0], "group", 5), "param group"),
        (lambda j: j.keys[0].parts.add(tensor="a", tensor_shape=[2]), "do not add up"),
    ],
)
def test_invalid_job_is_refused_and_leaves_the_server_uninitialized(
    start_cluster: StartCluster, job_change, message
) -> None:  # type: ignore[no-untyped-def]
    job = pb.JobSpec(
        mode=pb.BSP, num_workers=1,
        optimizer=pb.OptimizerSpec(name="Adam", groups=[codec.options_to_proto({"lr": 0.1})]),
        keys=[pb.KeySpec(key="w", dtype=pb.FLOAT32, shape=[3])],
    )  # fmt: skip
    job_change(job)
    cluster = start_cluster(num_servers=1)
    with grpc.insecure_channel(cluster.addresses[0]) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Init(_init_request(job, {"w": torch.zeros(3)}), timeout=10)
        assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        assert message in info.value.details()
        assert cluster.servers[0].shard.job is None


def test_client_of_another_protocol_version_is_refused_at_handshake(start_cluster: StartCluster) -> None:
    cluster = start_cluster(num_servers=1)
    with grpc.insecure_channel(cluster.addresses[0]) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Hello(pb.HelloRequest(protocol_version=PROTOCOL_VERSION + 1, worker_id=0, num_workers=1), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "protocol version" in info.value.details()


def test_worker_with_a_different_optimizer_configuration_is_told_so(start_cluster: StartCluster) -> None:
    from ps_common.errors import FailedPrecondition

    cluster = start_cluster(num_servers=2)
    a, b = small_model(), small_model()
    with PSClient(cluster.addresses, 0, 2) as first, PSClient(cluster.addresses, 1, 2) as second:
        DistributedOptimizer(torch.optim.Adam(a.parameters(), lr=1e-3), first, named_parameters=a.named_parameters())
        with pytest.raises(FailedPrecondition, match="different job"):
            DistributedOptimizer(torch.optim.Adam(b.parameters(), lr=1e-2), second,
                                 named_parameters=b.named_parameters())  # fmt: skip


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda into: into.pop("2.bias"), r"missing \['2.bias'\], unknown \[\]"),
        (lambda into: into.update(extra=torch.zeros(1)), r"missing \[\], unknown \['extra'\]"),
        (lambda into: into.update({"0.weight": torch.zeros(3)}), "'0.weight' has 3 elements, expected 256"),
    ],
    ids=["missing", "unknown", "wrong-size"],
)
def test_a_pull_into_the_wrong_tensors_is_refused_before_anything_is_read(
    start_cluster: StartCluster, change, message
) -> None:  # type: ignore[no-untyped-def]
    model = small_model()
    cluster = start_cluster(num_servers=2)
    with PSClient(cluster.addresses, 0, 1) as client:
        DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), client, named_parameters=model.named_parameters()
        )
        into = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
        given = list(into.values())
        change(into)
        with pytest.raises(InvalidArgument, match=message):
            client.pull(into, step=0)
        assert all(bool((t == 7.0).all()) for t in given)  # nothing was written


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_a_nan_gradient_changes_no_server_though_its_push_spans_requests_and_servers(
    start_cluster: StartCluster, overlap: bool
) -> None:
    model = small_model()
    cluster = start_cluster(num_servers=2)
    with PSClient(cluster.addresses, 0, 1, SPLITTING) as client:
        opt = DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), client,
                                   named_parameters=model.named_parameters(), overlap=overlap)  # fmt: skip
        shards = [server.shard for server in cluster.servers]
        before = [snapshot(shard) for shard in shards]
        (x, y), = batches(1, batch=4)  # fmt: skip
        poison = model[0].weight.register_hook(lambda grad: grad.index_fill(0, torch.tensor([0]), float("nan")))
        opt.zero_grad()
        loss_of(model, x, y).backward()  # with overlap, the other gradients are on their way
        with pytest.raises(InvalidArgument, match=r"gradient of '0.weight' contains NaN or Inf; nothing of"):
            opt.step()
        for shard, earlier in zip(shards, before, strict=True):
            assert_same(earlier, snapshot(shard))
        poison.remove()
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()  # the same step, sound this time, is taken whole
        opt.close()
        assert all(s.version == 1 for shard in shards for s in shard.slots.values())
        requests = sum(shard.counters["pushes"] for shard in shards)
        assert requests == 2 if overlap else requests > 2  # one request per server with overlap, else several


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64], ids=str
)
def test_nan_and_inf_are_detected_in_every_floating_dtype(dtype: torch.dtype) -> None:
    assert codec.all_finite(torch.ones(10, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        tensor = torch.ones(10, dtype=dtype)
        tensor[3] = bad
        assert not codec.all_finite(tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_finite_values_whose_sum_overflows_are_finite(dtype: torch.dtype) -> None:
    largest = torch.finfo(dtype).max
    tensor = torch.full((4,), largest, dtype=dtype)
    assert not math.isfinite(tensor.sum().item())  # the fast check alone would refuse it
    assert codec.all_finite(tensor)
    tensor[2] = -float("inf")
    assert not codec.all_finite(tensor)
