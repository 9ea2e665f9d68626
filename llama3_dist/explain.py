"""`explain`: one prefill of the real model, tensor by tensor, in the order of the from-scratch walkthrough.

The numbers are the model's own. Forward hooks on the modules `generate` runs (tok_embeddings,
attention_norm, attention.wqkv, attention.wo, ffn_norm, feed_forward.w13 and .w2, every layer,
norm, output) record what they saw during one prefill through `run_stages`, the call `generate`
makes. What is no module's output (rotated q and k, one head's scores and softmax, the causal
mask) is recomputed from the hooked inputs with the model's own functions (`apply_rotary`,
`attend`, the Transformer's freqs_cis and mask), and the recomputed attention output is compared
with the hooked input of wo, so a drift would show. Each rank sees only its own shards; the small
pieces rank 0 needs are gathered to it, and rank 0 alone assembles the walkthrough. Returns data,
never prints: cli.py renders `format_text`, `as_json` or `write_html`.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import importlib.util
import io
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .args import ModelArgs, RopeScaling
from .assemble import Ready
from .errors import UserError
from .model import Transformer, apply_rotary, attend, rope_frequencies
from .parallel.mesh import Mesh
from .parallel.pipeline import run_stages

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


def check_request(args: ModelArgs, prompt: str, layer: int, head: int) -> None:
    """Raise UserError for an empty prompt or a layer/head outside the model."""
    if not prompt.strip():
        raise UserError("explain: the prompt is empty; give some text with --prompt")
    if not 0 <= layer < args.n_layers:
        raise UserError(f"explain: --layer {layer} is out of range; the model has layers 0-{args.n_layers - 1}")
    if not 0 <= head < args.n_heads:
        raise UserError(f"explain: --head {head} is out of range; the model has query heads 0-{args.n_heads - 1}")


def explain(ready: Ready, prompt: str = DEFAULT_PROMPT, layer: int = 0, head: int = 0) -> Explanation | None:
    """Run one prefill of `prompt` through ready.model with hooks; the walkthrough on rank 0, None elsewhere."""
    args, mesh, tok = ready.model.args, ready.mesh, ready.tokenizer
    check_request(args, prompt, layer, head)
    ids = tok.encode(prompt)
    if not ids:
        raise UserError("explain: the prompt encodes to no tokens; give some text with --prompt")
    if len(ids) > min(MAX_TOKENS, ready.cfg.runtime.max_seq_len):
        raise UserError(
            f"explain: the prompt has {len(ids)} tokens; the walkthrough takes at most "
            f"{min(MAX_TOKENS, ready.cfg.runtime.max_seq_len)}: shorten it"
        )
    if len(ids) == 1 and ready.model.decode_step is not None:
        raise UserError(
            "explain: a one-token prompt runs the fast decode step, which hooks do not see; "
            "build the model with runtime.compile=false and runtime.cuda_graphs=false"
        )
    facts = observe(ready.model, mesh, ids, layer, head)
    everyone = gather_to_rank0(facts, mesh)
    if everyone is None:
        return None
    pieces = [tok.decode([i]) for i in ids]
    top = [NextToken(i, tok.decode([i]), p) for p, i in next(f["top"] for f in everyone if "top" in f)]
    return assemble_steps(ready, prompt, ids, pieces, layer, head, everyone, top)


# ---------------------------------------------------------------- on every rank: hooks and recomputation


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


# ---------------------------------------------------------------- on rank 0: the walkthrough


def few(t: Tensor, n: int = FEW) -> list[float]:
    return [float(f"{x:.4g}") for x in t[:n].tolist()]


def show(t: Tensor, n: int = FEW) -> str:
    return "[" + ", ".join(f"{x:.4g}" for x in t[:n].tolist()) + (", ...]" if t.numel() > n else "]")


def span(start: int, stop: int) -> str:
    """[start, stop) as 'start-last', or one number."""
    return f"{start}-{stop - 1}" if stop - start > 1 else str(start)


def spans(records: list[dict], key: str, unit: str) -> str:
    """'rank 0: heads 0-5, rank 1: heads 6-8' from each rank's [start, stop) record."""
    return ", ".join(f"rank {r['rank']}: {unit} {span(*r[key])}" for r in records)


