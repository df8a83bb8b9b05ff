"""The KV block agreement across real gloo ranks whose budgets disagree, and the consistency check that
catches a build without the agreement (the nano-vllm #187 failure) before any block id is handed out."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import traceback

import pytest
import torch.distributed as dist

from nanoserve.distributed.kv_agreement import agree_on_num_blocks, establish_kv_cache, gather_ints
from nanoserve.distributed.parallel_state import TPGroup
from nanoserve.runner.memory import budget_scale, cpu_kv_budget, short_kv_layers

LOCAL = [100, 40, 70]
NUM_LAYERS = 3


def _no_agreement(local: int, tp: TPGroup) -> tuple[int, list[int]]:
    """Test double: each rank keeps its own estimate, as nano-vllm did."""
    return local, gather_ints(local, tp)


def _rank_main(rank: int, world: int, port: int, scenario: dict, results: mp.Queue) -> None:
    """One rank of the agreement. ``scenario``: ``skip_agreement``, ``max_model_len`` (default 32, 2 blocks),
    ``explicit`` (default True) and ``short`` = (rank, layer) whose allocation comes back one block short."""
    try:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=datetime.timedelta(seconds=60))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        tp = TPGroup(rank, world, dist.group.WORLD, dist.group.WORLD)
        allocated: list[int] = []

        def allocate(n: int) -> list[int]:
            allocated.append(n)
            return [n - 1 if (rank, layer) == scenario.get("short") else n for layer in range(NUM_LAYERS)]

        agree = _no_agreement if scenario.get("skip_agreement") else agree_on_num_blocks
        try:
            info = establish_kv_cache(
                LOCAL[rank], 1024, 16, scenario.get("max_model_len", 32), allocate, tp, agree=agree,
                max_model_len_explicit=scenario.get("explicit", True),
            )  # fmt: skip
            results.put((rank, "ok", {**info.as_dict(), "allocated_per_layer": info.allocated_per_layer}, allocated))
        except RuntimeError as exc:
            results.put((rank, "error", str(exc), allocated))
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, "crash", traceback.format_exc(), []))


def _run_ranks(world: int, **scenario: object) -> dict[int, tuple]:
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, store.port, scenario, results)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        out = {}
        for _ in range(world):
            rank, *rest = results.get(timeout=120)
            out[rank] = tuple(rest)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return out


def test_ranks_agree_on_the_minimum_and_allocate_it() -> None:
    out = _run_ranks(3)
    for rank in range(3):
        status, info, allocated = out[rank]
        assert status == "ok", info
        assert info["num_blocks"] == min(LOCAL)
        assert info["local_num_blocks"] == LOCAL
        assert info["allocated_num_blocks"] == [min(LOCAL)] * 3
        assert info["allocated_per_layer"] == [[min(LOCAL)] * NUM_LAYERS] * 3  # every layer of every rank
        assert info["max_model_len"] == 32  # fits: served as configured
        assert allocated == [min(LOCAL)]  # this rank really allocated the agreed count, nothing else


def test_without_agreement_the_start_up_check_refuses() -> None:
    """Negative control: skip the MIN all-reduce and every rank allocates its own count; the explicit
    consistency check must stop start-up on every rank instead of letting block ids go out of range."""
    out = _run_ranks(3, skip_agreement=True)
    for rank in range(3):
        status, message, allocated = out[rank]
        assert status == "error", f"rank {rank} started despite disagreeing allocations: {message}"
        assert "KV cache mismatch" in message and "[100, 40, 70]" in message
        assert allocated == [LOCAL[rank]]


def test_one_short_layer_on_one_rank_refuses_on_every_rank() -> None:
    """Negative control: the agreement holds, but layer 1 of rank 2 comes back one block short. Checking only
    each rank's first layer would miss it; every rank must refuse, naming the rank and the layer."""
    out = _run_ranks(3, short=(2, 1))
    for rank in range(3):
        status, message, allocated = out[rank]
        assert status == "error", f"rank {rank} started despite a short layer: {message}"
        assert "KV cache mismatch" in message and "rank 2 layer 1 has 39" in message and "ranks [2]" in message
        assert "rank 0 layer" not in message and "rank 2 layer 0" not in message


