"""Typed run configuration: one dataclass per YAML section, dotted `--set` overrides, strict validation."""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml

from .args import PRESETS
from .errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # runtime.dtype -> torch dtype
WEIGHTS = ("auto", "float", "int8", "int4")  # runtime.weights
ACTIVATIONS = ("float", "int8")  # runtime.activations


@dataclass
class ModelConfig:
    checkpoint: str | None = None  # Meta dir, HF dir or .gguf file; None: the embedded SmolLM2-135M
    tokenizer: str | None = None  # override: tokenizer.model, an HF dir or a .gguf
    preset: str | None = None  # a known architecture (llama3-8b, ...): `plan` needs no weights
    rope_scaling_factor: float | None = None  # override the checkpoint's Llama 3.1 scaling factor


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    microbatches: int = 1
    stage_layers: list[int] | None = None  # layers per stage; None: balance by weight bytes
    backend: str = "auto"  # auto | gloo | nccl
    collectives: str = "auto"  # auto | shm | backend: shm = shared memory between CPU ranks of one host


@dataclass
class RuntimeConfig:
    dtype: str = "float32"  # float32 | bfloat16
    device: str = "cpu"  # cpu | cuda
    max_seq_len: int = 2048
    max_batch_size: int = 8
    threads: int | None = None  # torch threads per rank; None: cores / local ranks
    timeout_s: float = 120.0  # collective timeout: a hung peer fails the job instead of hanging it
    compile: bool | None = None  # torch.compile the decode step (minutes of compiling first); None: on for serve only
    cuda_graphs: bool = True  # on CUDA, replay each decode step from a CUDA graph (no effect on CPU)
    # auto: a GGUF's Q8_0/Q4_0/Q4_1/Q4_K/Q6_K tensors stay in their blocks, float stays float;
    # float: dequantize everything to `dtype`; int8 / int4: quantize float weights on load to
    # Q8_0 / Q4_1 (groups of 32; weight-only: activations stay in `dtype`)
    weights: str = "auto"
    # float: matmul inputs in `dtype`; int8: the input of each Q8_0 / Q4_0 / Q4_1 matmul is rounded to int8
    # per 32 elements (as llama.cpp's CPU backend does) and decode multiplies integers: faster, other numbers
    activations: str = "float"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class SamplingParams:
    """How one sequence is sampled: the `generate` section's sampling keys, and each server request's."""

    max_new_tokens: int = 64
    temperature: float = 0.6  # 0: greedy
    top_p: float = 0.9
    top_k: int = 0  # 0: no top-k filter
    min_p: float = 0.0  # vLLM's / llama.cpp's: drop tokens under min_p x the likeliest one's probability (0: off)
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was generated so far
    repetition_penalty: float = 1.0  # HF's / vLLM's: logits of tokens seen (prompt too) divided by it (x it if < 0)

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def check(self, prefix: str = "generate.") -> None:
        """Raise ConfigError naming the first out-of-range value (keys shown with `prefix`)."""
        if self.max_new_tokens < 1:
            raise ConfigError(f"{prefix}max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ConfigError(f"{prefix}temperature: must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{prefix}top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"{prefix}top_k: must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ConfigError(f"{prefix}min_p: must be in [0, 1] (0 disables it), got {self.min_p}")
        for key in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, key) <= 2:
                raise ConfigError(f"{prefix}{key}: must be in [-2, 2] (0 disables it), got {getattr(self, key)}")
        if not 0 < self.repetition_penalty <= 10:
            raise ConfigError(
                f"{prefix}repetition_penalty: must be in (0, 10] (1 disables it), got {self.repetition_penalty}"
            )

    def sampling(self) -> SamplingParams:
        """Just the sampling settings (a GenerateConfig carries more)."""
        return SamplingParams(**{f.name: getattr(self, f.name) for f in fields(SamplingParams)})


