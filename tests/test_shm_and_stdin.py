"""Machinery that must not leak or collide: shared-memory segments (owner-only, unlinked, stale ones
removed, refused off x86), two jobs on one host, and stdin read by rank 0 alone under torchrun."""

from __future__ import annotations

import json
import logging
import os
import re
import selectors
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import random_model, tiny_config, write_gguf
from helpers.distributed import run_ranks
from helpers.launch import run_cli, torchrun_cmd

from llama3_dist.config import ParallelConfig, RuntimeConfig
from llama3_dist.parallel import mesh as mesh_module
from llama3_dist.parallel import shm
from llama3_dist.parallel.mesh import Mesh, use_shm

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ARGS = ["--max-new-tokens", "6", "--temperature", "0", "--json"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_gguf(random_model(tiny_config(), seed=43), tmp_path_factory.mktemp("m") / "tiny.gguf")


def our_segments(pid: int) -> list[str]:
    return [p.name for p in shm.SHM_DIR.glob(f"{shm.PREFIX}{pid}-*")]


def test_a_segment_is_created_owner_only():
    path, why = shm.create_segment(1 << 20)
    assert why is None
    try:
        mode = os.stat(path).st_mode
        assert stat.S_IMODE(mode) == 0o600, oct(mode)
        assert os.path.getsize(path) == 1 << 20
        assert Path(path).name.startswith(f"{shm.PREFIX}{os.getpid()}-")
    finally:
        os.unlink(path)


def _segments_after_setup(mesh: Mesh):
    from llama3_dist.parallel.comm import all_reduce

    x = all_reduce(torch.ones(3), mesh.tp)  # through the segment
    return mesh.tp.shm is not None, x.tolist(), os.getpid(), our_segments(os.getpid())


def test_segments_are_unlinked_once_every_rank_has_mapped_them():
    for used, summed, pid, left in run_ranks(_segments_after_setup, 2, shm=True):
        assert used and summed == [2.0, 2.0, 2.0]
        assert left == [], left
        assert our_segments(pid) == []


def test_a_segment_left_by_a_killed_job_is_removed_by_the_next_one():
    # a process that dies by SIGKILL between creating its segment and unlinking it
    code = (
        "from llama3_dist.parallel import shm; print(shm.create_segment(1 << 20)[0], flush=True); "
        "import time; time.sleep(120)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV, stdin=subprocess.DEVNULL
    )
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout=60), "the segment-making process printed nothing within 60 s"
        left = Path(proc.stdout.readline().strip())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert left.exists() and left.name.startswith(f"{shm.PREFIX}{proc.pid}-")
    for used, summed, _, _ in run_ranks(_segments_after_setup, 2, shm=True):  # the next job
        assert used and summed == [2.0, 2.0, 2.0]
    assert not left.exists()