def frequency_scaling(args: ModelArgs, freqs: Tensor, base: Tensor) -> str | None:
    """How the model's frequencies differ from theta^(-2i/d): Llama 3.1 scaling, GGUF factors, or None."""
    ratio = base / freqs
    kept = int((ratio - 1).abs().lt(1e-6).sum())
    if args.rope_scaling is not None:
        s = args.rope_scaling
        divided = int((ratio - s.factor).abs().lt(1e-4 * s.factor).sum())
        return (
            f"Llama 3.1 scaling (factor {s.factor:g}, low_freq_factor {s.low_freq_factor:g}, high_freq_factor "
            f"{s.high_freq_factor:g}, original context {s.original_max_position_embeddings}): {kept} pairs kept "
            f"(wavelength < {s.original_max_position_embeddings / s.high_freq_factor:g}), {divided} divided by "
            f"{s.factor:g} (wavelength > {s.original_max_position_embeddings / s.low_freq_factor:g}), "
            f"{len(freqs) - kept - divided} blended"
        )
    if args.rope_freq_factors is not None:
        return (
            f"per-frequency divisors from the GGUF's rope_freqs (Llama 3.1 scaling as llama.cpp stores it): "
            f"{kept} pairs kept, {len(freqs) - kept} divided by {min(ratio.tolist()):.3g}-{max(ratio.tolist()):.3g}"
        )
    return None


