import pytest

from ps_worker.sharding import MIN_PIECE_BYTES, Part, Piece, TensorInfo, bytes_per_server, cut_requests, plan_placement

DOMINATED = [TensorInfo("embedding", 16_000_000, 4), TensorInfo("fc.weight", 4096, 4), TensorInfo("fc.bias", 16, 4)]
SMALL = [TensorInfo("a", 10, 4), TensorInfo("b", 300, 4), TensorInfo("c", 1, 8)]


# Layer norms and biases, in two param groups, around two big matrices.
LAYERED = [
    TensorInfo(f"layer{i}.{kind}", numel, 4, fuses_with=group)
    for i in range(12)
    for kind, numel, group in (("weight", 512 * 512, 0), ("bias", 512, 1), ("norm", 512, 1))
] + [TensorInfo("embedding", 4_000_000, 4, fuses_with=0), TensorInfo("mask", 100, 1, fuses_with=None)]


@pytest.mark.parametrize("tensors", [DOMINATED, SMALL, LAYERED], ids=["dominated", "small", "layered"])
@pytest.mark.parametrize("servers", range(1, 9))
@pytest.mark.parametrize("fuse_below_bytes", [0, 2**20])
def test_pieces_tile_every_tensor_exactly_once(tensors, servers, fuse_below_bytes) -> None:  # type: ignore[no-untyped-def]
    pieces = plan_placement(tensors, servers, fuse_below_bytes=fuse_below_bytes)
    for tensor in tensors:
        ranges = sorted((part.start, part.stop) for p in pieces for part in p.parts if part.name == tensor.name)
        assert ranges[0][0] == 0 and ranges[-1][1] == tensor.numel
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert len({p.key for p in pieces}) == len(pieces)
    assert all(0 <= p.server < servers for p in pieces)
    assert all(part.start == 0 for p in pieces if p.fused for part in p.parts)  # only whole tensors fuse


def test_small_tensors_of_one_kind_fuse_in_order_into_keys_within_the_piece_size() -> None:
    info = {t.name: t for t in LAYERED}
    pieces = plan_placement(LAYERED, 2, fuse_below_bytes=4096)
    fused = [p for p in pieces if p.fused]
    # The 24 biases and norms (2 KiB each, group 1) fill two keys, one per server.
    assert [p.key for p in fused] == ["layer0.bias+11", "layer6.bias+11"]
    assert fused[0].names == [f"layer{i // 2}.{('bias', 'norm')[i % 2]}" for i in range(12)]
    assert {p.server for p in fused} == {0, 1}
    assert all({info[n].fuses_with for n in p.names} == {1} for p in fused)
    # The matrices (1 MiB: not under the bound) and the mask (no kind) stay apart.
    assert all(not p.fused for p in pieces if any(n.endswith(".weight") or n == "mask" for n in p.names))
    # Fused keys are no bigger than the pieces the big tensors are cut into.
    piece_bytes = max(p.numel * 4 for p in pieces if p.names == ["embedding"])
    assert all(p.numel * 4 <= piece_bytes for p in fused)
    many = [TensorInfo(f"b{i}", 1000, 4, fuses_with=0) for i in range(1000)]  # 4 MB in all
    assert all(p.numel * 4 <= 2**20 for p in plan_placement(many, 1, fuse_below_bytes=4096))


@pytest.mark.parametrize("servers", range(1, 9))
def test_one_big_tensor_is_balanced_within_ten_percent(servers: int) -> None:
    load = bytes_per_server(plan_placement(DOMINATED, servers), DOMINATED, servers)
    mean = sum(load) / servers
    assert max(load) <= 1.1 * mean and min(load) >= 0.9 * mean


def test_placement_is_deterministic() -> None:
    assert plan_placement(DOMINATED, 3) == plan_placement(list(DOMINATED), 3)


def test_small_tensors_are_not_split() -> None:
    pieces = plan_placement(SMALL, 2)
    assert [p.key for p in pieces] == ["a", "b", "c"]


def test_a_small_model_is_cut_no_finer_than_the_floor() -> None:
    # 1/16 of this share would be 128 KiB pieces; the floor makes them 1 MiB.
    pieces = plan_placement([TensorInfo("w", 2 * MIN_PIECE_BYTES // 4, 4)], 1)
    assert [p.numel * 4 for p in pieces] == [MIN_PIECE_BYTES] * 2


def test_pieces_respect_the_maximum_size() -> None:
    pieces = plan_placement([TensorInfo("w", 1000, 4)], 1, max_piece_bytes=400)
    assert len(pieces) == 10 and all(p.numel * 4 <= 400 for p in pieces)


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unique"):
        plan_placement([TensorInfo("a", 1, 4), TensorInfo("a", 2, 4)], 1)
    fusing = [TensorInfo("a", 1, 4, fuses_with=0), TensorInfo("b", 1, 4, fuses_with=0)]
    with pytest.raises(ValueError, match="rename it"):  # "a" and "b" fuse into key "a+1"
        plan_placement([*fusing, TensorInfo("a+1", 1, 4)], 1, fuse_below_bytes=1024)


def test_a_push_is_cut_into_requests_in_order_each_within_the_limit() -> None:
    sizes = {"a": 600, "b": 300, "c": 0, "d": 500, "e": 2000, "f": 100}
    pieces = [Piece(key, 0, (Part(key, 0, 1),)) for key in sizes]
    requests = cut_requests(pieces, sizes, limit=1000)
    assert [[p.key for p in r] for r in requests] == [["a", "b", "c"], ["d"], ["e"], ["f"]]
    # Only a piece that alone exceeds the limit makes a request exceed it.
    assert all(sum(sizes[p.key] for p in r) <= 1000 or len(r) == 1 for r in requests)
    assert cut_requests([], {}, limit=1000) == [[]]  # a server with no key still hears of the step
