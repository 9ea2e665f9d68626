"""`llama3-dist generate`: argparse, config, distributed setup, and the only place that prints.

Results go to stdout on rank 0 only; diagnostics go to stderr; a user error is one stderr line
and exit code 2 on every rank that hits it, never a traceback or a hang.
"""
from __future__ import annotations

import argparse
import codecs
import json
import logging
import os
import sys

from .config import DTYPES, Config, load_config
from .errors import UserError

log = logging.getLogger("llama3_dist")

# CLI flag -> config key; a flag is sugar for --set and is applied after the --set list.
FLAG_KEYS = {
    "checkpoint": "model.checkpoint", "tokenizer": "model.tokenizer",
    "max_new_tokens": "generate.max_new_tokens", "temperature": "generate.temperature",
    "top_p": "generate.top_p", "top_k": "generate.top_k", "seed": "generate.seed",
    "dtype": "runtime.dtype",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama3-dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from one or more prompts")
    g.add_argument("--config", help="YAML config (see configs/)")
    g.add_argument("--checkpoint", help="Meta dir, Hugging Face dir or .gguf file (default: embedded SmolLM2-135M)")
    g.add_argument("--tokenizer", help="tokenizer override: tokenizer.model, an HF dir or a .gguf")
    g.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int, help="0 = off")
    g.add_argument("--seed", type=int, help="makes sampling reproducible")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    g.add_argument("--dtype", choices=sorted(DTYPES))
    g.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout, nothing else")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. parallel.tensor=2 (repeatable)")
    g.add_argument("-v", "--verbose", action="store_true", help="every rank logs (memory after loading, ...)")
    pl = sub.add_parser("plan", help="memory per rank for a config, from the real sharded modules")
    pl.add_argument("--config", help="YAML config (see configs/)")
    pl.add_argument("--checkpoint", help="read the architecture from a checkpoint instead of model.preset")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pl.add_argument("--device-memory", help="memory per device, e.g. 80GiB: adds a fits column")
    pl.add_argument("--json", action="store_true", help="one JSON array on stdout")
    b = sub.add_parser("bench", help="llama3_dist vs transformers (and llama.cpp) on the same weights")
    b.add_argument("--json", action="store_true", help="one JSON array on stdout")
    b.add_argument("--quick", action="store_true", help="only SmolLM2 fp32 batch 1 (a smoke run)")
    b.add_argument("--threads", type=int, default=2, help="threads per single-process engine")
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--timeout", type=float, default=900, help="seconds per engine run")
    b.add_argument("--eager", action="store_true", help="do not torch.compile our decode step")
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: Llama-3-8B-shaped random weights on the GPU, ours vs transformers")
    b.add_argument("--gpt-fast", metavar="DIR", help="with --device cuda: also time gpt-fast from this checkout")
    b.add_argument("--work-dir", help="where the dense GGUF / random checkpoints are written (a temp dir inside)")
    w = sub.add_parser("world-size", help="print the number of ranks a config needs (tensor x pipeline)")
    w.add_argument("--config")
    w.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """YAML <- --set <- explicit flags."""
    sets = list(args.set)
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            sets.append(f"{key}={json.dumps(value)}")
    if args.chat:
        sets.append("generate.chat=true")
    return load_config(args.config, sets)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        if args.command == "world-size":
            cfg = load_config(args.config, args.set)
            print(cfg.parallel.tensor * cfg.parallel.pipeline)
            return 0
        if args.command == "plan":
            return run_plan(args)
        if args.command == "bench":
            from .bench import run_bench, table
            if args.prompt_len < 16 or args.new_tokens < 2:
                raise UserError("bench: --prompt-len must be >= 16 and --new-tokens >= 2")
            rows = run_bench(args)
            print(json.dumps(rows) if args.json else table(rows))
            return 0
        return run_generate(args)
    except UserError as e:
        tag = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        print(f"error: {tag}{e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130


def run_plan(args: argparse.Namespace) -> int:
    from .assemble import model_args, open_model_checkpoint
    from .plan import as_json, parse_bytes, plan, table
    sets = list(args.set) + ([f"model.checkpoint={json.dumps(args.checkpoint)}"] if args.checkpoint else [])
    cfg = load_config(args.config, sets)
    try:
        memory = None if args.device_memory is None else parse_bytes(args.device_memory)
    except ValueError as e:
        raise UserError(f"--device-memory: {e}") from None
    ckpt = open_model_checkpoint(cfg) if cfg.model.preset is None or cfg.model.checkpoint else None
    rows = plan(cfg, ckpt.args if ckpt else model_args(cfg), memory, ckpt)
    if args.json:
        print(json.dumps(as_json(rows)))
    else:
        print(table(rows))
        worst = max(rows, key=lambda x: x.total_bytes)
        print(f"largest rank: {worst.total_bytes / 2**30:.2f} GiB (rank {worst.rank}); "
              f"batch {cfg.runtime.max_batch_size} x {cfg.runtime.max_seq_len} tokens, {cfg.runtime.dtype}")
    return 0 if all(x.fits is not False for x in rows) else 1


def run_generate(args: argparse.Namespace) -> int:
    from .assemble import assemble
    from .generate import check_prompts, generate, warm_up
    from .log import setup_logging
    from .parallel.mesh import shutdown, world_from_env

    cfg = config_from_args(args)
    setup_logging(world_from_env()[0], args.verbose)
    texts = args.prompt or ([sys.stdin.read()] if not sys.stdin.isatty() else [])
    if not texts:
        raise UserError("no prompt given: pass --prompt TEXT (repeatable) or pipe text on stdin")
    for i, t in enumerate(texts):
        if not t.strip():
            raise UserError(f"prompt {i} is empty: give some text with --prompt")
    gen = cfg.generate
    ready = assemble(cfg)
    mesh, model, tok = ready.mesh, ready.model, ready.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) if gen.chat else tok.encode(t) for t in texts]
    check_prompts(prompts, gen.max_new_tokens, cfg.runtime.max_seq_len, cfg.runtime.max_batch_size)
    if model.decode_step is not None:  # compile / capture now, at the final cache size
        warm_up(model, mesh, len(prompts), max(map(len, prompts)) + gen.max_new_tokens, cfg.parallel.microbatches)
    stream = mesh.is_rank0 and not args.json and len(prompts) == 1
    printer = StreamPrinter(tok) if stream else None
    if stream and not gen.chat:
        print(texts[0], end="", flush=True)
    stop_ids = tok.stop_ids | {tok.special_tokens[x] for x in gen.stop if x in tok.special_tokens}
    strings = [x for x in gen.stop if x not in tok.special_tokens]
    results = generate(model, mesh, prompts, gen.sampling(), stop_ids, printer, cfg.parallel.microbatches,
                       StopStrings(tok, strings) if strings else None)
    if mesh.is_rank0:
        report(args, texts, results, tok, printer)
    shutdown()
    return 0


