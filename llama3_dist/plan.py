"""Memory plan per rank, from the real modules built on the meta device with the real sharding."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .args import ModelArgs
from .checkpoint import weight_formats
from .checkpoint.base import Checkpoint
from .config import Config
from .kernels.quant import row_bytes
from .model import Transformer
from .parallel.mesh import Mesh
from .parallel.pipeline import stage_layer_ids


@dataclass
class RankPlan:
    rank: int
    stage: int
    tp_rank: int
    layers: str
    param_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    total_bytes: int
    fits: bool | None


CPU_HEAP_ROOM = 1.15  # glibc keeps freed blocks the next allocations may not fit: peak RSS above the live tensors


def workspace_bytes(model: Transformer, batch: int, seq_len: int, elem: int, cpu: bool) -> int:
    """Estimate of the largest live activations: a prefill micro-batch through one layer, plus logits.

    Per token: the layer's widest activations, with rope's float copies of q and k. On CPU, also one
    layer's (batch, local heads, seq_len, seq_len) attention scores and boolean mask, which torch's
    CPU attention materialises, and CPU_HEAP_ROOM for the heap's fragmentation
    (a 6-layer model's prefill: live tensors 87 MiB, peak RSS 114-163 MiB from run to run); CUDA's
    fused kernels work in tiles instead, and its caching allocator is counted by torch itself.
    """
    args, tokens = model.args, batch * seq_len
    widest, heads = 0, 0
    for block in model.layers.values():
        attn, ffn = block.attention, block.feed_forward
        qkv = (attn.n_local_heads + 2 * attn.n_local_kv_heads) * attn.head_dim
        rope = 2 * (attn.n_local_heads + attn.n_local_kv_heads) * attn.head_dim
        widest = max(widest, 4 * args.dim + qkv + rope + 3 * ffn.w2.weight.shape[1])
        heads = max(heads, attn.n_local_heads)
    attention = batch * seq_len * seq_len * (heads * elem + 1) if cpu else 0
    logits = batch * args.vocab_size * 4 if model.mesh.is_pp_last_stage else 0
    live = tokens * widest * elem + attention + logits
    return int(live * CPU_HEAP_ROOM) if cpu else live


def plan(
    cfg: Config, args: ModelArgs, device_memory: int | None = None, ckpt: Checkpoint | None = None
) -> list[RankPlan]:
    """One RankPlan per global rank for this config's layout, batch and sequence length.

    Weights count in the format runtime.weights holds them in: a GGUF's blocks (`ckpt`), int8 / int4
    blocks, or runtime.dtype.
    """
    t, p, r = cfg.parallel.tensor, cfg.parallel.pipeline, cfg.runtime
    rows = []
    for rank in range(t * p):
        mesh = Mesh.for_rank(rank, t, p, torch.device("meta"))
        layers = stage_layer_ids(args, cfg.parallel, mesh)
        with torch.device("meta"):
            model = Transformer(args, mesh, layers).to(r.torch_dtype)
            model.setup_caches(r.max_batch_size, r.max_seq_len)
        formats = weight_formats(model, ckpt, r.weights, torch.device(r.device))
        params = sum(weight_bytes(x, formats.get(name)) for name, x in model.named_parameters())
        kv = 2 * model.cache.k.numel() * model.cache.k.element_size()
        micro = -(-r.max_batch_size // cfg.parallel.microbatches)
        work = workspace_bytes(model, micro, r.max_seq_len, r.torch_dtype.itemsize, r.device == "cpu")
        total = params + kv + work
        rows.append(
            RankPlan(
                rank,
                mesh.stage,
                mesh.tp.rank,
                f"{layers.start}-{layers.stop - 1}",
                params,
                kv,
                work,
                total,
                None if device_memory is None else total <= device_memory,
            )
        )
    return rows


def weight_bytes(p: torch.Tensor, qtype: str | None) -> int:
    """Bytes of a (float, meta-device) parameter once held in block format qtype (None: as it is)."""
    return p.numel() * p.element_size() if qtype is None else p.shape[0] * row_bytes(qtype, p.shape[1])


def parse_bytes(text: str) -> int:
    """'80GiB', '24GB', '512MiB', '1e9' -> bytes."""
    units = {
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "tb": 10**12,
        "b": 1,
        "": 1,
    }
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num) :]
    if unit not in units or not num:
        raise ValueError(f"cannot read a size from {text!r}; use e.g. 80GiB or 24GB")
    return int(float(num) * units[unit])


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def table(rows: list[RankPlan]) -> str:
    """A fixed-width table, one line per rank, sizes in GiB."""
    head = ["rank", "stage", "tp", "layers", "params GiB", "kv GiB", "workspace GiB", "total GiB", "fits"]
    body = [
        [
            str(x.rank),
            str(x.stage),
            str(x.tp_rank),
            x.layers,
            gib(x.param_bytes),
            gib(x.kv_cache_bytes),
            gib(x.workspace_bytes),
            gib(x.total_bytes),
            {None: "-", True: "yes", False: "NO"}[x.fits],
        ]
        for x in rows
    ]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head, *body])


def as_json(rows: list[RankPlan]) -> list[dict]:
    return [asdict(x) for x in rows]
