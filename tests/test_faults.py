"""A rank that stops answering ends the job: every survivor exits non-zero within timeout_s + 10 s
with one `error:` line naming the collective and the silent rank, and nothing is left running.

The stopped rank is frozen with SIGSTOP (alive, so torchrun sees nothing), or killed with SIGKILL
in a job started without torchrun (so no launcher tears the job down). Each test records the
measured time to exit (printed with -s; see the README's Reliability section).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers.distributed import run_ranks
from helpers.launch import LONG_GENERATION, LONG_PROMPT, torchrun_cmd, workers

from llama3_dist.errors import CollectiveError
from llama3_dist.parallel.comm import all_reduce
from llama3_dist.parallel.mesh import Mesh, build_mesh

TIMEOUT_S = 8  # runtime.timeout_s of the faulty jobs (it also bounds how far apart the ranks may finish loading)
GRACE_S = 10  # a survivor must be gone within TIMEOUT_S + GRACE_S of the fault
PROMPT = LONG_PROMPT
LONG = [*LONG_GENERATION, "--set", "generate.stop=[]", "--set", f"runtime.timeout_s={TIMEOUT_S}"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def tiny(long_gguf) -> Path:
    return long_gguf


def wait_for(predicate, timeout: float, what: str):
    """Poll predicate() until it returns something truthy; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def started(job: subprocess.Popen, logs: Path) -> bool:
    """Mid-generation; a job that ended before its first token fails the test at once, with its logs."""
    if job.poll() is not None:
        errs = "".join(read(rank_log(logs, r, "stderr"))[-1500:] for r in (0, 1))
        raise AssertionError(f"the job ended (exit {job.returncode}) before generating:\n{errs}")
    return generating(rank_log(logs, 0, "stdout"))


def generating(stdout: Path) -> bool:
    """Rank 0 has streamed the prompt and at least one generated character: we are mid-generation."""
    return len(read(stdout)) > len(PROMPT)


def check_error_line(stderr: str, pattern: str) -> str:
    """Exactly one `error:` line, no traceback, and it matches the regex pattern. Returns the line."""
    errors = [x for x in stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert re.match(pattern, errors[0]), (pattern, errors[0])
    return errors[0]


def kill_all(procs) -> None:
    for p in procs:
        try:
            p.send_signal(signal.SIGCONT)
            p.kill()
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass


def torchrun_job(tiny: Path, logs: Path, *extra: str) -> subprocess.Popen:
    """A 2-rank torchrun job, each rank's stdout/stderr in logs/**/<local rank>/std{out,err}.log."""
    launcher = ("--redirects", "3", "--log-dir", str(logs))
    cmd = torchrun_cmd(2, "generate", "--checkpoint", str(tiny), *LONG, *extra, launcher=launcher)
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=ENV, text=True
    )


def rank_log(logs: Path, rank: int, stream: str) -> Path:
    found = list(logs.glob(f"**/{rank}/{stream}.log"))
    return found[0] if found else logs / "missing"


SILENT = r"did not (answer|arrive) within runtime.timeout_s"
# where the survivor notices depends on where the stop lands: the activations' send/recv or the token broadcast
PIPELINE_OP = r"(broadcast from rank \d|send to rank \d|recv from rank \d)"


