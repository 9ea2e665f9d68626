"""The serving engine: a fixed pool of KV-cache slots and the step loop that every rank runs.

A slot is a row of the model's KV cache (runtime.max_batch_size rows x runtime.max_seq_len).
Each step, rank 0 broadcasts one small Control (control.py) over a CPU (gloo) group; every rank
then runs the same step:

1. free the slots the control names (their sequences ended on rank 0 last step);
2. prefill the newcomers into their slots: each run of consecutive slots as one right-padded
   batch (cache rows first..last+1), as generate prefills a ragged batch;
3. one decode step over cache rows 0..highest occupied slot, each row at its own position;
4. the sampler rank (tp-rank 0 of the last stage) samples every row with the row's own settings
   and its own seeded generator, then broadcasts the tokens (as generate.Sampler does).

Rows that take part in a decode step without decoding compute garbage that is never read:
a free row feeds token 0 at position 0 (its next prefill overwrites positions 0..T-1 before
any query reads them), and a row prefilled in this same step feeds token 0 at position T, the
place its first real token is written at the next step; the padding of a short prompt in a
prefill batch lies past its end and is overwritten the same way. A row's mask only reaches
positions it has written itself, so no row ever reads another's garbage.

Only rank 0 decides when a sequence ends (stop token, stop string, length, disconnect); it names
the slot in the next control, so every rank frees it before that step's decode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from ..generate import Penalties, sample
from ..model import Transformer
from ..parallel.comm import broadcast, guarded
from ..parallel.mesh import Mesh
from ..parallel.pipeline import run_stages
from .control import Control, NewRow, StepResult, TokenLogprobs

log = logging.getLogger(__name__)


class EngineFailed(RuntimeError):
    """A collective failed (a rank died or stopped answering): the server cannot go on."""


@dataclass
class Row:
    """A sequence in a slot, as every rank knows it: where its next token goes and which token that is."""

    new: NewRow
    pos: int  # where the next fed token is written
    token: int  # the token fed at the next decode step
    generator: torch.Generator | None  # the sampler rank's, owned by this row alone
    penalties: Penalties | None = None  # the sampler rank's, when the row asks for penalties


class Driver(Protocol):
    """Rank 0's side of the loop (the Scheduler): what to do next, and what came of it."""

    def next_control(self) -> Control: ...

    def absorb(self, result: StepResult) -> None: ...


def top_logprobs(logits: Tensor, token: int, k: int) -> TokenLogprobs:
    """log-softmax of float32 logits (V,): the token's logprob and the k most likely tokens'."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = []
    if k:
        values, ids = torch.topk(lp, min(k, lp.shape[-1]))
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprobs(float(lp[token]), top)


def prefill_runs(new: list[NewRow]) -> list[list[NewRow]]:
    """Newcomers grouped into runs of consecutive slots, each prefilled as one right-padded batch
    (a burst of arrivals gets consecutive slots); a row that wants its prompt's logprobs goes alone."""
    runs: list[list[NewRow]] = []
    for n in sorted(new, key=lambda n: n.slot):
        prev = runs[-1][-1] if runs else None
        if prev is not None and prev.slot + 1 == n.slot and not (prev.prompt_logprobs or n.prompt_logprobs):
            runs[-1].append(n)
        else:
            runs.append([n])
    return runs


