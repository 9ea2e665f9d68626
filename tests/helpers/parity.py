"""Probes shared by the parity tests: our model from a checkpoint, its logits, transformers' greedy tokens,
and the logits + greedy tokens of one mesh (run on every rank by run_ranks)."""

from __future__ import annotations

import torch

from llama3_dist.checkpoint import load_model, open_checkpoint
from llama3_dist.generate import SamplingParams, generate
from llama3_dist.parallel.mesh import Mesh

TOL = 1e-4  # fp32 max-abs logit difference against transformers, and across layouts
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)
BATCH = [[3, 14, 15, 92, 65], [35, 89], [79, 32, 38, 46, 26, 43, 38]]  # ragged


def prompts(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


def our_model(path, dtype=torch.float32):
    return load_model(open_checkpoint(path), Mesh.single(), dtype)


def our_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    B, T = tokens.shape
    model.setup_caches(B, T)
    with torch.inference_mode():
        return model(tokens, torch.arange(T).expand(B, T))


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        for _ in range(n):
            nxt = hf(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist()


def logits_and_tokens(mesh: Mesh, path: str, batch=BATCH, params=GREEDY):
    """This rank's full-vocab logits for the first prompt, and the greedy completions of the batch."""
    model = load_model(open_checkpoint(path), mesh, torch.float32)
    tokens = torch.tensor([batch[0]])
    model.setup_caches(1, tokens.shape[1])
    with torch.inference_mode():
        logits = model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0))
    done = generate(model, mesh, batch, params, frozenset())
    return logits, [c.tokens for c in done]
