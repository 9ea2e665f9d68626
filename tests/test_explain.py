"""`llama3-dist explain`: the walkthrough is read off the model generate runs, at every layout, and its CLI contract."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.checkpoints import (
    LLAMA3_ROPE_SCALING,
    random_model,
    tiny_config,
    write_gguf,
    write_hf,
)
from helpers.distributed import run_ranks
from helpers.launch import run_cli

from llama3_dist.assemble import assemble
from llama3_dist.cli import main
from llama3_dist.config import SamplingParams, load_config
from llama3_dist.explain import DEFAULT_PROMPT, as_json, explain, format_text
from llama3_dist.generate import generate
from llama3_dist.parallel.mesh import Mesh

PROMPT = "the answer is"
NINE_THREE = {"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 72, "intermediate_size": 176}


def cli(*args: str, nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    return run_cli("explain", *args, nproc=nproc, timeout=timeout, env={"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """4 layers, 9 query heads over 3 KV heads (uneven at TP=2), byte-level vocab: any text is a prompt."""
    return write_gguf(random_model(tiny_config(**NINE_THREE), seed=61), tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def config(path, mesh: Mesh, *sets: str):
    return load_config(
        None,
        [
            f"model.checkpoint={json.dumps(str(path))}",
            f"parallel.tensor={mesh.tp.size}",
            f"parallel.pipeline={mesh.pp.size}",
            *sets,
        ],
    )


def _explain_then_generate(mesh: Mesh, path: str, layer: int, head: int):
    """explain(), then generate's first greedy token on the same ready model; rank 0 returns both."""
    ready = assemble(config(path, mesh), mesh=mesh)
    exp = explain(ready, PROMPT, layer, head)
    [done] = generate(
        ready.model,
        mesh,
        [ready.tokenizer.encode(PROMPT)],
        SamplingParams(1, temperature=0.0),
        frozenset(),
        microbatches=1,
    )
    if exp is None:
        return None
    # numpy, not a tensor: a tensor crosses the rank's result queue as a shared-memory handle
    # that may vanish when the rank exits
    return as_json(exp), done.tokens[0], exp.attention.numpy(), format_text(exp)


def test_top_token_is_generates_first_greedy_token_at_tp1(tiny):
    exp_json, greedy, _, _ = _explain_then_generate(Mesh.single(), str(tiny), 2, 4)
    assert exp_json["next_tokens"][0]["id"] == greedy


def test_tp2_gathers_the_other_ranks_head_and_matches_tp1_and_generate(tiny):
    one = _explain_then_generate(Mesh.single(), str(tiny), 1, 7)
    ranks = run_ranks(_explain_then_generate, 2, str(tiny), 1, 7, tensor=2)
    assert ranks[1] is None  # only rank 0 assembles the walkthrough
    exp_json, greedy, attention, text = ranks[0]
    assert exp_json["next_tokens"][0]["id"] == greedy == one[1]
    assert [t["id"] for t in exp_json["next_tokens"]] == [t["id"] for t in one[0]["next_tokens"]]
    np.testing.assert_allclose(attention, one[2], atol=1e-5, rtol=1e-5)  # every head, rank 1's included
    assert "query heads 0-5, KV heads 0-1, rank 1: query heads 6-8, KV heads 2" in text  # head_spans, uneven
    assert "head 7 lives on rank 1; its values were gathered to rank 0" in text
    assert "all-reduce (sum) over tp ranks [0, 1]" in text and "all-gather over tp ranks [0, 1]" in text
    assert exp_json["checks"]["attend_equals_wo_input"] and exp_json["checks"]["k_rot_equals_cache"]


def test_pp2_reads_layer_n_off_the_second_stage(tiny):
    one = _explain_then_generate(Mesh.single(), str(tiny), 3, 2)
    exp_json, greedy, attention, text = run_ranks(_explain_then_generate, 2, str(tiny), 3, 2, pipeline=2)[0]
    assert exp_json["next_tokens"][0]["id"] == greedy == one[1]
    np.testing.assert_allclose(attention, one[2], atol=1e-5, rtol=1e-5)
    stage1 = re.search(r"stage 1: layers (?:\d+-)?3 on ranks \[1\]", text)  # layer 3 lives on rank 1
    assert stage1, text
    assert "send_forward" in text


def test_recomputed_attention_is_the_models_attention(tiny):
    """The heatmaps times the model's own v give exactly the input the model's wo received."""
    ready = assemble(config(tiny, Mesh.single()), mesh=Mesh.single())
    layer = 1
    attention = ready.model.layers[str(layer)].attention
    seen = {}
    hooks = [
        attention.wqkv.register_forward_hook(lambda m, a, out: seen.update(v=out[2].clone())),
        attention.wo.register_forward_pre_hook(lambda m, a: seen.update(wo_in=a[0].clone())),
    ]
    exp = explain(ready, PROMPT, layer, 0)
    for h in hooks:
        h.remove()
    assert exp.checks["attend_equals_wo_input"] is True and exp.checks["k_rot_equals_cache"] is True
    assert exp.checks["softmax_v_max_diff"] < 1e-5
    T, hd = len(exp.pieces), attention.head_dim
    v = seen["v"].view(T, -1, hd)  # (T, n_kv_heads, hd)
    for h, kv in enumerate(exp.kv_of_head):
        torch.testing.assert_close(exp.attention[h] @ v[:, kv], seen["wo_in"].view(T, -1, hd)[:, h], atol=1e-5, rtol=0)
    assert torch.allclose(exp.attention.sum(-1), torch.ones(exp.attention.shape[:2]))
    assert torch.all(exp.attention.triu(1) == 0)  # causal: nothing from later positions


