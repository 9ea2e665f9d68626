"""`llama3-dist bench`: llama3_dist against transformers (and llama.cpp when installed), same run, same weights.

Each measurement runs in its own process (torchrun for TP=2), so peak RSS and thread counts are
those of that engine alone. Every engine gets the same prompt ids and decodes greedily. The read
bandwidth of this machine is measured in the same run: it varies from run to run here, and the
roofline (bytes read per decode step / bandwidth) is only meaningful against today's figure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import kernels
from .errors import UserError
from .log import peak_rss_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Setting:
    name: str
    model: str  # "smollm2" or a synthetic preset name
    dtype: str
    batch: int
    engines: tuple[str, ...]  # ours, ours-tp2, ours-graphs, ours-eager, transformers, llama.cpp


def settings(quick: bool, device: str = "cpu") -> list[Setting]:
    if device == "cuda":  # random weights at Llama 3 8B's real widths, all 32 layers, drawn on the GPU
        return [Setting("Llama-3-8B shape bf16 b1", "llama3-8b", "bfloat16", 1,
                        ("ours", "ours-graphs", "ours-eager", "transformers", "gpt-fast"))]
    both = ("ours", "transformers", "llama.cpp")
    full = [
        Setting("SmolLM2 fp32 b1", "smollm2", "float32", 1, both),
        Setting("SmolLM2 bf16 b1", "smollm2", "bfloat16", 1, both),
        Setting("SmolLM2 fp32 b8", "smollm2", "float32", 8, ("ours", "transformers")),
        Setting("SmolLM2 bf16 b8", "smollm2", "bfloat16", 8, ("ours", "transformers")),
        Setting("SmolLM2 bf16 b1 TP", "smollm2", "bfloat16", 1, ("ours", "ours-tp2")),
        Setting("Llama-3.2-1B shape bf16 b1", "llama3.2-1b", "bfloat16", 1, ("ours", "ours-tp2", "transformers")),
    ]
    return full[:1] if quick else full


# ---------------------------------------------------------------- workers (one engine, one process)

def prompt_ids(vocab: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    """The same pseudo-random prompt ids for every engine (content does not change the speed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (batch, length), generator=g).tolist()


def open_bench_checkpoint(path: str, device: str):
    """A checkpoint path, or random:PRESET for random weights drawn on `device` (no file)."""
    from .checkpoint import open_checkpoint
    from .checkpoint.synthetic import RandomCheckpoint
    if path.startswith("random:"):
        return RandomCheckpoint.preset(path.removeprefix("random:"), device)
    return open_checkpoint(path)


