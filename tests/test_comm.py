"""Collectives on real gloo ranks: the shared-memory all-reduce / all-gather / broadcast give the exact results
(large tensors through gloo), the model over them gives TP=1's logits, bitwise-equal on every rank, and a dead
peer is noticed, not waited for."""

from __future__ import annotations

import pytest
import torch
from helpers.distributed import run_ranks
from helpers.parity import TOL, logits_and_tokens

from llama3_dist.parallel.comm import all_gather, all_reduce, broadcast
from llama3_dist.parallel.mesh import Mesh


@pytest.mark.parametrize("tp", [2, 3])
def test_shared_memory_collectives_match_tp1_and_agree_bitwise(tiny, tp):
    path = tiny.path("tp-9-3", "hf")  # 9 query / 3 KV heads, dim 72, FFN 200, vocab 250: uneven splits
    want_logits, want_tokens = logits_and_tokens(Mesh.single(), str(path))
    results = run_ranks(logits_and_tokens, tp, str(path), shm=True)
    for logits, tokens in results:
        assert (logits - want_logits).abs().max().item() <= TOL
        assert tokens == want_tokens
    assert all(torch.equal(results[0][0], r[0]) for r in results)  # one summation order on every rank


def _shm_collectives(mesh: Mesh):
    r, n = mesh.tp.rank, mesh.tp.size
    summed = all_reduce(torch.full((3, 5), float(r + 1)), mesh.tp)
    big = all_reduce(torch.ones(2_000_000), mesh.tp)  # larger than a slot: goes through gloo
    gathered = all_gather(torch.full((2, r + 1), float(r)), mesh.tp, [i + 1 for i in range(n)], dim=-1)
    tokens = broadcast(torch.arange(4) * (r + 7), mesh.world.ranks[-1], mesh.world)
    return summed, big[:3], gathered, tokens


def test_shared_memory_collective_results():
    n = 3
    for summed, big, gathered, tokens in run_ranks(_shm_collectives, n, shm=True):
        assert torch.equal(summed, torch.full((3, 5), float(sum(range(1, n + 1)))))
        assert torch.equal(big, torch.full((3,), float(n)))
        assert torch.equal(gathered, torch.cat([torch.full((2, r + 1), float(r)) for r in range(n)], dim=-1))
        assert torch.equal(tokens, torch.arange(4) * (n - 1 + 7))


def _die_in_shm(mesh: Mesh):
    all_reduce(torch.ones(4), mesh.tp)
    if mesh.rank == 1:
        raise RuntimeError("injected failure on rank 1")
    all_reduce(torch.ones(4), mesh.tp)  # rank 0 waits for a peer that is gone


def test_shared_memory_notices_a_dead_peer():
    (ok0, err0, t0), (ok1, err1, _) = run_ranks(_die_in_shm, 2, shm=True, outcomes=True, timeout=60)
    assert not ok1 and "injected failure" in err1
    assert not ok0 and "has exited" in err0 and t0 < 30