class Engine:
    """This rank's slots and its part of the step loop."""

    def __init__(
        self,
        model: Transformer,
        mesh: Mesh,
        max_batch_size: int,
        max_seq_len: int,
        microbatches: int = 1,
        timeout_s: float = 120.0,
    ):
        self.model, self.mesh, self.microbatches = model, mesh, microbatches
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        model.setup_caches(max_batch_size, max_seq_len)
        self.slots: list[Row | None] = [None] * max_batch_size
        self.is_sampler = mesh.rank == mesh.sampler_rank
        # Control messages travel over a CPU group of their own, whatever backend the model uses.
        self.group, self.ranks = None, tuple(range(mesh.world_size))
        if mesh.world_size > 1:
            self.group = dist.new_group(
                list(range(mesh.world_size)), timeout=timedelta(seconds=timeout_s), backend="gloo"
            )

    def exchange(self, ctrl: Control | None) -> Control:
        """Rank 0's control, on every rank (rank 0 passes it, the others None)."""
        if self.group is None:
            return ctrl
        box = [ctrl]
        with guarded("control broadcast from rank 0", self.ranks):
            dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def ack(self) -> None:
        """An idle step's round trip: every rank must answer, so a dead or stopped one is noticed."""
        if self.group is not None:
            with guarded("idle heartbeat all_reduce", self.ranks):
                dist.all_reduce(torch.zeros(1), group=self.group)

    def run(self, driver: Driver | None) -> None:
        """The step loop, until rank 0 says stop. Rank 0 passes its driver; the other ranks None.

        Raises EngineFailed when a collective fails (a peer died or stopped answering).
        """
        try:
            while True:
                ctrl = self.exchange(driver.next_control() if driver is not None else None)
                if ctrl.stop:
                    return
                for slot in ctrl.free:
                    self.slots[slot] = None
                if ctrl.new or any(self.slots):
                    result = self.step(ctrl.new)
                    if driver is not None:
                        driver.absorb(result)
                else:
                    self.ack()
        except (RuntimeError, dist.DistBackendError) as e:
            raise EngineFailed(f"a rank stopped answering ({str(e).splitlines()[0]})") from e

    @torch.inference_mode()
    def step(self, new: list[NewRow]) -> StepResult:
        """Prefill the newcomers, decode the rows that were already running, sample and share the tokens."""
        mesh, device = self.mesh, self.mesh.device
        decoding = [r for r in self.slots if r is not None]
        picks: list[tuple[Row, Tensor]] = []  # (row, its float32 logits (V,)) on the sampler rank
        result = StepResult()
        prefilled: list[Row] = []
        for run in prefill_runs(new):
            rows = []
            for n in run:
                gen = penalties = None
                if self.is_sampler and n.params.temperature > 0:
                    gen = torch.Generator(device=device).manual_seed(n.params.seed)
                if self.is_sampler and n.params.penalized:
                    penalties = Penalties([n.prompt], self.model.args.vocab_size, device)
                rows.append(Row(n, len(n.prompt), 0, gen, penalties))
                self.slots[n.slot] = rows[-1]
            prefilled += rows
            lens = [len(n.prompt) for n in run]
            B, T = len(run), max(lens)
            tokens = torch.zeros(B, T, dtype=torch.long, device=device)  # right-padded, as generate does
            for i, n in enumerate(run):
                tokens[i, : lens[i]] = torch.tensor(n.prompt, dtype=torch.long)
            pos = torch.arange(T, device=device).expand(B, T)
            echo = run[0].prompt_logprobs  # such a row is a run of its own
            last = None if echo else torch.tensor(lens, device=device) - 1
            logits = run_stages(self.model, mesh, tokens, pos, last, min(self.microbatches, B), first_row=run[0].slot)
            if self.is_sampler:
                if echo:
                    n = run[0]
                    result.prompt_logprobs[n.slot] = [None] + [
                        top_logprobs(logits[0, t - 1], n.prompt[t], n.logprobs or 0) for t in range(1, T)
                    ]
                picks += [(row, logits[i, -1]) for i, row in enumerate(rows)]
        if decoding:
            hi = max(i for i, r in enumerate(self.slots) if r is not None) + 1
            tokens = torch.zeros(hi, 1, dtype=torch.long, device=device)
            pos = torch.zeros(hi, 1, dtype=torch.long, device=device)
            for i, r in enumerate(self.slots[:hi]):
                if r is not None:
                    tokens[i, 0], pos[i, 0] = r.token, r.pos
            logits = run_stages(self.model, mesh, tokens, pos, None, self.microbatches)
            if self.is_sampler:
                picks += [(r, logits[r.new.slot, -1]) for r in decoding]
        order = prefilled + decoding
        running = {r.new.slot for r in decoding}
        nxt = torch.zeros(len(order), dtype=torch.long, device=device)
        if self.is_sampler:
            for i, (row, lg) in enumerate(picks):
                # each row draws from its own generator only: its tokens do not depend on the batch
                z = lg.unsqueeze(0) if row.penalties is None else row.penalties(lg.unsqueeze(0), row.new.params)
                nxt[i] = sample(z, row.new.params, row.generator)[0]
                if row.penalties is not None:
                    row.penalties.add(nxt[i : i + 1])
                if row.new.logprobs is not None:
                    result.logprobs[row.new.slot] = top_logprobs(lg, int(nxt[i]), row.new.logprobs)
        broadcast(nxt, mesh.sampler_rank, mesh.world)
        for row, tok in zip(order, nxt.tolist()):
            if row.new.slot in running:
                row.pos += 1
            row.token = tok
            result.tokens[row.new.slot] = tok
        wanted = any(r.new.logprobs is not None or r.new.prompt_logprobs for r in order)
        if wanted and mesh.sampler_rank != 0:
            box = [(result.logprobs, result.prompt_logprobs)]
            with guarded(f"logprobs broadcast from rank {mesh.sampler_rank}", self.ranks):
                dist.broadcast_object_list(box, src=mesh.sampler_rank, group=self.group)
            result.logprobs, result.prompt_logprobs = box[0]
        return result
