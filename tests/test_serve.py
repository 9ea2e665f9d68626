"""`llama3-dist serve` through real server processes, the official `openai` client and httpx.

A few servers are started per module and shared: one process on a tiny random GGUF (most
tests), one on the embedded SmolLM2 (chat template, model name, loading), and torchrun servers
at TP=2 and PP=2 that must give the one-process tokens. Every wait has a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from helpers.checkpoints import random_model, tiny_config, write_gguf
from helpers.launch import run_cli, workers

import llama3_dist
from llama3_dist.assemble import assemble
from llama3_dist.bench.serving import run_serving_bench, serving_table
from llama3_dist.config import SamplingParams, load_config
from llama3_dist.errors import ConfigError
from llama3_dist.generate import generate
from llama3_dist.serve import checkpoint_name
from llama3_dist.serve.scheduler import TextStream

START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120
TINY_SETS = [
    "runtime.compile=false",
    "runtime.max_seq_len=8192",
    "runtime.max_batch_size=4",
    "serve.max_queue=4",
    "serve.shutdown_grace_s=60",
]


class Server:
    """A `llama3-dist serve` process (or a torchrun job of them); stderr collected line by line."""

    def __init__(self, args: list[str], nproc: int = 0):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        serve = ["-m", "llama3_dist", "serve", "--port", "0", *args]
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc else []
        self.proc = subprocess.Popen(
            [sys.executable, *launcher, *serve],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.new: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self.wait_for(r"listening on (http://\S+)")[1]

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            self.new.put(line)

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT_S) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.new.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None and self.new.empty():
                    break
                continue
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no line matching {pattern!r}; stderr:\n{''.join(self.lines)[-4000:]}")

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=REQUEST_TIMEOUT_S)

    def post(self, path: str, body, timeout: float | httpx.Timeout = REQUEST_TIMEOUT_S) -> httpx.Response:
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return httpx.post(f"{self.url}{path}", content=content, timeout=timeout)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=REQUEST_TIMEOUT_S)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A random 4-layer model with a byte-level vocab: any text is a prompt, each byte a token."""
    return write_gguf(random_model(tiny_config(), seed=31), tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def server(tiny_gguf):
    s = Server(["--checkpoint", str(tiny_gguf), *[x for kv in TINY_SETS for x in ("--set", kv)]])
    yield s
    s.close()


@pytest.fixture(scope="module")
def local_model(tiny_gguf):
    """The same tiny model in this process, for generate() and for logits."""
    return assemble(load_config(None, [f"model.checkpoint={tiny_gguf}", *TINY_SETS]))


def complete(server: Server, prompt, **kw) -> dict:
    r = server.post("/v1/completions", {"prompt": prompt, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def stream_completion(server: Server, body: dict, path: str = "/v1/completions") -> list[dict]:
    """Every SSE event's JSON, in order; asserts the stream ends with [DONE]."""
    events = []
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=REQUEST_TIMEOUT_S) as r:
        assert r.status_code == 200, r.read()
        data = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]", data[-3:]
    for d in data[:-1]:
        events.append(json.loads(d))
    return events


def streamed_text(events: list[dict], index: int = 0) -> str:
    return "".join(c["text"] for e in events for c in e["choices"] if c["index"] == index)


# --- pieces, without a server ---


class ByteTokenizer:
    """Token id b is byte b."""

    stop_ids = frozenset()

    def decode_bytes(self, ids: list[int]) -> bytes:
        return bytes(ids)


def pushed(stream: TextStream, data: bytes) -> tuple[list[str], bool]:
    out, stopped = [], False
    for b in data:
        text, stopped = stream.push(b)
        out.append(text)
        if stopped:
            break
    return out, stopped


def test_text_stream_holds_back_stop_string_prefixes_and_partial_utf8():
    out, stopped = pushed(TextStream(ByteTokenizer(), ["END", "xyz"]), b"abc EN! en END tail")
    assert stopped and "".join(out) == "abc EN! en "
    assert out[4:6] == ["", ""]  # "E", "N" held back: they could begin "END" ...
    assert out[6] == "EN!"  # ... released once they cannot
    out, stopped = pushed(TextStream(ByteTokenizer(), []), "é€😀".encode())
    assert not stopped and "".join(out) == "é€😀"
    assert all(len(x.encode()) in (0, 2, 3, 4) for x in out)  # whole characters only, never U+FFFD
    stream = TextStream(ByteTokenizer(), ["ab"])
    assert pushed(stream, b"xa")[0] == ["x", ""] and stream.flush() == "a"  # the end releases what was held


def test_served_name_is_the_checkpoints_without_quantization(tmp_path):
    for file, name in [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
        ("Meta-Llama-3-8B-Instruct-Q4_K_M.gguf", "Meta-Llama-3-8B-Instruct"),
        ("model.f16.gguf", "model"),
        ("tiny.gguf", "tiny"),
    ]:
        (tmp_path / file).touch()
        assert checkpoint_name(tmp_path / file) == name
    (tmp_path / "Meta-Llama-3-8B" / "original").mkdir(parents=True)
    assert checkpoint_name(tmp_path / "Meta-Llama-3-8B" / "original") == "Meta-Llama-3-8B"
    assert checkpoint_name(tmp_path / "Meta-Llama-3-8B") == "Meta-Llama-3-8B"


@pytest.mark.parametrize(
    "setting, needle",
    [
        ("serve.port=70000", "serve.port"),
        ("serve.max_queue=-1", "serve.max_queue"),
        ("serve.heartbeat_s=100", "serve.heartbeat_s"),
        ("serve.hots=x", "serve.host"),
    ],
)
def test_bad_serve_config_is_one_error_naming_the_key(setting, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(None, [setting])


def test_serve_cli_errors_are_one_line_and_exit_2(tiny_gguf):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        for args, needle in [(["--port", str(port)], "cannot listen"), (["--set", "serve.port=-1"], "serve.port")]:
            r = run_cli("serve", "--checkpoint", str(tiny_gguf), *args)
            assert r.returncode == 2 and needle in r.stderr
            assert r.stderr.strip().splitlines()[-1].startswith("error: ")
            assert "Traceback" not in r.stderr
    finally:
        busy.close()


# --- one process ---


def test_models_health_and_metrics(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = server.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = server.get("/metrics").text
    for name in (
        "llama3_dist_requests_running",
        "llama3_dist_requests_waiting",
        "llama3_dist_kv_slots_in_use",
        "llama3_dist_prompt_tokens_total",
        "llama3_dist_generation_tokens_total",
        "llama3_dist_time_to_first_token_seconds_bucket",
        "llama3_dist_inter_token_latency_seconds_bucket",
    ):
        assert name in metrics


def test_greedy_completion_equals_generate(server, local_model):
    m = local_model
    for prompt in ("hello", "a somewhat longer prompt here"):
        got = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        ids = m.tokenizer.encode(prompt)
        [want] = generate(m.model, m.mesh, [ids], SamplingParams(12, temperature=0.0), m.tokenizer.stop_ids)
        assert got.choices[0].text == m.tokenizer.decode(want.tokens)
        assert got.choices[0].finish_reason == want.finish_reason
        assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == len(want.tokens)


def test_seeded_sampling_equals_generate_alone(server, local_model):
    m = local_model
    params = SamplingParams(16, temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    got = complete(server, "seeded", max_tokens=16, temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    [want] = generate(m.model, m.mesh, [m.tokenizer.encode("seeded")], params, m.tokenizer.stop_ids)
    assert got["choices"][0]["text"] == m.tokenizer.decode(want.tokens)
    params = SamplingParams(16, temperature=1.5, min_p=0.2, seed=99)  # vLLM's min_p
    got = complete(server, "seeded", max_tokens=16, temperature=1.5, top_p=0.9, min_p=0.2, seed=99)
    [want] = generate(m.model, m.mesh, [m.tokenizer.encode("seeded")], params, m.tokenizer.stop_ids)
    assert got["choices"][0]["text"] == m.tokenizer.decode(want.tokens)


def test_penalties_equal_generate_among_other_requests(server, local_model):
    """presence / frequency / repetition penalties (vLLM's fields) give generate's tokens while
    unpenalized requests share the batch; without them the tokens differ."""
    m = local_model
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 1.5, "repetition_penalty": 1.4}
    ids = m.tokenizer.encode("abcabcabc")
    [want] = generate(m.model, m.mesh, [ids], SamplingParams(16, temperature=0.0, **penalties), m.tokenizer.stop_ids)
    [plain] = generate(m.model, m.mesh, [ids], SamplingParams(16, temperature=0.0), m.tokenizer.stop_ids)
    assert want.tokens != plain.tokens
    with ThreadPoolExecutor(3) as pool:
        others = [pool.submit(complete, server, "other", max_tokens=24, temperature=0) for _ in range(2)]
        got = complete(server, ids, max_tokens=16, temperature=0, **penalties)
        [f.result() for f in others]
    assert got["choices"][0]["text"] == m.tokenizer.decode(want.tokens)


def test_tokenize_and_detokenize_as_vllm_and_llama_cpp_ask(server, local_model):
    tok = local_model.tokenizer
    got = server.post("/tokenize", {"model": "tiny", "prompt": "hello there"}).json()
    assert got == {"tokens": tok.encode("hello there"), "count": len(tok.encode("hello there")), "max_model_len": 8192}
    assert server.post("/tokenize", {"content": "hello there"}).json()["tokens"] == tok.encode("hello there")
    messages = [{"role": "user", "content": "hi"}]
    assert server.post("/tokenize", {"messages": messages}).json()["tokens"] == tok.encode_chat(messages)
    back = server.post("/detokenize", {"tokens": got["tokens"]}).json()
    assert back == {"prompt": tok.decode(got["tokens"]), "content": tok.decode(got["tokens"])}
    for path, body, param in (("/detokenize", {"tokens": [1, -1]}, "tokens"), ("/tokenize", {"prompt": 5}, "prompt")):
        r = server.post(path, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_token_id_prompts_and_batches_of_prompts(server):
    """A list of prompts is prefilled as one ragged batch; each still gives its tokens alone."""
    one = complete(server, "abc", max_tokens=5, temperature=0)["choices"][0]["text"]
    ids = complete(server, list(b"abc"), max_tokens=5, temperature=0)["choices"][0]["text"]
    both = complete(server, [list(b"abc"), list(b"xyz and more")], max_tokens=5, temperature=0)["choices"]
    strings = complete(server, ["abc", "xyz and more"], max_tokens=5, temperature=0)["choices"]
    assert one == ids == both[0]["text"] == strings[0]["text"]
    assert (
        both[1]["text"]
        == strings[1]["text"]
        == complete(server, "xyz and more", max_tokens=5, temperature=0)["choices"][0]["text"]
    )
    assert [c["index"] for c in both] == [0, 1]


def test_stream_equals_whole_response(server):
    body = {"prompt": "stream me", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    whole = complete(server, **body)["choices"][0]
    events = stream_completion(server, {**body, "stream_options": {"include_usage": True}})
    assert streamed_text(events) == whole["text"]
    finals = [c for e in events for c in e["choices"] if c["finish_reason"] is not None]
    assert [c["finish_reason"] for c in finals] == ["length"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 20
    assert all(e["object"] == "text_completion" for e in events)


def test_chat_stream_and_not_through_openai_client(server, local_model):
    m = local_model
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    whole = server.client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    [want] = generate(
        m.model, m.mesh, [m.tokenizer.encode_chat(messages)], SamplingParams(10, temperature=0.0), m.tokenizer.stop_ids
    )
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == m.tokenizer.decode(want.tokens)
    chunks = list(
        server.client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_concurrent_requests_each_equal_their_output_alone(server):
    """8 requests, greedy and seeded, arriving while others decode (4 slots: some wait), each as alone."""
    requests = []
    for i in range(8):
        body = {"prompt": f"request number {i} " + "x" * (i * 3), "max_tokens": 160 + i, "ignore_eos": True}
        body |= {"temperature": 0} if i % 3 else {"temperature": 0.8, "top_p": 0.9, "seed": 100 + i}
        requests.append(body)
    alone = [complete(server, **b)["choices"][0]["text"] for b in requests]
    seen = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(server.get("/health").json()["slots_in_use"])
            time.sleep(0.02)

    def run(i):
        time.sleep(0.03 * i)  # staggered: later ones arrive while earlier ones decode
        if i % 2:
            return streamed_text(stream_completion(server, requests[i]))
        body = dict(requests[i])
        extra = {"ignore_eos": body.pop("ignore_eos")}  # an extension: the openai client passes it as extra_body
        return server.client.completions.create(model="tiny", extra_body=extra, **body).choices[0].text

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(run, range(8), timeout=REQUEST_TIMEOUT_S))
    finally:
        stop.set()
        watcher.join()
    assert together == alone
    assert max(seen) > 1, "the requests never shared a batch"


def test_n_choices_are_the_seeds_seed_plus_i(server):
    body = {"prompt": "choices", "max_tokens": 10, "temperature": 1.0, "seed": 42}
    many = complete(server, **body, n=3)
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    for i, c in enumerate(many["choices"]):
        assert c["text"] == complete(server, **{**body, "seed": 42 + i})["choices"][0]["text"]
    assert many["usage"]["completion_tokens"] == sum(
        complete(server, **{**body, "seed": 42 + i})["usage"]["completion_tokens"] for i in range(3)
    )
    events = stream_completion(server, {**body, "n": 3})
    assert [streamed_text(events, i) for i in range(3)] == [c["text"] for c in many["choices"]]


def printable_window(text: str, width: int) -> int:
    return next(
        i
        for i in range(1, len(text) - width)
        if text[i : i + width].isascii() and text[i : i + width].isprintable() and text[i : i + width] not in text[:i]
    )


def test_stop_string_split_across_tokens_never_reaches_the_client(server):
    body = {"prompt": "stop here", "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    full = complete(server, **body)["choices"][0]["text"]
    i = printable_window(full, 3)  # 3 characters = 3 byte tokens: the stop string spans chunks
    stop = full[i : i + 3]
    events = stream_completion(server, {**body, "stop": [stop, "never appears"]})
    chunks = [c["text"] for e in events for c in e["choices"]]
    assert "".join(chunks) == full[:i]
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["stop"]
    whole = complete(server, **body, stop=stop)["choices"][0]
    assert whole["text"] == full[:i] and whole["finish_reason"] == "stop"


def llama_cpp_stream(server: Server, body: dict) -> list[dict]:
    """Every SSE event's JSON from POST /completion (llama-server's stream: no [DONE])."""
    url, body = f"{server.url}/completion", {**body, "stream": True}
    with httpx.stream("POST", url, json=body, timeout=REQUEST_TIMEOUT_S) as r:
        assert r.status_code == 200, r.read()
        data = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    return [json.loads(d) for d in data]


def test_llama_cpp_completion_answers_as_llama_server(server, local_model):
    """POST /completion, llama.cpp's own API: generate's greedy text and counts, a stream of pieces
    that adds up to it, a stop word named, llama-server's sampling defaults and `repeat_penalty`; and
    GET /props, where llama.cpp's clients read the context size, /apply-template and vLLM's /version."""
    m = local_model
    ids = m.tokenizer.encode("hello")
    [want] = generate(m.model, m.mesh, [ids], SamplingParams(12, temperature=0.0), m.tokenizer.stop_ids)
    r = server.post("/completion", {"prompt": "hello", "n_predict": 12, "temperature": 0, "model": "any"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["content"] == m.tokenizer.decode(want.tokens) and got["stop"] is True
    assert (got["tokens_predicted"], got["tokens_evaluated"]) == (len(want.tokens), len(ids))
    assert got["stop_type"] == {"length": "limit", "stop": "eos"}[want.finish_reason]
    assert got["timings"]["predicted_n"] == len(want.tokens)
    assert server.post("/completions", {"prompt": ids, "n_predict": 12, "temperature": 0}).json() | {
        "timings": None
    } == got | {"timings": None}

    events = llama_cpp_stream(server, {"prompt": ids, "n_predict": 12, "temperature": 0})
    assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True]
    assert "".join(e["content"] for e in events) == got["content"]
    assert events[-1]["tokens_predicted"] == got["tokens_predicted"]

    body = {"prompt": "stop here", "n_predict": 60, "temperature": 0, "ignore_eos": True}
    full = server.post("/completion", body).json()["content"]
    i = printable_window(full, 3)
    word = full[i : i + 3]
    for stopped in (server.post("/completion", {**body, "n_predict": -1, "stop": [word]}).json(),
                    llama_cpp_stream(server, {**body, "n_predict": -1, "stop": [word]})[-1]):  # fmt: skip
        assert (stopped["stop_type"], stopped["stopping_word"]) == ("word", word)
    assert "".join(e["content"] for e in llama_cpp_stream(server, {**body, "stop": [word]})) == full[:i]

    sampled = SamplingParams(16, **{"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}, seed=1234)
    [want] = generate(m.model, m.mesh, [m.tokenizer.encode("seeded")], sampled, m.tokenizer.stop_ids)
    got = server.post("/completion", {"prompt": "seeded", "n_predict": 16, "seed": 1234}).json()
    assert got["content"] == m.tokenizer.decode(want.tokens)
    ids = m.tokenizer.encode("abcabcabc")
    penalized = SamplingParams(16, temperature=0.0, repetition_penalty=1.4)
    [want] = generate(m.model, m.mesh, [ids], penalized, m.tokenizer.stop_ids)
    got = server.post("/completion", {"prompt": ids, "n_predict": 16, "temperature": 0, "repeat_penalty": 1.4})
    assert got.json()["content"] == m.tokenizer.decode(want.tokens)

    messages = [{"role": "user", "content": "hi"}]
    rendered = server.post("/apply-template", {"messages": messages}).json()["prompt"]
    assert rendered == m.tokenizer.decode(m.tokenizer.encode_chat(messages))
    assert server.post("/apply-template", {"messages": []}).status_code == 400
    assert server.get("/version").json() == {"version": llama3_dist.__version__}
    props = server.get("/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 8192 and props["total_slots"] == 4, props
    assert props["chat_template"] == (m.tokenizer.chat_template or "")

    near_end = {"prompt": [ids[-1]] * 8180, "n_predict": 10**6, "temperature": 0, "ignore_eos": True}
    r = server.post("/completion", near_end)  # as llama-server, it stops at the context's end
    assert r.status_code == 200 and r.json()["tokens_predicted"] == 12 and r.json()["stop_type"] == "limit", r.text
    for bad_body, param in (({"prompt": 5}, "prompt"), ({"prompt": "a", "n_predict": 0}, "n_predict"),
                            ({"prompt": "a", "n_probs": 3}, "n_probs")):  # fmt: skip
        r = server.post("/completion", bad_body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_stop_token_ids_end_the_text_with_the_token_as_vllm_does(server, local_model):
    """vLLM's stop_token_ids: generation ends at the first of them, which is part of the completion
    (text and usage) unless it is a special token."""
    m = local_model
    ids = m.tokenizer.encode("stop here")
    [free] = generate(m.model, m.mesh, [ids], SamplingParams(40, temperature=0.0), frozenset())
    t = free.tokens[6]
    j = free.tokens.index(t)
    body = {"prompt": ids, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stop_token_ids": [t]}
    got = complete(server, **body)
    assert got["choices"][0]["text"] == m.tokenizer.decode(free.tokens[: j + 1])
    assert got["choices"][0]["finish_reason"] == "stop" and got["usage"]["completion_tokens"] == j + 1
    assert streamed_text(stream_completion(server, body)) == got["choices"][0]["text"]
    r = server.post("/v1/completions", {**body, "stop_token_ids": [-1]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids", r.text


def model_logprobs(m, ids: list[int]) -> torch.Tensor:
    """log-softmax of the local model's float32 logits at every position of ids: (T, V)."""
    m.model.setup_caches(1, len(ids))
    with torch.inference_mode():
        logits = m.model(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0))
    return torch.log_softmax(logits[0].float(), dim=-1)


def test_logprobs_and_echo_match_the_models_logits(server, local_model):
    m = local_model
    prompt = "score this text"
    got = complete(server, prompt, max_tokens=6, temperature=0, logprobs=3, echo=True)["choices"][0]
    ids = m.tokenizer.encode(prompt)
    text = got["text"]
    assert text.startswith(prompt)
    lp = got["logprobs"]
    n_prompt = len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    [gen] = generate(m.model, m.mesh, [ids], SamplingParams(6, temperature=0.0), m.tokenizer.stop_ids)
    all_ids = ids + gen.tokens
    want = model_logprobs(m, all_ids)
    assert len(lp["token_logprobs"]) == len(all_ids)
    for t in range(1, len(all_ids)):
        assert lp["token_logprobs"][t] == pytest.approx(float(want[t - 1, all_ids[t]]), abs=1e-4)
        # many byte tokens decode to the same U+FFFD string, so the top-3 dict may hold fewer keys
        assert max(lp["top_logprobs"][t].values()) == pytest.approx(float(want[t - 1].max()), abs=1e-4)
    assert lp["tokens"][:n_prompt] == [m.tokenizer.decode([i]) for i in ids]
    chat = server.client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    chat_ids = m.tokenizer.encode_chat([{"role": "user", "content": prompt}])
    content = chat.choices[0].logprobs.content
    [gen] = generate(m.model, m.mesh, [chat_ids], SamplingParams(4, temperature=0.0), m.tokenizer.stop_ids)
    want = model_logprobs(m, chat_ids + gen.tokens)
    for j, entry in enumerate(content):
        t = len(chat_ids) + j
        assert bytes(entry.bytes) == m.tokenizer.decode_bytes([gen.tokens[j]])
        assert entry.logprob == pytest.approx(float(want[t - 1, gen.tokens[j]]), abs=1e-4)
        assert len(entry.top_logprobs) == 2


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
        ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "x", "n": 5}, "n"),  # 4 slots
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 2, 999]}, "prompt"),
        ({"prompt": {"text": "x"}}, "prompt"),
        ({"prompt": "x" * 8180, "max_tokens": 25}, "max_tokens"),  # 8180 + 25 > runtime.max_seq_len=8192
    ],
)
def test_bad_completion_requests_are_400_naming_the_key(server, body, param):
    r = server.post("/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and param in err["message"]


def test_bad_chat_requests_json_and_model(server):
    r = server.post("/v1/chat/completions", "{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = server.post("/v1/chat/completions", {"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    with pytest.raises(openai.NotFoundError) as e:
        server.client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model="tiny", prompt="x", max_tokens=9000)
    assert "runtime.max_seq_len" in e.value.body["message"]
    ok = server.post("/v1/completions", {"prompt": "x", "max_tokens": 2, "unknown_field": [1, 2]})
    assert ok.status_code == 200  # unknown fields are ignored, as OpenAI does


def slots_in_use(server: Server) -> int:
    return server.get("/health").json()["slots_in_use"]


def wait_until(cond, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_full_queue_is_429_and_disconnects_free_the_slots(server):
    """4 slots + serve.max_queue=4: a 9th request is refused; closing the streams frees every slot.

    Each stream asks for 8000 tokens, many seconds of work; closed, their slots are free well before that.
    """
    body = {
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 8000,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0,
    }
    readers = []  # a dropped line iterator closes its connection: keep them until the end
    with contextlib.ExitStack() as open_streams:
        for _ in range(8):
            client = open_streams.enter_context(httpx.Client(timeout=REQUEST_TIMEOUT_S))
            s = open_streams.enter_context(client.stream("POST", f"{server.url}/v1/chat/completions", json=body))
            readers.append(s.iter_lines())
            next(readers[-1])  # the role chunk: the request is queued
        r = server.post("/v1/chat/completions", {**body, "stream": False})
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "queue_full"
        assert slots_in_use(server) == 4
        readers.clear()
    assert wait_until(lambda: slots_in_use(server) == 0, 5), "closed streams still hold slots"
    assert wait_until(lambda: "llama3_dist_kv_slots_in_use 0.0" in server.get("/metrics").text)
    assert server.get("/health").json()["waiting"] == 0
    assert complete(server, "after", max_tokens=3)["choices"][0]["finish_reason"] == "length"


def test_non_streamed_disconnect_frees_the_slot(server):
    body = {"prompt": "long", "max_tokens": 8000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        server.post("/v1/completions", body, timeout=httpx.Timeout(REQUEST_TIMEOUT_S, read=0.5))
    assert wait_until(lambda: slots_in_use(server) == 0, 5)


# --- the embedded model: its name, its chat template, loading ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_embedded_model_name_chat_template_and_loading(smollm2_gguf):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama3_dist",
            "serve",
            "--port",
            str(port),
            "--set",
            "runtime.compile=false",
            "--set",
            "runtime.max_seq_len=256",
            "--set",
            "runtime.max_batch_size=2",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        assert any("loading the model" in proc.stderr.readline() for _ in range(20))
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "loading"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        deadline = time.monotonic() + START_TIMEOUT_S
        for line in proc.stderr:
            if "listening on" in line or time.monotonic() > deadline:
                break
        assert line.strip() == f"listening on http://127.0.0.1:{port}"
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=REQUEST_TIMEOUT_S
        )
        assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        got = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=messages, max_tokens=8, temperature=0
        )
        m = assemble(load_config(None, ["runtime.max_seq_len=256"]))
        [want] = generate(
            m.model,
            m.mesh,
            [m.tokenizer.encode_chat(messages)],
            SamplingParams(8, temperature=0.0),
            m.tokenizer.stop_ids,
        )
        assert got.choices[0].message.content == m.tokenizer.decode(want.tokens)
        assert "Paris" in got.choices[0].message.content
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise


# --- torchrun: TP=2 and PP=2 give the one-process tokens; a killed rank ends the server ---

LAYOUT_REQUESTS = [
    {"prompt": "layouts agree", "max_tokens": 16, "temperature": 0},
    {"prompt": "another prompt, longer than the first one", "max_tokens": 12, "temperature": 0, "logprobs": 2},
    {"prompt": "sampled", "max_tokens": 16, "temperature": 0.7, "seed": 5},
]


def layout_outputs(server: Server) -> list[dict]:
    with ThreadPoolExecutor(len(LAYOUT_REQUESTS)) as pool:  # together, so the batch path runs too
        return list(pool.map(lambda b: complete(server, **b)["choices"][0], LAYOUT_REQUESTS))


def assert_same(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want):
        assert g["text"] == w["text"] and g["finish_reason"] == w["finish_reason"]
        if w["logprobs"] is not None:
            assert g["logprobs"]["token_logprobs"] == pytest.approx(w["logprobs"]["token_logprobs"], abs=1e-4)


@pytest.mark.parametrize(
    "layout, idle_s",
    [(["parallel.tensor=2", "runtime.timeout_s=15"], 3), (["parallel.pipeline=2", "runtime.timeout_s=15"], 17)],
    ids=["tp2", "pp2"],
)
def test_torchrun_layouts_give_the_one_process_tokens(server, tiny_gguf, layout, idle_s):
    want = layout_outputs(server)
    sets = [x for kv in TINY_SETS + layout for x in ("--set", kv)]
    dist = Server(["--checkpoint", str(tiny_gguf), *sets], nproc=2)
    try:
        assert_same(layout_outputs(dist), want)
        events = stream_completion(dist, LAYOUT_REQUESTS[0])
        assert streamed_text(events) == want[0]["text"]
        # idle (pp2: longer than the collective timeout): heartbeats keep the waiting ranks from timing out
        time.sleep(idle_s)
        assert dist.proc.poll() is None
        assert_same(layout_outputs(dist), want)
        if "parallel.pipeline=2" in layout:
            killed_rank_ends_the_server(dist)
        else:
            stopped_rank_ends_the_server(dist, timeout_s=15)
    finally:
        dist.close()


def stopped_rank_ends_the_server(dist: Server, timeout_s: float) -> None:
    """SIGSTOP rank 1 mid-stream (alive and silent, so torchrun sees nothing): the client gets an error
    event, and rank 0 prints one line naming the silent collective and exits within timeout_s + 10 s."""
    ranks = workers(dist.proc.pid)
    body = {"prompt": "stopped", "max_tokens": 8000, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", f"{dist.url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            ranks[1].suspend()
            stopped = time.monotonic()
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest and rest[-1] != "data: [DONE]", "the stream ended as if complete"
        assert "error" in rest[-1], rest[-3:]
        ranks[0].wait(timeout_s + 10)  # gone, not hanging
        exited = time.monotonic() - stopped
        assert exited < timeout_s + 10
        line = dist.wait_for(r"error: \[rank 0\] serve: a rank stopped answering .*", timeout=5)[0]
        assert "rank 1" in line and "timeout" in line, line
        print(f"\n{line} (rank 0 gone {exited:.1f} s after SIGSTOP)")
    finally:
        ranks[1].kill()


def killed_rank_ends_the_server(dist: Server) -> None:
    """SIGKILL rank 1 mid-stream: the client gets an error (not a hang), the job exits non-zero within 30 s."""
    rank1 = workers(dist.proc.pid)[1]
    body = {"prompt": "killed", "max_tokens": 8000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{dist.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        rank1.kill()
        killed = time.monotonic()
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest, "the stream closed without a word"
    assert "error" in json.loads(rest[-1][len("data: ") :]) or rest[-1] != "data: [DONE]"
    assert dist.proc.wait(30) != 0
    assert time.monotonic() - killed < 30


# --- bench --serve against the running server: a smoke run, no timing asserts ---


def test_bench_serve_runs_end_to_end(server, tiny_gguf):
    args = argparse.Namespace(
        serve=server.url,
        clients="1,2",
        prompt_len=16,
        new_tokens=4,
        threads=1,
        eager=True,
        set=[f"model.checkpoint={tiny_gguf}"],
        timeout=REQUEST_TIMEOUT_S,
    )
    result = run_serving_bench(args)
    assert [r["clients"] for r in result["rounds"]] == [1, 2]
    for r in result["rounds"]:
        assert r["tok_s"] > 0 and r["static_tok_s"] > 0 and r["ttft_p50_ms"] > 0 and r["itl_p50_ms"] > 0
    assert result["model"] == "tiny" and result["late_ttft_ms"] > 0
    assert "clients" in serving_table(result)


# --- last: SIGTERM ends the one-process server cleanly ---


def test_sigterm_stops_taking_requests_and_exits_0(server):
    """The in-flight request (seconds of work) finishes within serve.shutdown_grace_s; a new one is refused."""
    body = {"prompt": "finish me", "max_tokens": 1000, "ignore_eos": True, "temperature": 0}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=REQUEST_TIMEOUT_S
    ) as r:
        lines = r.iter_lines()
        next(lines)
        server.proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: any("SIGTERM" in x for x in server.lines), 10)
        late = server.post("/v1/completions", body)
        assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"  # the in-flight request finished within the grace time
    assert server.proc.wait(30) == 0
