import pytest
import torch

from ps_common import assembly, codec, wire
from ps_common.errors import InvalidArgument
from ps_common.proto import ps_pb2 as pb

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.int32,
          torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128]  # fmt: skip


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_complex or dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    return torch.randint(0, 100, shape, dtype=dtype)


def _round_trip(chunks: list[codec.ChunkLike]) -> dict[str, torch.Tensor]:
    """Through the wire: encoded as PullResponses, decoded, assembled."""
    frames = [wire.decode_pull(wire.encode_pull(wire.Frame(chunks=[_as_chunk(c)]))) for c in chunks]
    return assembly.receive(frames, assembly.new_tensor_for)  # type: ignore[arg-type]


def _as_chunk(chunk: codec.ChunkLike) -> codec.Chunk:
    if isinstance(chunk, codec.Chunk):
        return chunk
    fields = ("key", "dtype", "shape", "offset", "data", "absent", "sparse", "indices", "length")
    return codec.Chunk(**{name: getattr(chunk, name) for name in fields})


def test_every_proto_dtype_has_a_torch_dtype() -> None:
    mapped = {codec.dtype_to_proto(d) for d in DTYPES}
    assert mapped == set(pb.DType.values()) - {pb.DTYPE_UNSPECIFIED}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (1,), (7, 13), (3, 4, 5)])
def test_round_trip_is_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = _sample(dtype, shape)
    out = _round_trip(list(codec.tensor_to_chunks("t", tensor, chunk_bytes=16)))["t"]
    assert out.dtype == dtype
    assert torch.equal(out.view(shape), tensor)


def test_large_tensor_travels_in_chunks_no_bigger_than_asked() -> None:
    tensor = torch.randn(10_000)
    chunks = list(codec.tensor_to_chunks("big", tensor, chunk_bytes=4096))
    assert len(chunks) == 10
    assert all(len(c.data) <= 4096 for c in chunks)
    assert torch.equal(_round_trip(chunks)["big"], tensor)


def test_default_chunk_fits_under_grpc_default_message_limit() -> None:
    chunk = next(codec.tensor_to_chunks("x" * 200, torch.zeros(2**21)))
    assert chunk.to_proto().ByteSize() < 4 * 2**20


def test_assembler_writes_into_given_destination() -> None:
    dest = torch.zeros(100)
    assembler = assembly.ChunkAssembler(lambda chunk: dest[10:60])
    for chunk in codec.tensor_to_chunks("k", torch.ones(50), chunk_bytes=40):
        assembler.add(chunk)
    assembler.finish()
    assert dest.sum().item() == 50 and dest[10:60].eq(1).all()


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda cs: cs[1:], "starts at element"),
        (lambda cs: [cs[0], cs[2], cs[1]], "received"),
        (lambda cs: cs[:-1], "before these keys were complete"),
        (lambda cs: [cs[0], pb.TensorChunk(key="t", dtype=pb.FLOAT64, shape=[10], offset=4)], "changed"),
        (
            lambda cs: [*cs, pb.TensorChunk(key="t", dtype=pb.FLOAT32, shape=[10], offset=10, data=b"\0" * 4)],
            "overruns",
        ),
        (lambda cs: [pb.TensorChunk(key="t", dtype=pb.FLOAT32, shape=[2], data=b"\0" * 5)], "overruns or splits"),
        (lambda cs: [codec.absent_chunk("t"), *cs], "after the absent marker"),
    ],
)
def test_malformed_streams_are_refused(mangle, message) -> None:  # type: ignore[no-untyped-def]
    chunks = list(codec.tensor_to_chunks("t", torch.ones(10), chunk_bytes=16))
    with pytest.raises(InvalidArgument, match=message):
        _round_trip(mangle(chunks))


def test_unknown_dtype_code_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument):
        _round_trip([pb.TensorChunk(key="t", dtype=99, shape=[1], data=b"\0")])


def test_hyperparameters_keep_their_types() -> None:
    options = {"lr": 0.01, "betas": (0.9, 0.999), "amsgrad": True, "weight_decay": 0, "foreach": None, "mode": "x"}
    decoded = codec.options_from_proto(codec.options_to_proto(options))
    assert decoded == options
    assert type(decoded["weight_decay"]) is int and type(decoded["amsgrad"]) is bool


def test_tensor_learning_rate_travels_as_a_number() -> None:
    assert codec.options_from_proto(codec.options_to_proto({"lr": torch.tensor(0.5)})) == {"lr": 0.5}


def test_unsupported_hyperparameter_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="cannot travel"):
        codec.options_to_proto({"callback": object()})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64], ids=str)
def test_sparse_encoding_is_chosen_when_smaller_and_round_trips(dtype: torch.dtype) -> None:
    tensor = torch.zeros(10_000, dtype=dtype)
    tensor[::50] = torch.arange(1, 201).to(dtype)
    chunks = list(codec.tensor_to_chunks("s", tensor, chunk_bytes=8192, sparse_if_smaller=True))
    assert all(c.sparse for c in chunks)
    sent = sum(len(c.data) + len(c.indices) for c in chunks)
    assert sent == 200 * (4 + tensor.element_size())
    assert torch.equal(_round_trip(chunks)["s"], tensor)


