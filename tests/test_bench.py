"""`bench` runs end to end (a smoke run: no timing is asserted) and refuses CUDA without a GPU in one line."""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch

from llama3_dist.bench import run_bench, table
from llama3_dist.bench.run import best_of, failure
from llama3_dist.cli import main


def test_bench_smoke_run_ours_and_transformers_agree():
    args = argparse.Namespace(
        quick=True, threads=2, prompt_len=16, new_tokens=4, timeout=600, work_dir=None, eager=True
    )
    [row] = run_bench(args)
    assert row["setting"] == "SmolLM2 fp32 b1" and row["bandwidth_gb_s"] > 0
    ours, hf = row["engines"]["ours"], row["engines"]["transformers"]
    assert "error" not in ours and "error" not in hf, row
    assert ours["decode_tok_s"] > 0 and 0 < ours["roofline_pct"]
    assert hf["same_tokens"] is True  # same weights, same prompt ids, greedy: the same tokens
    text = table([row])
    assert "ours/peer decode" in text and "transformers" in text and "GB/s" in text


def test_bench_on_cuda_without_a_gpu_is_one_clear_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    assert main(["bench", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: bench --device cuda: CUDA is not available here; run it on a GPU machine"]


def test_rounds_keep_each_engines_best_decode_and_prefill(capsys):
    slow = {"prefill_ms": 300.0, "decode_tok_s": 50.0, "tokens": [[1, 2]]}
    fast = {"prefill_ms": 350.0, "decode_tok_s": 60.0, "tokens": [[1, 2]]}
    failed = {"error": "ours failed: killed"}
    assert best_of(best_of(None, slow), fast) == {**fast, "prefill_ms": 300.0}
    assert best_of(best_of(None, failed), slow) == slow and best_of(slow, failed) == slow
    assert best_of(None, failed) == failed  # every round failed: the error is the result
    assert main(["bench", "--rounds", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: bench --rounds 0: give 1 or more"]


def test_an_engine_that_dies_says_how():
    """A worker killed by a signal (llama.cpp built for instructions the machine has not enabled dies
    of SIGILL, with nothing on stderr) is reported by that signal, not as 'no output'."""
    cmd = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
    assert failure(subprocess.run(cmd, capture_output=True, text=True)).startswith("killed by SIGILL (an instruction")
    cmd = [sys.executable, "-c", "import sys; sys.exit('no model here')"]
    assert failure(subprocess.run(cmd, capture_output=True, text=True)) == "no model here"
