"""Pipeline parallelism (and tensor x pipeline meshes) on real gloo ranks: TP=1's tokens and logits."""

from __future__ import annotations

import pytest
import torch
from helpers.distributed import run_ranks

from llama3_dist.args import ModelArgs
from llama3_dist.checkpoint import load_model, open_checkpoint
from llama3_dist.config import ConfigError, ParallelConfig, load_config
from llama3_dist.generate import SamplingParams, generate
from llama3_dist.parallel.mesh import Mesh
from llama3_dist.parallel.pipeline import balance_stages, run_stages, stage_layer_ids

TOL = 1e-4
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)
BATCH = [
    [3, 14, 15, 92, 65],
    [35, 89],
    [79, 32, 38, 46, 26, 43, 38],
    [2, 7],
    [1, 8, 2, 8, 1],
    [8],
    [28, 18, 28, 45],
    [90, 45, 23, 53, 60, 28],
]


def run(mesh: Mesh, path: str, microbatches: int = 1, stage_layers=None, batch=BATCH):
    """(full logits of the batch's first prompt on the last stage else None, greedy tokens, tensors read)."""
    ckpt = open_checkpoint(path)
    read = []
    original = ckpt.read
    ckpt.read = lambda name, *a: read.append(name) or original(name, *a)
    layers = stage_layer_ids(ckpt.args, ParallelConfig(pipeline=mesh.n_stages, stage_layers=stage_layers), mesh)
    model = load_model(ckpt, mesh, torch.float32, layers)
    prompt = torch.tensor([batch[0]])
    model.setup_caches(1, prompt.shape[1])
    with torch.inference_mode():
        logits = run_stages(model, mesh, prompt, torch.arange(prompt.shape[1]).unsqueeze(0), None, 1)
    done = generate(model, mesh, batch, GREEDY, frozenset(), microbatches=microbatches)
    return logits, [c.tokens for c in done], sorted(set(read))


@pytest.fixture(scope="module")
def ckpt(tiny):
    return str(tiny.path("6-layers", "meta"))  # 6 layers, vocab 120: stages of uneven depth


@pytest.fixture(scope="module")
def reference(ckpt):
    return run(Mesh.single(), ckpt)


@pytest.mark.parametrize(
    ("tensor", "pipeline", "microbatches"),
    [
        (1, 2, 1),
        (1, 2, 2),
        (1, 2, 4),
        (1, 4, 1),
        (1, 4, 3),
        (2, 2, 1),
        (2, 2, 2),
    ],
)
def test_layouts_give_tp1_tokens_and_logits(ckpt, reference, tensor, pipeline, microbatches):
    want_logits, want_tokens, _ = reference
    results = run_ranks(run, tensor * pipeline, ckpt, microbatches, tensor=tensor, pipeline=pipeline)
    for rank, (logits, tokens, _) in enumerate(results):
        assert tokens == want_tokens, rank
        if rank >= (pipeline - 1) * tensor:  # last stage
            assert (logits - want_logits).abs().max().item() <= TOL, rank
        else:
            assert logits is None


def test_each_stage_reads_only_its_own_tensors(ckpt):
    results = run_ranks(run, 2, ckpt, 1, [2, 4], pipeline=2)
    first, last = results[0][2], results[1][2]
    layer = lambda names: {int(n.split(".")[1]) for n in names if n.startswith("layers.")}  # noqa: E731
    assert layer(first) == {0, 1} and layer(last) == {2, 3, 4, 5}
    assert "tok_embeddings.weight" in first and "output.weight" not in first and "norm.weight" not in first
    assert "output.weight" in last and "norm.weight" in last and "tok_embeddings.weight" not in last


def test_real_smollm2_pipeline_and_2d_mesh(smollm2_gguf):
    prompts = [[504, 3575, 282, 4649, 314], [1248, 253, 1345], [19556, 28, 957, 1462, 314], [42]]
    want = run(Mesh.single(), str(smollm2_gguf), batch=prompts)[1]
    for tensor, pipeline in ((1, 2), (2, 2)):
        for _, tokens, _ in run_ranks(
            run, tensor * pipeline, str(smollm2_gguf), 2, None, prompts, tensor=tensor, pipeline=pipeline
        ):
            assert tokens == want, (tensor, pipeline)


def _raise_on_last_stage(mesh: Mesh, path: str):
    ckpt = open_checkpoint(path)
    model = load_model(ckpt, mesh, torch.float32, stage_layer_ids(ckpt.args, ParallelConfig(pipeline=2), mesh))

    def on_token(row, token, seen=[]):  # noqa: B006 - a counter local to this rank
        seen.append(token)
        if mesh.is_pp_last_stage and len(seen) == 4:
            raise RuntimeError("injected failure in the last stage")

    generate(model, mesh, [[1, 2, 3]], SamplingParams(5000, temperature=0.0), frozenset(), on_token)


def test_a_failing_stage_fails_the_other_stage_not_hangs(ckpt):
    (ok0, err0, t0), (ok1, err1, _) = run_ranks(_raise_on_last_stage, 2, ckpt, pipeline=2, outcomes=True, timeout=60)
    assert not ok1 and "injected failure" in err1
    assert not ok0 and t0 < 30


def args(n_layers: int, vocab: int = 1000) -> ModelArgs:
    return ModelArgs(dim=64, n_layers=n_layers, n_heads=8, n_kv_heads=2, vocab_size=vocab, hidden_dim=160)


def test_balance_by_weight_bytes():
    assert balance_stages(args(8, vocab=10), 2) == [4, 4]
    heavy_vocab = balance_stages(args(8, vocab=50_000), 2)  # embedding and head outweigh layers
    assert heavy_vocab[0] == heavy_vocab[1] == 4
    lopsided = balance_stages(args(12, vocab=2_000), 3)  # the middle stage carries no embedding or head
    assert sum(lopsided) == 12 and lopsided[1] > lopsided[0] and lopsided[1] > lopsided[2]
    assert min(balance_stages(args(4), 4)) == 1


def test_stage_errors():
    with pytest.raises(ConfigError, match="5 stages but the model has only 4 layers"):
        balance_stages(args(4), 5)
    with pytest.raises(ConfigError, match="sums to 5"):
        stage_layer_ids(args(4), ParallelConfig(pipeline=2, stage_layers=[2, 3]), Mesh.single())
    with pytest.raises(ConfigError, match="every stage needs >= 1 layer"):
        load_config(None, ["parallel.pipeline=2", "parallel.stage_layers=[4, 0]"])
    with pytest.raises(ConfigError, match="one entry per stage"):
        load_config(None, ["parallel.pipeline=2", "parallel.stage_layers=[4]"])
