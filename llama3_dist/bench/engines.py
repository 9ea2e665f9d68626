"""The bench's workers: one engine (ours, transformers, gpt-fast, llama.cpp) timed in a process of its own.

Every engine gets the same prompt ids and decodes greedily; a worker prints one `BENCH {json}` line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import kernels
from ..assemble import assemble
from ..checkpoint import open_checkpoint
from ..checkpoint.synthetic import RandomCheckpoint
from ..config import DTYPES, SamplingParams, load_config
from ..generate import generate, warm_up
from ..log import peak_rss_bytes
from ..parallel.mesh import shutdown
from .convert import hf_model_from


def prompt_ids(vocab: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    """The same pseudo-random prompt ids for every engine (content does not change the speed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (batch, length), generator=g).tolist()


def open_bench_checkpoint(path: str, device: str):
    """A checkpoint path, or random:PRESET for random weights drawn on `device` (no file)."""
    if path.startswith("random:"):
        return RandomCheckpoint.preset(path.removeprefix("random:"), device)
    return open_checkpoint(path)


def run_ours(args) -> dict:
    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg = load_config(
        None,
        [
            f"parallel.tensor={world}",
            f"runtime.device={args.device}",
            f"runtime.dtype={args.dtype}",
            f"runtime.compile={str(args.compile).lower()}",
            f"runtime.cuda_graphs={str(args.graphs).lower()}",
            f"runtime.weights={args.weights}",
            f"runtime.activations={args.activations}",
        ],
    )  # float: the dense weights transformers and llama.cpp get; auto: a GGUF's blocks, as llama.cpp reads them
    ready = assemble(cfg, open_bench_checkpoint(args.checkpoint, args.device), tokenizer=False)
    mesh, model, ckpt = ready.mesh, ready.model, ready.ckpt
    prompts = prompt_ids(ckpt.args.vocab_size, args.batch, args.prompt_len)
    params = SamplingParams(args.new_tokens, temperature=0.0)
    warm_up(model, mesh, args.batch, args.prompt_len + args.new_tokens)
    generate(model, mesh, prompts, SamplingParams(2, temperature=0.0), frozenset())  # the timed prefill's shapes
    done = generate(model, mesh, prompts, params, frozenset())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if ckpt.args.tie_embeddings or mesh.world_size > 1:
        table = 0
    else:  # the untied embedding table is not read by a decode step, one row of it is
        table = model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    out = {
        "prefill_ms": done[0].prefill_ms,
        "decode_tok_s": done[0].decode_tokens_per_s * args.batch,
        "tokens": [c.tokens for c in done],
        "peak_rss": peak_rss_bytes(),
        "peak_gpu": peak_gpu_bytes(),
        "read_bytes_per_step": (weights - table) * mesh.world_size,
        "kv_bytes_per_step": kv_bytes(ckpt.args, args),
        "rank": mesh.rank,
        "kernels": kernels.variant() if mesh.device.type == "cpu" else None,
    }
    shutdown()
    return out


def kv_bytes(a, args) -> int:
    """KV cache bytes a decode step reads on average over the run (all ranks together)."""
    mean_len = args.prompt_len + args.new_tokens / 2
    return int(2 * a.n_layers * a.n_kv_heads * a.hd * mean_len * args.batch * DTYPES[args.dtype].itemsize)


def peak_gpu_bytes() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else None


def wait(device: str) -> None:
    """Let queued GPU work finish before a clock is read."""
    if device == "cuda":
        torch.cuda.synchronize()


