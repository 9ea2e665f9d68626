"""On every rank: forward hooks on the modules one prefill runs, and what no module outputs
(rotated q and k, one head's scores and softmax) recomputed with the model's own functions."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from ..model import Transformer, apply_rotary, attend
from ..parallel.mesh import Mesh
from ..parallel.pipeline import run_stages
from .record import FEW, TOP_FIGURE


class Probe:
    """Forward hooks on this rank's modules that keep a copy of what each saw."""

    def __init__(self, model: Transformer, layer: int):
        self.seen: dict[str, Tensor] = {}
        self.resid: dict[int, Tensor] = {}  # layer id -> its output at the last position
        self.handles = []
        if model.mesh.is_pp_first_stage:
            self.output(model.tok_embeddings, "embed")
        for lid, block in model.layers.items():
            self.handles.append(
                block.register_forward_hook(lambda m, a, out, lid=int(lid): self.resid.__setitem__(lid, row(out)))
            )
        if str(layer) in model.layers:  # layer N is on this stage
            block = model.layers[str(layer)]
            self.input(block.attention_norm, "x")
            self.output(block.attention_norm, "x_norm")
            self.handles.append(block.attention.register_forward_pre_hook(self._attention_inputs))
            self.output(block.attention.wqkv, "qkv")
            self.input(block.attention.wo, "attn")
            self.output(block.attention.wo, "attn_proj")
            self.input(block.ffn_norm, "h")
            self.output(block.ffn_norm, "h_norm")
            self.output(block.feed_forward.w13, "gate_up")
            self.input(block.feed_forward.w2, "act")
            self.output(block.feed_forward.w2, "ffn")
            self.output(block, "out")
        if model.mesh.is_pp_last_stage:
            self.input(model.norm, "final_in")
            self.output(model.norm, "final_norm")
            self.output(model.output, "logits")

    def _attention_inputs(self, module, args) -> None:
        _, pos, freqs_cis, mask, _ = args  # Attention.forward(x, pos, freqs_cis, mask, cache)
        self.seen.update(pos=pos.clone(), freqs_cis=freqs_cis.clone(), mask=mask.clone())

    def input(self, module, name: str) -> None:
        self.handles.append(
            module.register_forward_pre_hook(lambda m, a: self.seen.__setitem__(name, a[0].detach().clone()))
        )

    def output(self, module, name: str) -> None:
        def keep(m, a, out):  # a clone: row-parallel outputs are all-reduced in place
            self.seen[name] = tuple(t.detach().clone() for t in out) if isinstance(out, tuple) else out.detach().clone()

        self.handles.append(module.register_forward_hook(keep))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def row(t: Tensor) -> Tensor:
    """The last position's vector of a (1, T, n) activation, float32 on the CPU."""
    return t[0, -1].float().cpu().clone()  # a copy: no view into a buffer the model may reuse