def test_llama31_rope_scaling_shows_in_the_rope_step(tmp_path):
    model = random_model(tiny_config(rope_scaling=LLAMA3_ROPE_SCALING), seed=62)
    hf = write_hf(model, tmp_path / "hf")
    vocab = write_gguf(model, tmp_path / "vocab.gguf")  # only its byte-level tokenizer is used
    ready = assemble(config(hf, Mesh.single(), f"model.tokenizer={json.dumps(str(vocab))}"), mesh=Mesh.single())
    exp = explain(ready, PROMPT, 0, 0)
    rope = next(s for s in exp.steps if s.name == "RoPE")
    line = next(t for t in rope.text if t.startswith("Llama 3.1 scaling"))
    kept, divided, blended = map(
        int, re.search(r"(\d+) pairs kept .* (\d+) divided by 8 .* (\d+) blended", line).groups()
    )
    assert kept >= 1 and divided >= 1 and blended >= 1 and kept + divided + blended == len(exp.freqs)
    assert torch.equal(exp.freqs[:kept], exp.base_freqs[:kept]) and torch.all(exp.freqs[kept:] < exp.base_freqs[kept:])
    assert rope.values == [float(f"{x:.4g}") for x in exp.freqs[:4].tolist()]
    # the same model as llama.cpp stores it (per-frequency divisors) shows the same frequencies
    gguf_exp = explain(assemble(config(vocab, Mesh.single()), mesh=Mesh.single()), PROMPT, 0, 0)
    assert any("rope_freqs" in t for t in next(s for s in gguf_exp.steps if s.name == "RoPE").text)
    torch.testing.assert_close(gguf_exp.freqs, exp.freqs, rtol=1e-5, atol=0)


def test_json_is_one_object_with_steps_and_next_tokens(tiny, capsys):
    assert (
        main(["explain", "--checkpoint", str(tiny), "--prompt", PROMPT, "--layer", "2", "--head", "5", "--json"]) == 0
    )
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1
    obj = json.loads(out)
    assert [s["section"] for s in obj["steps"]] == sorted(s["section"] for s in obj["steps"])
    assert {s["section"] for s in obj["steps"]} == set(range(1, 9))
    for s in obj["steps"]:
        assert s["name"] and s["math"] and isinstance(s["shape"], list) and s["dtype"] and s["values"]
    T = len(PROMPT.encode())  # byte-level vocab, no BOS
    assert obj["tokens"] == list(PROMPT) and obj["steps"][0]["shape"] == [T]
    assert next(s for s in obj["steps"] if s["name"] == "embedding")["shape"] == [T, 72]
    assert next(s for s in obj["steps"] if s["name"].startswith("attention"))["shape"] == [T, T]
    tops = obj["next_tokens"]
    assert len(tops) == 5 and all(set(t) == {"id", "text", "prob"} for t in tops)
    probs = [t["prob"] for t in tops]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_out_writes_a_self_contained_index_html_and_pngs(tiny, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["explain", "--checkpoint", str(tiny), "--prompt", PROMPT, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.index("1. tokens") < text.index("5. RoPE") < text.index("8. layers")
    html = (out / "index.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "8. layers" in html
    for name in ("attention.png", "rope.png", "next_tokens.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--layer", "4"], "--layer 4 is out of range; the model has layers 0-3"),
        (["--layer", "-1"], "--layer -1 is out of range"),
        (["--head", "9"], "--head 9 is out of range; the model has query heads 0-8"),
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt", "   "], "the prompt is empty"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny, capsys, argv, needle):
    assert main(["explain", "--checkpoint", str(tiny), *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], captured.err
    assert captured.out == ""


def test_unwritable_out_is_one_line_before_loading(tiny, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["explain", "--checkpoint", str(tiny), "--out", str(tmp_path / "file" / "report")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot create the directory" in err[0]


def test_torchrun_tp2_prints_one_json_object_with_tp1s_tokens(tiny):
    tp2 = cli(
        "--checkpoint", str(tiny), "--prompt", PROMPT, "--head", "8", "--json", "--set", "parallel.tensor=2", nproc=2
    )
    assert tp2.returncode == 0, tp2.stderr
    assert len(tp2.stdout.splitlines()) == 1  # rank 0 only
    tp1 = cli("--checkpoint", str(tiny), "--prompt", PROMPT, "--head", "8", "--json")
    assert tp1.returncode == 0, tp1.stderr
    ids = [[t["id"] for t in json.loads(r.stdout)["next_tokens"]] for r in (tp2, tp1)]
    assert ids[0] == ids[1]


def test_embedded_smollm2_walkthrough_predicts_generates_token():
    r = cli()
    assert r.returncode == 0, r.stderr
    sections = [int(m) for m in re.findall(r"^(\d)\. ", r.stdout, flags=re.MULTILINE)]
    assert sections == list(range(1, 9))
    assert "layer 0 attention_norm" in r.stdout and "layer 0 head 0" in r.stdout
    assert "equals the hooked input of wo: True" in r.stdout
    predicted = int(re.search(r"greedy next token: .* \(id (\d+)\)", r.stdout).group(1))
    g = subprocess.run(
        [
            sys.executable,
            "-m",
            "llama3_dist",
            "generate",
            "--temperature",
            "0",
            "--max-new-tokens",
            "1",
            "--json",
            "--prompt",
            DEFAULT_PROMPT,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    assert g.returncode == 0, g.stderr
    assert json.loads(g.stdout)["tokens"] == [predicted]
