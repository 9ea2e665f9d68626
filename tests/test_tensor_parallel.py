"""Tensor parallelism on real gloo ranks: every degree gives TP=1's logits and greedy tokens."""
from __future__ import annotations

import pytest
import torch

from llama3_dist import fast_decode
from checkpoints import random_model, tiny_config, write_gguf, write_hf, write_meta
from distributed import run_ranks

from llama3_dist.checkpoint import load_model, open_checkpoint
from llama3_dist.generate import SamplingParams, generate
from llama3_dist.parallel.mesh import Mesh

TOL = 1e-4
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)
BATCH = [[3, 14, 15, 92, 65], [35, 89], [79, 32, 38, 46, 26, 43, 38]]


def logits_and_tokens(mesh: Mesh, path: str, batch=BATCH, params=GREEDY):
    """This rank's full-vocab logits for the first prompt, and the greedy completions of the batch."""
    model = load_model(open_checkpoint(path), mesh, torch.float32)
    tokens = torch.tensor([batch[0]])
    model.setup_caches(1, tokens.shape[1])
    with torch.inference_mode():
        logits = model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0))
    done = generate(model, mesh, batch, params, frozenset())
    return logits, [c.tokens for c in done]


def check_all_degrees(path, degrees=(2, 3, 4), batch=BATCH, params=GREEDY):
    want_logits, want_tokens = logits_and_tokens(Mesh.single(), str(path), batch, params)
    for tp in degrees:
        for rank, (logits, tokens) in enumerate(run_ranks(logits_and_tokens, tp, str(path), batch, params)):
            assert (logits - want_logits).abs().max().item() <= TOL, (tp, rank)
            assert tokens == want_tokens, (tp, rank)
    return want_tokens


@pytest.mark.parametrize("heads", [(8, 2), (9, 3)])
def test_every_tp_degree_matches_tp1(tmp_path, heads):
    n_heads, n_kv = heads
    hf = random_model(tiny_config(hidden_size=8 * n_heads, num_attention_heads=n_heads,
                                  num_key_value_heads=n_kv, intermediate_size=200, vocab_size=250), seed=21)
    check_all_degrees(write_hf(hf, tmp_path / "hf"))


def test_meta_mp2_checkpoint_loads_at_tp1_2_4(tmp_path):
    hf = random_model(tiny_config(), seed=22)
    tokens = check_all_degrees(write_meta(hf, tmp_path / "meta", mp=2), degrees=(2, 4))
    single = logits_and_tokens(Mesh.single(), str(write_meta(hf, tmp_path / "meta1")))[1]
    assert tokens == single


def test_quantized_gguf_at_tp2_and_tp3(tmp_path):
    hf = random_model(tiny_config(), seed=23)
    check_all_degrees(write_gguf(hf, tmp_path / "m.gguf", qtype="Q8_0"), degrees=(2, 3))


def test_ranks_agree_on_sampled_tokens(tmp_path):
    path = write_meta(random_model(tiny_config(), seed=24), tmp_path / "meta")
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    results = run_ranks(logits_and_tokens, 2, str(path), BATCH, params)
    assert results[0][1] == results[1][1]
    assert results[0][1] == logits_and_tokens(Mesh.single(), str(path), BATCH, params)[1]


def smollm2_tokens(mesh: Mesh, path: str, prompts: list[list[int]]):
    model = load_model(open_checkpoint(path), mesh, torch.float32)
    return [c.tokens for c in generate(model, mesh, prompts, SamplingParams(16, temperature=0.0), frozenset())]


@pytest.mark.parametrize("tp", [2, 4])
def test_real_smollm2_at_tp_matches_tp1(smollm2_gguf, tp):
    prompts = [[504, 3575, 282, 4649, 314], [1248, 253, 1345, 1112, 288, 4238, 30]]
    want = smollm2_tokens(Mesh.single(), str(smollm2_gguf), prompts)
    for got in run_ranks(smollm2_tokens, tp, str(smollm2_gguf), prompts):
        assert got == want


def _load_peak_mib(mesh: Mesh, path: str) -> tuple[float, float]:
    """(peak RSS growth while loading, this rank's parameter MiB): the high-water mark is reset first."""
    def status(key: str) -> float:
        line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
        return int(line.split()[1]) / 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = status("VmRSS")
    model = load_model(open_checkpoint(path), mesh, torch.float32)
    params = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return status("VmHWM") - base, params


def test_tp2_loads_about_half_the_memory_per_rank(tmp_path):
    from llama3_dist.checkpoint.synthetic import write_random_meta
    params = {"dim": 512, "n_layers": 8, "n_heads": 8, "n_kv_heads": 2, "vocab_size": 32000,
              "multiple_of": 256, "norm_eps": 1e-5, "rope_theta": 500000.0}
    path = str(write_random_meta(tmp_path / "m", params, dtype=torch.float32))  # ~220 MiB of fp32
    [(tp1_peak, tp1_params)] = run_ranks(_load_peak_mib, 1, path)
    for tp2_peak, tp2_params in run_ranks(_load_peak_mib, 2, path):
        assert tp2_params < 0.55 * tp1_params
        assert tp2_peak < 0.75 * tp1_peak, (tp2_peak, tp1_peak)


@pytest.mark.parametrize("tp", [2, 3])
def test_shared_memory_collectives_match_tp1_and_agree_bitwise(tmp_path, tp):
    hf = random_model(tiny_config(num_attention_heads=9, num_key_value_heads=3, hidden_size=72,
                                  intermediate_size=200, vocab_size=250), seed=25)
    path = write_hf(hf, tmp_path / "hf")
    want_logits, want_tokens = logits_and_tokens(Mesh.single(), str(path))
    results = run_ranks(logits_and_tokens, tp, str(path), shm=True)
    for logits, tokens in results:
        assert (logits - want_logits).abs().max().item() <= TOL
        assert tokens == want_tokens
    assert all(torch.equal(results[0][0], r[0]) for r in results)  # one summation order on every rank


def compiled_tokens(mesh: Mesh, path: str):
    """Greedy tokens with the decode step compiled: the shm all-reduce is an op inside the graph."""
    model = load_model(open_checkpoint(path), mesh, torch.float32)
    fast_decode.enable(model, compile=True, cuda_graphs=False)
    tokens = [c.tokens for c in generate(model, mesh, BATCH, GREEDY, frozenset())]
    assert model.decode_step.compiled_runs > 0, "the compiled decode step never ran"
    return tokens


def test_compiled_decode_at_tp2_gives_tp1_tokens(tmp_path):
    path = write_meta(random_model(tiny_config(), seed=26), tmp_path / "m")
    _, want = logits_and_tokens(Mesh.single(), str(path))
    for shm in (True, False):  # the all-reduce inside the compiled graph, or gloo between graphs
        assert run_ranks(compiled_tokens, 2, str(path), shm=shm) == [want, want], shm


def _shm_collectives(mesh: Mesh):
    from llama3_dist.parallel.comm import all_gather, all_reduce, broadcast
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
    from llama3_dist.parallel.comm import all_reduce
    all_reduce(torch.ones(4), mesh.tp)
    if mesh.rank == 1:
        raise RuntimeError("injected failure on rank 1")
    all_reduce(torch.ones(4), mesh.tp)  # rank 0 waits for a peer that is gone


def test_shared_memory_notices_a_dead_peer():
    (ok0, err0, t0), (ok1, err1, _) = run_ranks(_die_in_shm, 2, shm=True, outcomes=True, timeout=60)
    assert not ok1 and "injected failure" in err1
    assert not ok0 and "has exited" in err0 and t0 < 30
