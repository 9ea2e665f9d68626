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

from .log import peak_rss_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Setting:
    name: str
    model: str  # "smollm2" or a synthetic preset name
    dtype: str
    batch: int
    engines: tuple[str, ...]  # ours, ours-tp2, transformers, llama.cpp


def settings(quick: bool) -> list[Setting]:
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


def hf_model_from(ckpt_path: str, dtype: torch.dtype):
    """transformers' LlamaForCausalLM holding exactly the weights our loader reads from ckpt_path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .checkpoint import load_model, open_checkpoint
    from .checkpoint.hf import meta_to_hf_rows
    from .parallel.mesh import Mesh
    ours = load_model(open_checkpoint(ckpt_path), Mesh.single(), dtype)
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
    with no_init_weights():
        hf = LlamaForCausalLM(cfg)

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
    del ours
    return hf.to(dtype).eval()


def run_ours(args) -> dict:
    from .checkpoint import load_model, open_checkpoint
    from .config import ParallelConfig
    from .generate import SamplingParams, generate, warm_up
    from .parallel.mesh import init_distributed, shutdown
    from .parallel.pipeline import stage_layer_ids
    world = int(os.environ.get("WORLD_SIZE", 1))
    mesh = init_distributed(world, 1)
    ckpt = open_checkpoint(args.checkpoint)
    model = load_model(ckpt, mesh, DTYPES[args.dtype], stage_layer_ids(ckpt.args, ParallelConfig(), mesh))
    prompts = prompt_ids(ckpt.args.vocab_size, args.batch, args.prompt_len)
    params = SamplingParams(args.new_tokens, temperature=0.0)
    if args.compile:
        model.compile_decode()
    warm_up(model, mesh, args.batch, args.prompt_len + args.new_tokens)
    done = generate(model, mesh, prompts, params, frozenset())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if ckpt.args.tie_embeddings or mesh.world_size > 1:
        table = 0
    else:  # the untied embedding table is not read by a decode step, one row of it is
        table = model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
    out = {"prefill_ms": done[0].prefill_ms, "decode_tok_s": done[0].decode_tokens_per_s * args.batch,
           "tokens": [c.tokens for c in done], "peak_rss": peak_rss_bytes(),
           "read_bytes_per_step": (weights - table) * mesh.world_size,
           "kv_bytes_per_step": kv_bytes(ckpt.args, args), "rank": mesh.rank}
    shutdown()
    return out


def kv_bytes(a, args) -> int:
    """KV cache bytes a decode step reads on average over the run (all ranks together)."""
    mean_len = args.prompt_len + args.new_tokens / 2
    return int(2 * a.n_layers * a.n_kv_heads * a.hd * mean_len * args.batch * DTYPES[args.dtype].itemsize)


def run_transformers(args) -> dict:
    hf = hf_model_from(args.checkpoint, DTYPES[args.dtype])
    ids = torch.tensor(prompt_ids(hf.config.vocab_size, args.batch, args.prompt_len))
    with torch.inference_mode():
        hf.generate(ids[:, :16], max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = hf(ids, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        prefill = time.perf_counter() - start
        past, tokens = out.past_key_values, [nxt]
        start = time.perf_counter()
        for _ in range(args.new_tokens - 1):
            out = hf(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
        decode = time.perf_counter() - start
    return {"prefill_ms": prefill * 1e3, "decode_tok_s": (args.new_tokens - 1) * args.batch / decode,
            "tokens": torch.cat(tokens, 1).tolist(), "peak_rss": peak_rss_bytes()}


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
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"ours": run_ours, "transformers": run_transformers, "llama.cpp": run_llama_cpp}[args.engine](args)
    if result.get("rank", 0) == 0:
        print("BENCH " + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------- orchestration

def read_bandwidth(seconds: float = 1.5) -> float:
    """Best bytes/s seen streaming 1 GiB from memory: torch's sum, and the decode kernel where it is built."""
    from . import kernels
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