def test_stale_cleanup_keeps_the_segments_of_live_processes(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, timeout=60
    ).stdout.strip()
    (tmp_path / f"{shm.PREFIX}{dead}-ab12").write_bytes(b"x")
    (tmp_path / f"{shm.PREFIX}{os.getpid()}-cd34").write_bytes(b"x")
    (tmp_path / "someone-else").write_bytes(b"x")
    assert shm.remove_stale_segments(tmp_path) == [f"{shm.PREFIX}{dead}-ab12"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{shm.PREFIX}{os.getpid()}-cd34", "someone-else"])


def test_shm_is_refused_where_stores_are_not_ordered_like_x86(monkeypatch, request):
    records: list[logging.LogRecord] = []
    catch = logging.Handler(logging.INFO)
    catch.emit = records.append
    # only this handler: another test's CLI run may have left a handler on a closed capture stream
    monkeypatch.setattr(logging.getLogger("llama3_dist"), "handlers", [catch])
    request.addfinalizer(lambda level=mesh_module.log.level: mesh_module.log.setLevel(level))
    mesh_module.log.setLevel(logging.INFO)
    cpu, tp2 = RuntimeConfig(), ParallelConfig(tensor=2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(shm.platform, "machine", lambda: "x86_64")
    assert use_shm(tp2, cpu, 2)
    assert use_shm(ParallelConfig(tensor=2, collectives="shm"), cpu, 2)
    assert not use_shm(ParallelConfig(tensor=2, collectives="backend"), cpu, 2)
    assert not use_shm(tp2, RuntimeConfig(device="cuda"), 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # ranks on two hosts: auto leaves shm off
    assert not use_shm(tp2, cpu, 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert records == []
    monkeypatch.setattr(shm.platform, "machine", lambda: "aarch64")
    for collectives in ("auto", "shm"):
        assert not use_shm(ParallelConfig(tensor=2, collectives=collectives), cpu, 2)
    lines = [r.getMessage() for r in records if r.name == mesh_module.log.name and r.levelno == logging.INFO]
    assert len(lines) == 2 and all("aarch64" in x and "TSO" in x and "using gloo" in x for x in lines), lines


def _without_room(mesh: Mesh):
    from llama3_dist.parallel.comm import all_reduce

    shm.create_segment = lambda nbytes: (None, "test: /dev/shm has no room")
    again = mesh_module.build_mesh(2, 1, torch.device("cpu"), shm=True, timeout_s=60)
    return again.tp.shm is None, all_reduce(torch.ones(2), again.tp).tolist()


def test_no_room_for_a_segment_falls_back_to_gloo_on_every_rank():
    assert run_ranks(_without_room, 2, shm=True) == [(True, [2.0, 2.0])] * 2


def torchrun(nproc: int, *args: str, stdin: str | None = None) -> subprocess.Popen:
    cmd = torchrun_cmd(nproc, "generate", *args)
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
    )


def single(tiny: Path, prompt: str) -> list[int]:
    r = run_cli("generate", "--checkpoint", str(tiny), "--prompt", prompt, *ARGS, env=ENV)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["tokens"]


def test_only_rank0_reads_stdin_and_broadcasts_the_prompt(tiny):
    prompt = "a prompt piped to torchrun, read once\n" * 50
    job = torchrun(2, "--checkpoint", str(tiny), "--set", "parallel.tensor=2", *ARGS, stdin=prompt)
    out, err = job.communicate(prompt, timeout=240)
    assert job.returncode == 0, err[-3000:]
    (line,) = out.splitlines()  # rank 0 alone prints
    result = json.loads(line)
    assert result["prompt"] == prompt
    assert result["tokens"] == single(tiny, prompt)


def test_two_jobs_on_one_host_at_once_do_not_collide(tiny):
    jobs = [
        torchrun(
            2,
            "--checkpoint",
            str(tiny),
            "--set",
            "parallel.tensor=2",
            "--set",
            "parallel.collectives=shm",
            "--prompt",
            p,
            *ARGS,
        )
        for p in ("first job", "second job")
    ]
    try:
        outs = [j.communicate(timeout=240) for j in jobs]
    finally:
        for j in jobs:
            if j.poll() is None:
                j.kill()
    assert all(j.returncode == 0 for j in jobs), [e[-2000:] for _, e in outs]
    for (out, _), prompt in zip(outs, ("first job", "second job")):
        assert json.loads(out)["tokens"] == single(tiny, prompt)


def test_an_empty_stdin_is_one_error_line_per_rank_after_joining(tiny):
    """The ranks have joined the job (to share stdin), so they end with os._exit: no hang, no traceback."""
    job = torchrun(2, "--checkpoint", str(tiny), "--set", "parallel.tensor=2", *ARGS, stdin="")
    out, err = job.communicate("", timeout=240)
    assert job.returncode != 0 and out == ""
    for rank in range(2):
        assert err.count(f"error: [rank {rank}] prompt 0 is empty: give some text") == 1, err[-3000:]
    assert not re.search(r'File ".*/llama3_dist/', err), err[-3000:]  # no traceback through our code
