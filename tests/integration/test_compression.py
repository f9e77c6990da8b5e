"""Compressed pushes and pulls: the codec round trip, error feedback, the
update the server applies from a compressed gradient, and training on
weights pulled in bf16."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from ps_common import assembly, codec, wire
from ps_common.proto import ps_pb2 as pb
from ps_server.shard import PulledKey, Shard
from ps_worker import ClientConfig, DistributedOptimizer, PSClient
from ps_worker.compression import Compression, Compressor, Payload
from tests.integration.conftest import StartCluster
from tests.support.training import SPLITTING, batches, loss_of, max_difference, small_model

CONFIG = ClientConfig(max_piece_bytes=4096, timeout=30, wait_timeout=60)  # pieces of 1024 fp32


def _round_trip(payload: Payload) -> torch.Tensor:
    """The piece as the server decodes it."""
    chunks = list(payload.chunks("k", chunk_bytes=1000))
    out = assembly.receive([wire.decode_pull(wire.encode_pull(wire.Frame(chunks=chunks)))], assembly.new_tensor_for)  # type: ignore[list-item]
    return out["k"]


@pytest.mark.parametrize("method,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_payload_is_the_cast_gradient(method: str, dtype: torch.dtype) -> None:
    grad = torch.randn(5000)
    payload = Compressor(Compression(method)).encode("k", grad)  # type: ignore[arg-type]
    assert payload.values.dtype == dtype and payload.indices is None
    assert payload.values.numel() * payload.values.element_size() == grad.numel() * 2
    assert torch.equal(_round_trip(payload), grad.to(dtype))


def test_topk_sends_the_largest_and_keeps_the_rest_for_later() -> None:
    compressor = Compressor(Compression("topk", topk_ratio=0.05))
    torch.manual_seed(0)
    grads = [torch.randn(2000) for _ in range(6)]
    sent_total = torch.zeros(2000)
    for grad in grads:
        payload = compressor.encode("k", grad)
        assert payload.indices is not None and payload.values.numel() == 100
        received = _round_trip(payload)
        assert int(torch.count_nonzero(received)) == 100
        assert torch.equal(received[payload.indices], payload.values)
        sent_total += received
    first = _round_trip(Compressor(Compression("topk", topk_ratio=0.05)).encode("k", grads[0]))
    chosen = first != 0
    assert first[chosen].abs().min() >= grads[0][~chosen].abs().max()  # the largest magnitudes
    # Error feedback loses nothing: what was sent plus what waits is all that came.
    residual = compressor._residuals["k"]
    assert torch.allclose(sent_total + residual, torch.stack(grads).sum(0), atol=1e-5)


def test_topk_of_a_large_piece_is_exactly_torch_topk() -> None:
    """Above 64k elements the selection goes through a sampled threshold: the same elements."""
    compressor = Compressor(Compression("topk", topk_ratio=0.01))
    torch.manual_seed(2)
    for grad in (torch.randn(300_000), torch.randn(300_000) ** 3, torch.rand(300_000)):
        chosen = compressor._largest(grad, 3000)
        expected = torch.topk(grad.abs(), 3000).indices
        assert set(chosen.tolist()) == set(expected.tolist())
        assert bool((chosen[1:] > chosen[:-1]).all())  # ascending, as sparse_to_chunks needs
    for dtype in (torch.float16, torch.bfloat16, torch.float64):  # numpy has no bfloat16
        values = torch.randn(300_000).to(dtype)
        expected = torch.topk(values.abs(), 3000).values
        picked = torch.from_numpy(compressor._largest(values, 3000))
        assert torch.equal(values[picked].abs().sort().values, expected.sort().values)
    # Ties at the threshold (all but k elements equal): still the k largest.
    flat = torch.zeros(300_000)
    flat[:3000] = -1.0
    assert set(compressor._largest(flat, 3000).tolist()) == set(range(3000))


def test_topk_searches_every_element_when_the_sample_places_its_threshold_too_high() -> None:
    class LargestOnly:
        """A sampler that draws only the largest elements, so that fewer than k pass."""

        def integers(self, high: int, size: int) -> np.ndarray:
            return np.argsort(-grad.abs().numpy())[:size]

    grad = torch.randn(300_000)
    compressor = Compressor(Compression("topk", topk_ratio=0.01))
    compressor._sampler = LargestOnly()  # type: ignore[assignment]
    chosen = compressor._largest(grad, 6000)
    assert set(chosen.tolist()) == set(torch.topk(grad.abs(), 6000).indices.tolist())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_topk_payload_and_residual_keep_the_gradient_dtype(dtype: torch.dtype) -> None:
    compressor = Compressor(Compression("topk", topk_ratio=0.01))
    grad = torch.randn(100_000).to(dtype)
    payload = compressor.encode("k", grad)
    assert payload.values.dtype == dtype and payload.indices is not None
    assert torch.equal(payload.values, grad[payload.indices])
    residual = compressor._residuals["k"]
    assert residual.dtype == dtype and int(torch.count_nonzero(residual[payload.indices])) == 0
    assert torch.equal(residual + _round_trip(payload).to(dtype), grad)


def test_topk_of_a_fused_key_picks_from_each_parameter_as_if_it_had_a_key_of_its_own() -> None:
    """A bias's small gradients are not crowded out by a weight's large ones."""
    torch.manual_seed(5)
    bias, weight = torch.randn(10) * 1e-3, torch.randn(2000)
    fused, apart = Compressor(Compression("topk", topk_ratio=0.1)), Compressor(Compression("topk", topk_ratio=0.1))
    for _ in range(3):  # the residuals carry over, per parameter as apart
        payload = fused.encode("bias+1", torch.cat([bias, weight]), sizes=[10, 2000])
        expected = torch.cat([_round_trip(apart.encode("bias", bias)), _round_trip(apart.encode("weight", weight))])
        assert torch.equal(_round_trip(payload), expected)
        assert payload.indices is not None and int((payload.indices < 10).sum()) == 1  # ceil(10%) of the bias
        residuals = torch.cat([apart._residuals["bias"], apart._residuals["weight"]])
        assert torch.equal(fused._residuals["bias+1"], residuals)


def test_topk_chunks_are_sparse_on_the_wire() -> None:
    payload = Compressor(Compression("topk", topk_ratio=0.01)).encode("k", torch.randn(100_000))
    chunks = list(payload.chunks("k", codec.DEFAULT_CHUNK_BYTES))
    wire = sum(len(c.data) + len(c.indices) for c in chunks)
    assert wire == 1000 * (4 + 4)  # 1% of the elements, index and value each


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="compression"):
        Compression("zip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="topk_ratio"):
        Compression("topk", topk_ratio=0)
    with pytest.raises(ValueError, match="pull compression"):
        Compression(pull="fp16")  # type: ignore[arg-type]


def test_weights_cast_on_the_way_decode_into_full_precision_as_the_rounded_weights() -> None:
    """A pull in bf16: half the bytes, dense and sparse chunks, each chunk
    cast into the fp32 destination; what is not a wider float travels as is."""
    torch.manual_seed(4)
    weights = torch.randn(5000)
    weights[:2000][torch.rand(2000) < 0.9] = 0  # pruned: its chunks travel sparse
    chunks = list(codec.tensor_to_chunks("w", weights, 1000, sparse_if_smaller=True, cast_to=torch.bfloat16))
    assert {c.dtype for c in chunks} == {pb.BFLOAT16} and any(c.sparse for c in chunks)
    dense_elements = 5000 - sum(c.length for c in chunks if c.sparse)
    assert sum(len(c.data) for c in chunks if not c.sparse) == 2 * dense_elements
    into = torch.full((5000,), float("nan"))
    received = assembly.receive([wire.decode_pull(wire.encode_pull(wire.Frame(chunks=chunks)))], lambda _: into)  # type: ignore[list-item]
    assert received["w"] is into and torch.equal(into, weights.to(torch.bfloat16).float())
    assert codec.wire_dtype(torch.float64, torch.bfloat16) == torch.bfloat16
    for stored in (torch.float16, torch.bfloat16, torch.int64, torch.bool):
        assert codec.wire_dtype(stored, torch.bfloat16) == stored
    assert codec.wire_dtype(torch.float32, None) == torch.float32


def test_the_workers_of_a_bsp_step_share_one_bf16_cast_of_its_weights() -> None:
    """Shard.pulled_as: a server of W workers casts a step's weights once,
    not W times; an update makes the next pull cast again, and a pull of an
    update the key has moved past gets a cast of its own."""
    options = pb.OptimizerSpec(name="SGD", groups=[codec.options_to_proto({"lr": 1.0})])
    job = pb.JobSpec(mode=pb.BSP, num_workers=2, optimizer=options,
                     keys=[pb.KeySpec(key="w", dtype=pb.FLOAT32, shape=[6])])  # fmt: skip
    torch.manual_seed(0)
    shard = Shard()
    shard.init(job, {"w": torch.randn(6)})  # fp32 mantissas that bf16 rounds

    def pulled(worker: int, step: int) -> PulledKey:
        [[item]] = list(shard.pull(worker, step, ["w"], wait_for_all=False, timeout=5.0))
        return item

    first, second = pulled(0, 0), pulled(1, 0)
    assert shard.metrics_snapshot()["pull_cast_bytes"] == 0  # nothing cast before a bf16 pull
    cast = shard.pulled_as(first, torch.bfloat16)
    assert cast.dtype == torch.bfloat16 and torch.equal(cast, first.value.to(torch.bfloat16))
    assert shard.pulled_as(second, torch.bfloat16) is cast
    assert shard.metrics_snapshot()["pull_cast_bytes"] == 6 * 2  # what ps_pull_cast_bytes reports
    before = cast.clone()
    for worker in (0, 1):
        shard.push(worker, 0, [], {"w": torch.full((6,), 0.1)})
    update = pulled(0, 1)
    assert torch.equal(shard.pulled_as(update, torch.bfloat16), update.value.to(torch.bfloat16))
    assert not torch.equal(before, update.value.to(torch.bfloat16))  # the update changed what travels
    late = shard.pulled_as(first, torch.bfloat16)  # update 0's pull, after update 1
    assert late is not shard.pulled_as(update, torch.bfloat16)
    assert torch.equal(late, first.value.to(torch.bfloat16))


def _bsp_worker_on_bf16_weights(addresses: list[str], rank: int, model: torch.nn.Module, data, config) -> None:  # type: ignore[no-untyped-def]
    with PSClient(addresses, rank, 2, config) as client:
        opt = DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.25), client, named_parameters=model.named_parameters(),
            compression=Compression(pull="bf16"),
        )  # fmt: skip
        for x, y in data:
            for param in model.parameters():  # what backward runs on: the server's weights, rounded
                assert torch.equal(param, param.to(torch.bfloat16).float())
            half = slice(rank * len(x) // 2, (rank + 1) * len(x) // 2)
            opt.zero_grad()
            loss_of(model, x[half], y[half]).backward()
            opt.step()
        opt.pull_final()


@pytest.mark.parametrize(
    ("data_channel", "shared_weights"), [(True, True), (True, False), (False, False)], ids=["shared", "sent", "grpc"]
)
def test_bsp_on_weights_pulled_in_bf16_equals_torch_with_fp32_master_weights(
    start_cluster: StartCluster, data_channel: bool, shared_weights: bool
) -> None:
    """The oracle is mixed precision training in one process: torch.optim
    updates fp32 master weights with the gradients computed on their bf16
    rounding. (SGD with a power-of-two lr, the two halves' gradients
    averaged as the server does: the same floats, so equal to the bit.)"""
    data = batches(12, batch=32)
    master, rounded = small_model(), small_model()
    oracle = torch.optim.SGD(master.parameters(), lr=0.25)
    for x, y in data:
        halves = []
        for half in (slice(0, 16), slice(16, 32)):
            with torch.no_grad():
                for r, m in zip(rounded.parameters(), master.parameters(), strict=True):
                    r.copy_(m.to(torch.bfloat16))
            rounded.zero_grad()
            loss_of(rounded, x[half], y[half]).backward()
            halves.append([r.grad.clone() for r in rounded.parameters()])  # type: ignore[union-attr]
        for m, first, second in zip(master.parameters(), *halves, strict=True):
            m.grad = (first + second) / 2
        oracle.step()
    full_precision = small_model()
    oracle_fp32 = torch.optim.SGD(full_precision.parameters(), lr=0.25)
    for x, y in data:
        oracle_fp32.zero_grad()
        loss_of(full_precision, x, y).backward()
        oracle_fp32.step()

    replicas = [small_model() for _ in range(2)]
    config = dataclasses.replace(SPLITTING, data_channel=data_channel, shared_weights=shared_weights)
    cluster = start_cluster(num_servers=2)
    with ThreadPoolExecutor(2) as pool:
        jobs = [
            pool.submit(_bsp_worker_on_bf16_weights, cluster.addresses, r, replicas[r], data, config) for r in (0, 1)
        ]
        for job in jobs:
            job.result(timeout=120)
        pulled = sum(server.shard.counters["bytes_out"] for server in cluster.servers)
        shared = sum(server.shard.counters["bytes_shared"] for server in cluster.servers)
    for replica in replicas:  # the final model, read at full precision
        assert max_difference(master, replica) == 0
    assert max_difference(full_precision, replicas[0]) > 1e-4  # the rounding is not lost in the noise
    weights = sum(p.numel() for p in master.parameters())
    # Each worker's pulls: the first and one a step in bf16, the final model in fp32; through
    # the Unix socket, all read from the server's shared weights (fp32, rounded by the worker).
    steps = len(data) + 1
    if shared_weights:
        assert (pulled, shared) == (0, 2 * (steps + 1) * weights * 4)
    else:
        assert (pulled, shared) == (2 * (steps * weights * 2 + weights * 4), 0)


@pytest.mark.parametrize("mode", ["bsp", "asp"])
def test_top_k_pushes_of_two_workers_are_added_as_they_were_sent(start_cluster: StartCluster, mode: str) -> None:
    """The servers keep top-k pushes sparse and add only what was sent: into
    the step's sum in BSP, densified for the update in ASP. SGD at lr 1 on
    integer gradients makes every sum exact, whatever order the pushes land
    in: the weights end as the start minus what was sent (BSP: its mean),
    and the servers count the bytes of the sparse pushes, not of the dense."""
    torch.manual_seed(3)
    start = torch.randint(-50, 50, (3000,)).float()
    grads = [[torch.randint(-8, 9, (3000,)).float() for _ in range(4)] for _ in range(2)]

    def train(rank: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        weights = torch.nn.Parameter(start.clone())
        with PSClient(cluster.addresses, rank, 2, CONFIG) as client:
            opt = DistributedOptimizer(
                torch.optim.SGD([weights], lr=1.0), client, named_parameters=[("w", weights)], mode=mode,
                compression=Compression("topk", topk_ratio=0.1),
            )  # fmt: skip
            oracle, sent, sent_bytes = Compressor(Compression("topk", topk_ratio=0.1)), torch.zeros(3000), 0
            for grad in grads[rank]:
                for piece in client.layout.pieces_of["w"]:
                    (part,) = piece.parts
                    payload = oracle.encode(piece.key, grad[part.start : part.stop])
                    sent[part.start : part.stop] += _round_trip(payload)
                    sent_bytes += codec.sparse_bytes(payload.values.numel(), 4)
                weights.grad = grad.clone()
                opt.step()
            opt.pull_final()
        return sent, weights.detach().clone(), sent_bytes

    cluster = start_cluster(num_servers=2)
    with ThreadPoolExecutor(2) as pool:
        (sent0, final0, bytes0), (sent1, final1, bytes1) = pool.map(train, range(2))
        received = sum(server.shard.counters["bytes_in"] for server in cluster.servers)
    assert received == bytes0 + bytes1 < 2 * 4 * 3000 * 4
    expected = start - (sent0 + sent1) / (2 if mode == "bsp" else 1)
    assert torch.equal(final0, expected) and torch.equal(final1, expected)


@pytest.mark.parametrize("method", ["fp16", "bf16", "topk"])
def test_the_server_applies_exactly_what_was_sent(start_cluster: StartCluster, method: str) -> None:
    """SGD with lr 1: each step subtracts the decoded gradient, across split pieces and 2 servers."""
    torch.manual_seed(1)
    weights = torch.nn.Parameter(torch.randn(3000))
    expected = weights.detach().clone()
    oracle = Compressor(Compression(method, topk_ratio=0.1))  # type: ignore[arg-type]
    cluster = start_cluster(num_servers=2)
    with PSClient(cluster.addresses, 0, 1, CONFIG) as client:
        opt = DistributedOptimizer(
            torch.optim.SGD([weights], lr=1.0), client, named_parameters=[("w", weights)],
            compression=Compression(method, topk_ratio=0.1),  # type: ignore[arg-type]
        )  # fmt: skip
        pieces = client.layout.pieces_of["w"]
        assert len({p.server for p in pieces}) == 2
        for _ in range(4):
            weights.grad = torch.randn(3000)
            for piece in pieces:
                (part,) = piece.parts
                sent = _round_trip(oracle.encode(piece.key, weights.grad[part.start : part.stop]))
                expected[part.start : part.stop] -= sent.to(torch.float32)
            opt.step()
    assert torch.equal(weights.detach(), expected)
