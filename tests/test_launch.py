"""torchrun and launch/ end to end (the small presets, two "nodes" on localhost): the same tokens as one
process, rank-0-only output, no hang on failure."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.distributed import run_ranks
from helpers.launch import LONG_GENERATION, LONG_PROMPT, run_cli, torchrun_cmd, workers

from llama3_dist.checkpoint import load_model, open_checkpoint
from llama3_dist.generate import SamplingParams, generate

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--prompt", "hello there", "--prompt", "x", "--max-new-tokens", "8", "--temperature", "0", "--json"]


def torchrun(nproc: int, *args: str, **kw) -> subprocess.CompletedProcess:
    cmd = torchrun_cmd(nproc, "generate", *args)
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 180), stdin=subprocess.DEVNULL, **kw
    )


def tokens_of(stdout: str) -> list[list[int]]:
    return [json.loads(line)["tokens"] for line in stdout.splitlines()]


@pytest.fixture(scope="module")
def one_process(tiny_gguf) -> list[list[int]]:
    """The tokens of ARGS from one plain process: what every layout and launcher must print."""
    r = run_cli("generate", "--checkpoint", str(tiny_gguf), *ARGS)
    assert r.returncode == 0, r.stderr
    return tokens_of(r.stdout)


def test_torchrun_tp2_prints_once_and_matches_one_process(tiny_gguf, one_process):
    r = torchrun(2, "--checkpoint", str(tiny_gguf), "--set", "parallel.tensor=2", *ARGS)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2  # rank 0 only: one JSON line per prompt
    assert tokens_of(r.stdout) == one_process


def test_layout_mismatch_is_one_clear_error_before_loading(tiny_gguf):
    """Every rank checks the layout before it loads anything and prints the same line. Once the first
    rank exits, torchrun stops the others, so which of them get to print varies from run to run; the
    first to fail always prints before it exits."""
    r = torchrun(3, "--checkpoint", str(tiny_gguf), "--set", "parallel.tensor=2", *ARGS)
    assert r.returncode != 0
    message = "parallel.tensor (2) x parallel.pipeline (1) = 2 must equal the number of processes (3)"
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors, r.stderr
    assert all(re.fullmatch(rf"error: \[rank [012]\] {re.escape(message)}; launch with .*", e) for e in errors), errors
    assert "loading" not in r.stderr and r.stdout == ""


def test_a_killed_rank_ends_the_whole_job_quickly(long_gguf):
    cmd = torchrun_cmd(
        2,
        "generate",
        "--checkpoint",
        str(long_gguf),
        "--set",
        "parallel.tensor=2",
        *LONG_GENERATION,
    )
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert job.stdout.read(1) == LONG_PROMPT.encode()  # rank 0 streams the prompt once the model is loaded
        time.sleep(1.0)
        rank1 = workers(job.pid).get(1)
        assert rank1 is not None
        rank1.kill()
        killed = time.monotonic()
        code = job.wait(timeout=60)
        assert code != 0
        assert time.monotonic() - killed < 30
    finally:
        if job.poll() is None:
            job.kill()


def _raise_mid_generation(mesh, path: str):
    model = load_model(open_checkpoint(path), mesh, __import__("torch").float32)

    def on_token(row: int, token: int, seen=[]):  # noqa: B006 - a counter local to this rank
        seen.append(token)
        if mesh.rank == 1 and len(seen) == 3:
            raise RuntimeError("injected failure on rank 1")

    generate(model, mesh, [[1, 2, 3]], SamplingParams(5000, temperature=0.0), frozenset(), on_token)
    return "finished"


def test_a_raising_rank_makes_its_peer_fail_not_hang(tiny_gguf):
    # No launcher to kill the survivors: rank 0 itself must notice within the 30 s budget.
    outcomes = run_ranks(_raise_mid_generation, 2, str(tiny_gguf), outcomes=True, timeout=60)
    (ok0, err0, t0), (ok1, err1, _) = outcomes
    assert not ok1 and "injected failure on rank 1" in err1
    assert not ok0, "rank 0 finished although its peer died"
    assert t0 < 30


@pytest.mark.parametrize("name", ["smollm2-135m-pp2", "smollm2-135m-tp2-pp2", "smollm2-135m-tp4"])
def test_small_presets_run_through_the_launch_script(tiny_gguf, one_process, name):
    """launch/run.sh reads the rank count from the preset (2, 4 or 4 ranks) and prints one process's tokens."""
    r = subprocess.run(
        [
            str(REPO / "launch" / "run.sh"),
            str(REPO / "configs" / f"{name}.yaml"),
            "--",
            "--checkpoint",
            str(tiny_gguf),
            *ARGS,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["tokens"] for x in r.stdout.splitlines()] == one_process


def test_two_nodes_on_localhost_run_tp2_like_one_process(tiny_gguf, one_process):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        str(REPO / "launch" / "multinode.sh"),
        str(REPO / "configs" / "smollm2-135m-tp2.yaml"),
        "--nnodes",
        "2",
        "--endpoint",
        f"127.0.0.1:{port}",
        "--id",
        "test",
        "--",
        "--checkpoint",
        str(tiny_gguf),
        *ARGS,
    ]
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL
        )
        for _ in range(2)
    ]
    outs = [n.communicate(timeout=240) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), [o[1][-2000:] for o in outs]
    lines = [x for out, _ in outs for x in out.splitlines()]
    assert len(lines) == 2  # only global rank 0, on whichever node it landed, prints
    assert [json.loads(x)["tokens"] for x in lines] == one_process
