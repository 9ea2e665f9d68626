"""The HTTP side (world rank 0 only): OpenAI-shaped routes on FastAPI, run by uvicorn in a thread,
and llama.cpp's own POST /completion for the clients written for llama-server.

Routes validate a request completely, turn it into Sequences, submit them to the Scheduler and
drain their Outputs; they never touch the model. Errors have OpenAI's shape
{"error": {"message", "type", "param", "code"}}: 400 for a bad request, 404 for another model,
429 when the queue is full, 503 while loading, shutting down, or after the engine failed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from .. import __version__
from ..config import SamplingParams
from ..errors import ConfigError, UserError
from .control import TokenLogprobs
from .metrics import Metrics
from .scheduler import Output, QueueFull, Scheduler, Sequence, Unavailable

MAX_LOGPROBS = 20


class ApiError(Exception):
    """An OpenAI-shaped error response."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


@dataclass
class ServerState:
    """What the routes need: filled in once the model is ready (scheduler None while loading)."""

    model_name: str
    max_seq_len: int
    max_batch_size: int
    metrics: Metrics
    scheduler: Scheduler | None = None
    tokenizer: object | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def ready(self) -> Scheduler:
        if self.scheduler is None:
            raise ApiError(
                503,
                "the model is still loading; retry when GET /health answers 200",
                kind="service_unavailable",
                code="loading",
            )
        if self.scheduler.failed is not None:
            raise ApiError(
                503, f"the engine failed: {self.scheduler.failed}", kind="service_unavailable", code="engine_failed"
            )
        return self.scheduler


# --- request fields ---


def _get(body: dict, key: str, kinds: tuple[type, ...], default, what: str):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise bad(f"{key}: expected {what}, got {json.dumps(value)[:50]}", key)
    return value


def get_int(body: dict, key: str, default: int | None, lo: int | None = None, hi: int | None = None):
    value = _get(body, key, (int,), default, "an integer")
    if value is not None and (lo is not None and value < lo or hi is not None and value > hi):
        span = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise bad(f"{key}: must be {span}, got {value}", key)
    return value


def get_float(body: dict, key: str, default: float) -> float:
    value = _get(body, key, (int, float), default, "a number")
    if not math.isfinite(value):
        raise bad(f"{key}: must be a finite number, got {value}", key)
    return float(value)


def get_bool(body: dict, key: str, default: bool) -> bool:
    return _get(body, key, (bool,), default, "true or false")


def get_stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop: expected a string or a list of strings", "stop")
    if any(not s for s in stops):
        raise bad("stop: stop strings must not be empty", "stop")
    return stops


@dataclass
class Plan:
    """A validated request: its prompts and how to complete each, n times."""

    prompts: list[list[int]]
    max_tokens: int | None  # None (chat): up to the context's end
    params: SamplingParams
    n: int
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool
    ignore_eos: bool
    stop_token_ids: list[int]


