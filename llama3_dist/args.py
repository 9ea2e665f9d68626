"""Architecture facts: ModelArgs, Llama 3.1 rope scaling, Meta's FFN width rule, named Llama 3 presets.

The bottom of the package (beside errors.py): every other module may import it, it imports none.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CheckpointError


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


def params_to_args(params: dict, has_output: bool) -> ModelArgs:
    """Meta's params.json -> ModelArgs, with Meta's FFN width rule and optional Llama 3.1 rope scaling."""
    try:
        dim, n_heads = int(params["dim"]), int(params["n_heads"])
        scaling = None
        if params.get("use_scaled_rope", False):
            scaling = RopeScaling(
                factor=float(params.get("rope_scaling_factor", 8.0)),
                low_freq_factor=float(params.get("rope_low_freq_factor", 1.0)),
                high_freq_factor=float(params.get("rope_high_freq_factor", 4.0)),
                original_max_position_embeddings=int(params.get("rope_original_max_position_embeddings", 8192)),
            )
        return ModelArgs(
            dim=dim,
            n_layers=int(params["n_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(params.get("n_kv_heads") or n_heads),
            vocab_size=int(params["vocab_size"]),
            hidden_dim=ffn_hidden_dim(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 500000.0)),
            rope_scaling=scaling,
            tie_embeddings=not has_output,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"params.json: missing or invalid field {e}; expected Meta's keys "
            f"(dim, n_layers, n_heads, n_kv_heads, vocab_size, ...)"
        ) from None


# Real Llama 3 architectures (params.json as Meta ships them), for random checkpoints and `plan`.
PRESETS: dict[str, dict] = {
    "llama3-8b": {
        "dim": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "multiple_of": 1024,
        "ffn_dim_multiplier": 1.3,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
    },
    "llama3-70b": {
        "dim": 8192,
        "n_layers": 80,
        "n_heads": 64,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "multiple_of": 4096,
        "ffn_dim_multiplier": 1.3,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
    },
    "llama3.1-8b": {
        "dim": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "multiple_of": 1024,
        "ffn_dim_multiplier": 1.3,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    },
    "llama3.1-70b": {
        "dim": 8192,
        "n_layers": 80,
        "n_heads": 64,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "multiple_of": 4096,
        "ffn_dim_multiplier": 1.3,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    },
    "llama3.1-405b": {
        "dim": 16384,
        "n_layers": 126,
        "n_heads": 128,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "multiple_of": 4096,
        "ffn_dim_multiplier": 1.2,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    },
    "llama3.2-1b": {
        "dim": 2048,
        "n_layers": 16,
        "n_heads": 32,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "multiple_of": 256,
        "ffn_dim_multiplier": 1.5,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
        "rope_scaling_factor": 32.0,
    },
    "llama3.2-3b": {
        "dim": 3072,
        "n_layers": 28,
        "n_heads": 24,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "multiple_of": 256,
        "ffn_dim_multiplier": 1.0,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
        "rope_scaling_factor": 32.0,
    },
}
TIED = {"llama3.2-1b", "llama3.2-3b"}  # these share the embedding with the output head


def preset_args(name: str) -> ModelArgs:
    """ModelArgs of a named architecture."""
    return params_to_args(PRESETS[name], has_output=name not in TIED)
