"""On a CUDA GPU: the model equals itself on CPU and transformers on the GPU, and neither CUDA graphs
nor torch.compile changes a token.

Run with `make test-gpu` (`pytest -m gpu tests/gpu`) on a machine with a GPU. The default run deselects
these tests (marker `gpu`); selected without CUDA, every one fails (none skips; see conftest.py here). The CPU
suite (`make test`) is the one CI runs.
"""

from __future__ import annotations

import pytest
import torch

from llama3_dist.args import ModelArgs, RopeScaling
from llama3_dist.assemble import assemble
from llama3_dist.bench import hf_model_from
from llama3_dist.checkpoint.synthetic import RandomCheckpoint
from llama3_dist.config import load_config
from llama3_dist.generate import SamplingParams, generate
from llama3_dist.parallel.mesh import Mesh

pytestmark = pytest.mark.gpu

# GQA 8/2 heads, Llama 3.1 rope scaling, an FFN width that is not a power of two
ARGS = ModelArgs(
    dim=256,
    n_layers=3,
    n_heads=8,
    n_kv_heads=2,
    vocab_size=1000,
    hidden_dim=688,
    rope_scaling=RopeScaling(8.0, original_max_position_embeddings=64),
)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20]]  # ragged
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0)
TOL = 5e-4  # fp32 max-abs logit difference across devices and engines (different reduction orders)


def checkpoint() -> RandomCheckpoint:
    return RandomCheckpoint(ARGS, "cpu", seed=3)  # drawn on the CPU: both devices load the same numbers


def model_on(device: str, dtype: torch.dtype = torch.float32, graphs: bool = False, compile: bool = False):
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    cfg = load_config(
        None,
        [
            f"runtime.device={device}",
            f"runtime.dtype={name}",
            f"runtime.compile={str(compile).lower()}",
            f"runtime.cuda_graphs={str(graphs).lower()}",
        ],
    )
    return assemble(cfg, checkpoint(), tokenizer=False).model


def tokens(model, device: str) -> list[list[int]]:
    return [c.tokens for c in generate(model, Mesh.single(device), PROMPTS, GREEDY, frozenset())]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    B, T = ids.shape
    model.setup_caches(B, T + 1)
    with torch.inference_mode():
        return model(ids.to(model.device), torch.arange(T, device=model.device).expand(B, T)).cpu()


def test_cuda_is_available():
    assert torch.cuda.is_available(), "tests/gpu needs a CUDA GPU; the CPU suite is `make test`"


def test_fp32_logits_and_tokens_match_cpu():
    ids = torch.tensor([PROMPTS[2]])
    gpu, cpu = model_on("cuda"), model_on("cpu")
    diff = (logits(gpu, ids) - logits(cpu, ids)).abs().max().item()
    assert diff < TOL, diff
    assert tokens(gpu, "cuda") == tokens(cpu, "cpu")


def test_fp32_matches_transformers_on_cuda():
    ids = torch.tensor([PROMPTS[2]])
    hf = hf_model_from(checkpoint(), torch.float32, "cuda")
    with torch.inference_mode():
        want = hf(ids.cuda()).logits.float().cpu()
    diff = (logits(model_on("cuda"), ids) - want).abs().max().item()
    assert diff < TOL, diff


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_change_no_token(dtype):
    eager = tokens(model_on("cuda", dtype), "cuda")
    graphed = model_on("cuda", dtype, graphs=True)
    assert tokens(graphed, "cuda") == eager
    graphs = graphed.decode_step.graphs
    assert graphs.graphs, "no decode step was captured"
    captured = dict(graphs.graphs)
    assert tokens(graphed, "cuda") == eager  # replayed from the graphs captured by the first run
    assert graphs.graphs == captured, "the second run captured again instead of replaying"
    graphed.setup_caches(8, 64)  # a larger cache: the graphs that wrote into the old one are dropped
    assert tokens(graphed, "cuda") == eager
    assert graphs.storage == graphed.cache.k.untyped_storage().data_ptr()
    assert not set(graphs.graphs) & set(captured)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_and_graphed_decode_changes_no_token(dtype):
    eager = tokens(model_on("cuda", dtype), "cuda")
    assert tokens(model_on("cuda", dtype, graphs=True, compile=True), "cuda") == eager


def test_8b_shape_random_checkpoint_on_the_gpu_is_sliced_consistently():
    from llama3_dist.args import preset_args

    ckpt = RandomCheckpoint(preset_args("llama3-8b"), "cuda")
    full = ckpt.read("layers.0.attention.wq.weight")
    assert full.device.type == "cuda" and full.shape == (4096, 4096)
    assert torch.equal(ckpt.read("layers.0.attention.wq.weight", 0, 1024, 2048), full[1024:2048])


def test_cli_generates_the_same_tokens_on_cuda_with_and_without_graphs_and_on_cpu(
    tmp_path, capsys, llama3_tokenizer_model
):
    import json

    from llama3_dist.checkpoint.synthetic import write_random_meta
    from llama3_dist.cli import main

    tok = llama3_tokenizer_model  # the llama-models wheel; its fixture fails loudly when it is missing
    params = {
        "dim": 256,
        "n_layers": 2,
        "n_heads": 8,
        "n_kv_heads": 2,
        "vocab_size": 128256,
        "multiple_of": 256,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
    }
    ckpt = write_random_meta(tmp_path / "m", params, dtype=torch.float32)

    def run(*sets: str) -> list[int]:
        argv = [
            "generate",
            "--checkpoint",
            str(ckpt),
            "--set",
            f"model.tokenizer={tok}",
            "--json",
            "--prompt",
            "The capital of France is",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0",
        ]
        for s in sets:
            argv += ["--set", s]
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"]

    graphed = run("runtime.device=cuda")
    assert graphed, "no token generated"
    assert graphed == run("runtime.device=cuda", "runtime.cuda_graphs=false") == run("runtime.device=cpu")