def parse_common(
    body: dict,
    state: ServerState,
    prompts: list[list[int]],
    max_tokens: int | None,
    logprobs: int | None,
    echo: bool = False,
) -> Plan:
    """The fields completions and chat share; raises ApiError (400/404)."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model: expected a string", "model")
    if model is not None and model != state.model_name:
        raise ApiError(
            404,
            f"model {model!r} does not exist; this server serves {state.model_name!r}",
            "model",
            code="model_not_found",
        )
    vocab = state.tokenizer.n_words
    for i, p in enumerate(prompts):
        if not p:
            raise bad(f"prompt {i} is empty: give some text or token ids", "prompt")
        if not all(0 <= t < vocab for t in p):
            raise bad(f"prompt {i}: token ids must be in 0..{vocab - 1}", "prompt")
    temperature = get_float(body, "temperature", 1.0)
    top_p = get_float(body, "top_p", 1.0)
    top_k = get_int(body, "top_k", 0, -1)
    min_p = get_float(body, "min_p", 0.0)
    seed = get_int(body, "seed", None, -(2**63), 2**63 - 1)
    n = get_int(body, "n", 1, 1)
    if n > state.max_batch_size:
        raise bad(f"n: {n} choices exceed runtime.max_batch_size={state.max_batch_size} KV-cache slots", "n")
    penalties = {  # vLLM's names and defaults; OpenAI's two, and HF's repetition_penalty
        "presence_penalty": get_float(body, "presence_penalty", 0.0),
        "frequency_penalty": get_float(body, "frequency_penalty", 0.0),
        "repetition_penalty": get_float(body, "repetition_penalty", 1.0),
    }
    try:
        SamplingParams(max_tokens or 1, temperature, top_p, max(top_k, 0), min_p, seed, **penalties).check(prefix="")
    except ConfigError as e:
        raise bad(str(e), str(e).split(":")[0]) from None
    stream = get_bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options: expected an object", "stream_options")
    include_usage = get_bool(options or {}, "include_usage", False)
    longest = max(map(len, prompts))
    room = state.max_seq_len - longest
    if max_tokens is not None and max_tokens > room:
        raise bad(
            f"max_tokens: the prompt has {longest} tokens; with max_tokens={max_tokens} that exceeds the "
            f"context of runtime.max_seq_len={state.max_seq_len} tokens; lower max_tokens to <= {room} "
            f"or shorten the prompt",
            "max_tokens",
        )
    if max_tokens is None and room < 1:
        raise bad(
            f"the prompt has {longest} tokens and leaves no room for a reply in "
            f"runtime.max_seq_len={state.max_seq_len}; shorten it",
            "messages",
        )
    params = SamplingParams(max_tokens or 0, temperature, top_p, max(top_k, 0), min_p, seed, **penalties)
    stop_token_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_token_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in stop_token_ids
    ):
        raise bad(f"stop_token_ids: expected a list of token ids in 0..{vocab - 1}", "stop_token_ids")
    return Plan(
        prompts,
        max_tokens,
        params,
        n,
        get_stop(body),
        stream,
        include_usage,
        logprobs,
        echo,
        get_bool(body, "ignore_eos", False),
        stop_token_ids,
    )


def parse_completion(body: dict, state: ServerState) -> Plan:
    tok = state.tokenizer
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [tok.encode(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, str) for x in prompt):
        prompts = [tok.encode(x) for x in prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
        prompts = [list(prompt)]
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(x, list) for x in prompt)
        and all(isinstance(t, int) and not isinstance(t, bool) for x in prompt for t in x)
    ):
        prompts = [list(x) for x in prompt]
    else:
        raise bad("prompt: expected a string, a list of strings, a list of token ids or a list of such lists", "prompt")
    max_tokens = get_int(body, "max_tokens", 16, 1)
    logprobs = get_int(body, "logprobs", None, 0, MAX_LOGPROBS)
    return parse_common(body, state, prompts, max_tokens, logprobs, get_bool(body, "echo", False))


def message_text(content, i: int) -> str:
    """A message's content: a string, or a list of text parts ({"type": "text", "text": ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise bad(f"messages[{i}].content: expected a string or a list of text parts", f"messages[{i}].content")


