"""What rank 0 broadcasts each step (Control) and what a step gives back (StepResult): small, picklable."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import SamplingParams


@dataclass(frozen=True)
class NewRow:
    """A sequence to prefill into `slot`; params.seed is always set, so its row owns a seeded generator."""

    slot: int
    prompt: list[int]
    params: SamplingParams  # max_new_tokens: the request's max_tokens
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's logprob and the top k
    prompt_logprobs: bool = False  # also the logprobs of the prompt's tokens (echo)


@dataclass
class Control:
    """One step's orders: slots to free, newcomers to prefill, or stop. Empty: decode (or, idle, a heartbeat)."""

    new: list[NewRow] = field(default_factory=list)
    free: list[int] = field(default_factory=list)
    stop: bool = False


@dataclass
class TokenLogprobs:
    """A token's log-probability and the top-k alternatives [(token id, logprob)], most likely first."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class StepResult:
    """A step's sampled token per slot; logprobs only for the rows that asked (complete on rank 0)."""

    tokens: dict[int, int] = field(default_factory=dict)
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[TokenLogprobs | None]] = field(default_factory=dict)