@pytest.mark.parametrize("length,every", [(10_000, 50), (10_000, 2), (3000, 1), (0, 1)])
def test_sparse_to_chunks_cuts_as_tensor_to_chunks_does(length: int, every: int) -> None:
    """Given the non-zeros, the same chunks as from the whole tensor: sparse
    where that is smaller (every 50th element), dense where not (every 2nd)."""
    tensor = torch.zeros(length)
    tensor[::every] = torch.arange(1, len(range(0, length, every)) + 1, dtype=torch.float32)
    indices = torch.nonzero(tensor).view(-1)
    expected = list(codec.tensor_to_chunks("s", tensor, chunk_bytes=8192, sparse_if_smaller=True))
    got = list(codec.sparse_to_chunks("s", indices, tensor[indices], length, chunk_bytes=8192))
    assert [c.to_proto() for c in got] == [c.to_proto() for c in expected]
    assert any(c.sparse for c in got) == (every == 50)


def test_dense_tensor_stays_dense_even_when_sparse_is_allowed() -> None:
    chunks = list(codec.tensor_to_chunks("d", torch.randn(1000), sparse_if_smaller=True))
    assert not any(c.sparse for c in chunks)


def test_sparse_chunk_with_index_outside_its_range_is_refused() -> None:
    bad = pb.TensorChunk(key="s", dtype=pb.FLOAT32, shape=[10], sparse=True, length=10,
                         indices=torch.tensor([12], dtype=torch.int32).numpy().tobytes(),
                         data=torch.tensor([1.0]).numpy().tobytes())  # fmt: skip
    with pytest.raises(InvalidArgument, match="outside"):
        _round_trip([bad])


def test_sparse_chunk_with_indices_out_of_order_is_refused() -> None:
    bad = pb.TensorChunk(key="s", dtype=pb.FLOAT32, shape=[10], sparse=True, length=10,
                         indices=torch.tensor([3, 3], dtype=torch.int32).numpy().tobytes(),
                         data=torch.tensor([1.0, 2.0]).numpy().tobytes())  # fmt: skip
    with pytest.raises(InvalidArgument, match="ascending"):
        _round_trip([bad])


def _kept_sparse(chunks: list[codec.ChunkLike]) -> assembly.ChunkAssembler:
    checked = []
    assembler = assembly.ChunkAssembler(assembly.new_tensor_for, keep_sparse=checked.append)
    for chunk in chunks:
        assembler.add(chunk)
    assert [c.key for c in checked] == sorted({c.key for c in chunks if c.sparse and c.offset == 0})
    return assembler


def test_a_key_that_comes_all_sparse_is_kept_sparse_and_adds_what_was_sent() -> None:
    tensor = torch.zeros(10_000)
    tensor[::50] = torch.arange(1, 201, dtype=torch.float32)
    chunks = list(codec.tensor_to_chunks("s", tensor, chunk_bytes=8192, sparse_if_smaller=True))
    assert len(chunks) > 1 and all(c.sparse for c in chunks)
    assembler = _kept_sparse([_as_chunk(c) for c in chunks])
    assert assembler.finish() == {}
    kept = assembler.sparse["s"]
    assert kept.shape == (10_000,) and kept.nbytes == 200 * 8
    assert torch.equal(kept.densify(torch.full((10_000,), 7.0)), tensor)
    total = torch.ones(10_000)
    kept.add_to(total)
    assert torch.equal(total, tensor + 1)


def test_a_dense_chunk_after_sparse_ones_makes_the_key_dense() -> None:
    tensor = torch.zeros(6000)
    tensor[:2000:50] = 1.0  # sparse in the first chunk
    tensor[4000:] = torch.randn(2000)  # dense in the last
    chunks = [_as_chunk(c) for c in codec.tensor_to_chunks("m", tensor, chunk_bytes=8000, sparse_if_smaller=True)]
    assert [c.sparse for c in chunks] == [True, True, False]
    assembler = _kept_sparse(chunks)
    assert assembler.sparse == {} and torch.equal(assembler.finish()["m"], tensor)


def test_a_refused_first_sparse_chunk_is_refused_before_anything_is_kept() -> None:
    def refuse(chunk: codec.ChunkLike) -> None:
        raise InvalidArgument(f"unknown key {chunk.key!r}")

    assembler = assembly.ChunkAssembler(assembly.new_tensor_for, keep_sparse=refuse)
    chunk = next(iter(codec.sparse_to_chunks("x", torch.tensor([3]), torch.tensor([1.0]), 100)))
    with pytest.raises(InvalidArgument, match="unknown key"):
        assembler.add(chunk)
    assert assembler.sparse == {}
