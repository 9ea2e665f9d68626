"""What `explain` produces: the walkthrough's steps and what its figures draw (data only)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

DEFAULT_PROMPT = "the answer to the ultimate question of life, the universe, and everything is"
MAX_TOKENS = 256  # the heatmaps hold n_heads x T x T numbers; longer prompts make no readable walkthrough
FEW = 4  # values shown per tensor
TOP = 5  # next tokens listed
TOP_FIGURE = 20  # next tokens in the distribution figure


@dataclass
class Step:
    """One line of the walkthrough: the operation as math, its result's shape and dtype, a few values."""

    section: int  # 1..8, the seed's order
    name: str
    math: str
    shape: list[int] | None = None
    dtype: str | None = None
    values: list[float] = field(default_factory=list)  # token ids for the tokens step
    text: list[str] = field(default_factory=list)  # detail lines
    where: list[str] = field(default_factory=list)  # which rank holds what, and the communication


@dataclass
class NextToken:
    id: int
    text: str
    prob: float


@dataclass
class Explanation:
    """Rank 0's walkthrough, plus what the figures draw."""

    title: str
    prompt: str
    layer: int
    head: int
    pieces: list[str]  # the text of each prompt token
    steps: list[Step]
    next_tokens: list[NextToken]  # top TOP
    top_figure: list[NextToken]  # top TOP_FIGURE
    attention: Tensor  # (n_heads, T, T): softmax of every head of layer `layer`
    kv_of_head: list[int]  # global KV head each query head reads
    freqs: Tensor  # (hd/2,) the frequencies the model uses
    base_freqs: Tensor  # (hd/2,) theta^(-2i/d), unscaled
    scaling: str | None  # how the frequencies were scaled, None when not at all
    llama31_freqs: Tensor  # (hd/2,) what Llama 3.1's scaling would make of base_freqs, for the figure
    checks: dict[str, float | bool]  # recomputation vs the model (attention output, cached keys)
