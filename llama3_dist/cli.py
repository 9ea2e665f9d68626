"""`llama3-dist generate`: argparse, config, distributed setup, and the only place that prints.

Results go to stdout on rank 0 only; diagnostics go to stderr; a user error is one stderr line
and exit code 2 on every rank that hits it, never a traceback or a hang. A peer rank that stops
answering is one stderr line and exit code 1 on every surviving rank, which then ends at once
(no barrier, no teardown that could wait on the silent peer).
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import json
import logging
import os
import re
import sys

import torch.distributed as dist

from .config import DTYPES, Config, load_config
from .errors import CollectiveError, UserError

log = logging.getLogger("llama3_dist")

# CLI flag -> config key; a flag is sugar for --set and is applied after the --set list.
FLAG_KEYS = {
    "checkpoint": "model.checkpoint",
    "tokenizer": "model.tokenizer",
    "max_new_tokens": "generate.max_new_tokens",
    "temperature": "generate.temperature",
    "top_p": "generate.top_p",
    "top_k": "generate.top_k",
    "min_p": "generate.min_p",
    "seed": "generate.seed",
    "dtype": "runtime.dtype",
    "host": "serve.host",
    "port": "serve.port",
    "model_name": "serve.model_name",
}


class Parser(argparse.ArgumentParser):
    """argparse with a bad flag reported as one `error:` line (exit 2), like every other user error."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message}; see {self.prog} --help", file=sys.stderr, flush=True)
        sys.exit(2)


def model_flags(p: argparse.ArgumentParser, tokenizer: bool = True) -> None:
    """The flags every command that loads a model shares: config, checkpoint, tokenizer, dtype, --set, -v."""
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--checkpoint", help="Meta dir, Hugging Face dir or .gguf file (default: embedded SmolLM2-135M)")
    if tokenizer:
        p.add_argument("--tokenizer", help="tokenizer override: tokenizer.model, an HF dir or a .gguf")
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. parallel.tensor=2 (repeatable)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="every rank logs (memory after loading, ...)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llama3-dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from one or more prompts")
    model_flags(g)
    g.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int, help="0 = off")
    g.add_argument("--min-p", type=float, help="drop tokens under this share of the top one's probability; 0 = off")
    g.add_argument("--seed", type=int, help="makes sampling reproducible")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout, nothing else")
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    model_flags(s)
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to listen on (default 8000; 0: any free port)")
    s.add_argument("--model-name", help="the model name clients send (default: the checkpoint's name)")
    pl = sub.add_parser("plan", help="memory per rank for a config, from the real sharded modules")
    pl.add_argument("--config", help="YAML config (see configs/)")
    pl.add_argument("--checkpoint", help="read the architecture from a checkpoint instead of model.preset")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pl.add_argument("--device-memory", help="memory per device, e.g. 80GiB: adds a fits column")
    pl.add_argument("--json", action="store_true", help="one JSON array on stdout")
    b = sub.add_parser("bench", help="llama3_dist vs transformers (and llama.cpp) on the same weights")
    b.add_argument("--json", action="store_true", help="one JSON array on stdout")
    b.add_argument("--quick", action="store_true", help="only SmolLM2 fp32 batch 1 (a smoke run)")
    b.add_argument(
        "--only", metavar="TEXT", help="only the setting named TEXT, or those whose name contains it (e.g. Q4_1)"
    )
    b.add_argument("--threads", type=int, default=2, help="threads per single-process engine")
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--timeout", type=float, default=900, help="seconds per engine run")
    b.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each setting's engines this many times in rotation and keep each one's best (a shared machine)",
    )
    b.add_argument("--eager", action="store_true", help="do not torch.compile our decode step")
    b.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: Llama-3-8B-shaped random weights on the GPU, ours vs transformers",
    )
    b.add_argument("--gpt-fast", metavar="DIR", help="with --device cuda: also time gpt-fast from this checkout")
    b.add_argument(
        "--serve",
        metavar="URL",
        help="serving mode: time a running `llama3-dist serve` at URL "
        "under 1, 2, 4, 8 concurrent streaming clients, next to generate's static batch",
    )
    b.add_argument("--clients", default="1,2,4,8", help="with --serve: concurrent client counts")
    b.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --serve: config of the static-batch model (give it the server's settings)",
    )
    b.add_argument("--work-dir", help="where the GGUF / random checkpoints are written (a temp dir inside)")
    e = sub.add_parser("explain", help="walk one forward pass of the real model, tensor by tensor")
    model_flags(e, tokenizer=False)
    e.add_argument(
        "--prompt", help="prompt text (default: the seed's question about life, the universe and everything)"
    )
    e.add_argument("--layer", type=int, default=0, help="the layer walked through in detail (default 0)")
    e.add_argument("--head", type=int, default=0, help="the query head shown in detail (default 0)")
    e.add_argument("--out", metavar="DIR", help="also write DIR/index.html with the figures (PNGs beside it)")
    e.add_argument("--json", action="store_true", help="one JSON object on stdout (steps, next_tokens)")
    w = sub.add_parser("world-size", help="print the number of ranks a config needs (tensor x pipeline)")
    w.add_argument("--config")
    w.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """YAML <- --set <- explicit flags."""
    sets = list(args.set)
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            sets.append(f"{key}={json.dumps(value)}")
    if getattr(args, "chat", False):
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
            if args.serve:
                from .bench.serving import run_serving_bench, serving_table

                result = run_serving_bench(args)
                print(json.dumps(result) if args.json else serving_table(result))
                return 0
            rows = run_bench(args)
            print(json.dumps(rows) if args.json else table(rows))
            return 0
        if args.command == "explain":
            return run_explain(args)
        if args.command == "serve":
            return run_serve(args)
        return run_generate(args)
    except UserError as e:
        return fail(2, rank, str(e))
    except (CollectiveError, dist.DistError) as e:  # a peer stopped answering, or the job never formed
        return fail(1, rank, one_line(e))
    except KeyboardInterrupt:
        return fail(130, rank, None)


