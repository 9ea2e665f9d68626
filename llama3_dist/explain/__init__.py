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

from ..args import ModelArgs
from ..assemble import Ready
from ..errors import UserError
from .probe import gather_to_rank0, observe
from .record import DEFAULT_PROMPT, MAX_TOKENS, Explanation, NextToken, Step
from .render import as_json, format_text, prepare_out, write_html
from .walk import assemble_steps

__all__ = [
    "DEFAULT_PROMPT",
    "Explanation",
    "NextToken",
    "Step",
    "as_json",
    "check_request",
    "explain",
    "format_text",
    "prepare_out",
    "write_html",
]


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
