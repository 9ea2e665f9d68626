"""Generation on one rank: logits and greedy tokens == transformers' LlamaForCausalLM for every tiny variant
in every checkpoint format; ragged batches, stop tokens, seeded sampling, bfloat16."""

from __future__ import annotations

import pytest
import torch
from helpers.parity import GREEDY, TOL, hf_greedy, our_logits, our_model, prompts
from helpers.tiny import FORMATS

from llama3_dist.generate import SamplingParams, generate, sample
from llama3_dist.parallel.mesh import Mesh

PARITY_VARIANTS = ("9-3-heads", "gqa", "gqa-rope-scaling", "tied-mha")
# Meta's MP=2 layout needs the head counts to split evenly, which 9/3 heads do not.
CASES = [(f, c) for f in FORMATS for c in PARITY_VARIANTS if (f, c) != ("meta-mp2", "9-3-heads")]


@pytest.mark.parametrize(("fmt", "config"), CASES)
def test_logits_and_greedy_match_transformers(tiny, fmt, config):
    hf = tiny.model(config)
    model = our_model(tiny.path(config, fmt))
    tokens = prompts(hf.config.vocab_size)
    with torch.inference_mode():
        want = hf(tokens).logits
    got = our_logits(model, tokens)
    assert (got - want).abs().max().item() <= TOL
    prompt = tokens[0, :5].tolist()
    [done] = generate(model, Mesh.single(), [prompt], GREEDY, frozenset())
    assert done.tokens == hf_greedy(hf, prompt, GREEDY.max_new_tokens)
    assert done.finish_reason == "length"


def test_ragged_batch_equals_one_by_one(tiny_model, tiny_meta):
    model = our_model(tiny_meta)
    g = torch.Generator().manual_seed(7)
    batch = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    together = generate(model, Mesh.single(), batch, GREEDY, frozenset())
    alone = [generate(model, Mesh.single(), [p], GREEDY, frozenset())[0] for p in batch]
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    assert [c.tokens for c in alone] == [hf_greedy(tiny_model, p, GREEDY.max_new_tokens) for p in batch]


def test_stop_token_ends_a_row_and_is_excluded(tiny_meta):
    model = our_model(tiny_meta)
    prompt = [1, 2, 3]
    [free] = generate(model, Mesh.single(), [prompt], GREEDY, frozenset())
    stop = free.tokens[4]
    [stopped] = generate(model, Mesh.single(), [prompt], GREEDY, frozenset({stop}))
    assert stopped.finish_reason == "stop"
    assert stopped.tokens == free.tokens[: free.tokens.index(stop)]


def test_sampling_is_reproducible_with_a_seed(tiny_meta):
    model = our_model(tiny_meta)
    batch = [[5, 6, 7], [8, 9]]

    def run(seed):
        params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=seed)
        return [c.tokens for c in generate(model, Mesh.single(), batch, params, frozenset())]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_min_p_keeps_the_tokens_within_its_share_of_the_likeliest():
    """min_p (vLLM's, llama.cpp's): after temperature, a token survives if its probability is at least
    min_p times the likeliest one's; 4000 seeded draws from a known distribution hit those and only those."""
    probs = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])  # min_p 0.3: threshold 0.12, keeps 3
    logits = probs.log().repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    for min_p, kept in ((0.0, 6), (0.3, 3), (1.0, 1)):
        got = sample(logits, SamplingParams(temperature=1.0, top_p=1.0, min_p=min_p), g)
        assert set(got.tolist()) == set(range(kept)), (min_p, got.bincount())
    # temperature 2 flattens the shares to sqrt(p / 0.40): 0.06's 0.39 is in at min_p 0.35, 0.04's 0.32 out
    hot = sample(logits, SamplingParams(temperature=2.0, top_p=1.0, min_p=0.35), g)
    assert set(hot.tolist()) == set(range(5)), hot.bincount()


PENALTIES = {"presence_penalty": 0.7, "frequency_penalty": 1.3, "repetition_penalty": 1.6}


def penalized_greedy(model, prompt: list[int], n: int, presence: float, frequency: float, repetition: float):
    """Greedy tokens with the penalties written out per token from a full forward pass at each step
    (OpenAI's presence/frequency over generated tokens; HF's repetition over prompt and generated)."""
    seq, out = list(prompt), []
    for _ in range(n):
        z = our_logits(model, torch.tensor([seq]))[0, -1].double()
        for t in set(seq):
            z[t] = z[t] / repetition if z[t] > 0 else z[t] * repetition
        for t in set(out):
            z[t] -= frequency * out.count(t) + presence
        out.append(int(z.argmax()))
        seq.append(out[-1])
    return out


def test_presence_frequency_and_repetition_penalties(tiny_meta):
    model = our_model(tiny_meta)
    prompts = [[5, 6, 7, 5, 6], [9, 9, 9]]
    plain = [
        c.tokens for c in generate(model, Mesh.single(), prompts, SamplingParams(12, temperature=0.0), frozenset())
    ]
    params = SamplingParams(12, temperature=0.0, **PENALTIES)
    got = [c.tokens for c in generate(model, Mesh.single(), prompts, params, frozenset())]
    want = [penalized_greedy(model, p, 12, *PENALTIES.values()) for p in prompts]
    assert got == want
    assert got != plain  # the penalties changed something: the test can tell


def test_bfloat16_runs_close_to_float32(tiny_model, tiny_hf):
    tokens = prompts(tiny_model.config.vocab_size)
    full = our_logits(our_model(tiny_hf), tokens)
    half = our_model(tiny_hf, torch.bfloat16)
    assert half.tok_embeddings.weight.dtype == torch.bfloat16
    low = our_logits(half, tokens)
    assert low.dtype == torch.float32
    assert (low - full).abs().max().item() < 0.25 * full.abs().max().item()