@dataclass
class GenerateConfig(SamplingParams):
    chat: bool = False
    stop: list[str] = field(default_factory=list)  # extra stop strings (matched on token ids)


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None  # the name clients pass as `model`; None: the checkpoint's name
    max_queue: int = 64  # requests waiting for a slot beyond this get 429
    heartbeat_s: float | None = None  # an idle rank 0 pings the other ranks this often; None: min(2, timeout_s / 4)
    shutdown_grace_s: float = 5.0  # on SIGTERM, in-flight requests get this long to finish

    def check(self, timeout_s: float) -> None:
        """Raise ConfigError for an out-of-range serve.* value."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"serve.port: must be in 0..65535, got {self.port}")
        if self.max_queue < 0:
            raise ConfigError(f"serve.max_queue: must be >= 0, got {self.max_queue}")
        if self.heartbeat_s is not None and not 0 < self.heartbeat_s <= timeout_s / 4:
            raise ConfigError(
                f"serve.heartbeat_s: must be in (0, runtime.timeout_s / 4 = {timeout_s / 4:g}], got {self.heartbeat_s}"
            )
        if self.shutdown_grace_s < 0:
            raise ConfigError(f"serve.shutdown_grace_s: must be >= 0, got {self.shutdown_grace_s}")
        if self.model_name is not None and not self.model_name.strip():
            raise ConfigError("serve.model_name: must not be empty")

    def heartbeat(self, timeout_s: float) -> float:
        """Seconds between an idle server's heartbeats: well under the collective timeout."""
        return min(2.0, timeout_s / 4) if self.heartbeat_s is None else self.heartbeat_s


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def validate(self) -> Config:
        """Check every value and cross-field rule; raise ConfigError naming the key."""
        p, r, g = self.parallel, self.runtime, self.generate
        for key, value in (
            ("parallel.tensor", p.tensor),
            ("parallel.pipeline", p.pipeline),
            ("parallel.microbatches", p.microbatches),
            ("runtime.max_seq_len", r.max_seq_len),
            ("runtime.max_batch_size", r.max_batch_size),
        ):
            if value < 1:
                raise ConfigError(f"{key}: must be >= 1, got {value}")
        _choice("parallel.backend", p.backend, ("auto", "gloo", "nccl"))
        _choice("parallel.collectives", p.collectives, ("auto", "shm", "backend"))
        if p.collectives == "shm" and r.device != "cpu":
            raise ConfigError("parallel.collectives: shm is for CPU ranks; use auto or backend on CUDA")
        _choice("runtime.dtype", r.dtype, ("float32", "bfloat16"))
        _choice("runtime.device", r.device, ("cpu", "cuda"))
        _choice("runtime.weights", r.weights, WEIGHTS)
        _choice("runtime.activations", r.activations, ACTIVATIONS)
        if r.activations == "int8" and r.weights == "float":
            raise ConfigError(
                "runtime.activations=int8 rounds the inputs of quantized matmuls, and runtime.weights=float has none; "
                "use runtime.weights=auto (a quantized GGUF), int8 or int4"
            )
        if p.backend == "nccl" and r.device != "cuda":
            raise ConfigError("parallel.backend: nccl needs runtime.device=cuda; use gloo on CPU")
        if r.threads is not None and r.threads < 1:
            raise ConfigError(f"runtime.threads: must be >= 1, got {r.threads}")
        if r.timeout_s <= 0:
            raise ConfigError(f"runtime.timeout_s: must be > 0, got {r.timeout_s}")
        g.check()
        if self.model.rope_scaling_factor is not None and self.model.rope_scaling_factor <= 0:
            raise ConfigError(f"model.rope_scaling_factor: must be > 0, got {self.model.rope_scaling_factor}")
        if any(not s for s in g.stop):
            raise ConfigError("generate.stop: stop strings must not be empty")
        self.serve.check(r.timeout_s)
        if self.model.preset is not None:
            _choice("model.preset", self.model.preset, tuple(PRESETS))
        if p.stage_layers is not None:
            if len(p.stage_layers) != p.pipeline:
                raise ConfigError(
                    f"parallel.stage_layers: needs one entry per stage ({p.pipeline}), got {len(p.stage_layers)}"
                )
            if any(n < 1 for n in p.stage_layers):
                raise ConfigError(f"parallel.stage_layers: every stage needs >= 1 layer, got {p.stage_layers}")
        return self


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: must be one of {', '.join(allowed)}; got {value!r}")


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- `section.key=value` overrides; validated."""
    cfg = Config()
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(
                f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix its syntax (see configs/*.yaml)"
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path}: top level must be a mapping of sections (model:, parallel:, ...), got "
                f"a {type(data).__name__}; see configs/*.yaml"
            )
        for section, values in data.items():
            if not isinstance(values, dict):
                _section(cfg, section)
                raise ConfigError(f"{section}: must be a mapping of keys, got {values!r}")
            for key, value in values.items():
                set_key(cfg, f"{section}.{key}", value)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item}: expected dotted.key=value, e.g. parallel.tensor=2")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(
                f"--set {item}: the value is not valid YAML ({str(e).splitlines()[0]}); "
                f"quote strings, e.g. {key.strip()}='\"text\"'"
            ) from None
        set_key(cfg, key.strip(), value)
    return cfg.validate()


SECTION_ALIASES = {"generation": "generate"}


def _section(cfg: Config, name: str):
    name = SECTION_ALIASES.get(name, name)
    names = [f.name for f in dataclasses.fields(cfg)]
    if name not in names:
        raise ConfigError(f"{name}: unknown section{_suggest(name, names)}; sections: {', '.join(names)}")
    return getattr(cfg, name)


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def set_key(cfg: Config, dotted: str, value) -> None:
    """Set cfg.section.key = value after checking the key exists and the value has its type."""
    section_name, _, key = dotted.partition(".")
    section = _section(cfg, section_name)
    section_name = SECTION_ALIASES.get(section_name, section_name)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if key not in fields:
        full = [f"{section_name}.{k}" for k in fields]
        raise ConfigError(f"{dotted}: unknown key{_suggest(dotted, full)}")
    hint = typing.get_type_hints(type(section))[key]
    setattr(section, key, _coerce(dotted, value, hint))


def _coerce(key: str, value, hint):
    """Check value against a field's type hint (int, float, str, bool, optional, list[int])."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, typing.get_args(hint)[0]) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5, inf and nan as strings
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            return float(value)
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
