"""Meta's format: params.json + consolidated.NN.pth model-parallel shards, read through mmap.

Shard k of an MP=N checkpoint holds rows k of the column-parallel weights (wq wk wv w1 w3 output,
tok_embeddings) and columns k of the row-parallel ones (wo w2); norms are in every shard. Any
slice a rank asks for is cut from the overlapping shards, so MP and TP degrees need not match.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import torch
from torch import Tensor

from ..args import params_to_args
from ..errors import CheckpointError
from ..tokenizer import default_llama3_tokenizer_path, llama3_tokenizer
from .base import Checkpoint, copy_out, narrow

log = logging.getLogger(__name__)

ROW_PARALLEL = re.compile(r"\.(wo|w2)\.weight$")
REPLICATED = re.compile(r"norm\.weight$")
IGNORED = {"rope.freqs"}  # Llama 2 checkpoints carry precomputed rotary frequencies


class MetaCheckpoint(Checkpoint):
    """A Meta checkpoint directory; shards are mmap'd on first use, tensors copied only when read."""

    def __init__(self, path: Path):
        self.path = path
        try:
            params = json.loads((path / "params.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path / 'params.json'}: cannot parse ({e})") from None
        self.files = sorted(path.glob("consolidated.*.pth"))
        if not self.files:
            raise CheckpointError(f"{path}: params.json but no consolidated.NN.pth shard files")
        for i, f in enumerate(self.files):
            if f.name != f"consolidated.{i:02d}.pth":
                raise CheckpointError(
                    f"{path}: shard consolidated.{i:02d}.pth is missing (found {', '.join(x.name for x in self.files)})"
                )
        self._shards: list[dict[str, Tensor] | None] = [None] * len(self.files)
        if params.get("vocab_size", -1) <= 0:  # Llama 2 style: take it from the embedding
            params["vocab_size"] = self._shard(0)["tok_embeddings.weight"].shape[0] * len(self.files)
        self.args = params_to_args(params, "output.weight" in self._shard(0))
        self._check_shard_count()
        self._layouts: dict[str, tuple[int | None, tuple[int, ...]]] = {}

    def _check_shard_count(self) -> None:
        """Shards carry no count, so infer it from the embedding: a missing last shard shows there."""
        emb = self._shard(0).get("tok_embeddings.weight")
        if emb is None or emb.dim() != 2:
            return
        rows, cols = emb.shape
        implied = max(
            self.args.vocab_size // rows if self.args.vocab_size % rows == 0 else 1,
            self.args.dim // cols if self.args.dim % cols == 0 else 1,
        )
        if implied > len(self.files):
            missing = ", ".join(f"consolidated.{i:02d}.pth" for i in range(len(self.files), implied))
            raise CheckpointError(
                f"{self.path}: the tensors are 1/{implied} of the model but only "
                f"{len(self.files)} shard(s) are here; missing {missing}"
            )

    def _shard(self, i: int) -> dict[str, Tensor]:
        if self._shards[i] is None:
            f = self.files[i]
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError:
                raise CheckpointError(
                    f"refusing to load {f}: it holds pickled Python objects, not only tensors "
                    f"(torch.load weights_only=True); re-save it as a plain state dict"
                ) from None
            except (RuntimeError, OSError, EOFError, ValueError) as e:
                raise CheckpointError(
                    f"cannot read {f}: {str(e).splitlines()[0]} (the file is truncated or corrupt; copy it again)"
                ) from None
            if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
                raise CheckpointError(f"{f}: expected a dict of tensors (a Meta state dict)")
            self._shards[i] = {k: v for k, v in sd.items() if k not in IGNORED}
        return self._shards[i]

    def _layout(self, name: str) -> tuple[int | None, tuple[int, ...]]:
        """(split dim or None if replicated, full shape) of a tensor across the shards."""
        if name not in self._layouts:
            shards = [self._shard(i) for i in range(len(self.files))]
            if any(name not in s for s in shards):
                raise CheckpointError(f"{self.path}: {name} is missing from some shards")
            shape = tuple(shards[0][name].shape)
            if any(tuple(s[name].shape) != shape for s in shards):
                raise CheckpointError(f"{self.path}: {name} has different shapes in different shards")
            mp = len(shards)
            if mp == 1 or REPLICATED.search(name):
                split = None
            elif ROW_PARALLEL.search(name):
                split = 1
            elif name == "tok_embeddings.weight" and shape[0] == self.args.vocab_size:
                split = 1  # Llama 2's ParallelEmbedding splits the embedding dim
            else:
                split = 0
            full = shape if split is None else shape[:split] + (shape[split] * mp,) + shape[split + 1 :]
            self._layouts[name] = (split, full)
        return self._layouts[name]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self._layout(name)[1] for name in self._shard(0)}

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> Tensor:
        split, full = self._layout(name)
        if split is None:
            return copy_out(narrow(self._shard(0)[name], dim, start, stop))
        if dim != split:  # cut the same slice from every shard, then join the shards
            pieces = [narrow(self._shard(i)[name], dim, start, stop) for i in range(len(self.files))]
        else:
            stop = full[dim] if stop is None else stop
            size = full[split] // len(self.files)
            overlap = range(start // size, (stop - 1) // size + 1)  # only the shards that hold the slice
            pieces = [
                narrow(self._shard(i)[name], dim, max(start, i * size) - i * size, min(stop, (i + 1) * size) - i * size)
                for i in overlap
            ]
        pieces = [copy_out(p) for p in pieces]
        return torch.cat(pieces, dim=split) if len(pieces) > 1 else pieces[0]

    def tokenizer(self):
        local = self.path / "tokenizer.model"
        if local.is_file():
            return llama3_tokenizer(local)
        log.info("no tokenizer.model next to %s: using the Llama 3 tokenizer from llama-models", self.path)
        return llama3_tokenizer(default_llama3_tokenizer_path())
