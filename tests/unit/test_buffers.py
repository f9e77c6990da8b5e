"""The server's reused buffers: what is lent is never lent twice at once,
and a shard gives its push buffers back only once it is done with them."""

from __future__ import annotations

import gc

import pytest
import torch

from ps_common import codec
from ps_common.proto import ps_pb2 as pb
from ps_server.buffers import BufferPool
from ps_server.shard import Shard


def test_a_buffer_given_back_is_lent_again_for_the_same_size_or_a_little_smaller() -> None:
    pool = BufferPool()
    first = pool.take((256, 4), torch.float32)
    address = first.data_ptr()
    pool.give([first])
    assert pool.idle_bytes >= 4096
    again = pool.take((1000,), torch.float32)  # 4000 bytes: fits in the 4096 waiting
    assert again.data_ptr() == address and again.shape == (1000,)
    assert pool.idle_bytes == 0


def test_a_waiting_buffer_more_than_twice_the_size_asked_for_is_not_used() -> None:
    pool = BufferPool()
    big = pool.take((4096,), torch.uint8)
    pool.give([big])
    small = pool.take((100,), torch.uint8)
    assert small.data_ptr() != big.data_ptr()
    assert pool.idle_bytes == 4096


def test_loans_of_any_dtype_share_buffers() -> None:
    pool = BufferPool()
    half = pool.take((8,), torch.bfloat16)
    address = half.data_ptr()
    pool.give([half])
    single = pool.take((4,), torch.float32)
    assert single.dtype == torch.float32 and single.data_ptr() == address


def test_only_tensors_lent_and_not_yet_given_back_are_taken_back() -> None:
    pool = BufferPool()
    lent = pool.take((16,), torch.float32)
    pool.give([torch.zeros(16)])  # the caller's own
    assert pool.idle_bytes == 0
    pool.give([lent])
    pool.give([lent])  # twice: the second time does nothing
    assert pool.idle_bytes == 64
    reused = pool.take((16,), torch.float32)
    pool.give([lent])  # a stale reference to the memory now lent as `reused`
    assert pool.idle_bytes == 0
    other = pool.take((16,), torch.float32)
    assert other.data_ptr() != reused.data_ptr()


def test_a_loan_never_given_back_is_freed_not_kept() -> None:
    pool = BufferPool()
    pool.take((1024,), torch.float32)  # dropped at once
    gc.collect()
    assert pool.idle_bytes == 0 and not pool._lent


def test_no_more_than_max_idle_bytes_wait() -> None:
    pool = BufferPool(max_idle_bytes=100)
    loans = [pool.take((64,), torch.uint8) for _ in range(3)]
    pool.give(loans)
    assert pool.idle_bytes == 64


@pytest.mark.parametrize("parts", [[b"head", memoryview(b"er"), torch.arange(5, dtype=torch.uint8).numpy()], [b""]])
def test_joined_is_a_join_of_the_parts(parts: list[object]) -> None:
    pool = BufferPool()
    joined = pool.joined(parts)
    assert bytes(joined.numpy()) == b"".join(parts)  # type: ignore[arg-type]


def _shard(mode: int, workers: int) -> Shard:
    options = pb.OptimizerSpec(name="SGD", groups=[codec.options_to_proto({"lr": 1.0})])
    job = pb.JobSpec(mode=mode, num_workers=workers, optimizer=options,
                     keys=[pb.KeySpec(key="w", dtype=pb.FLOAT32, shape=[4])])  # fmt: skip
    shard = Shard()
    shard.init(job, {"w": torch.zeros(4)})
    return shard


def _pushed(shard: Shard, value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A gradient in a buffer lent by the shard, as a push stream gets one."""
    return shard.buffers.take((4,), dtype).fill_(value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_asp_push_gives_its_buffers_back_once_applied(dtype: torch.dtype) -> None:
    shard = _shard(pb.ASP, 1)
    shard.push(0, 0, [], {"w": _pushed(shard, 1.0, dtype)})
    assert torch.equal(shard.slots["w"].value, torch.full((4,), -1.0))
    assert shard.buffers.idle_bytes > 0  # the pushed buffer, and the cast copy of a bf16 one
    shard.push(0, 1, [], {"w": _pushed(shard, 2.0, dtype)})
    assert torch.equal(shard.slots["w"].value, torch.full((4,), -3.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_bsp_sum_keeps_its_buffer_until_the_step_is_applied(dtype: torch.dtype) -> None:
    shard = _shard(pb.BSP, 2)
    shard.push(0, 0, [], {"w": _pushed(shard, 1.0, dtype)})
    # Worker 0's gradient is the step's sum now: lending its memory to the
    # next push would overwrite it.
    shard.push(1, 0, [], {"w": _pushed(shard, 3.0, dtype)})
    assert torch.equal(shard.slots["w"].value, torch.full((4,), -2.0))
    assert shard.buffers.idle_bytes > 0
