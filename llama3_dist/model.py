"""Llama 3 for one pipeline stage: RMSNorm, complex rotary embeddings, GQA with a KV cache, SwiGLU.

Parallelism enters only through the layer classes (ColumnParallelLinear & co.) and the Mesh;
with a one-rank mesh they are plain dense layers. Parameter names are Meta's. Speed lives beside
the model: fast_decode.py through the `decode_step` hook, CPU kernels through @kernels.fusable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .args import ModelArgs
from .parallel import layers as parallel
from .parallel.comm import Group
from .parallel.layers import MergedColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelHead
from .parallel.mesh import Mesh


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
    ratio = s.original_max_position_embeddings / wavelen
    smooth = (ratio - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_band, blended, scaled)


def precompute_freqs_cis(args: ModelArgs, end: int) -> Tensor:
    """e^(i * pos * freq) for every position < end: (end, head_dim // 2) complex64."""
    angles = torch.outer(torch.arange(end, dtype=torch.float32), rope_frequencies(args))
    return torch.polar(torch.ones_like(angles), angles)


@kernels.fusable("rope", tokens_dim=1)
def apply_rotary(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Rotate each (even, odd) pair of x (B, T, H, hd) as x0 + i x1, times e^(i pos freq) (B, T, hd/2, 2).

    (x0 + i x1)(c + i s) = (x0 c - x1 s) + i (x0 s + x1 c) in real arithmetic, which torch.compile
    can fuse; in eager mode it equals view_as_complex(x) * freqs_cis bit for bit.
    """
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, H, hd/2) each
    c, s = freqs_cis.unsqueeze(2).unbind(-1)  # (B, T, 1, hd/2): same rotation for every head
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(3).type_as(x)


@kernels.fusable("attend_decode", tokens_dim=2)
def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(hd), masked) v, each KV head shared by a group of consecutive query heads.

    q: (B, Hq, T, hd); k, v: (B, Hkv, S, hd); mask: (B, 1, T, S). A decode step (T = 1) stacks each
    KV head's query heads and multiplies the cache once; a prefill uses torch's fused attention.
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


@kernels.fusable("rms_norm", tokens_dim=1)
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / rms(x) * weight, computed in float32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


@dataclass(frozen=True)
class KVCache:
    """Keys and values of this stage's layers and this rank's KV heads: (B, n_layers, n_local_kv_heads,
    max_seq_len, head_dim). rows(a, b) (sequences a..b-1) and layer(i) are views into the one cache.
    Sequences lead, so the rows of any batch are one contiguous block, laid out as a cache allocated
    for that batch alone: a compiled decode step then has one graph for every batch of two or more."""

    k: Tensor
    v: Tensor

    @classmethod
    def allocate(cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> KVCache:
        """Zeros of shape (B, n_layers, n_local_kv_heads, max_seq_len, head_dim) for k and v."""
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def seq_len(self) -> int:
        return self.k.shape[3]

    def rows(self, start: int, stop: int) -> KVCache:
        return KVCache(self.k[start:stop], self.v[start:stop])

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self.k, self.v, i)


@dataclass(frozen=True)
class LayerCache:
    """Layer `i` of a cache: its keys and values k, v (B, n_local_kv_heads, max_seq_len, head_dim)
    are views of the whole (B, n_layers, ...) tensors, and are written through them: a compiled
    decode step then updates the cache in place, where writing into a layer's view made it
    rebuild the whole cache once per layer."""

    all_k: Tensor
    all_v: Tensor
    i: int

    @property
    def k(self) -> Tensor:
        return self.all_k[:, self.i]

    @property
    def v(self) -> Tensor:
        return self.all_v[:, self.i]

    def update(self, pos: Tensor, k: Tensor, v: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H, T, hd) at positions pos (B, T); return the first `length` positions (B, H, length, hd)."""
        write_cache(k, v, self.all_k, self.all_v, self.i, pos)
        return self.k[:, :, :length], self.v[:, :, :length]


@kernels.fusable("cache_write", tokens_dim=2)
def write_cache(k: Tensor, v: Tensor, all_k: Tensor, all_v: Tensor, i: int, pos: Tensor) -> None:
    """k, v (B, H, T, hd) into layer i of the caches (B, n_layers, H, max_seq_len, hd) at positions pos (B, T)."""
    b = torch.arange(k.shape[0], device=pos.device).unsqueeze(1)  # (B, 1)
    layer = torch.full((1, 1), i, device=pos.device)
    all_k[b, layer, :, pos] = k.transpose(1, 2)  # advanced indices first: (B, T, H, hd)
    all_v[b, layer, :, pos] = v.transpose(1, 2)


class Attention(nn.Module):
    """Grouped-query attention over this rank's query heads and the KV heads they read."""

    def __init__(self, args: ModelArgs, group: Group):
        super().__init__()
        (q0, q1), (kv0, kv1) = parallel.head_spans(args.n_heads, args.n_kv_heads, group.rank, group.size)
        hd = args.hd
        self.head_dim, self.n_local_heads, self.n_local_kv_heads = hd, q1 - q0, kv1 - kv0
        # wq, wk, wv stacked: this rank's query heads and the KV heads they read, in one matmul
        q, kv = (q0 * hd, q1 * hd), (kv0 * hd, kv1 * hd)
        parts = [("wq", args.n_heads * hd, q), ("wk", args.n_kv_heads * hd, kv), ("wv", args.n_kv_heads * hd, kv)]
        self.wqkv = MergedColumnParallelLinear(args.dim, parts, group)
        self.wo = RowParallelLinear(args.n_heads * hd, args.dim, group, q)

    def forward(self, x: Tensor, pos: Tensor, freqs_cis: Tensor, mask: Tensor, cache: LayerCache) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.wqkv(x)
        q = q.view(B, T, self.n_local_heads, self.head_dim)  # (B, T, n_local_heads, hd)
        k = k.view(B, T, self.n_local_kv_heads, self.head_dim)  # (B, T, n_local_kv_heads, hd)
        v = v.view(B, T, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rotary(q, freqs_cis), apply_rotary(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first
        k, v = cache.update(pos, k, v, mask.shape[-1])  # (B, n_local_kv_heads, S, hd)
        y = attend(q, k, v, mask)  # (B, n_local_heads, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_local_heads * self.head_dim)
        return self.wo(y)  # row-parallel: one all-reduce


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), hidden features split across ranks (w1 and w3 stacked)."""

    def __init__(self, dim: int, hidden_dim: int, group: Group):
        super().__init__()
        rows = parallel.feature_split(hidden_dim, group)
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

    def forward(self, x: Tensor, pos: Tensor, freqs_cis: Tensor, mask: Tensor, cache: LayerCache) -> Tensor:
        h = x + self.attention(self.attention_norm(x), pos, freqs_cis, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


LayerStack = Callable[[Tensor, Tensor, Tensor, Tensor, KVCache], Tensor]  # (x, pos, freqs_cis, mask, cache) -> x


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
        self.cache: KVCache | None = None
        self.freqs_cis: Tensor | None = None
        # fast_decode.py's hook: the layers of a decode step; fixed_shapes: attend over the whole cache
        self.decode_step: LayerStack | None = None
        self.tie_weights()

    def tie_weights(self) -> None:
        """With tied embeddings and both ends on this stage, the head reads the embedding's tensor."""
        if self.args.tie_embeddings and self.mesh.is_pp_first_stage and self.mesh.is_pp_last_stage:
            self.output.tie(self.tok_embeddings)

    def setup_caches(self, batch: int, seq_len: int) -> None:
        """Allocate the KV cache for `batch` sequences of up to `seq_len` tokens (kept if large enough)."""
        c = self.cache
        if c is None or c.batch < batch or c.seq_len < seq_len or c.k.dtype != self.dtype:
            attn = next(iter(self.layers.values())).attention
            shape = (batch, len(self.layers), attn.n_local_kv_heads, seq_len, attn.head_dim)
            self.cache = KVCache.allocate(shape, self.dtype, self.device)
        if self.freqs_cis is None or self.freqs_cis.shape[0] < seq_len:
            self.freqs_cis = precompute_freqs_cis(self.args, seq_len).to(self.device)

    def run_layers(self, x: Tensor, pos: Tensor, freqs_cis: Tensor, mask: Tensor, cache: KVCache) -> Tensor:
        for i, layer in enumerate(self.layers.values()):
            x = layer(x, pos, freqs_cis, mask, cache.layer(i))
        return x

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())  # quantized weights are uint8

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, x: Tensor, pos: Tensor, last: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """Tokens (B, T) on the first stage, else hidden states (B, T, dim), at positions pos (B, T).

        Returns the last stage's float32 logits (B, T, vocab), or (B, 1, vocab) at indices `last` (B,);
        other stages return hidden states (B, T, dim). `cache`: these sequences' rows (default 0..B-1).
        """
        cache = self.cache.rows(0, x.shape[0]) if cache is None else cache
        if self.mesh.is_pp_first_stage:
            x = self.tok_embeddings(x)  # (B, T, dim)
        fast = x.shape[1] == 1 and self.decode_step is not None
        # Keys up to the furthest position, or the whole cache when the decode step needs fixed shapes.
        length = cache.seq_len if fast and getattr(self.decode_step, "fixed_shapes", False) else int(pos.max()) + 1
        # Query at p sees keys at <= p; a ragged batch's pad rows are overwritten before the mask reaches them.
        mask = torch.arange(length, device=pos.device) <= pos.unsqueeze(-1)  # (B, T, S)
        mask = mask.unsqueeze(1)  # (B, 1, T, S): same for every head
        freqs_cis = torch.view_as_real(self.freqs_cis[pos])  # (B, T, hd/2, 2)
        x = (self.decode_step if fast else self.run_layers)(x, pos, freqs_cis, mask, cache)
        if not self.mesh.is_pp_last_stage:
            return x
        if last is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last].unsqueeze(1)  # (B, 1, dim)
        return self.output(self.norm(x)).float()
