"""Fast decode steps beside the model: torch.compile and CUDA graphs, behind the model's one hook.

`enable(model, compile=..., cuda_graphs=...)` sets `model.decode_step` to a `DecodeStep`, which
runs the layers of every decode step (T = 1) in place of `model.run_layers`; prefill stays eager.

- torch.compile fuses the small ops between matmuls (on CPU attention stays the kernels' fused op:
  kernels.IN_GRAPHS). Without CUDA graphs the whole layer stack
  is one compiled graph, so no Python runs between layers; on CPU it also gets inductor's C++
  wrapper, which calls its kernels without Python in between (about a minute more to compile on
  two cores), skips dynamo's guards on module attributes (~1 ms per step; DecodeStep._stack) and
  holds the weights as the graph's own tensors rather than inputs gathered at each step.
  Under CUDA graphs Python costs nothing per step, so the layers, which differ only in their
  tensors, share one compiled block: compiling then takes one layer's time. Fused kernels round
  to the model's dtype wherever the eager ops do (emulate_precision_casts), so bfloat16 gives
  the eager tokens.
- CUDA graphs: a decode step of Llama 3 8B runs several hundred small kernels; launched one at
  a time from Python they take longer than the GPU needs to stream the weights. Captured into a
  graph they replay with one launch. A graph fixes every shape and address, so a graphed step
  reads its inputs from tensors of its own (copied in before each replay) and attends over the
  whole KV cache under the mask (fixed_shapes) rather than over the filled prefix.
- If compiling fails (no C++ compiler, an inductor bug), decoding goes on eagerly with one warning.
  Compiling comes before running, and a decode step run again rewrites the same keys and values,
  so the failed step is simply run again.
"""

from __future__ import annotations

import logging

import torch
import torch.fx.experimental._config as shapes_config
from torch import Tensor

from . import kernels
from .model import KVCache, LayerStack, Transformer, TransformerBlock
from .parallel import comm

log = logging.getLogger(__name__)

OPTIONS = {"emulate_precision_casts": True}  # inductor options of every compile (see above)
KERNELS_TAG = "llama3_dist-kernels-"  # the compile caches' key tag: this prefix and kernels.source_digest()


def _configure_dynamo() -> None:
    """Settings of torch.compile for a model that never changes once loaded. They hold for the
    whole process (torch has no per-compile switch for them) and only make graphs more general,
    read constants as constants, or key the caches more finely.

    - Sizes equal by chance when a graph is compiled (a 3-token key length and 3 KV heads, 8
      sequences and 8 KV heads) would be tied by "duck sizing", and the graph compiled again when
      they part, minutes on a small CPU: every size is a symbol of its own.
    - Floats the layers read (RMSNorm's eps) are constants of the graph, not inputs that dynamo
      turns into tensors before every step (60 of them for SmolLM2's 30 layers, ~4 µs each).
    - Compiled graphs are cached on disk (TORCHINDUCTOR_CACHE_DIR) under a key of the graph, which
      names our kernel ops but not their code: the key also carries the kernels' source digest. A
      graph cached by an earlier version called the ops with the arguments of that version (one
      such graph, from before runtime.activations, ran every Q4_1 matmul with int8 activations).
    """
    import torch._dynamo  # here, not at the top: eager runs never import it (comm.out_of_graphs)

    shapes_config.use_duck_shape = False
    torch._dynamo.config.specialize_float = True
    tags = [t for t in torch.compiler.config.cache_key_tag.split("+") if t and not t.startswith(KERNELS_TAG)]
    torch.compiler.config.cache_key_tag = "+".join([*tags, KERNELS_TAG + kernels.source_digest()])


