"""Renderings of an Explanation: text, JSON, and an HTML page with figures (cli.py prints or writes them)."""

from __future__ import annotations

import base64
import dataclasses
import html
import importlib.util
import io
import math
from pathlib import Path

from ..errors import UserError
from .record import Explanation


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