def hf_model_from(ckpt, dtype: torch.dtype, device: str = "cpu"):
    """transformers' LlamaForCausalLM on `device` holding exactly the weights our loader reads from ckpt.

    It is built under `dtype` as the default dtype, as from_pretrained(torch_dtype=...) builds it,
    so its rotary inverse frequencies stay float32.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from .checkpoint import load_model
    from .checkpoint.hf import meta_to_hf_rows
    from .parallel.mesh import Mesh
    ours = load_model(ckpt, Mesh.single(device), dtype)
    a = ours.args
    rope = {"rope_type": "default", "rope_theta": a.rope_theta}
    if a.rope_scaling is not None:
        s = a.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": a.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    cfg = LlamaConfig(hidden_size=a.dim, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
                      num_key_value_heads=a.n_kv_heads, intermediate_size=a.hidden_dim, vocab_size=a.vocab_size,
                      rms_norm_eps=a.norm_eps, tie_word_embeddings=a.tie_embeddings, rope_parameters=rope,
                      max_position_embeddings=a.max_position_embeddings or 8192)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), torch.device(device):
            hf = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)

    sd = {"model.embed_tokens.weight": ours.tok_embeddings.weight, "model.norm.weight": ours.norm.weight}
    if not a.tie_embeddings:
        sd["lm_head.weight"] = ours.output.weight
    for i, layer in ours.layers.items():
        p, at, ff = f"model.layers.{i}.", layer.attention, layer.feed_forward
        wq, wk, wv = at.wqkv.weight.split(at.wqkv.sizes)
        w1, w3 = ff.w13.weight.split(ff.w13.sizes)
        sd.update({p + "self_attn.q_proj.weight": meta_to_hf_rows(wq, a.n_heads),
                   p + "self_attn.k_proj.weight": meta_to_hf_rows(wk, a.n_kv_heads),
                   p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": at.wo.weight,
                   p + "mlp.gate_proj.weight": w1, p + "mlp.up_proj.weight": w3,
                   p + "mlp.down_proj.weight": ff.w2.weight, p + "input_layernorm.weight": layer.attention_norm.weight,
                   p + "post_attention_layernorm.weight": layer.ffn_norm.weight})
    hf.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=not a.tie_embeddings)
    if a.tie_embeddings:
        hf.tie_weights()
    del ours, sd
    return hf.eval()


def run_ours(args) -> dict:
    from .checkpoint import load_model
    from .config import ParallelConfig
    from .generate import SamplingParams, generate, warm_up
    from .parallel.mesh import init_distributed, shutdown
    from .parallel.pipeline import stage_layer_ids
    world = int(os.environ.get("WORLD_SIZE", 1))
    mesh = init_distributed(world, 1, device=args.device)
    ckpt = open_bench_checkpoint(args.checkpoint, mesh.device)
    model = load_model(ckpt, mesh, DTYPES[args.dtype], stage_layer_ids(ckpt.args, ParallelConfig(), mesh))
    prompts = prompt_ids(ckpt.args.vocab_size, args.batch, args.prompt_len)
    params = SamplingParams(args.new_tokens, temperature=0.0)
    if args.compile:
        model.compile_decode()
    if args.graphs:
        model.use_cuda_graphs()
    warm_up(model, mesh, args.batch, args.prompt_len + args.new_tokens)
    generate(model, mesh, prompts, SamplingParams(2, temperature=0.0), frozenset())  # the timed prefill's shapes
    done = generate(model, mesh, prompts, params, frozenset())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if ckpt.args.tie_embeddings or mesh.world_size > 1:
        table = 0
    else:  # the untied embedding table is not read by a decode step, one row of it is
        table = model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    out = {"prefill_ms": done[0].prefill_ms, "decode_tok_s": done[0].decode_tokens_per_s * args.batch,
           "tokens": [c.tokens for c in done], "peak_rss": peak_rss_bytes(), "peak_gpu": peak_gpu_bytes(),
           "read_bytes_per_step": (weights - table) * mesh.world_size,
           "kv_bytes_per_step": kv_bytes(ckpt.args, args), "rank": mesh.rank,
           "kernels": kernels.variant() if mesh.device.type == "cpu" else None}
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
    return {"prefill_ms": prefill * 1e3, "decode_tok_s": (args.new_tokens - 1) * args.batch / decode,
            "tokens": torch.cat(tokens, 1).tolist(), "peak_rss": peak_rss_bytes(), "peak_gpu": peak_gpu_bytes()}


def run_gpt_fast(args) -> dict:
    """gpt-fast (a checkout at --gpt-fast-dir) at the same shapes, the way its generate.py runs:
    its model with random weights (its own init), its inductor options, greedy (top_k=1) decode
    compiled with mode="reduce-overhead" and math attention. Its tokens are not comparable to ours
    (other weights); its speed is."""
    sys.path.insert(0, args.gpt_fast_dir)
    import generate as gf  # gpt-fast's generate.py: sets its inductor options on import
    from model import Transformer
    from torch.nn.attention import SDPBackend, sdpa_kernel
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
    return {"prefill_ms": prefill * 1e3, "decode_tok_s": (N - 1) * B / decode_s,
            "tokens": torch.cat(tokens, 1).tolist(), "peak_rss": peak_rss_bytes(), "peak_gpu": peak_gpu_bytes()}


def write_dense_gguf(ckpt_path: str, dtype: str, out: Path) -> Path:
    """The same weights as a dense F32/BF16 llama GGUF for llama.cpp (tokenizer copied from a GGUF source)."""
    import gguf
    import numpy as np

    from .checkpoint import load_model, meta_state, open_checkpoint
    from .checkpoint.gguf import gguf_name
    from .parallel.mesh import Mesh
    ckpt = open_checkpoint(ckpt_path)
    a = ckpt.args
    model = load_model(ckpt, Mesh.single(), torch.float32)
    w = gguf.GGUFWriter(out, arch="llama")
    for key, value in ((gguf.Keys.LLM.BLOCK_COUNT, a.n_layers), (gguf.Keys.LLM.EMBEDDING_LENGTH, a.dim),
                       (gguf.Keys.LLM.FEED_FORWARD_LENGTH, a.hidden_dim), (gguf.Keys.LLM.CONTEXT_LENGTH, 8192),
                       (gguf.Keys.Attention.HEAD_COUNT, a.n_heads), (gguf.Keys.Attention.HEAD_COUNT_KV, a.n_kv_heads),
                       (gguf.Keys.LLM.VOCAB_SIZE, a.vocab_size), (gguf.Keys.Rope.DIMENSION_COUNT, a.hd)):
        w.add_uint32(key.format(arch="llama"), value)
    w.add_float32(gguf.Keys.Rope.FREQ_BASE.format(arch="llama"), a.rope_theta)
    w.add_float32(gguf.Keys.Attention.LAYERNORM_RMS_EPS.format(arch="llama"), a.norm_eps)
    src = gguf.GGUFReader(ckpt_path)
    for key, field in src.fields.items():
        if key.startswith("tokenizer."):
            value = field.contents()
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, value, vtype, sub_type=sub)
    for name, p in meta_state(model):
        gname = gguf_name(name)
        data = p.detach().numpy().astype(np.float32)
        if dtype == "bfloat16" and data.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16),
                         raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(gname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def run_llama_cpp(args) -> dict:
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(model_path=args.checkpoint, n_ctx=args.prompt_len + args.new_tokens + 8, n_threads=args.threads,
                n_threads_batch=args.threads, n_batch=512, verbose=False)
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
    return {"prefill_ms": prefill * 1e3, "decode_tok_s": (args.new_tokens - 1) / decode, "tokens": [tokens],
            "peak_rss": peak_rss_bytes()}


def worker(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
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
    p.add_argument("--gpt-fast-dir")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engines = {"ours": run_ours, "transformers": run_transformers, "llama.cpp": run_llama_cpp, "gpt-fast": run_gpt_fast}
    result = engines[args.engine](args)
    if result.get("rank", 0) == 0:
        print("BENCH " + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------- orchestration

def read_bandwidth(seconds: float = 1.5, device: str = "cpu") -> float:
    """Best bytes/s seen streaming 1 GiB from memory: torch's sum, and the decode kernel where it is built.

    On a GPU: torch's sum over 4 GiB of HBM.
    """
    if device == "cuda":
        return _gpu_read_bandwidth(seconds)
    x = torch.ones(256 * 2**20, dtype=torch.float32)
    readers = [lambda: x.sum()]
    if kernels.load() is not None:  # the kernel's fp32 and bf16 streams, over the same 1 GiB
        w32, w16 = x.view(2**16, 2**12), x.view(torch.bfloat16).view(2**16, 2**13)
        readers += [lambda: kernels.gemv(torch.ones(1, 2**12), w32),
                    lambda: kernels.gemv(torch.ones(1, 2**13, dtype=torch.bfloat16), w16)]
    best = 0.0
    for read in readers:
        read()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            read()
            best = max(best, x.numel() * 4 / (time.perf_counter() - t))
    return best


def _gpu_read_bandwidth(seconds: float) -> float:
    x = torch.ones(2**30, dtype=torch.float32, device="cuda")
    best = 0.0
    x.sum()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x.sum()
        stop.record()
        stop.synchronize()
        best = max(best, x.numel() * 4 / (start.elapsed_time(stop) / 1e3))
    del x
    torch.cuda.empty_cache()
    return best


def launch(engine: str, ckpt: str, s: Setting, args) -> dict:
    """One worker process (torchrun with 2 ranks x 1 thread for ours-tp2); its BENCH line as a dict.

    ours: compiled (unless --eager) and, on CUDA, CUDA-graphed; ours-graphs: graphed, not compiled;
    ours-eager: neither.
    """
    device = getattr(args, "device", "cpu")
    common = ["--checkpoint", ckpt, "--dtype", s.dtype, "--batch", str(s.batch), "--device", device,
              "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
    if engine in ("ours", "ours-tp2") and not args.eager:
        common.append("--compile")
    if engine in ("ours", "ours-graphs") and device == "cuda":
        common.append("--graphs")
    if engine == "gpt-fast":
        common += ["--gpt-fast-dir", str(Path(args.gpt_fast).resolve())]
    if engine == "ours-tp2":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "llama3_dist.bench", "ours", *common, "--threads", "1"]
    else:
        worker_engine = "ours" if engine.startswith("ours") else engine
        cmd = [sys.executable, "-m", "llama3_dist.bench", worker_engine, *common, "--threads", str(args.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, stdin=subprocess.DEVNULL)
    line = next((x for x in r.stdout.splitlines() if x.startswith("BENCH ")), None)
    if r.returncode != 0 or line is None:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{engine} failed: {tail}"}
    return json.loads(line[len("BENCH "):])


def checkpoint_for(s: Setting, engine: str, work: Path, device: str = "cpu") -> str | None:
    from .checkpoint import default_checkpoint
    from .checkpoint.synthetic import PRESETS, TIED, write_random_meta
    if device == "cuda":  # drawn on the GPU by each worker: 16 GB of 8B weights never touch the disk
        return f"random:{s.model}"
    if s.model == "smollm2":
        src = str(default_checkpoint())
        if engine == "llama.cpp":
            out = work / f"smollm2-{s.dtype}.gguf"
            return str(out if out.exists() else write_dense_gguf(src, s.dtype, out))
        return src
    if engine == "llama.cpp":
        return None
    out = work / s.model
    if not (out / "params.json").exists():
        write_random_meta(out, PRESETS[s.model], dtype=torch.bfloat16, tied=s.model in TIED)
    return str(out)


def have_llama_cpp() -> bool:
    import importlib.util
    return importlib.util.find_spec("llama_cpp") is not None


def run_bench(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    device = getattr(args, "device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("bench --device cuda: CUDA is not available here; run it on a GPU machine")
    gpt_fast = getattr(args, "gpt_fast", None)
    if gpt_fast and device != "cuda":
        raise UserError("bench --gpt-fast: gpt-fast is a GPU peer; add --device cuda")
    if gpt_fast and not (Path(gpt_fast) / "generate.py").is_file():
        raise UserError(f"bench --gpt-fast {gpt_fast}: no generate.py there; give a gpt-fast checkout "
                        f"(github.com/pytorch-labs/gpt-fast)")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        for s in settings(args.quick, device):
            bandwidth = read_bandwidth(device=device)  # per setting: it drifts during a run on a shared machine
            results = {}
            for engine in s.engines:
                if engine == "llama.cpp" and not have_llama_cpp():
                    continue
                if engine == "gpt-fast" and not gpt_fast:
                    continue
                ckpt = checkpoint_for(s, engine, Path(tmp), device)
                if ckpt is not None:
                    results[engine] = launch(engine, ckpt, s, args)
            rows.append(summarize(s, results, bandwidth, args))
    return rows


def summarize(s: Setting, results: dict, bandwidth: float, args) -> dict:
    ours = results.get("ours", {})
    row = {"setting": s.name, "dtype": s.dtype, "batch": s.batch, "bandwidth_gb_s": bandwidth / 1e9,
           "cpu_isa": kernels.isa_summary(), "kernels": ours.get("kernels"), "engines": {}}
    for engine, r in results.items():
        if "error" in r:
            row["engines"][engine] = r
            continue
        e = {k: r.get(k) for k in ("prefill_ms", "decode_tok_s", "peak_rss", "peak_gpu")}
        if "read_bytes_per_step" in r:
            per_step = r["read_bytes_per_step"] + r["kv_bytes_per_step"]
            roof = bandwidth / per_step * s.batch
            e["roofline_pct"] = 100 * r["decode_tok_s"] / roof
        if engine != "ours" and "decode_tok_s" in ours:
            e["ours_decode_ratio"] = ours["decode_tok_s"] / r["decode_tok_s"]
            e["ours_prefill_ratio"] = r["prefill_ms"] / ours["prefill_ms"]
        if engine not in ("ours", "gpt-fast") and "tokens" in ours:  # gpt-fast runs weights of its own
            e["same_tokens"] = r["tokens"] == ours["tokens"]
            e["common_prefix"] = min(common_prefix(a, b) for a, b in zip(r["tokens"], ours["tokens"]))
        row["engines"][engine] = e
    return row


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def same(e: dict) -> str:
    """'yes', or where the tokens part ways ('from token 7'), or '' (not compared)."""
    if "same_tokens" not in e:
        return ""
    return "yes" if e["same_tokens"] else f"from token {e['common_prefix']}"


def table(rows: list[dict]) -> str:
    head = ["setting", "engine", "prefill ms", "decode tok/s", "ours/peer decode", "ours/peer prefill",
            "% roofline", "peak RSS MiB", "same tokens"]
    gpu = any(e.get("peak_gpu") for row in rows for e in row["engines"].values())
    if gpu:
        head.insert(-1, "peak GPU MiB")
    body = []
    for row in rows:
        for engine, e in row["engines"].items():
            if "error" in e:
                body.append([row["setting"], engine, e["error"], *[""] * (len(head) - 3)])
                continue
            body.append([row["setting"], engine, f"{e['prefill_ms']:.1f}", f"{e['decode_tok_s']:.1f}",
                         f"{e['ours_decode_ratio']:.2f}x" if "ours_decode_ratio" in e else "",
                         f"{e['ours_prefill_ratio']:.2f}x" if "ours_prefill_ratio" in e else "",
                         f"{e['roofline_pct']:.0f}%" if "roofline_pct" in e else "",
                         f"{e['peak_rss'] / 2**20:.0f}" if e.get("peak_rss") else "",
                         *([f"{e['peak_gpu'] / 2**20:.0f}" if e.get("peak_gpu") else ""] if gpu else []),
                         same(e)])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *body]]
    if rows:
        gbs = ", ".join(f"{r['bandwidth_gb_s']:.1f}" for r in rows)
        lines.append(f"read bandwidth measured before each setting (GB/s): {gbs}")
        lines.append(f"CPU instruction sets: {rows[0]['cpu_isa']}; decode kernels: "
                     f"{', '.join(sorted({str(r['kernels']) for r in rows}))}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