def run_transformers(args) -> dict:
    hf = hf_model_from(open_bench_checkpoint(args.checkpoint, args.device), DTYPES[args.dtype], args.device)
    ids = torch.tensor(prompt_ids(hf.config.vocab_size, args.batch, args.prompt_len), device=args.device)
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up, at the timed prefill's shape
        wait(args.device)
        start = time.perf_counter()
        out = hf(ids, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        wait(args.device)
        prefill = time.perf_counter() - start
        past, tokens = out.past_key_values, [nxt]
        start = time.perf_counter()
        for _ in range(args.new_tokens - 1):
            out = hf(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
        wait(args.device)
        decode = time.perf_counter() - start
    return {
        "prefill_ms": prefill * 1e3,
        "decode_tok_s": (args.new_tokens - 1) * args.batch / decode,
        "tokens": torch.cat(tokens, 1).tolist(),
        "peak_rss": peak_rss_bytes(),
        "peak_gpu": peak_gpu_bytes(),
    }


def run_gpt_fast(args) -> dict:
    """gpt-fast (a checkout at --gpt-fast-dir) at the same shapes, the way its generate.py runs:
    its model with random weights (its own init), its inductor options, greedy (top_k=1) decode
    compiled with mode="reduce-overhead" and math attention. Its tokens are not comparable to ours
    (other weights); its speed is."""
    sys.path.insert(0, args.gpt_fast_dir)
    import generate as gf  # gpt-fast's generate.py: sets its inductor options on import
    from model import Transformer

    name = args.checkpoint.removeprefix("random:").replace("llama3", "llama-3")  # llama3-8b -> llama-3-8b
    B, T, N = args.batch, args.prompt_len, args.new_tokens
    with torch.device(args.device):
        model = Transformer.from_name(name).to(DTYPES[args.dtype]).eval()
        model.setup_caches(B, T + N)
    decode = torch.compile(gf.decode_one_token, mode="reduce-overhead", fullgraph=True)
    ids = torch.tensor(prompt_ids(model.config.vocab_size, B, T), device=args.device)

    def run() -> tuple[float, float, list]:
        with torch.inference_mode():
            wait(args.device)
            start = time.perf_counter()
            tok = gf.prefill(model, ids, torch.arange(T, device=args.device), temperature=1.0, top_k=1)
            wait(args.device)
            prefill = time.perf_counter() - start
            pos, tokens = torch.tensor([T], device=args.device), [tok]
            start = time.perf_counter()
            for _ in range(N - 1):
                with sdpa_kernel(SDPBackend.MATH):
                    tok, _ = decode(model, tok.view(B, -1), pos, temperature=1.0, top_k=1)
                pos += 1
                tok = tok.clone()  # as gpt-fast does: the graph's output is overwritten by its next replay
                tokens.append(tok)
            wait(args.device)
            return prefill, time.perf_counter() - start, tokens

    run()  # compiles
    prefill, decode_s, tokens = run()
    return {
        "prefill_ms": prefill * 1e3,
        "decode_tok_s": (N - 1) * B / decode_s,
        "tokens": torch.cat(tokens, 1).tolist(),
        "peak_rss": peak_rss_bytes(),
        "peak_gpu": peak_gpu_bytes(),
    }


def run_llama_cpp(args) -> dict:
    from llama_cpp import Llama

    llm = Llama(
        model_path=args.checkpoint,
        n_ctx=args.prompt_len + args.new_tokens + 8,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=512,
        verbose=False,
    )
    n_vocab = llm.n_vocab()

    def next_token() -> int:  # the last evaluated position's logits (llama.cpp computes only those)
        return int(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)).argmax())

    ids = prompt_ids(n_vocab, 1, args.prompt_len)[0]
    llm.eval(ids[:16])  # warm-up
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    nxt = next_token()
    prefill = time.perf_counter() - start
    tokens = [nxt]
    start = time.perf_counter()
    for _ in range(args.new_tokens - 1):
        llm.eval([nxt])
        nxt = next_token()
        tokens.append(nxt)
    decode = time.perf_counter() - start
    return {
        "prefill_ms": prefill * 1e3,
        "decode_tok_s": (args.new_tokens - 1) / decode,
        "tokens": [tokens],
        "peak_rss": peak_rss_bytes(),
    }


def worker(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m llama3_dist.bench")
    p.add_argument("engine")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--graphs", action="store_true", help="replay decode steps from CUDA graphs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--weights", default="float", help="ours: runtime.weights")
    p.add_argument("--activations", default="float", help="ours: runtime.activations")
    p.add_argument("--gpt-fast-dir")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engines = {"ours": run_ours, "transformers": run_transformers, "llama.cpp": run_llama_cpp, "gpt-fast": run_gpt_fast}
    result = engines[args.engine](args)
    if result.get("rank", 0) == 0:
        print("BENCH " + json.dumps(result), flush=True)
    return 0