def assemble_steps(
    ready: Ready,
    prompt: str,
    ids: list[int],
    pieces: list[str],
    layer: int,
    head: int,
    everyone: list[dict],
    top: list[NextToken],
) -> Explanation:
    """Rank 0: the numbered steps from every rank's facts."""
    args, cfg = ready.model.args, ready.cfg
    T, hd, dim = len(ids), args.hd, args.dim
    records = [f["layout"] for f in everyone]
    many = len(records) > 1
    lead = {}  # replicated activations: from the tp-rank-0 rank that saw them
    dtypes: dict[str, str] = {}
    for f in everyone:
        for k, v in f.get("rows", {}).items():
            lead.setdefault(k, v)
        for k, v in f["dtypes"].items():
            dtypes.setdefault(k, v)
    F_ = args.hidden_dim

    def td(name: str, *shape: int) -> tuple[list[int], str]:  # the full (unsharded) shape and the real dtype
        return list(shape), dtypes[name]

    at_layer = [f for f in everyone if "probs" in f]
    probs = {h: p for f in at_layer for h, p in f["probs"].items()}
    kv_of = {h: kv for f in at_layer for h, kv in f["kv_of"].items()}
    detail = next(f["head"] for f in at_layer if "head" in f)
    layer_lead = next(f for f in at_layer if "norm_w" in f)
    last = next(f for f in everyone if "top" in f)
    resid = {lid: v for f in everyone for lid, v in f.get("resid", {}).items()}
    layer_ranks = [r for r in records if r["layers"][0] <= layer < r["layers"][1]]
    dtype = records[0]["dtype"]
    freqs = rope_frequencies(args)
    base = rope_frequencies(dataclasses.replace(args, rope_scaling=None, rope_freq_factors=None))
    scaling = frequency_scaling(args, freqs, base)
    steps: list[Step] = []

    def where(*lines: str) -> list[str]:
        return list(lines) if many else []

    def on_stage(s: int) -> list[int]:
        return [x["rank"] for x in records if x["stage"] == s]

    # 1. tokens
    bos = getattr(ready.tokenizer, "bos_id", None)
    text = [
        f"{t:>4} {i:>7} {p!r}" + ("  <- BOS" if i == bos and t == 0 else "")
        for t, (i, p) in enumerate(zip(ids, pieces))
    ]
    if bos is None or ids[0] != bos:
        text.append("(no BOS: this tokenizer does not prepend one)")
    steps.append(Step(1, "tokens", "ids = tokenizer.encode(prompt)", [T], "int64", ids[:FEW], text))

    # 2. embedding
    e = lead["embed"]
    first = [r for r in records if "embed_rows" in r]
    steps.append(
        Step(
            2,
            "embedding",
            "x = tok_embeddings.weight[ids]",
            *td("embed", T, dim),
            few(e),
            [f"x[{T - 1}] = {show(e)}  ‖x[{T - 1}]‖ = {e.norm():.4g}  (one row of a {args.vocab_size} x {dim} table)"],
            where(
                f"VocabParallelEmbedding rows: {spans(first, 'embed_rows', 'ids')}",
                f"each rank looks up the ids it holds, zeroes the others, then all-reduce over tp ranks "
                f"{first[0]['tp_ranks']}",
            ),
        )
    )

    # 3. RMSNorm of layer N
    x, xn, w = lead["x"], lead["x_norm"], layer_lead["norm_w"]["attention_norm"]
    rms = math.sqrt(float(x.pow(2).mean()) + args.norm_eps)
    steps.append(
        Step(
            3,
            f"RMSNorm (layer {layer} attention_norm)",
            "x / rms(x) * w,  rms(x) = sqrt(mean(x²) + eps)",
            *td("x_norm", T, dim),
            few(xn),
            [
                f"layer {layer} input x[{T - 1}] = {show(x)}",
                f"rms(x[{T - 1}]) = {rms:.4g} (eps {args.norm_eps:g}),  w[:{FEW}] = {show(w)}",
                f"x / rms(x) * w = {show(xn)}",
            ],
            where("norm weights are replicated on every rank; no communication"),
        )
    )

    # 4. q, k, v and the GQA grouping
    groups = {}
    for h in range(args.n_heads):
        groups.setdefault(kv_of[h], []).append(h)
    gqa = "; ".join(f"KV head {kv} <- query heads {' '.join(map(str, hs))}" for kv, hs in sorted(groups.items()))
    steps.append(
        Step(
            4,
            "q, k, v",
            "q = n·wqᵀ, k = n·wkᵀ, v = n·wvᵀ with n = attention_norm(x) (one stacked matmul, wqkv), split into heads",
            *td("qkv", T, args.n_heads, hd),
            few(detail["q"]),
            [
                (
                    f"q ({T}, {args.n_heads}, {hd}), k ({T}, {args.n_kv_heads}, {hd}), "
                    f"v ({T}, {args.n_kv_heads}, {hd})  (tokens, heads, head_dim)"
                ),
                f"GQA, {args.n_heads // args.n_kv_heads} query heads per KV head: {gqa}",
                f"q[{T - 1}, head {head}] = {show(detail['q'])}",
                f"k[{T - 1}, KV head {kv_of[head]}] = {show(detail['k'])}   v = {show(detail['v'])}",
            ],
            where(
                "wqkv (column-parallel, KV-head groups): "
                + ", ".join(
                    f"rank {r['rank']}: query heads {span(*r['q_heads'])}, KV heads {span(*r['kv_heads'])}"
                    for r in layer_ranks
                ),
                "each rank computes only its heads; no communication",
            ),
        )
    )

    # 5. RoPE
    (b0, b1), (a0, a1), angle = detail["pair"]
    text = [
        (
            f"θ_j = theta^(-2j/{hd}), theta = {args.rope_theta:g}: θ_0 = {freqs[0]:.4g}, θ_1 = {freqs[1]:.4g}, "
            f"θ_{hd // 4} = {freqs[hd // 4]:.4g}, θ_{hd // 2 - 1} = {freqs[-1]:.4g}"
        )
    ]
    if scaling is None:
        text.append("no frequency scaling: this checkpoint has none (Llama 3.1/3.2 checkpoints do)")
    else:
        text += [scaling, f"θ_{hd // 2 - 1}: {base[-1]:.4g} unscaled -> {freqs[-1]:.4g} scaled"]
    text += [
        (
            f"q head {head}, position {T - 1}, pair 0 rotated by {T - 1}·θ_0 = {(T - 1) * float(freqs[0]):.4g} rad "
            f"(≡ {angle:.4g} mod 2π, read off the model's freqs_cis):"
        ),
        f"({b0:.4g}, {b1:.4g}) -> ({a0:.4g}, {a1:.4g}),  length {math.hypot(b0, b1):.4g} -> {math.hypot(a0, a1):.4g}",
    ]
    steps.append(
        Step(
            5,
            "RoPE",
            "(x0 + i·x1) · e^(i·pos·θ_j) for each (even, odd) pair j of q and k",
            [T, hd // 2],
            "float32",
            few(freqs),
            text,
            where("rotation is per position: every rank rotates its own heads"),
        )
    )

    # 6. attention of head H
    sc, pr = detail["scores"], probs[head]
    order = pr[T - 1].argsort(descending=True)[:3].tolist()
    mask = layer_lead["mask"]
    n = min(T, 6)
    text = [
        f"scores[{T - 1}, :] = {show(sc[T - 1])}  (the last position sees every key: nothing masked in its row)",
        f"causal mask: position t sees positions 0..t (first {n} rows, ■ sees, · masked to -inf):",
    ]
    text += ["    " + " ".join("■" if mask[t, s] else "·" for s in range(n)) for t in range(n)]
    text += [
        f"softmax row {T - 1} = {show(pr[T - 1])}  (sums to {pr[T - 1].sum():.4g})",
        f"position {T - 1} {pieces[-1]!r} attends most to: "
        + ", ".join(f"{s} {pieces[s]!r} {pr[T - 1, s]:.3f}" for s in order),
        f"output y = softmax · v:  y[{T - 1}, head {head}] = {show(detail['y'])}",
    ]
    owner = next(r["rank"] for r in layer_ranks if r["q_heads"][0] <= head < r["q_heads"][1])
    steps.append(
        Step(
            6,
            f"attention (layer {layer} head {head}, reads KV head {kv_of[head]})",
            f"softmax(q·kᵀ/√{hd} + mask) · v",
            [T, T],
            "float32",
            few(pr[T - 1]),
            text,
            where(
                f"head {head} lives on rank {owner}" + ("; its values were gathered to rank 0" if owner else ""),
                "each rank attends over its own heads with its own KV cache; no communication",
            ),
        )
    )

    # 7. output projection, residual, SwiGLU, residual
    r = lead
    wo = spans(layer_ranks, "wo_cols", "columns")
    ffn = spans(layer_ranks, "ffn", "hidden")
    tp = layer_ranks[0]["tp_ranks"]
    steps += [
        Step(
            7,
            "output projection",
            "attn = concat(heads)·woᵀ",
            *td("attn_proj", T, dim),
            few(r["attn_proj"]),
            [f"concat(heads) ({T}, {args.n_heads * hd}) -> ({T}, {dim}): attn[{T - 1}] = {show(r['attn_proj'])}"],
            where(
                f"wo (row-parallel): {wo}", f"each rank multiplies its heads' part; all-reduce (sum) over tp ranks {tp}"
            ),
        ),
        Step(
            7,
            "residual",
            "h = x + attn",
            *td("h", T, dim),
            few(r["h"]),
            [f"h[{T - 1}] = {show(r['h'])}  ‖h[{T - 1}]‖ = {r['h'].norm():.4g}"],
        ),
        Step(
            7,
            f"RMSNorm (layer {layer} ffn_norm)",
            "h / rms(h) * w",
            *td("h_norm", T, dim),
            few(r["h_norm"]),
            [f"w[:{FEW}] = {show(layer_lead['norm_w']['ffn_norm'])} -> {show(r['h_norm'])}"],
        ),
        Step(
            7,
            "SwiGLU gate and up",
            "gate = h·w1ᵀ, up = h·w3ᵀ (one stacked matmul, w13)",
            *td("gate_up", T, F_),
            few(r["gate"]),
            [f"gate[{T - 1}] = {show(r['gate'])}", f"up[{T - 1}] = {show(r['up'])}"],
            where(f"w13 (column-parallel): {ffn}; no communication"),
        ),
        Step(
            7,
            "SwiGLU",
            "silu(gate) · up,  silu(g) = g · sigmoid(g)",
            *td("act", T, F_),
            few(r["act"]),
            [f"silu(gate) · up [{T - 1}] = {show(r['act'])}  (silu(gate) = {show(F.silu(r['gate']))})"],
        ),
        Step(
            7,
            "down projection",
            "ffn = (silu(gate) · up)·w2ᵀ",
            *td("ffn", T, dim),
            few(r["ffn"]),
            [f"({T}, {args.hidden_dim}) -> ({T}, {dim}): ffn[{T - 1}] = {show(r['ffn'])}"],
            where(f"w2 (row-parallel): {ffn}", f"all-reduce (sum) over tp ranks {tp}"),
        ),
        Step(
            7,
            "residual",
            "out = h + ffn",
            *td("out", T, dim),
            few(r["out"]),
            [
                f"out[{T - 1}] = {show(r['out'])}  ‖out[{T - 1}]‖ = {r['out'].norm():.4g}: the input of "
                + (f"layer {layer + 1}" if layer + 1 < args.n_layers else "the final norm")
            ],
        ),
    ]

    # 8. the other layers, final norm, logits, next token
    stages = sorted({(x["stage"], tuple(x["layers"])) for x in records})
    text = [
        f"layer {lid:>3}: ‖x[{T - 1}]‖ = {v.norm():8.4g}   rms = {v.pow(2).mean().sqrt():.4g}"
        + ("   <- the layer above" if lid == layer else "")
        for lid, v in sorted(resid.items())
    ]
    send = []
    for (s, (_, hi)), (nxt, _) in itertools.pairwise(stages):
        send.append(
            f"after layer {hi - 1}: send_forward of the ({T}, {dim}) activations from stage {s} ranks "
            f"{on_stage(s)} to stage {nxt} ranks {on_stage(nxt)} (tp-rank r to tp-rank r)"
        )
    steps.append(
        Step(
            8,
            "layers",
            f"x = layer_i(x) for i = 0..{args.n_layers - 1}: residual-stream norm at the last token",
            [T, dim],
            dtype,
            [float(f"{resid[i].norm():.4g}") for i in sorted(resid)][:FEW],
            text,
            where(*[f"stage {s}: layers {span(lo, hi)} on ranks {on_stage(s)}" for s, (lo, hi) in stages], *send),
        )
    )
    fi, fo = lead["final_in"], lead["final_norm"]
    steps.append(
        Step(
            8,
            "final norm",
            "x / rms(x) * w (norm), last position only",
            *td("final_norm", 1, dim),
            few(fo),
            [f"x[{T - 1}] = {show(fi)} -> {show(fo)}  (w[:{FEW}] = {show(last['norm_w_final'])})"],
        )
    )
    heads_rows = [x for x in records if "head_rows" in x]
    steps.append(
        Step(
            8,
            "logits",
            "logits = norm(x)·outputᵀ" + ("  (output = tok_embeddings, tied)" if args.tie_embeddings else ""),
            *td("logits", 1, args.vocab_size),
            few(last["logits_few"]),
            [
                (
                    f"one score per vocabulary entry ({args.vocab_size}) for the next token: logits[:{FEW}] = "
                    f"{show(last['logits_few'])}"
                )
            ],
            where(
                f"output head (vocab-parallel): {spans(heads_rows, 'head_rows', 'vocab')}",
                f"all-gather over tp ranks {heads_rows[0]['tp_ranks']} into full-vocab logits; "
                f"rank {ready.mesh.sampler_rank} samples and broadcasts the token to every rank",
            ),
        )
    )
    steps.append(
        Step(
            8,
            "next token",
            "softmax(logits), top 5",
            [args.vocab_size],
            "float32",
            [float(f"{t.prob:.4g}") for t in top[:TOP]],
            [f"{t.id:>7} {t.text!r:<16} {t.prob:.4f}" for t in top[:TOP]]
            + [f"greedy next token: {top[0].text!r} (id {top[0].id})"],
        )
    )

    title = (
        f"{Path(str(ready.ckpt.path)).name}: {args.n_layers} layers, dim {dim}, {args.n_heads} query heads / "
        f"{args.n_kv_heads} KV heads x {hd}, FFN {args.hidden_dim}, vocab {args.vocab_size}; {dtype}; "
        + (
            f"tensor={cfg.parallel.tensor} x pipeline={cfg.parallel.pipeline} ({len(records)} ranks)"
            if many
            else "1 rank"
        )
    )
    checks = {
        "attend_equals_wo_input": all(f["attend_equals_wo_input"] for f in at_layer),
        "softmax_v_max_diff": max(f["softmax_v_max_diff"] for f in at_layer),
        "k_rot_equals_cache": all(f["k_rot_equals_cache"] for f in at_layer),
    }
    attention = torch.stack([probs[h] for h in range(args.n_heads)])
    return Explanation(
        title,
        prompt,
        layer,
        head,
        pieces,
        steps,
        top[:TOP],
        top,
        attention,
        [kv_of[h] for h in range(args.n_heads)],
        freqs,
        base,
        scaling,
        rope_frequencies(dataclasses.replace(args, rope_scaling=RopeScaling(8.0), rope_freq_factors=None)),
        checks,
    )


# ---------------------------------------------------------------- renderings (cli.py prints them)


def format_text(exp: Explanation) -> str:
    """The numbered walkthrough as plain text."""
    out = [exp.title, f"prompt: {exp.prompt!r}", ""]
    shown = set()
    for s in exp.steps:
        number = f"{s.section}." if s.section not in shown else "  "
        shown.add(s.section)
        shape = f"  {tuple(s.shape)} {s.dtype}" if s.shape is not None else ""
        out.append(f"{number} {s.name}: {s.math}{shape}")
        out += [f"     {line}" for line in s.text]
        out += [f"     [layout] {line}" for line in s.where]
    c = exp.checks
    out += [
        "",
        (
            f"checks: attend() on the hooked q/k/v equals the hooked input of wo: {c['attend_equals_wo_input']}; "
            f"rotated k equals the KV cache: {c['k_rot_equals_cache']}; "
            f"|softmax(scores)·v - model| <= {c['softmax_v_max_diff']:.2g}"
        ),
    ]
    return "\n".join(out)


def as_json(exp: Explanation) -> dict:
    """The walkthrough as one JSON-ready object: steps and the top next tokens."""
    return {
        "prompt": exp.prompt,
        "title": exp.title,
        "layer": exp.layer,
        "head": exp.head,
        "tokens": exp.pieces,
        "steps": [dataclasses.asdict(s) for s in exp.steps],
        "next_tokens": [dataclasses.asdict(t) for t in exp.next_tokens],
        "checks": exp.checks,
    }


def prepare_out(directory: str | Path) -> Path:
    """Create the --out directory and check matplotlib is there, before any weights load."""
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {directory}: cannot create the directory ({e.strerror})") from None
    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("explain --out needs matplotlib: pip install 'llama3_dist[explain]'")
    return out


def figures(exp: Explanation) -> dict[str, bytes]:
    """PNG figures: attention heatmaps of every head, rotary frequencies, next-token distribution."""
    import matplotlib  # only --out draws: the optional dependency is imported here, not by every explain

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    labels = [p.replace("\n", "\\n").replace(" ", "·") or "∅" for p in exp.pieces]
    T, H = len(labels), exp.attention.shape[0]
    out = {}

    cols = math.ceil(math.sqrt(H))
    rows = math.ceil(H / cols)
    size = 1.2 + 0.22 * T
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * size), squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.axis("off")
            continue
        ax.imshow(exp.attention[h].numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"head {h} (KV {exp.kv_of_head[h]})", fontsize=8)
        if T <= 40:
            ax.set_xticks(range(T), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(T), labels, fontsize=6)
        else:
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"layer {exp.layer}: softmax(q·kᵀ/√d + mask), rows = query position, columns = key position")
    out["attention.png"] = _png(fig, plt)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogy(exp.base_freqs.numpy(), "o-", ms=3, label="theta^(-2j/d), unscaled")
    if exp.scaling is not None:
        ax.semilogy(exp.freqs.numpy(), "s-", ms=3, label="scaled: what this model uses")
    else:
        ax.semilogy(exp.llama31_freqs.numpy(), "--", label="Llama 3.1 scaling (factor 8), not used by this model")
    ax.set_xlabel("pair j"), ax.set_ylabel("θ_j (radians per position)")
    ax.set_title("rotary frequencies" + (" with and without scaling" if exp.scaling else " (no scaling)"))
    ax.legend()
    out["rope.png"] = _png(fig, plt)

    fig, ax = plt.subplots(figsize=(6, 0.25 * len(exp.top_figure) + 1))
    names = [repr(t.text) for t in exp.top_figure][::-1]
    ax.barh(range(len(names)), [t.prob for t in exp.top_figure][::-1])
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("probability")
    ax.set_title("next token")
    out["next_tokens.png"] = _png(fig, plt)
    return out


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def write_html(exp: Explanation, directory: str | Path) -> Path:
    """index.html (figures embedded as data URIs, so it stands alone) and the PNGs beside it; returns its path."""
    out = prepare_out(directory)
    images = figures(exp)
    parts = [
        "<!doctype html><meta charset='utf-8'><title>llama3-dist explain</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}pre{font-size:12px}</style>",
        "<h1>One forward pass, tensor by tensor</h1>",
        f"<pre>{html.escape(format_text(exp))}</pre>",
    ]
    for name, data in images.items():
        (out / name).write_bytes(data)
        parts.append(
            f"<h2>{name.removesuffix('.png').replace('_', ' ')}</h2>"
            f"<img alt='{name}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
        )
    index = out / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    return index