def chat_prompt(body: dict, state: ServerState) -> list[int]:
    """`messages` rendered with the checkpoint's chat template, as token ids."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages: expected a non-empty list of {role, content} objects", "messages")
    rendered = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}]: expected an object with a string role", f"messages[{i}]")
        rendered.append({"role": m["role"], "content": message_text(m.get("content"), i)})
    try:
        return state.tokenizer.encode_chat(rendered)
    except Exception as e:  # noqa: BLE001 - a template may raise anything (e.g. "roles must alternate")
        raise bad(
            f"messages: the chat template rejects them ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
            "messages",
        ) from None


def parse_chat(body: dict, state: ServerState) -> Plan:
    prompt = chat_prompt(body, state)
    max_tokens = get_int(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = get_int(body, "max_tokens", None, 1)
    want = get_bool(body, "logprobs", False)
    top = get_int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise bad("top_logprobs: needs logprobs: true", "top_logprobs")
    return parse_common(body, state, [prompt], max_tokens, (top or 0) if want else None)


# llama-server's sampling defaults for /completion
LLAMA_CPP_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}


def parse_llama_cpp(body: dict, state: ServerState) -> Plan:
    """llama.cpp's POST /completion: `prompt` (text or token ids), `n_predict` (-1, the default: up to
    EOS; as in llama-server, never past the context's end), `repeat_penalty`, `seed` (-1: random),
    llama-server's sampling defaults, and the fields they share with the OpenAI routes (`stop`,
    `stream`, `top_k`, `min_p`, penalties, `ignore_eos`).
    `model` is not checked, as llama-server does not with one model."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [state.tokenizer.encode(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [list(prompt)]
    else:
        raise bad("prompt: expected a string or a list of token ids", "prompt")
    n_predict = get_int(body, "n_predict", -1, -1)
    if n_predict == 0:
        raise bad("n_predict: must be -1 (up to EOS or the context's end) or >= 1, got 0", "n_predict")
    room = state.max_seq_len - len(prompts[0])
    if room < 1:
        raise bad(
            f"prompt: it has {len(prompts[0])} tokens and leaves no room for a reply in "
            f"runtime.max_seq_len={state.max_seq_len}; shorten it",
            "prompt",
        )
    if get_int(body, "n_probs", 0, 0):
        raise bad("n_probs: token probabilities are served by POST /v1/completions (`logprobs`)", "n_probs")
    seed = get_int(body, "seed", None, -1, 2**63 - 1)
    keys = ("top_p", "top_k", "min_p", "temperature", "stop", "stream", "ignore_eos")
    fields = {k: v for k, v in body.items() if k in keys}
    fields |= {k: v for k, v in body.items() if k.endswith("_penalty") and k != "repeat_penalty"}
    fields = {**LLAMA_CPP_DEFAULTS, **{k: v for k, v in fields.items() if v is not None}}
    if body.get("repeat_penalty") is not None:  # llama.cpp's name for repetition_penalty
        fields["repetition_penalty"] = body["repeat_penalty"]
    fields["seed"] = None if seed == -1 else seed
    return parse_common(fields, state, prompts, room if n_predict == -1 else min(n_predict, room), None)


# --- responses ---


def clean(x: float) -> float:
    return max(x, -9999.0)  # JSON has no -inf


class Choice:
    """What one choice has produced so far."""

    def __init__(self):
        self.text: list[str] = []
        self.logprobs: list[tuple[int, TokenLogprobs | None]] = []
        self.finish_reason: str | None = None
        self.stop: str | None = None  # Output.stop
        self.n_generated = 0


