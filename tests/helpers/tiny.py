"""The session's tiny random checkpoints: each (variant, format) is written once and shared by every test.

A variant is a tiny HF oracle model (`random_model(tiny_config(**VARIANTS[v]), SEED)`); a format is one of
FORMATS or `gguf-<QTYPE>` (a quantized GGUF). Tests that change a checkpoint on disk write their own.
"""

from __future__ import annotations

from pathlib import Path

from transformers import LlamaForCausalLM

from helpers.checkpoints import random_model, tiny_config, write_gguf, write_hf, write_meta

SEED = 1
# llama3 rope scaling with an original context of 64: of head_dim 8's wavelengths (~6, ~167, ~4443, ~1.2e5
# tokens) the first is kept and the rest are divided by the factor.
SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
VARIANTS = {
    "gqa": {},  # tiny_config(): 4 layers, dim 64, 8 query / 2 KV heads, vocab 256 (a byte-level GGUF vocab)
    "gqa-rope-scaling": {"rope_scaling": SCALING},
    "tied-mha": {"tie_word_embeddings": True, "num_key_value_heads": 8},
    "9-3-heads": {"hidden_size": 72, "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 192},
    # widths that split unevenly over 2, 3 and 4 tensor-parallel ranks
    "tp-8-2": {
        "hidden_size": 64,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 200,
        "vocab_size": 250,
    },
    "tp-9-3": {
        "hidden_size": 72,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 200,
        "vocab_size": 250,
    },
    "6-layers": {"num_hidden_layers": 6, "vocab_size": 120},  # pipeline stages of uneven depth
}
FORMATS = ("gguf", "hf", "hf-sharded", "meta", "meta-mp2")


def _write(model: LlamaForCausalLM, fmt: str, directory: Path) -> Path:
    if fmt == "meta":
        return write_meta(model, directory / "meta")
    if fmt == "meta-mp2":
        return write_meta(model, directory / "meta-mp2", mp=2)
    if fmt == "hf":
        return write_hf(model, directory / "hf")
    if fmt == "hf-sharded":
        return write_hf(model, directory / "hf-sharded", shards=2)
    if fmt == "gguf":
        return write_gguf(model, directory / "tiny.gguf")
    if fmt.startswith("gguf-"):
        qtype = fmt.removeprefix("gguf-")
        return write_gguf(model, directory / f"tiny-{qtype}.gguf", qtype=qtype)
    raise ValueError(f"unknown tiny checkpoint format {fmt!r}: one of {FORMATS} or gguf-<QTYPE>")


class TinyCheckpoints:
    """HF oracle models and their checkpoints under `root`, built on first use and then reused."""

    def __init__(self, root: Path):
        self.root = root
        self._models: dict[str, LlamaForCausalLM] = {}
        self._paths: dict[tuple[str, str], Path] = {}

    def model(self, variant: str = "gqa") -> LlamaForCausalLM:
        """The fp32 eval-mode transformers model of `variant` (shared: do not change its weights)."""
        if variant not in self._models:
            if variant not in VARIANTS:
                raise ValueError(f"unknown tiny variant {variant!r}: one of {sorted(VARIANTS)}")
            self._models[variant] = random_model(tiny_config(**VARIANTS[variant]), seed=SEED)
        return self._models[variant]

    def path(self, variant: str = "gqa", fmt: str = "meta") -> Path:
        """`variant` written in `fmt` (a directory, or a .gguf file); read-only for the tests."""
        key = (variant, fmt)
        if key not in self._paths:
            self._paths[key] = _write(self.model(variant), fmt, self.root / variant)
        return self._paths[key]