def layout(model: Transformer, mesh: Mesh) -> dict:
    """This rank's place and the slices of each weight it holds, from the layers' own shard records."""
    block = next(iter(model.layers.values()))
    attn, ffn = block.attention, block.feed_forward
    hd = attn.head_dim
    (_, _, (q0, q1)), (_, _, (k0, k1)), _ = attn.wqkv.parts
    out = {
        "rank": mesh.rank,
        "stage": mesh.stage,
        "tp_rank": mesh.tp.rank,
        "tp_ranks": list(mesh.tp.ranks),
        "pp_ranks": list(mesh.pp.ranks),
        "layers": [model.layer_ids.start, model.layer_ids.stop],
        "q_heads": [q0 // hd, q1 // hd],
        "kv_heads": [k0 // hd, k1 // hd],
        "ffn": list(ffn.w13.parts[0][2]),
        "wo_cols": list(attn.wo.shard[1:]),
        "w2_cols": list(ffn.w2.shard[1:]),
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    if mesh.is_pp_first_stage:
        out["embed_rows"] = list(model.tok_embeddings.shard[1:])
    if mesh.is_pp_last_stage:
        out["head_rows"] = list(model.output.shard[1:])
    return out


@torch.inference_mode()
def observe(model: Transformer, mesh: Mesh, ids: list[int], layer: int, head: int) -> dict:
    """One prefill through run_stages (as generate runs it) with hooks; what this rank saw, small and on the CPU."""
    T = len(ids)
    model.setup_caches(1, T)
    probe = Probe(model, layer)
    tokens = torch.tensor([ids], dtype=torch.long, device=mesh.device)
    pos = torch.arange(T, device=mesh.device).unsqueeze(0)  # (1, T)
    try:
        run_stages(model, mesh, tokens, pos, torch.tensor([T - 1], device=mesh.device), 1)
    finally:
        probe.remove()
    seen, facts = probe.seen, {"layout": layout(model, mesh)}
    lead = mesh.tp.rank == 0  # replicated activations are reported once per stage
    facts["dtypes"] = {
        name: str((t[0] if isinstance(t, tuple) else t).dtype).removeprefix("torch.") for name, t in seen.items()
    }
    if lead:
        facts["resid"] = probe.resid
        facts["rows"] = {
            name: row(seen[name])
            for name in ("embed", "x", "x_norm", "attn_proj", "h", "h_norm", "ffn", "out", "final_in", "final_norm")
            if name in seen
        }
    if "qkv" in seen:
        block = model.layers[str(layer)]
        facts.update(
            recompute_attention(
                block, model.cache.rows(0, 1).layer(list(model.layers).index(str(layer))), seen, head, facts["layout"]
            )
        )
        if lead:
            gate, up = seen["gate_up"]
            facts["rows"].update(gate=row(gate), up=row(up), act=row(seen["act"]))
            facts["norm_w"] = {
                "attention_norm": block.attention_norm.weight[:FEW].float().cpu(),
                "ffn_norm": block.ffn_norm.weight[:FEW].float().cpu(),
            }
            facts["mask"] = seen["mask"][0, 0].cpu()
    if "logits" in seen and mesh.rank == mesh.sampler_rank:
        logits = seen["logits"][0, -1].float()  # (vocab,): full vocab after the all-gather
        probs = torch.softmax(logits, dim=-1)
        p, i = probs.topk(min(TOP_FIGURE, probs.numel()))
        facts["top"] = list(zip(p.tolist(), i.tolist()))
        facts["logits_few"] = logits[:FEW].cpu()
        facts["norm_w_final"] = model.norm.weight[:FEW].float().cpu()
    return facts


def recompute_attention(block, cache, seen: dict, head: int, where: dict) -> dict:
    """Rotary, scores, mask and softmax of this rank's heads of one layer, from the hooked inputs, with
    the model's own apply_rotary and attend; checked against the hooked input of wo and the KV cache."""
    attn = block.attention
    q, k, v = seen["qkv"]  # (1, T, local heads * hd) each
    B, T, _ = q.shape
    hd, nq, nkv = attn.head_dim, attn.n_local_heads, attn.n_local_kv_heads
    q, k, v = q.view(B, T, nq, hd), k.view(B, T, nkv, hd), v.view(B, T, nkv, hd)
    freqs_cis, mask = seen["freqs_cis"], seen["mask"]  # (1, T, hd/2, 2), (1, 1, T, S)
    q_rot, k_rot = apply_rotary(q, freqs_cis), apply_rotary(k, freqs_cis)  # (1, T, heads, hd)
    k_cached, v_cached = cache.k[:, :, : mask.shape[-1]], cache.v[:, :, : mask.shape[-1]]  # the views attend read
    y = attend(q_rot.transpose(1, 2), k_cached, v_cached, mask)  # (1, nq, T, hd)
    y = y.transpose(1, 2).reshape(B, T, nq * hd)
    q0, kv0 = where["q_heads"][0], where["kv_heads"][0]
    group = nq // nkv  # local query head i reads local KV head i // group
    scores = torch.einsum("bthd,bshd->bhts", q_rot.float(), k_rot.float().repeat_interleave(group, dim=2)) * hd**-0.5
    scores = scores.masked_fill(~mask, float("-inf"))  # (1, nq, T, S)
    probs = torch.softmax(scores, dim=-1)
    by_hand = (probs @ v.float().repeat_interleave(group, dim=2).transpose(1, 2)).transpose(1, 2)  # (1, T, nq, hd)
    out = {
        "probs": {q0 + i: probs[0, i].cpu() for i in range(nq)},
        "kv_of": {q0 + i: kv0 + i // group for i in range(nq)},
        "attend_equals_wo_input": bool(torch.equal(y, seen["attn"])),
        "softmax_v_max_diff": float((by_hand.reshape(B, T, nq * hd) - seen["attn"].float()).abs().max()),
        "k_rot_equals_cache": bool(torch.equal(k_rot.transpose(1, 2), k_cached)),
    }
    if q0 <= head < q0 + nq:
        i, kv = head - q0, (head - q0) // group
        p = T - 1
        c, s = freqs_cis[0, p, 0].tolist()
        out["head"] = {
            "q": q[0, p, i, :FEW].float().cpu(),
            "k": k[0, p, kv, :FEW].float().cpu(),
            "v": v[0, p, kv, :FEW].float().cpu(),
            "pair": [q[0, p, i, :2].float().tolist(), q_rot[0, p, i, :2].float().tolist(), math.atan2(s, c)],
            "scores": scores[0, i].cpu(),
            "y": y[0, p, i * hd : i * hd + FEW].float().cpu(),
        }
    return out


def gather_to_rank0(facts: dict, mesh: Mesh) -> list[dict] | None:
    """Every rank's facts, in rank order, on global rank 0 (None elsewhere).

    Over the default group, which init_distributed created with runtime.timeout_s: a dead peer
    ends the wait with an error instead of a hang.
    """
    if mesh.world_size == 1:
        return [facts]
    out = [None] * mesh.world_size if mesh.is_rank0 else None
    dist.gather_object(facts, out, dst=0)
    return out
