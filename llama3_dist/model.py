"""Llama 3 for one pipeline stage: RMSNorm, complex rotary embeddings, GQA with a KV cache, SwiGLU.

Parallelism enters only through the layer classes (ColumnParallelLinear & co.) and the Mesh;
with a one-rank mesh they are plain dense layers. Parameter names are Meta's.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cuda_graphs import DecodeGraphs
from .parallel.comm import Group
from .parallel.layers import (MergedColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                              VocabParallelHead, even_split, head_spans)
from .parallel.mesh import Mesh

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1-style frequency scaling (factor 8 for 3.1, 32 for 3.2), read from the checkpoint."""

    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    """The architecture, as every checkpoint format describes it."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None  # GGUF's rope_freqs: freq_i / factor_i
    tie_embeddings: bool = False
    head_dim: int | None = None
    max_position_embeddings: int | None = None

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's SwiGLU width: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def rope_frequencies(args: ModelArgs) -> Tensor:
    """theta^(-2i/d) for i < d/2, with Llama 3.1 scaling or GGUF per-frequency factors applied."""
    d = args.hd
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    if args.rope_freq_factors is not None:
        return freqs / torch.tensor(args.rope_freq_factors, dtype=torch.float32)
    s = args.rope_scaling
    if s is None:
        return freqs
    # Long wavelengths are slowed by `factor`, short ones kept, and the band between is blended.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_wavelen, freqs / s.factor, freqs)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_band, blended, scaled)


def precompute_freqs_cis(args: ModelArgs, end: int) -> Tensor:
    """e^(i * pos * freq) for every position < end: (end, head_dim // 2) complex64."""
    angles = torch.outer(torch.arange(end, dtype=torch.float32), rope_frequencies(args))
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Rotate each (even, odd) pair of x as the complex number x0 + i x1, times e^(i pos freq).

    x: (B, T, H, hd); freqs_cis: (B, T, hd/2, 2), the complex factors as (real, imag) pairs
    (torch.view_as_real). The product (x0 + i x1)(c + i s) = (x0 c - x1 s) + i (x0 s + x1 c) is
    written out in real arithmetic, which torch.compile can fuse (it does not generate complex code);
    in eager mode it equals view_as_complex(x) * freqs_cis bit for bit.
    """
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, H, hd/2) each
    c, s = freqs_cis.unsqueeze(2).unbind(-1)  # (B, T, 1, hd/2): same rotation for every head
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(3).type_as(x)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(hd), masked) v, each KV head shared by a group of consecutive query heads.

    q: (B, Hq, T, hd); k, v: (B, Hkv, S, hd); mask: (B, 1, T, S), True where attending. A decode
    step (T = 1) stacks each KV head's query heads into one matrix and multiplies the cache once,
    never copying it per query head; a prefill uses torch's fused attention.
    """
    B, Hq, T, hd = q.shape
    Hkv = k.shape[1]
    if T > 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hq != Hkv)
    # float32 throughout: as exact as Meta's softmax, and faster than bf16 for products this small on CPU
    qg = q.view(B, Hkv, Hq // Hkv, hd).float()  # (B, Hkv, group, hd)
    scores = qg @ k.float().transpose(-1, -2) * hd**-0.5  # (B, Hkv, group, S)
    scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, 1, S) broadcasts over heads
    y = torch.softmax(scores, dim=-1) @ v.float()  # (B, Hkv, group, hd)
    return y.type_as(q).view(B, Hq, 1, hd)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache(nn.Module):
    """Preallocated keys/values of this rank's KV heads: (B, n_local_kv_heads, max_seq_len, head_dim)."""

    def __init__(self, batch: int, n_kv_heads: int, seq_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        shape = (batch, n_kv_heads, seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, rows: slice, pos: Tensor, k: Tensor, v: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H, T, hd) of cache rows `rows` at positions pos (B, T); return their first
        `length` cached positions, (B, H, length, hd)."""
        b = torch.arange(rows.start, rows.stop, device=pos.device).unsqueeze(1)  # (B, 1)
        self.k[b, :, pos] = k.transpose(1, 2)  # advanced indices first: (B, T, H, hd)
        self.v[b, :, pos] = v.transpose(1, 2)
        return self.k[rows, :, :length], self.v[rows, :, :length]


class Attention(nn.Module):
    """Grouped-query attention over this rank's query heads and the KV heads they read."""

    def __init__(self, args: ModelArgs, group: Group):
        super().__init__()
        (q0, q1), (kv0, kv1) = head_spans(args.n_heads, args.n_kv_heads, group.rank, group.size)
        hd = args.hd
        self.head_dim, self.n_local_heads, self.n_local_kv_heads = hd, q1 - q0, kv1 - kv0
        # wq, wk, wv stacked: this rank's query heads and the KV heads they read, in one matmul
        self.wqkv = MergedColumnParallelLinear(args.dim, [
            ("wq", args.n_heads * hd, (q0 * hd, q1 * hd)),
            ("wk", args.n_kv_heads * hd, (kv0 * hd, kv1 * hd)),
            ("wv", args.n_kv_heads * hd, (kv0 * hd, kv1 * hd)),
        ], group)
        self.wo = RowParallelLinear(args.n_heads * hd, args.dim, group, (q0 * hd, q1 * hd))
        self.cache: KVCache | None = None

    def forward(self, x: Tensor, pos: Tensor, freqs_cis: Tensor, mask: Tensor, rows: slice) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.wqkv(x)
        q = q.view(B, T, self.n_local_heads, self.head_dim)  # (B, T, n_local_heads, hd)
        k = k.view(B, T, self.n_local_kv_heads, self.head_dim)  # (B, T, n_local_kv_heads, hd)
        v = v.view(B, T, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rotary(q, freqs_cis), apply_rotary(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first
        k, v = self.cache.update(rows, pos, k, v, mask.shape[-1])  # (B, n_local_kv_heads, S, hd)
        y = attend(q, k, v, mask)  # (B, n_local_heads, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_local_heads * self.head_dim)
        return self.wo(y)  # row-parallel: one all-reduce


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), hidden features split across ranks (w1 and w3 stacked)."""

    def __init__(self, dim: int, hidden_dim: int, group: Group):
        super().__init__()
        rows = even_split(hidden_dim, group.size)[group.rank]
        self.w13 = MergedColumnParallelLinear(dim, [("w1", hidden_dim, rows), ("w3", hidden_dim, rows)], group)
        self.w2 = RowParallelLinear(hidden_dim, dim, group, rows)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, args: ModelArgs, group: Group):
        super().__init__()
        self.attention = Attention(args, group)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim, group)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, pos: Tensor, freqs_cis: Tensor, mask: Tensor, rows: slice) -> Tensor:
        h = x + self.attention(self.attention_norm(x), pos, freqs_cis, mask, rows)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The layers `layer_ids` of Llama 3, plus the embedding on the first stage and norm + head on the last."""

    def __init__(self, args: ModelArgs, mesh: Mesh, layer_ids: range | None = None):
        super().__init__()
        self.args, self.mesh = args, mesh
        self.layer_ids = range(args.n_layers) if layer_ids is None else layer_ids
        group = mesh.tp
        if mesh.is_pp_first_stage:
            self.tok_embeddings = VocabParallelEmbedding(args.vocab_size, args.dim, group)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args, group) for i in self.layer_ids})
        if mesh.is_pp_last_stage:
            self.norm = RMSNorm(args.dim, args.norm_eps)
            self.output = VocabParallelHead(args.dim, args.vocab_size, group)
        self.freqs_cis: Tensor | None = None
        self.compiled_layers = self.compiled_block = None
        self.decode_graphs: DecodeGraphs | None = None
        self.tie_weights()

    def tie_weights(self) -> None:
        """With tied embeddings and both ends on this stage, the head reads the embedding's tensor."""
        if self.args.tie_embeddings and self.mesh.is_pp_first_stage and self.mesh.is_pp_last_stage:
            self.output.weight = self.tok_embeddings.weight

    def setup_caches(self, batch: int, seq_len: int) -> None:
        """Allocate every layer's KV cache for `batch` sequences of up to `seq_len` tokens."""
        dtype, device = self.dtype, self.device
        for block in self.layers.values():
            attn = block.attention
            c = attn.cache
            if c is None or c.k.shape[0] < batch or c.k.shape[2] < seq_len or c.k.dtype != dtype:
                attn.cache = KVCache(batch, attn.n_local_kv_heads, seq_len, attn.head_dim, dtype, device)
                if self.decode_graphs is not None:
                    self.decode_graphs.reset()  # captured graphs read the old cache tensors
        if self.freqs_cis is None or self.freqs_cis.shape[0] < seq_len:
            self.freqs_cis = precompute_freqs_cis(self.args, seq_len).to(device)

    def run_layers(self, x: Tensor, pos: Tensor, freqs_cis: Tensor, mask: Tensor, rows: slice) -> Tensor:
        for layer in self.layers.values():
            x = layer(x, pos, freqs_cis, mask, rows)
        return x

    def compile_decode(self) -> None:
        """Send decode steps (T = 1) through torch.compile, which fuses the small ops between matmuls.

        Without CUDA graphs the whole layer stack is one compiled graph, so no Python runs between
        layers. Under CUDA graphs Python costs nothing per step, so the layers, which differ only
        in their tensors, share one compiled block: compiling then takes one layer's time.
        Fused kernels round to the model's dtype wherever the eager ops do
        (emulate_precision_casts), so bfloat16 gives the eager tokens. On CPU the stack also gets
        inductor's C++ wrapper, which calls its kernels without Python in between (compiling then
        takes about a minute longer on two cores).
        """
        options = {"emulate_precision_casts": True}
        stack_options = {**options, "cpp_wrapper": self.device.type == "cpu"}
        self.compiled_layers = torch.compile(self.run_layers, dynamic=True, options=stack_options)
        self.compiled_block = torch.compile(TransformerBlock.forward, dynamic=True, options=options)

    def decode_layers(self, x: Tensor, pos: Tensor, freqs_cis: Tensor, mask: Tensor, rows: slice) -> Tensor:
        """The layers of a decode step: compiled when compile_decode() was called.

        If compiling fails (no C++ compiler, an inductor bug), the model decodes eagerly from then
        on. Compiling comes before running, and a decode step run again rewrites the same keys
        and values, so the step is simply run again.
        """
        if self.compiled_layers is None:
            return self.run_layers(x, pos, freqs_cis, mask, rows)
        try:
            if self.decode_graphs is None:
                return self.compiled_layers(x, pos, freqs_cis, mask, rows)
            h = x
            for layer in self.layers.values():
                h = self.compiled_block(layer, h, pos, freqs_cis, mask, rows)
            return h
        except torch._dynamo.exc.BackendCompilerFailed as e:
            log.warning("torch.compile failed (%s); decoding without it", str(e).splitlines()[0])
            self.compiled_layers = self.compiled_block = None
            return self.run_layers(x, pos, freqs_cis, mask, rows)

    def use_cuda_graphs(self) -> None:
        """Replay decode steps from CUDA graphs (one launch per step instead of one per kernel)."""
        if self.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.decode_graphs = DecodeGraphs(self.decode_layers)

    @property
    def cache_len(self) -> int:
        return next(iter(self.layers.values())).attention.cache.k.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, x: Tensor, pos: Tensor, last: Tensor | None = None, rows: slice | None = None) -> Tensor:
        """Tokens (B, T) on the first stage, else hidden states (B, T, dim), at positions pos (B, T).

        Returns the last stage's float32 logits, (B, T, vocab), or (B, 1, vocab) at the indices
        `last` (B,) when given; other stages return hidden states (B, T, dim) for the next stage.
        `rows` picks the KV-cache rows of these sequences (a micro-batch); default 0..B-1.
        """
        rows = slice(0, x.shape[0]) if rows is None else rows
        if self.mesh.is_pp_first_stage:
            x = self.tok_embeddings(x)  # (B, T, dim)
        decode = x.shape[1] == 1
        graphed = decode and self.decode_graphs is not None
        # Keys up to the furthest position, or (a CUDA graph needs fixed shapes) the whole cache.
        length = self.cache_len if graphed else int(pos.max()) + 1
        # Query at position p sees cached keys at positions <= p; the pad rows of a ragged batch
        # are never read, because a row's own next token overwrites them before its mask reaches them.
        mask = torch.arange(length, device=pos.device) <= pos.unsqueeze(-1)  # (B, T, S)
        mask = mask.unsqueeze(1)  # (B, 1, T, S): same for every head
        freqs_cis = torch.view_as_real(self.freqs_cis[pos])  # (B, T, hd/2, 2)
        if graphed:
            x = self.decode_graphs(x, pos, freqs_cis, mask, rows=rows)
        else:
            x = (self.decode_layers if decode else self.run_layers)(x, pos, freqs_cis, mask, rows)
        if not self.mesh.is_pp_last_stage:
            return x
        if last is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last].unsqueeze(1)  # (B, 1, dim)
        return self.output(self.norm(x)).float()