def launch(engine: str, ckpt: str, s: Setting, args) -> dict:
    """One worker process (torchrun with 2 ranks x 1 thread for ours-tp2); its BENCH line as a dict."""
    common = ["--checkpoint", ckpt, "--dtype", s.dtype, "--batch", str(s.batch),
              "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
    if engine.startswith("ours") and not args.eager:
        common.append("--compile")
    if engine == "ours-tp2":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "llama3_dist.bench", "ours", *common, "--threads", "1"]
    else:
        cmd = [sys.executable, "-m", "llama3_dist.bench", engine, *common, "--threads", str(args.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, stdin=subprocess.DEVNULL)
    line = next((x for x in r.stdout.splitlines() if x.startswith("BENCH ")), None)
    if r.returncode != 0 or line is None:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"{engine} failed: {tail}"}
    return json.loads(line[len("BENCH "):])


def checkpoint_for(s: Setting, engine: str, work: Path) -> str | None:
    from .checkpoint import default_checkpoint
    from .checkpoint.synthetic import PRESETS, TIED, write_random_meta
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
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        for s in settings(args.quick):
            bandwidth = read_bandwidth()  # per setting: it drifts during a run on a shared machine
            results = {}
            for engine in s.engines:
                if engine == "llama.cpp" and not have_llama_cpp():
                    continue
                ckpt = checkpoint_for(s, engine, Path(tmp))
                if ckpt is not None:
                    results[engine] = launch(engine, ckpt, s, args)
            rows.append(summarize(s, results, bandwidth, args))
    return rows


def summarize(s: Setting, results: dict, bandwidth: float, args) -> dict:
    ours = results.get("ours", {})
    row = {"setting": s.name, "dtype": s.dtype, "batch": s.batch, "bandwidth_gb_s": bandwidth / 1e9,
           "engines": {}}
    for engine, r in results.items():
        if "error" in r:
            row["engines"][engine] = r
            continue
        e = {k: r[k] for k in ("prefill_ms", "decode_tok_s", "peak_rss")}
        if "read_bytes_per_step" in r:
            per_step = r["read_bytes_per_step"] + r["kv_bytes_per_step"]
            roof = bandwidth / per_step * s.batch
            e["roofline_pct"] = 100 * r["decode_tok_s"] / roof
        if engine != "ours" and "decode_tok_s" in ours:
            e["ours_decode_ratio"] = ours["decode_tok_s"] / r["decode_tok_s"]
            e["ours_prefill_ratio"] = r["prefill_ms"] / ours["prefill_ms"]
            e["same_tokens"] = r["tokens"] == ours["tokens"]
        row["engines"][engine] = e
    return row


def table(rows: list[dict]) -> str:
    head = ["setting", "engine", "prefill ms", "decode tok/s", "ours/peer decode", "ours/peer prefill",
            "% roofline", "peak RSS MiB", "same tokens"]
    body = []
    for row in rows:
        for engine, e in row["engines"].items():
            if "error" in e:
                body.append([row["setting"], engine, e["error"], "", "", "", "", "", ""])
                continue
            body.append([row["setting"], engine, f"{e['prefill_ms']:.1f}", f"{e['decode_tok_s']:.1f}",
                         f"{e['ours_decode_ratio']:.2f}x" if "ours_decode_ratio" in e else "",
                         f"{e['ours_prefill_ratio']:.2f}x" if "ours_prefill_ratio" in e else "",
                         f"{e['roofline_pct']:.0f}%" if "roofline_pct" in e else "",
                         f"{e['peak_rss'] / 2**20:.0f}" if e.get("peak_rss") else "",
                         {True: "yes", False: "no"}.get(e.get("same_tokens"), "")])
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *body]]
    if rows:
        gbs = ", ".join(f"{r['bandwidth_gb_s']:.1f}" for r in rows)
        lines.append(f"read bandwidth measured before each setting (GB/s): {gbs}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