def one_line(e: BaseException) -> str:
    """The first line of an error, without a C++ [file.cc:N] prefix."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    text = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else type(e).__name__
    return text if isinstance(e, CollectiveError) else f"torch.distributed: {text}"


def fail(code: int, rank: int, message: str | None) -> int:
    """Print `error: [rank N] message`; in a multi-rank job end this process now, so it never waits on a peer."""
    if message is not None:
        tag = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        print(f"error: {tag}{message}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip atexit and process-group teardown: either could block on the silent peer
    return code


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
        print(
            f"largest rank: {worst.total_bytes / 2**30:.2f} GiB (rank {worst.rank}); "
            f"batch {cfg.runtime.max_batch_size} x {cfg.runtime.max_seq_len} tokens, {cfg.runtime.dtype}"
        )
    return 0 if all(x.fits is not False for x in rows) else 1


def run_serve(args: argparse.Namespace) -> int:
    from .log import setup_logging
    from .parallel.mesh import world_from_env
    from .serve import EngineFailed, serve

    cfg = config_from_args(args)
    rank, world_size, _ = world_from_env()
    setup_logging(rank, args.verbose)
    try:
        serve(cfg, lambda line: print(line, file=sys.stderr, flush=True))
    except EngineFailed as e:
        tag = f"[rank {rank}] " if world_size > 1 else ""
        print(f"error: {tag}serve: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # the process group is broken: leaving through its destructors could hang
    return 0


def run_explain(args: argparse.Namespace) -> int:
    from .assemble import assemble, open_model_checkpoint
    from .explain import (
        DEFAULT_PROMPT,
        as_json,
        check_request,
        explain,
        format_text,
        prepare_out,
        write_html,
    )
    from .log import setup_logging
    from .parallel.mesh import shutdown, world_from_env

    sets = list(args.set) + [
        f"{FLAG_KEYS[k]}={json.dumps(getattr(args, k))}"
        for k in ("checkpoint", "dtype")
        if getattr(args, k) is not None
    ]
    cfg = load_config(args.config, sets)
    # explain runs one eager prefill; the fast decode path (compile, CUDA graphs) serves decode steps only
    cfg.runtime = dataclasses.replace(cfg.runtime, compile=False, cuda_graphs=False)
    setup_logging(world_from_env()[0], args.verbose)
    prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
    ckpt = open_model_checkpoint(cfg)
    check_request(ckpt.args, prompt, args.layer, args.head)  # before the weights load
    if args.out and world_from_env()[0] == 0:
        prepare_out(args.out)
    ready = assemble(cfg, ckpt=ckpt)
    exp = explain(ready, prompt, args.layer, args.head)
    if exp is not None:  # rank 0
        if args.out:
            log.info("wrote %s", write_html(exp, args.out))
        print(json.dumps(as_json(exp)) if args.json else format_text(exp), flush=True)
    shutdown()
    return 0


def run_generate(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # a bad value fails here, before the model code is imported (seconds)
    from .assemble import assemble, open_model_checkpoint, open_tokenizer_for
    from .generate import check_prompts, generate, warm_up
    from .log import setup_logging
    from .parallel.mesh import init_distributed, shutdown, world_from_env

    setup_logging(world_from_env()[0], args.verbose)
    mesh = init_distributed(cfg.parallel, cfg.runtime)
    texts = args.prompt or read_stdin(mesh)
    if not texts:
        raise UserError("no prompt given: pass --prompt TEXT (repeatable) or pipe text on stdin")
    for i, t in enumerate(texts):
        if not t.strip():
            raise UserError(f"prompt {i} is empty: give some text with --prompt")
    gen = cfg.generate
    # tokenize and check the prompts before any weights load, so a bad prompt is one line and quick
    ckpt = open_model_checkpoint(cfg)
    tok = open_tokenizer_for(cfg, ckpt)
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) if gen.chat else tok.encode(t) for t in texts]
    check_prompts(prompts, gen.max_new_tokens, cfg.runtime.max_seq_len, cfg.runtime.max_batch_size)
    model = assemble(cfg, ckpt, tok, mesh=mesh).model
    if model.decode_step is not None:  # compile / capture now, at the final cache size
        warm_up(model, mesh, len(prompts), max(map(len, prompts)) + gen.max_new_tokens, cfg.parallel.microbatches)
    stream = mesh.is_rank0 and not args.json and len(prompts) == 1
    printer = StreamPrinter(tok) if stream else None
    if stream and not gen.chat:
        print(texts[0], end="", flush=True)
    stop_ids = tok.stop_ids | {tok.special_tokens[x] for x in gen.stop if x in tok.special_tokens}
    strings = [x for x in gen.stop if x not in tok.special_tokens]
    results = generate(
        model,
        mesh,
        prompts,
        gen.sampling(),
        stop_ids,
        printer,
        cfg.parallel.microbatches,
        StopStrings(tok, strings) if strings else None,
    )
    if mesh.is_rank0:
        report(args, texts, results, tok, printer)
    shutdown()
    return 0


def read_stdin(mesh) -> list[str]:
    """The prompt piped on stdin: rank 0 alone reads it and sends it to every rank ([] from a terminal)."""
    from .parallel.comm import broadcast_object

    texts = None
    if mesh.is_rank0:
        texts = [sys.stdin.read()] if not sys.stdin.isatty() else []
    return broadcast_object(texts, 0, mesh.world)


class StopStrings:
    """stop_check for generate(): once a stop string appears, keep the tokens whose text precedes it."""

    def __init__(self, tok, strings: list[str]):
        self.tok, self.strings = tok, strings
        self.window = max(len(x.encode()) for x in strings) + 1  # every token carries >= 1 byte

    def __call__(self, tokens: list[int]) -> int | None:
        tail = self.tok.decode(tokens[-self.window :])
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
            print(
                json.dumps(
                    {
                        "prompt": text,
                        "prompt_tokens": r.prompt_tokens,
                        "tokens": r.tokens,
                        "text": tok.decode(r.tokens),
                        "finish_reason": r.finish_reason,
                        "prefill_ms": round(r.prefill_ms, 3),
                        "decode_tokens_per_s": round(r.decode_tokens_per_s, 3),
                    }
                ),
                flush=True,
            )
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
    print(
        f"[{n_prompt} prompt tokens, {n_gen} generated, prefill {r.prefill_ms:.1f} ms, "
        f"decode {r.decode_tokens_per_s * len(results):.1f} tok/s]",
        file=sys.stderr,
        flush=True,
    )
