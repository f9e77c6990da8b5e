"""Compressed pushes: the codec round trip, error feedback, and the update
the server applies from a compressed gradient."""

from __future__ import annotations

import pytest
import torch

from ps_common import codec, wire
from ps_server.harness import InProcessCluster
from ps_worker import ClientConfig, DistributedOptimizer, PSClient
from ps_worker.compression import Compression, Compressor, Payload

CONFIG = ClientConfig(max_piece_bytes=4096, timeout=30, wait_timeout=60)  # pieces of 1024 fp32


def _round_trip(payload: Payload) -> torch.Tensor:
    """The piece as the server decodes it."""
    chunks = list(payload.chunks("k", chunk_bytes=1000))
    out = codec.receive([wire.decode_pull(wire.encode_pull(wire.Frame(chunks=chunks)))], codec.new_tensor_for)  # type: ignore[list-item]
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
        total = grad.clone()
        chosen = compressor._largest(total.abs(), 3000)
        expected = torch.topk(total.abs(), 3000).indices
        assert set(chosen.tolist()) == set(expected.tolist())
        assert bool((chosen[1:] > chosen[:-1]).all())  # ascending, as sparse_to_chunks needs
    for dtype in (torch.float16, torch.bfloat16, torch.float64):  # numpy has no bfloat16; quantile no halves
        magnitude = torch.randn(300_000).abs().to(dtype)
        expected = torch.topk(magnitude, 3000).values
        assert torch.equal(magnitude[compressor._largest(magnitude, 3000)].sort().values, expected.sort().values)
    # Ties at the threshold (all but k elements equal): still the k largest.
    flat = torch.zeros(300_000)
    flat[:3000] = 1.0
    assert set(compressor._largest(flat, 3000).tolist()) == set(range(3000))


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


@pytest.mark.parametrize("method", ["fp16", "bf16", "topk"])
def test_the_server_applies_exactly_what_was_sent(method: str) -> None:
    """SGD with lr 1: each step subtracts the decoded gradient, across split pieces and 2 servers."""
    torch.manual_seed(1)
    weights = torch.nn.Parameter(torch.randn(3000))
    expected = weights.detach().clone()
    oracle = Compressor(Compression(method, topk_ratio=0.1))  # type: ignore[arg-type]
    with InProcessCluster(num_servers=2) as cluster, PSClient(cluster.addresses, 0, 1, CONFIG) as client:
        opt = DistributedOptimizer(
            torch.optim.SGD([weights], lr=1.0), client, named_parameters=[("w", weights)],
            compression=Compression(method, topk_ratio=0.1),  # type: ignore[arg-type]
        )  # fmt: skip
        pieces = client._pieces_of["w"]
        assert len({p.server for p in pieces}) == 2
        for _ in range(4):
            weights.grad = torch.randn(3000)
            for piece in pieces:
                sent = _round_trip(oracle.encode(piece.key, weights.grad[piece.start : piece.stop]))
                expected[piece.start : piece.stop] -= sent.to(torch.float32)
            opt.step()
    assert torch.equal(weights.detach(), expected)