@pytest.mark.parametrize(
    "layout,stop,message",
    [
        (
            ["--set", "parallel.tensor=2", "--set", "parallel.collectives=shm"],
            1,
            rf"error: \[rank 0\] shm (all_reduce|all_gather|broadcast) over ranks \(0, 1\): rank 1 \(pid \d+\) {SILENT}",  # noqa: E501
        ),
        (
            ["--set", "parallel.tensor=2", "--set", "parallel.collectives=backend"],
            1,
            rf"error: \[rank 0\] (all_reduce|all_gather|broadcast from rank 0) over ranks \(0, 1\): rank 1 {SILENT}",
        ),
        # stage 0 waits for the tokens the last stage samples; stage 1 waits for stage 0's activations
        (
            ["--set", "parallel.pipeline=2"],
            1,
            rf"error: \[rank 0\] {PIPELINE_OP} over ranks \(0, 1\): rank 1 {SILENT}",
        ),
        (
            ["--set", "parallel.pipeline=2"],
            0,
            rf"error: \[rank 1\] {PIPELINE_OP} over ranks \(0, 1\): rank 0 {SILENT}",
        ),
    ],
    ids=["shm", "gloo", "pipeline-stop-last", "pipeline-stop-first"],
)
def test_a_stopped_rank_ends_the_job(tiny, tmp_path, layout, stop, message):
    job = torchrun_job(tiny, tmp_path / "logs", *layout)
    survivor = 1 - stop
    try:
        wait_for(lambda: started(job, tmp_path / "logs"), 180, "the first generated token")
        ranks = wait_for(lambda: w if len(w := workers(job.pid)) == 2 else None, 10, "both workers")
        ranks[stop].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            ranks[survivor].wait(timeout=TIMEOUT_S + GRACE_S + 30)
        except psutil.TimeoutExpired:
            raise AssertionError(
                f"rank {survivor} still runs {TIMEOUT_S + GRACE_S + 30} s after rank {stop} stopped"
            ) from None
        took = time.monotonic() - stopped
        print(f"\nfault: SIGSTOP rank {stop} ({' '.join(layout)}): rank {survivor} exited after {took:.1f} s")
        assert took < TIMEOUT_S + GRACE_S, took
        kill_all([ranks[stop]])
        _, err = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            kill_all(workers(job.pid).values())
            job.kill()
            job.communicate(timeout=30)
    print(check_error_line(read(rank_log(tmp_path / "logs", survivor, "stderr")), message))
    # torchrun's failure report: the survivor ended on its own, with exit code 1
    assert re.search(rf"rank\s*:\s*{survivor} \(local_rank: {survivor}\)\s*\n\s*exitcode\s*:\s*1 ", err), err[-3000:]
    assert job.returncode != 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("collectives", ["shm", "backend"])
def test_a_killed_rank_ends_its_peer_without_a_launcher(tiny, tmp_path, collectives):
    """Two ranks started as plain processes (env:// rendezvous, no torchrun): SIGKILL rank 1, rank 0 ends itself."""
    port = free_port()
    procs, outs, errs = [], [], []
    for rank in range(2):
        env = {
            **ENV,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        outs.append(tmp_path / f"out{rank}")
        errs.append(tmp_path / f"err{rank}")
        cmd = [
            sys.executable,
            "-m",
            "llama3_dist",
            "generate",
            "--checkpoint",
            str(tiny),
            *LONG,
            "--set",
            "parallel.tensor=2",
            "--set",
            f"parallel.collectives={collectives}",
        ]
        with open(outs[-1], "w") as out, open(errs[-1], "w") as err:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env))
    try:
        wait_for(lambda: generating(outs[0]), 180, "the first generated token")
        procs[1].kill()
        killed = time.monotonic()
        code = procs[0].wait(timeout=TIMEOUT_S + GRACE_S + 30)
        took = time.monotonic() - killed
        print(
            f"\nfault: SIGKILL rank 1 (collectives={collectives}, no launcher): rank 0 exited {code} after {took:.1f} s"
        )
    finally:
        kill_all([psutil.Process(p.pid) for p in procs if p.poll() is None])
        for p in procs:
            p.wait(timeout=30)
    assert code == 1
    assert took < TIMEOUT_S + GRACE_S, took
    lost = r"rank 1 \(pid \d+\) has exited" if collectives == "shm" else r"lost rank 1 \(.+\)"
    print(
        check_error_line(
            read(errs[0]),
            rf"error: \[rank 0\] (shm )?(all_reduce|all_gather|broadcast\b.*) over ranks "
            rf"\(0, 1\): {lost}",
        )
    )


def _silent_peer_in_a_short_group(mesh: Mesh):
    """A group made with a 2 s timeout (the world group has 60 s): rank 1 sleeps, rank 0 must give up in ~2 s."""
    short = build_mesh(2, 1, torch.device("cpu"), shm=False, timeout_s=2)
    if mesh.rank == 1:
        time.sleep(8)
        return None
    start = time.monotonic()
    try:
        all_reduce(torch.ones(2), short.tp)
    except CollectiveError as e:
        return time.monotonic() - start, str(e)
    return time.monotonic() - start, "no error"


def test_sub_groups_get_the_timeout():
    """new_group gets runtime.timeout_s, not gloo's 30-minute default."""
    took, err = run_ranks(_silent_peer_in_a_short_group, 2, timeout=180)[0]
    print(f"\nall_reduce on a group with a 2 s timeout gave up after {took:.1f} s")
    assert re.match(rf"all_reduce over ranks \(0, 1\): rank 1 {SILENT}", err), err
    assert took < 6, took
