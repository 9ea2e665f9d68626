"""Random-weight checkpoints in Meta's format, for tests, benchmarks and memory planning at real widths."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch

from ..args import ModelArgs, params_to_args, preset_args
from ..errors import CheckpointError
from .base import Checkpoint, expected_shapes, narrow
from .meta import ROW_PARALLEL

ROWS_PER_DRAW = 256  # rows of a matrix drawn from one seed: a slice of rows draws only its blocks


def _random(
    name: str,
    shape: tuple[int, ...],
    seed: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """N(0, 1/fan_in) matrices and 1 + 0.1 N(0, 1) norms, seeded by (seed, name, block of rows) so shards agree;
    `rows` = (start, stop) draws only those rows' blocks.

    The numbers depend on the device's generator: the same on every CPU, the same on every GPU.
    """
    start, stop = rows or (0, shape[0])
    base = seed * 1_000_003 + zlib.crc32(name.encode())
    if len(shape) == 1:
        g = torch.Generator(device).manual_seed(base)
        return (1 + 0.1 * torch.randn(shape, generator=g, device=device))[start:stop].to(dtype)
    first, last = start // ROWS_PER_DRAW, -(-stop // ROWS_PER_DRAW)
    blocks = []
    for b in range(first, last):
        g = torch.Generator(device).manual_seed(base + 7919 * b)
        n = min(ROWS_PER_DRAW, shape[0] - b * ROWS_PER_DRAW)
        blocks.append(torch.randn((n, *shape[1:]), generator=g, device=device))
    x = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
    x = x[start - first * ROWS_PER_DRAW : stop - first * ROWS_PER_DRAW]
    return (x / math.sqrt(shape[1])).to(dtype)


class RandomCheckpoint(Checkpoint):
    """Random weights of an architecture, drawn on `device` as they are read (vLLM's load_format=dummy).

    Real widths with no file and no disk: a GPU benchmark of the 8B shape starts in seconds. Each
    block of rows is drawn from a seed of (seed, name, block), so every tensor- and pipeline-parallel
    layout on the same kind of device sees the same model, and a slice of rows draws only its blocks.
    """

    def __init__(self, args: ModelArgs, device: str | torch.device = "cpu", seed: int = 0, name: str = "random"):
        self.args, self.device, self.seed = args, torch.device(device), seed
        self.path = Path(f"random:{name}")
        self._shapes = expected_shapes(args)

    @classmethod
    def preset(cls, name: str, device: str | torch.device = "cpu", seed: int = 0) -> RandomCheckpoint:
        return cls(preset_args(name), device, seed, name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        shape = self._shapes[name]
        if dim == 0:  # draw only the blocks of rows the slice covers
            stop = shape[0] if stop is None else stop
            return _random(name, shape, self.seed, torch.float32, self.device, rows=(start, stop))
        return narrow(_random(name, shape, self.seed, torch.float32, self.device), dim, start, stop).clone()

    def tokenizer(self):
        raise CheckpointError(f"{self.path} has random weights and no tokenizer; give one with model.tokenizer")


def write_random_meta(
    path: str | Path, params: dict, mp: int = 1, seed: int = 0, dtype: torch.dtype = torch.bfloat16, tied: bool = False
) -> Path:
    """Write params.json and consolidated.00..{mp-1}.pth of random weights, split the way Meta splits them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    args = params_to_args(params, has_output=not tied)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(mp)]
    for name, shape in expected_shapes(args).items():
        full = _random(name, shape, seed, dtype)
        if len(shape) == 1 or mp == 1:
            parts = [full] * mp
        else:
            dim = 1 if ROW_PARALLEL.search(name) else 0
            if shape[dim] % mp:
                raise ValueError(f"mp={mp} does not divide {name} {shape} along dim {dim}")
            parts = full.chunk(mp, dim=dim)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    (path / "params.json").write_text(json.dumps(params, indent=2))
    return path
