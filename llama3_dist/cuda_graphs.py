"""Decode steps replayed from CUDA graphs: captured once per batch shape, then one launch per step.

A decode step of Llama 3 8B runs several hundred small kernels; launched one at a time from
Python they take longer than the GPU needs to stream the weights. Captured into a CUDA graph they
replay with a single launch. A graph fixes every shape and address, so a graphed step reads its
inputs from tensors of its own (copied in before each replay), and attends over the whole KV
cache under the mask rather than over the filled prefix (see Transformer.forward).

Capture is lazy: the first step of a new shape runs the layers on a side stream first (cuBLAS
handles, Triton autotuning, allocator warm-up), then once more under capture. Running a decode
step again is harmless: it rewrites the same keys and values at the same positions.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


class DecodeGraphs:
    """`fn(*inputs, rows)` replayed from a CUDA graph per (rows, input shapes)."""

    def __init__(self, fn: Callable[..., Tensor], warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor], Tensor]] = {}

    def __call__(self, *inputs: Tensor, rows: slice) -> Tensor:
        """fn(*inputs, rows). The result lives in the graph's memory: read it before the next call."""
        key = (rows.start, rows.stop, *(tuple(t.shape) for t in inputs))
        if key not in self.graphs:
            self.graphs[key] = self.capture(inputs, rows)
        graph, static_inputs, out = self.graphs[key]
        for static, x in zip(static_inputs, inputs):
            static.copy_(x)
        graph.replay()
        return out

    def capture(self, inputs: tuple[Tensor, ...], rows: slice):
        static_inputs = [x.clone() for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static_inputs, rows)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()  # a memory pool of its own: graphs replay in any order
        with torch.cuda.graph(graph):
            out = self.fn(*static_inputs, rows)
        return graph, static_inputs, out

    def reset(self) -> None:
        """Forget every capture (the tensors they read, e.g. the KV cache, were replaced)."""
        self.graphs.clear()
