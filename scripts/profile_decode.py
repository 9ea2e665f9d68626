"""Where a decode step's time goes: torch.profiler over a few decode steps, top ops by time.

    python scripts/profile_decode.py                                    # embedded SmolLM2, CPU
    python scripts/profile_decode.py --compile --weights auto --activations int8   # its Q4_1 blocks, int8 x
    python scripts/profile_decode.py --checkpoint random:llama3-8b --device cuda --dtype bfloat16 --compile

On CUDA the table is by GPU kernel time (CUDA graphs are left off, so each kernel is seen); the
step time with graphs on is printed beside it.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from llama3_dist import fast_decode
from llama3_dist.assemble import assemble
from llama3_dist.bench import open_bench_checkpoint, prompt_ids, wait
from llama3_dist.checkpoint import default_checkpoint
from llama3_dist.config import DTYPES, load_config


def step_ms(model, tok, pos, n: int, device: str) -> float:
    with torch.inference_mode():
        for _ in range(3):
            model(tok, pos)
        wait(device)
        start = time.perf_counter()
        for _ in range(n):
            model(tok, pos)
        wait(device)
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a checkpoint path or random:PRESET (default: the embedded SmolLM2)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step first")
    p.add_argument("--weights", default="float", help="runtime.weights: float, auto, int8, int4")
    p.add_argument("--activations", default="float", help="runtime.activations: float, int8")
    p.add_argument("--context", type=int, default=128, help="tokens already in the cache")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = open_bench_checkpoint(args.checkpoint or str(default_checkpoint()), args.device)
    cfg = load_config(
        None,
        [
            f"runtime.device={args.device}",
            f"runtime.dtype={args.dtype}",
            f"runtime.weights={args.weights}",
            f"runtime.activations={args.activations}",
            f"runtime.compile={str(args.compile).lower()}",
            "runtime.cuda_graphs=false",
        ],
    )
    model = assemble(cfg, ckpt, tokenizer=False).model
    model.setup_caches(1, args.context + 1)
    ids = torch.tensor(prompt_ids(ckpt.args.vocab_size, 1, args.context), device=args.device)
    with torch.inference_mode():
        model(ids, torch.arange(args.context, device=args.device)[None])
    tok, pos = ids[:, :1], torch.tensor([[args.context]], device=args.device)
    print(f"decode step: {step_ms(model, tok, pos, args.steps, args.device):.2f} ms")
    if args.device == "cuda":
        fast_decode.enable(model, args.compile, cuda_graphs=True)
        print(f"decode step with CUDA graphs: {step_ms(model, tok, pos, args.steps, args.device):.2f} ms")
        fast_decode.enable(model, args.compile, cuda_graphs=False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        for _ in range(args.steps):
            model(tok, pos)
        wait(args.device)
    key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))


if __name__ == "__main__":
    main()
