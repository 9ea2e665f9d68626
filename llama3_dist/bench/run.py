"""`llama3-dist bench`: llama3_dist against transformers (and llama.cpp when installed), same run, same weights.

Each measurement runs in its own process (torchrun for TP=2), so peak RSS and thread counts are
those of that engine alone. Every engine gets the same prompt ids and decodes greedily. The read
bandwidth of this machine is measured in the same run: it varies from run to run here, and the
roofline (bytes read per decode step / bandwidth) is only meaningful against today's figure.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import kernels
from ..errors import UserError
from .convert import checkpoint_for


@dataclass
class Setting:
    name: str
    model: str  # "smollm2" or a synthetic preset name
    dtype: str
    batch: int
    engines: tuple[str, ...]  # ours, ours-tp2, ours-graphs, ours-eager, transformers, llama.cpp
    file_format: str | None = None  # a GGUF block format every engine reads as is (ours: runtime.weights=auto)
    activations: str = "float"  # ours: runtime.activations (int8: rounded as llama.cpp's CPU backend rounds them)


def settings(quick: bool, device: str = "cpu") -> list[Setting]:
    if device == "cuda":  # random weights at Llama 3 8B's real widths, all 32 layers, drawn on the GPU
        return [
            Setting(
                "Llama-3-8B shape bf16 b1",
                "llama3-8b",
                "bfloat16",
                1,
                ("ours", "ours-graphs", "ours-eager", "transformers", "gpt-fast"),
            )
        ]
    both = ("ours", "transformers", "llama.cpp")
    full = [
        Setting("SmolLM2 fp32 b1", "smollm2", "float32", 1, both),
        Setting("SmolLM2 bf16 b1", "smollm2", "bfloat16", 1, both),
        Setting("SmolLM2 fp32 b8", "smollm2", "float32", 8, ("ours", "transformers")),
        Setting("SmolLM2 bf16 b8", "smollm2", "bfloat16", 8, ("ours", "transformers")),
        Setting("SmolLM2 bf16 b1 TP", "smollm2", "bfloat16", 1, ("ours", "ours-tp2")),
        Setting("Llama-3.2-1B shape bf16 b1", "llama3.2-1b", "bfloat16", 1, ("ours", "ours-tp2", "transformers")),
        Setting("SmolLM2 Q4_1 file b1", "smollm2", "float32", 1, ("ours", "llama.cpp"), file_format="Q4_1"),
        Setting("SmolLM2 Q8_0 file b1", "smollm2", "float32", 1, ("ours", "llama.cpp"), file_format="Q8_0"),
        Setting("SmolLM2 Q4_1 file b1 int8-act", "smollm2", "float32", 1, ("ours", "llama.cpp"), "Q4_1", "int8"),
        Setting("SmolLM2 Q8_0 file b1 int8-act", "smollm2", "float32", 1, ("ours", "llama.cpp"), "Q8_0", "int8"),
    ]
    return full[:1] if quick else full


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
        readers += [
            lambda: kernels.gemv(torch.ones(1, 2**12), w32),
            lambda: kernels.gemv(torch.ones(1, 2**13, dtype=torch.bfloat16), w16),
        ]
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
    common = [
        "--checkpoint",
        ckpt,
        "--dtype",
        s.dtype,
        "--batch",
        str(s.batch),
        "--device",
        device,
        "--prompt-len",
        str(args.prompt_len),
        "--new-tokens",
        str(args.new_tokens),
    ]
    if engine in ("ours", "ours-tp2") and not args.eager:
        common.append("--compile")
    if s.file_format is not None:
        common += ["--weights", "auto"]
    if s.activations != "float" and engine.startswith("ours"):
        common += ["--activations", s.activations]
    if engine in ("ours", "ours-graphs") and device == "cuda":
        common.append("--graphs")
    if engine == "gpt-fast":
        common += ["--gpt-fast-dir", str(Path(args.gpt_fast).resolve())]
    if engine == "ours-tp2":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "llama3_dist.bench",
            "ours",
            *common,
            "--threads",
            "1",
        ]
    else:
        worker_engine = "ours" if engine.startswith("ours") else engine
        cmd = [sys.executable, "-m", "llama3_dist.bench", worker_engine, *common, "--threads", str(args.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, stdin=subprocess.DEVNULL)
    line = next((x for x in r.stdout.splitlines() if x.startswith("BENCH ")), None)
    if r.returncode != 0 or line is None:
        return {"error": f"{engine} failed: {failure(r)}"}
    return json.loads(line[len("BENCH ") :])


def failure(r: subprocess.CompletedProcess) -> str:
    """Why a worker gave no result: the last line of its stderr, or the signal that ended it."""
    if r.returncode < 0:
        sig = signal.Signals(-r.returncode).name
        if sig == "SIGILL":
            return "killed by SIGILL (an instruction this CPU lacks or has not enabled: rebuild it for this machine)"
        return f"killed by {sig}"
    return (r.stderr.strip().splitlines() or [f"exit code {r.returncode}, no output"])[-1]


def have_llama_cpp() -> bool:
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
        raise UserError(
            f"bench --gpt-fast {gpt_fast}: no generate.py there; give a gpt-fast checkout "
            f"(github.com/pytorch-labs/gpt-fast)"
        )
    if getattr(args, "rounds", 1) < 1:
        raise UserError(f"bench --rounds {args.rounds}: give 1 or more")
    chosen = settings(args.quick, device)
    only = getattr(args, "only", None)
    if only:
        named = [s for s in chosen if only.lower() == s.name.lower()]  # a full name: that one setting
        chosen = named or [s for s in chosen if only.lower() in s.name.lower()]
        if not chosen:
            names = ", ".join(s.name for s in settings(False, device))
            raise UserError(f"bench --only {only}: no setting's name contains it; the settings: {names}")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        for s in chosen:
            ckpts = {}
            for engine in s.engines:
                if engine == "llama.cpp" and not have_llama_cpp():
                    continue
                if engine == "gpt-fast" and not gpt_fast:
                    continue
                ckpt = checkpoint_for(s.model, s.dtype, engine, Path(tmp), device, s.file_format)
                if ckpt is not None:
                    ckpts[engine] = ckpt
            results: dict[str, dict] = {}
            bandwidth = 0.0
            for _ in range(getattr(args, "rounds", 1)):  # engines in rotation: each round sees the same machine
                # read before each round: it drifts on a shared machine, and the best rates meet the best moments
                bandwidth = max(bandwidth, read_bandwidth(device=device))
                for engine, ckpt in ckpts.items():
                    results[engine] = best_of(results.get(engine), launch(engine, ckpt, s, args))
            rows.append(summarize(s, results, bandwidth, args))
    return rows


def best_of(kept: dict | None, new: dict) -> dict:
    """An engine's result over rounds: the round with the best decode rate, with the best prefill of any
    round (a shared machine only ever slows a run down); a failed round counts only if every round failed."""
    if kept is None or "error" in kept:
        return new
    if "error" in new:
        return kept
    best = dict(new if new["decode_tok_s"] > kept["decode_tok_s"] else kept)
    best["prefill_ms"] = min(kept["prefill_ms"], new["prefill_ms"])
    return best


def summarize(s: Setting, results: dict, bandwidth: float, args) -> dict:
    ours = results.get("ours", {})
    row = {
        "setting": s.name,
        "dtype": s.dtype,
        "batch": s.batch,
        "bandwidth_gb_s": bandwidth / 1e9,
        "cpu_isa": kernels.isa_summary(),
        "kernels": ours.get("kernels"),
        "engines": {},
    }
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
    head = [
        "setting",
        "engine",
        "prefill ms",
        "decode tok/s",
        "ours/peer decode",
        "ours/peer prefill",
        "% roofline",
        "peak RSS MiB",
        "same tokens",
    ]
    gpu = any(e.get("peak_gpu") for row in rows for e in row["engines"].values())
    if gpu:
        head.insert(-1, "peak GPU MiB")
    body = []
    for row in rows:
        for engine, e in row["engines"].items():
            if "error" in e:
                body.append([row["setting"], engine, e["error"], *[""] * (len(head) - 3)])
                continue
            body.append(
                [
                    row["setting"],
                    engine,
                    f"{e['prefill_ms']:.1f}",
                    f"{e['decode_tok_s']:.1f}",
                    f"{e['ours_decode_ratio']:.2f}x" if "ours_decode_ratio" in e else "",
                    f"{e['ours_prefill_ratio']:.2f}x" if "ours_prefill_ratio" in e else "",
                    f"{e['roofline_pct']:.0f}%" if "roofline_pct" in e else "",
                    f"{e['peak_rss'] / 2**20:.0f}" if e.get("peak_rss") else "",
                    *([f"{e['peak_gpu'] / 2**20:.0f}" if e.get("peak_gpu") else ""] if gpu else []),
                    same(e),
                ]
            )
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *body]]
    if rows:
        gbs = ", ".join(f"{r['bandwidth_gb_s']:.1f}" for r in rows)
        lines.append(f"read bandwidth per setting, the best of those measured before each round (GB/s): {gbs}")
        lines.append(
            f"CPU instruction sets: {rows[0]['cpu_isa']}; decode kernels: "
            f"{', '.join(sorted({str(r['kernels']) for r in rows}))}"
        )
    return "\n".join(lines)
