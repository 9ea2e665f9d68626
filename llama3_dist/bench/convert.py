"""Checkpoints for the bench's peers: our weights as a transformers model, or a GGUF (F32, BF16, Q8_0) for llama.cpp."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from ..args import PRESETS, TIED
from ..checkpoint import default_checkpoint, load_model, meta_state, open_checkpoint
from ..checkpoint.gguf import gguf_name
from ..checkpoint.hf import hf_name, meta_to_hf_rows
from ..checkpoint.synthetic import write_random_meta
from ..parallel.mesh import Mesh


def hf_model_from(ckpt, dtype: torch.dtype, device: str = "cpu"):
    """transformers' LlamaForCausalLM on `device` holding exactly the weights our loader reads from ckpt.

    It is built under `dtype` as the default dtype, as from_pretrained(torch_dtype=...) builds it,
    so its rotary inverse frequencies stay float32.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = load_model(ckpt, Mesh.single(device), dtype)
    a = ours.args
    rope = {"rope_type": "default", "rope_theta": a.rope_theta}
    if a.rope_scaling is not None:
        s = a.rope_scaling
        rope = {
            "rope_type": "llama3",
            "rope_theta": a.rope_theta,
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    cfg = LlamaConfig(
        hidden_size=a.dim,
        num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads,
        num_key_value_heads=a.n_kv_heads,
        intermediate_size=a.hidden_dim,
        vocab_size=a.vocab_size,
        rms_norm_eps=a.norm_eps,
        tie_word_embeddings=a.tie_embeddings,
        rope_parameters=rope,
        max_position_embeddings=a.max_position_embeddings or 8192,
    )
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), torch.device(device):
            hf = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)

    heads = {"attention.wq.weight": a.n_heads, "attention.wk.weight": a.n_kv_heads}  # stored rotate-half in HF
    sd = {}
    for name, t in meta_state(ours):
        n = heads.get(name.partition(".")[2].partition(".")[2]) if name.startswith("layers.") else None
        sd[hf_name(name)] = meta_to_hf_rows(t, n) if n else t
    if a.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    hf.load_state_dict({k: v.contiguous() for k, v in sd.items()})
    if a.tie_embeddings:
        hf.tie_weights()
    del ours, sd
    return hf.eval()


def write_llama_gguf(ckpt_path: str, dtype: str, out: Path) -> Path:
    """The same weights as a llama GGUF for llama.cpp (tokenizer copied from a GGUF source): matrices in
    `dtype` (float32, bfloat16, or a block format gguf writes: Q8_0), vectors (the norms) in F32."""
    ckpt = open_checkpoint(ckpt_path)
    a = ckpt.args
    model = load_model(ckpt, Mesh.single(), torch.float32)
    w = gguf.GGUFWriter(out, arch="llama")
    for key, value in (
        (gguf.Keys.LLM.BLOCK_COUNT, a.n_layers),
        (gguf.Keys.LLM.EMBEDDING_LENGTH, a.dim),
        (gguf.Keys.LLM.FEED_FORWARD_LENGTH, a.hidden_dim),
        (gguf.Keys.LLM.CONTEXT_LENGTH, 8192),
        (gguf.Keys.Attention.HEAD_COUNT, a.n_heads),
        (gguf.Keys.Attention.HEAD_COUNT_KV, a.n_kv_heads),
        (gguf.Keys.LLM.VOCAB_SIZE, a.vocab_size),
        (gguf.Keys.Rope.DIMENSION_COUNT, a.hd),
    ):
        w.add_uint32(key.format(arch="llama"), value)
    w.add_float32(gguf.Keys.Rope.FREQ_BASE.format(arch="llama"), a.rope_theta)
    w.add_float32(gguf.Keys.Attention.LAYERNORM_RMS_EPS.format(arch="llama"), a.norm_eps)
    src = gguf.GGUFReader(ckpt_path)
    for key, field in src.fields.items():
        if key.startswith("tokenizer."):
            value = field.contents()
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, value, vtype, sub_type=sub)
    for name, p in meta_state(model):
        gname = gguf_name(name)
        data = p.detach().numpy().astype(np.float32)
        if dtype != "float32" and data.ndim == 2:
            fmt = gguf.GGMLQuantizationType.BF16 if dtype == "bfloat16" else gguf.GGMLQuantizationType[dtype]
            w.add_tensor(gname, gguf.quants.quantize(data, fmt), raw_dtype=fmt)
        else:
            w.add_tensor(gname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def checkpoint_for(
    model: str, dtype: str, engine: str, work: Path, device: str = "cpu", file_format: str | None = None
) -> str | None:
    """The checkpoint `engine` reads for a setting of `model` at `dtype` (written under `work` when needed).

    file_format (SmolLM2 only): every engine reads one GGUF in that block format: "Q4_1" the
    embedded file itself (Q4_1 layers, Q8_0 table), another (Q8_0) written from its weights."""
    if device == "cuda":  # drawn on the GPU by each worker: 16 GB of 8B weights never touch the disk
        return f"random:{model}"
    if model == "smollm2":
        src = str(default_checkpoint())
        if file_format == "Q4_1":
            return src
        if file_format is not None:
            out = work / f"smollm2-{file_format}.gguf"
            return str(out if out.exists() else write_llama_gguf(src, file_format, out))
        if engine == "llama.cpp":
            out = work / f"smollm2-{dtype}.gguf"
            return str(out if out.exists() else write_llama_gguf(src, dtype, out))
        return src
    if engine == "llama.cpp":
        return None
    out = work / model
    if not (out / "params.json").exists():
        write_random_meta(out, PRESETS[model], dtype=torch.bfloat16, tied=model in TIED)
    return str(out)