def test_default_max_model_len_is_lowered_to_the_agreed_blocks_on_every_rank() -> None:
    """A default max_model_len of 4096 (256 blocks of 16) does not fit the agreed 40 blocks: every rank serves
    40 x 16 = 640 tokens, derived from the MIN, so the short rank's length holds everywhere."""
    out = _run_ranks(3, max_model_len=4096, explicit=False)
    for rank in range(3):
        status, info, allocated = out[rank]
        assert status == "ok", info
        assert info["max_model_len"] == min(LOCAL) * 16
        assert allocated == [min(LOCAL)]


def test_explicit_max_model_len_that_does_not_fit_refuses_on_every_rank() -> None:
    out = _run_ranks(3, max_model_len=4096, explicit=True)
    for rank in range(3):
        status, message, allocated = out[rank]
        assert status == "error", message
        assert "KV cache too small: rank 1 can hold 40 blocks" in message and "max_model_len (4096)" in message
        assert allocated == []  # refused before allocating anything


def test_budget_scale_parsing(monkeypatch) -> None:
    monkeypatch.setenv("NANOSERVE_KV_BUDGET_SCALE", "1.0,0.4")
    assert budget_scale(0, 2) == 1.0 and budget_scale(1, 2) == 0.4
    monkeypatch.setenv("NANOSERVE_KV_BUDGET_SCALE", "0.5")
    assert budget_scale(1, 4) == 0.5
    monkeypatch.setenv("NANOSERVE_KV_BUDGET_SCALE", "1.0,0.4,2")
    with pytest.raises(ValueError, match="need 2 positive factors"):
        budget_scale(0, 2)
    monkeypatch.setenv("NANOSERVE_KV_BUDGET_SCALE", "a,b")
    with pytest.raises(ValueError, match="comma-separated numbers"):
        budget_scale(0, 2)


def test_cpu_budget_is_shared_among_local_ranks() -> None:
    gib = 2**30
    # Default: a share of available memory split between the ranks on the host.
    one, _ = cpu_kv_budget(None, 10 * gib, 1)
    two, _ = cpu_kv_budget(None, 10 * gib, 2)
    assert two * 2 == pytest.approx(one, rel=1e-6)
    # Explicit per-rank budgets are capped so all local ranks together fit in what the host has.
    capped, how = cpu_kv_budget(8 * gib, 10 * gib, 2)
    assert capped * 2 <= 10 * gib and "capped" in how
    assert cpu_kv_budget(gib, 10 * gib, 2)[0] == gib


def test_short_kv_parsing(monkeypatch) -> None:
    monkeypatch.delenv("NANOSERVE_TEST_SHORT_KV", raising=False)
    assert short_kv_layers(0, 2, 4) == ()
    monkeypatch.setenv("NANOSERVE_TEST_SHORT_KV", "1:3")
    assert short_kv_layers(0, 2, 4) == () and short_kv_layers(1, 2, 4) == (3,)
    monkeypatch.setenv("NANOSERVE_TEST_SHORT_KV", "1:0,0:2,1:1")
    assert short_kv_layers(0, 2, 4) == (2,) and short_kv_layers(1, 2, 4) == (0, 1)
    monkeypatch.setenv("NANOSERVE_TEST_SHORT_KV", "1")
    with pytest.raises(ValueError, match="RANK:LAYER"):
        short_kv_layers(0, 2, 4)
    monkeypatch.setenv("NANOSERVE_TEST_SHORT_KV", "2:0")
    with pytest.raises(ValueError, match="outside 2 ranks x 4 attention layers"):
        short_kv_layers(0, 2, 4)
