"""On rank 0: the gathered facts assembled into the walkthrough's steps, in the seed's order."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..args import ModelArgs, RopeScaling
from ..assemble import Ready
from ..model import rope_frequencies
from .record import FEW, TOP, Explanation, NextToken, Step


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