class StopStrings:
    """stop_check for generate(): once a stop string appears, keep the tokens whose text precedes it."""

    def __init__(self, tok, strings: list[str]):
        self.tok, self.strings = tok, strings
        self.window = max(len(x.encode()) for x in strings) + 1  # every token carries >= 1 byte

    def __call__(self, tokens: list[int]) -> int | None:
        tail = self.tok.decode(tokens[-self.window:])
        if not any(x in tail for x in self.strings):
            return None
        text = self.tok.decode(tokens)
        start = min(text.find(x) for x in self.strings if x in text)
        keep = len(tokens) - 1
        while keep > 0 and len(self.tok.decode(tokens[:keep])) > start:
            keep -= 1
        return keep


class StreamPrinter:
    """Prints tokens of row 0 as they arrive, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tok):
        self.tok = tok
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, row: int, token: int) -> None:
        text = self.decoder.decode(self.tok.decode_bytes([token]))
        if text:
            print(text, end="", flush=True)

    def close(self) -> None:
        print(self.decoder.decode(b"", final=True), flush=True)


def report(args, texts, results, tok, printer: StreamPrinter | None) -> None:
    """Rank 0's output: JSON lines, the end of a stream, or each completion in turn."""
    if args.json:
        for text, r in zip(texts, results):
            print(json.dumps({"prompt": text, "prompt_tokens": r.prompt_tokens, "tokens": r.tokens,
                              "text": tok.decode(r.tokens), "finish_reason": r.finish_reason,
                              "prefill_ms": round(r.prefill_ms, 3),
                              "decode_tokens_per_s": round(r.decode_tokens_per_s, 3)}), flush=True)
        return
    if printer is not None:
        printer.close()
    else:
        for i, (text, r) in enumerate(zip(texts, results)):
            print(f"--- [{i}] {text}" if not args.chat else f"--- [{i}] user: {text}")
            print(tok.decode(r.tokens), flush=True)
    n_prompt = sum(len(r.prompt_tokens) for r in results)
    n_gen = sum(len(r.tokens) for r in results)
    r = results[0]
    print(f"[{n_prompt} prompt tokens, {n_gen} generated, prefill {r.prefill_ms:.1f} ms, "
          f"decode {r.decode_tokens_per_s * len(results):.1f} tok/s]", file=sys.stderr, flush=True)