class DecodeStep:
    """The layers of a decode step, compiled and/or replayed from CUDA graphs; model.decode_step."""

    def __init__(self, model: Transformer, compile: bool, cuda_graphs: bool):
        if cuda_graphs and model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.model, self.fixed_shapes = model, cuda_graphs
        self.compiled: LayerStack | None = None
        self.compiled_runs = 0  # decode steps that ran through the compiled code (tests check it ran)
        self.one_graph = False  # compiled as one graph without guards on the modules (see _stack)
        if compile:
            comm.out_of_graphs()
            _configure_dynamo()
        if compile and cuda_graphs:  # one compiled block for every layer: guards tell the layers apart
            block = torch.compile(TransformerBlock.forward, dynamic=True, options=dict(OPTIONS))
            self.compiled = self._per_block(block)
        elif compile:
            self.compiled = self._stack(one_graph=True)
        self.graphs = DecodeGraphs(self._layers) if cuda_graphs else None

    def _stack(self, one_graph: bool) -> LayerStack:
        """The whole layer stack compiled (on CPU with inductor's C++ wrapper).

        Dynamo guards a compiled graph on every module attribute it read: ~4,500 checks for SmolLM2's
        30 layers, ~1 ms per CPU decode step. Nothing changes a module once loaded, so as one graph
        (fullgraph) the stack skips them, and isolate_recompiles keeps the graph to this model (a
        second model in the process, in another dtype or format, compiles its own). A stack that
        breaks into several graphs (a collective torch.compile cannot trace, e.g. gloo's all-reduce)
        keeps every guard: its pieces are functions shared by modules of different shapes.

        As one graph, the stack is also traced with the weights installed in the graph
        (install_free_tensors) rather than lifted to inputs: otherwise dynamo's bytecode before the
        graph gathers every weight from the modules again at each step (180 tensors for SmolLM2,
        ~0.3 ms a step on a 2-core Zen 3: steps 4% faster). That setting is dynamo's, for the whole
        process, and holds only while this stack runs (it is read when a call traces a new graph)."""
        self.one_graph = one_graph
        options = {**OPTIONS, "cpp_wrapper": self.model.device.type == "cpu"}
        if one_graph:
            options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
        compiled = torch.compile(
            self.model.run_layers, dynamic=True, fullgraph=one_graph, options=options, isolate_recompiles=one_graph
        )
        if not one_graph:
            return compiled

        def run(x: Tensor, pos: Tensor, freqs_cis: Tensor, mask: Tensor, cache: KVCache) -> Tensor:
            config = torch._dynamo.config
            before, config.install_free_tensors = config.install_free_tensors, True
            try:
                return compiled(x, pos, freqs_cis, mask, cache)
            finally:
                config.install_free_tensors = before

        return run

    def _per_block(self, block) -> LayerStack:
        def run(x: Tensor, pos: Tensor, freqs_cis: Tensor, mask: Tensor, cache: KVCache) -> Tensor:
            for i, layer in enumerate(self.model.layers.values()):
                x = block(layer, x, pos, freqs_cis, mask, cache.layer(i))
            return x

        return run

    def _layers(self, x: Tensor, pos: Tensor, freqs_cis: Tensor, mask: Tensor, cache: KVCache) -> Tensor:
        # A one-token prompt's prefill is a step with T = 1 too, but keys of length 1 would be a
        # graph of their own (torch specializes sizes 0 and 1): it runs eagerly, as prefills do.
        if self.compiled is None or mask.shape[-1] == 1:
            return self.model.run_layers(x, pos, freqs_cis, mask, cache)
        try:
            out = self.compiled(x, pos, freqs_cis, mask, cache)
        except torch._dynamo.exc.Unsupported as e:
            if not self.one_graph:
                raise
            log.info("the decode step is not one graph (%s): compiling its pieces", str(e).splitlines()[0])
            self.compiled = self._stack(one_graph=False)
            return self._layers(x, pos, freqs_cis, mask, cache)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            log.warning("torch.compile failed (%s); decoding without it", str(e).splitlines()[0])
            self.compiled = None
            return self.model.run_layers(x, pos, freqs_cis, mask, cache)
        self.compiled_runs += 1
        return out

    def __call__(self, x: Tensor, pos: Tensor, freqs_cis: Tensor, mask: Tensor, cache: KVCache) -> Tensor:
        if self.graphs is not None:
            return self.graphs(x, pos, freqs_cis, mask, cache=cache)
        return self._layers(x, pos, freqs_cis, mask, cache)


class DecodeGraphs:
    """`fn(*inputs, cache)` replayed from a CUDA graph per (cache rows, input shapes).

    Capture is lazy: the first step of a new shape runs on a side stream first (cuBLAS handles,
    Triton autotuning, allocator warm-up), then once more under capture. The cache is not copied:
    the graph writes into it where it lies, so a new cache (another allocation) forgets every graph.
    """

    def __init__(self, fn: LayerStack, warmup: int = 2):
        self.fn, self.warmup = fn, warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor], Tensor]] = {}
        self.storage: int | None = None  # the cache allocation the graphs write into

    def __call__(self, *inputs: Tensor, cache: KVCache) -> Tensor:
        """fn(*inputs, cache). The result lives in the graph's memory: read it before the next call."""
        storage = cache.k.untyped_storage().data_ptr()
        if storage != self.storage:
            self.graphs.clear()  # captured graphs write into the old cache tensors
            self.storage = storage
        key = (cache.k.data_ptr(), cache.batch, *(tuple(t.shape) for t in inputs))
        if key not in self.graphs:
            self.graphs[key] = self.capture(inputs, cache)
        graph, static_inputs, out = self.graphs[key]
        for static, x in zip(static_inputs, inputs):
            static.copy_(x)
        graph.replay()
        return out

    def capture(self, inputs: tuple[Tensor, ...], cache: KVCache):
        static_inputs = [x.clone() for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static_inputs, cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()  # a memory pool of its own: graphs replay in any order
        with torch.cuda.graph(graph):
            out = self.fn(*static_inputs, cache)
        return graph, static_inputs, out


def enable(model: Transformer, compile: bool, cuda_graphs: bool) -> None:
    """Route the model's decode steps through torch.compile and/or CUDA graphs (no-op when both are off)."""
    model.decode_step = DecodeStep(model, compile, cuda_graphs) if compile or cuda_graphs else None