class Responder:
    """Turns Outputs into OpenAI's JSON shapes for one request (completions or chat)."""

    def __init__(self, state: ServerState, plan: Plan, chat: bool):
        self.tok, self.plan, self.chat = state.tokenizer, plan, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created, self.model = int(time.time()), state.model_name
        self.object = "chat.completion" if chat else "text_completion"
        self.offsets: dict[int, int] = {}  # choice -> characters of text its logprobs have covered
        self.echoed: set[int] = set()

    def prompt_of(self, index: int) -> list[int]:
        return self.plan.prompts[index // self.plan.n]

    def token_str(self, t: int) -> str:
        return self.tok.decode([t])

    def chat_entry(self, t: int, lp: TokenLogprobs) -> dict:
        def one(i: int, x: float) -> dict:
            return {"token": self.token_str(i), "logprob": clean(x), "bytes": list(self.tok.decode_bytes([i]))}

        return {**one(t, lp.logprob), "top_logprobs": [one(i, x) for i, x in lp.top]}

    def completion_logprobs(self, index: int, entries: list[tuple[int, TokenLogprobs | None]]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp in entries:
            s = self.token_str(t)
            out["tokens"].append(s)
            out["token_logprobs"].append(None if lp is None else clean(lp.logprob))
            top = None
            if lp is not None:  # tokens whose text is the same (e.g. partial UTF-8): the likeliest one shows
                top = {}
                for i, x in lp.top:
                    top.setdefault(self.token_str(i), clean(x))
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offsets.get(index, 0))
            self.offsets[index] = self.offsets.get(index, 0) + len(s)
        return out

    def pieces(self, out: Output) -> tuple[str, list[tuple[int, TokenLogprobs | None]]]:
        """The text and (token, logprobs) entries an Output adds; a choice's first one carries the echoed prompt."""
        text, entries = out.text, []
        if self.plan.echo and out.index not in self.echoed:
            self.echoed.add(out.index)
            prompt = self.prompt_of(out.index)
            text = self.tok.decode(prompt) + text
            if out.prompt_logprobs is not None:
                entries += list(zip(prompt, out.prompt_logprobs))
        if out.logprobs is not None and out.token is not None:
            entries.append((out.token, out.logprobs))
        return text, entries

    def usage(self, choices: dict[int, Choice]) -> dict:
        prompt = sum(map(len, self.plan.prompts))
        done = sum(c.n_generated for c in choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def logprobs_json(self, index: int, entries) -> dict | None:
        if self.plan.logprobs is None:
            return None
        if self.chat:
            return {"content": [self.chat_entry(t, lp) for t, lp in entries]}
        return self.completion_logprobs(index, entries)

    def full(self, choices: dict[int, Choice]) -> dict:
        rows = []
        for i in sorted(choices):
            c = choices[i]
            text = "".join(c.text)
            lp = self.logprobs_json(i, c.logprobs)
            if self.chat:
                rows.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": lp,
                        "finish_reason": c.finish_reason,
                    }
                )
            else:
                rows.append({"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": rows,
            "usage": self.usage(choices),
        }

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        obj = {
            "id": self.id,
            "object": self.object + ("" if not self.chat else ".chunk"),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.plan.include_usage:
            obj["usage"] = usage
        return f"data: {json.dumps(obj)}\n\n"

    def delta(self, index: int, text: str, entries, finish_reason: str | None = None, role: bool = False) -> dict:
        lp = self.logprobs_json(index, entries) if entries else None
        if self.chat:
            d = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            return {"index": index, "delta": d, "logprobs": lp, "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}


class LlamaCppResponder(Responder):
    """llama.cpp's /completion shapes for one prompt: a streamed piece {"content", "stop": false}, and at
    the end {"content", "stop": true, "tokens_predicted", "stop_type", "timings", ...}."""

    def __init__(self, state: ServerState, plan: Plan):
        super().__init__(state, plan, chat=False)
        self.start, self.first = time.perf_counter(), None  # submitted; first output (the prompt's end)

    def pieces(self, out: Output):
        self.first = self.first or time.perf_counter()
        return super().pieces(out)

    def piece(self, text: str) -> str:
        return f"data: {json.dumps({'content': text, 'stop': False, 'index': 0})}\n\n"

    def result(self, c: Choice, content: str) -> dict:
        now = time.perf_counter()
        first = self.first or now
        prompt_n, predicted_s = len(self.plan.prompts[0]), now - first
        return {
            "content": content,
            "stop": True,
            "index": 0,
            "model": self.model,
            "tokens_predicted": c.n_generated,
            "tokens_evaluated": prompt_n,
            "stop_type": "limit" if c.finish_reason == "length" else "eos" if c.stop is None else "word",
            "stopping_word": c.stop or "",
            "truncated": False,
            "timings": {  # prompt: submission (queueing included) to the first token; predicted: first to last
                "prompt_n": prompt_n,
                "prompt_ms": (first - self.start) * 1e3,
                "predicted_n": c.n_generated,
                "predicted_ms": predicted_s * 1e3,
                "predicted_per_second": (c.n_generated - 1) / predicted_s if c.n_generated > 1 else None,
            },
        }

    def full(self, choices: dict[int, Choice]) -> dict:
        return self.result(choices[0], "".join(choices[0].text))


def error_event(e: ApiError) -> str:
    return f"data: {json.dumps(e.body())}\n\n"


def sequences_of(plan: Plan, emit, stop_ids: frozenset[int]) -> list[Sequence]:
    """One Sequence per (prompt, choice); choice i samples with seed + i (a random base seed when none is given)."""
    base = plan.params.seed if plan.params.seed is not None else random.getrandbits(63)
    seqs = []
    for p, prompt in enumerate(plan.prompts):
        for i in range(plan.n):
            params = dataclasses.replace(plan.params, max_new_tokens=plan.max_tokens, seed=(base + i) % 2**64)
            seqs.append(
                Sequence(
                    p * plan.n + i,
                    prompt,
                    params,
                    emit,
                    plan.stop,
                    stop_ids,
                    plan.logprobs,
                    plan.echo,
                    plan.ignore_eos,
                    frozenset(plan.stop_token_ids),
                )
            )
    return seqs


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="llama3_dist", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    async def health():
        s = state.scheduler
        if s is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if s.failed is not None:
            return JSONResponse({"status": "failed", "error": s.failed}, status_code=503)
        if s.closing_at is not None:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return {
            "status": "ok",
            "slots_in_use": s.busy_slots,
            "slots_total": state.max_batch_size,
            "waiting": s.n_waiting,
        }

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/props")
    async def props():
        """llama.cpp's /props, where its web UI and clients read the context size and the defaults."""
        state.ready()
        defaults = {"n_ctx": state.max_seq_len, "params": {"n_predict": -1, **LLAMA_CPP_DEFAULTS}}
        return {
            "default_generation_settings": defaults,
            "total_slots": state.max_batch_size,
            "model_path": state.model_name,
            "chat_template": state.tokenizer.chat_template or "",
            "modalities": {"vision": False, "audio": False},
            "build_info": f"llama3_dist {__version__}",
        }

    @app.get("/version")
    async def version():
        """vLLM's /version."""
        return {"version": __version__}

    @app.post("/apply-template")
    async def apply_template(request: Request):
        """llama.cpp's /apply-template: `messages` rendered as /v1/chat/completions renders them, as text."""
        state.ready()
        return {"prompt": state.tokenizer.decode(chat_prompt(await json_object(request), state))}

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": state.model_name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "llama3_dist",
                    "max_model_len": state.max_seq_len,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, "chat")

    @app.post("/completion")
    @app.post("/completions")
    async def llama_cpp_completion(request: Request):
        """llama.cpp's native completion (llama-server serves it at both paths)."""
        return await complete(request, "llama.cpp")

    @app.post("/tokenize")
    async def tokenize(request: Request):
        """vLLM's /tokenize (`prompt` or `messages`) and llama.cpp's (`content`): the ids a request would see."""
        state.ready()
        body = await json_object(request)
        if "messages" in body:
            tokens = chat_prompt(body, state)
        else:
            key = "prompt" if "prompt" in body else "content"
            text = body.get(key)
            if not isinstance(text, str):
                raise bad(f"{key}: expected a string (or give messages)", key)
            special = get_bool(body, "add_special_tokens", get_bool(body, "add_special", True))
            tokens = state.tokenizer.encode(text, bos=None if special else False)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        """vLLM's and llama.cpp's /detokenize: token ids to text (as `prompt` and as `content`)."""
        state.ready()
        tokens = (await json_object(request)).get("tokens")
        vocab = state.tokenizer.n_words
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in tokens
        ):
            raise bad(f"tokens: expected a list of token ids in 0..{vocab - 1}", "tokens")
        text = state.tokenizer.decode(tokens)
        return {"prompt": text, "content": text}

    async def complete(request: Request, dialect: str):
        scheduler = state.ready()
        body = await json_object(request)
        parse = {"completions": parse_completion, "chat": parse_chat, "llama.cpp": parse_llama_cpp}[dialect]
        plan = parse(body, state)
        if plan.max_tokens is None:  # chat without a limit: up to the end of the context
            plan.max_tokens = state.max_seq_len - len(plan.prompts[0])
        special = state.tokenizer.special_tokens
        # stop strings naming special tokens, and vLLM's stop_token_ids that are special, stop on the
        # token and leave it out (as EOS); other stop_token_ids end the text with themselves, as vLLM's
        stop_ids = frozenset(special[s] for s in plan.stop if s in special)
        stop_ids |= frozenset(t for t in plan.stop_token_ids if t in special.values())
        plan.stop = [s for s in plan.stop if s not in special]
        plan.stop_token_ids = [t for t in plan.stop_token_ids if t not in stop_ids]
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[Output] = asyncio.Queue()

        def emit(out: Output) -> None:
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, out)
            except RuntimeError:  # the event loop is gone (server shut down)
                pass

        seqs = sequences_of(plan, emit, stop_ids)
        try:
            scheduler.submit(seqs)
        except QueueFull as e:
            raise ApiError(429, str(e), kind="rate_limit_exceeded", code="queue_full") from None
        except Unavailable as e:
            raise ApiError(503, str(e), kind="service_unavailable", code="unavailable") from None
        if dialect == "llama.cpp":
            responder, events = LlamaCppResponder(state, plan), stream_llama_cpp
        else:
            responder, events = Responder(state, plan, dialect == "chat"), stream
        if plan.stream:
            return StreamingResponse(
                events(scheduler, seqs, outputs, responder),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return await collect(request, scheduler, seqs, outputs, responder)

    return app


async def json_object(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise bad("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


async def collect(
    request: Request, scheduler: Scheduler, seqs: list[Sequence], outputs: asyncio.Queue, responder: Responder
):
    """A whole (non-streamed) response; a client that goes away has its sequences aborted."""
    choices = {s.index: Choice() for s in seqs}
    left = len(seqs)
    checked = time.monotonic()
    try:
        while left:
            try:
                out = await asyncio.wait_for(outputs.get(), 0.5)
            except asyncio.TimeoutError:
                out = None
            if time.monotonic() - checked > 0.5:  # tokens may arrive faster than that: check on the clock
                checked = time.monotonic()
                if await request.is_disconnected():
                    return Response(status_code=499)
            if out is None:
                continue
            if out.error is not None:
                raise ApiError(503, out.error, kind="service_unavailable", code="unavailable")
            c = choices[out.index]
            text, entries = responder.pieces(out)
            c.text.append(text)
            c.logprobs += entries
            if out.finish_reason is not None:
                c.finish_reason, c.stop, left = out.finish_reason, out.stop, left - 1
                c.n_generated = next(s.n_generated for s in seqs if s.index == out.index)
        return JSONResponse(responder.full(choices))
    finally:
        if left:
            scheduler.abort(seqs)


async def stream(scheduler: Scheduler, seqs: list[Sequence], outputs: asyncio.Queue, responder: Responder):
    """Server-sent events as OpenAI sends them; a client that goes away has its sequences aborted."""
    choices = {s.index: Choice() for s in seqs}
    left = len(seqs)
    try:
        if responder.chat:
            for i in sorted(choices):
                yield responder.chunk([responder.delta(i, "", None, role=True)])
        while left:
            out = await outputs.get()
            if out.error is not None:
                yield error_event(ApiError(503, out.error, kind="service_unavailable", code="unavailable"))
                return
            c = choices[out.index]
            text, entries = responder.pieces(out)
            if text or entries:
                yield responder.chunk([responder.delta(out.index, text, entries)])
            if out.finish_reason is not None:
                left -= 1
                c.n_generated = next(s.n_generated for s in seqs if s.index == out.index)
                c.finish_reason = out.finish_reason
                yield responder.chunk([responder.delta(out.index, "", None, out.finish_reason)])
        if responder.plan.include_usage:
            yield responder.chunk([], responder.usage(choices))
        yield "data: [DONE]\n\n"
    finally:
        if left:
            scheduler.abort(seqs)


async def stream_llama_cpp(
    scheduler: Scheduler, seqs: list[Sequence], outputs: asyncio.Queue, responder: LlamaCppResponder
):
    """Server-sent events as llama-server sends them: a {"content", "stop": false} event per piece of
    text, then the result with "stop": true (and no [DONE])."""
    [seq], c, done = seqs, Choice(), False
    try:
        while not done:
            out = await outputs.get()
            if out.error is not None:
                yield error_event(ApiError(503, out.error, kind="service_unavailable", code="unavailable"))
                return
            text, _ = responder.pieces(out)
            if text:
                yield responder.piece(text)
            if out.finish_reason is not None:
                c.finish_reason, c.stop, c.n_generated, done = out.finish_reason, out.stop, seq.n_generated, True
        yield f"data: {json.dumps(responder.result(c, ''))}\n\n"
    finally:
        if not done:
            scheduler.abort(seqs)


class HttpServer:
    """uvicorn serving an app from a thread, on a socket bound up front (a taken port is a one-line error)."""

    def __init__(self, app: FastAPI, host: str, port: int, grace_s: float = 3.0):
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            self.sock = socket.socket(family, kind, proto)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(addr)
            self.sock.listen(128)
        except OSError as e:
            raise UserError(
                f"serve: cannot listen on {host}:{port} ({e.strerror or e}); pick another with --port or --host"
            ) from None
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=grace_s
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True, name="http"
        )
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise UserError(f"serve: the HTTP server did not start on {host}:{port}")
            time.sleep(0.02)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, let open responses end (up to the grace time), join the thread."""
        self.server.should_exit = True
        self.thread.join(timeout_s)
