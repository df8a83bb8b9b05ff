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
from nanoserve.runner.memory import budget_scale, cpu_kv_budget

LOCAL = [100, 40, 70]


def _no_agreement(local: int, tp: TPGroup) -> tuple[int, list[int]]:
    """Test double: each rank keeps its own estimate, as nano-vllm did."""
    return local, gather_ints(local, tp)


def _rank_main(rank: int, world: int, port: int, skip_agreement: bool, results: mp.Queue) -> None:
    try:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=datetime.timedelta(seconds=60))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        tp = TPGroup(rank, world, dist.group.WORLD, dist.group.WORLD)
        allocated: list[int] = []

        def allocate(n: int) -> int:
            allocated.append(n)
            return n

        agree = _no_agreement if skip_agreement else agree_on_num_blocks
        try:
            info = establish_kv_cache(LOCAL[rank], 1024, 16, 32, allocate, tp, agree=agree)
            results.put((rank, "ok", info.as_dict(), allocated))
        except RuntimeError as exc:
            results.put((rank, "error", str(exc), allocated))
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, "crash", traceback.format_exc(), []))


def _run_ranks(world: int, skip_agreement: bool) -> dict[int, tuple]:
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, store.port, skip_agreement, results)) for r in range(world)]
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
    out = _run_ranks(3, skip_agreement=False)
    for rank in range(3):
        status, info, allocated = out[rank]
        assert status == "ok", info
        assert info["num_blocks"] == min(LOCAL)
        assert info["local_num_blocks"] == LOCAL
        assert info["allocated_num_blocks"] == [min(LOCAL)] * 3
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
