"""The CLI contract: --json shape, the embedded default, and one clear stderr line for every bad input."""

from __future__ import annotations

import json
import pathlib
import subprocess

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from helpers.checkpoints import random_model, tiny_config, write_hf, write_meta
from helpers.launch import run_cli

from llama3_dist.cli import main

JSON_KEYS = {"prompt", "prompt_tokens", "tokens", "text", "finish_reason", "prefill_ms", "decode_tokens_per_s"}


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=timeout, env={"PYTHONUNBUFFERED": "1"})


def test_embedded_default_knows_the_capital_of_france():
    r = cli("generate", "--prompt", "The capital of France is", "--max-new-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is")
    assert "Paris" in r.stdout
    assert "prompt tokens" in r.stderr and "tok/s" in r.stderr


def test_json_is_one_object_per_prompt_and_nothing_else(tiny_gguf):
    r = cli(
        "generate",
        "--checkpoint",
        str(tiny_gguf),
        "--prompt",
        "hello",
        "--prompt",
        "a longer prompt",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2
    for line, prompt in zip(lines, ["hello", "a longer prompt"]):
        obj = json.loads(line)
        assert set(obj) == JSON_KEYS
        assert obj["prompt"] == prompt
        assert obj["prompt_tokens"] == list(prompt.encode())  # byte-level vocab, no BOS in this GGUF
        assert all(isinstance(t, int) for t in obj["tokens"]) and len(obj["tokens"]) <= 5
        assert obj["finish_reason"] in ("stop", "length")
        assert obj["prefill_ms"] > 0 and obj["decode_tokens_per_s"] >= 0


def test_seeded_sampling_is_reproducible_from_the_cli(tiny_gguf, capsys):
    args = [
        "generate",
        "--checkpoint",
        str(tiny_gguf),
        "--prompt",
        "abc",
        "--max-new-tokens",
        "12",
        "--temperature",
        "1.0",
        "--top-k",
        "40",
        "--json",
    ]
    runs = []
    for seed in ("3", "3", "4"):
        assert main([*args, "--seed", seed]) == 0
        runs.append(json.loads(capsys.readouterr().out)["tokens"])
    assert runs[0] == runs[1] != runs[2]


def test_an_eager_run_never_imports_the_compiler(tiny_gguf):
    """torch._dynamo (~70 MiB of memory, ~1.3 s to import) serves runtime.compile=true only."""
    r = run_cli(
        "generate",
        "--checkpoint",
        str(tiny_gguf),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "3",
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    assert r.returncode == 0, r.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert {"torch", "llama3_dist.model"} <= imported, "no import profile: the check would prove nothing"
    assert "torch._dynamo" not in imported


def test_tokenizer_bigger_than_the_vocab_is_refused(tiny_meta_mp2, capsys):
    # Meta dir without tokenizer.model falls back to llama-models' tokenizer; the tiny vocab is too small
    assert main(["generate", "--checkpoint", str(tiny_meta_mp2), "--prompt", "x"]) == 2
    assert "vocabulary" in capsys.readouterr().err


def _one_error_line(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


def test_missing_checkpoint_path(capsys, tmp_path):
    _one_error_line(
        capsys, ["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"], "checkpoint not found"
    )


def test_directory_that_is_no_checkpoint(capsys, tmp_path):
    _one_error_line(capsys, ["generate", "--checkpoint", str(tmp_path), "--prompt", "x"], "params.json")


def test_params_disagreeing_with_tensor_shapes(capsys, tmp_path):
    d = write_meta(random_model(tiny_config(), seed=33), tmp_path / "m")
    params = json.loads((d / "params.json").read_text())
    params["n_kv_heads"] = 4
    (d / "params.json").write_text(json.dumps(params))
    _one_error_line(
        capsys, ["generate", "--checkpoint", str(d), "--tokenizer", "x", "--prompt", "x"], "wk.weight", "disagree"
    )


def test_hf_config_disagreeing_with_tensor_shapes(capsys, tmp_path, smollm2_gguf):
    d = write_hf(random_model(tiny_config(), seed=34), tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    _one_error_line(
        capsys, ["generate", "--checkpoint", str(d), "--tokenizer", str(smollm2_gguf), "--prompt", "x"], "disagree"
    )


def test_missing_and_truncated_shards(capsys, tmp_path):
    d = write_meta(random_model(tiny_config(), seed=35), tmp_path / "m", mp=2)
    (d / "consolidated.01.pth").unlink()
    _one_error_line(capsys, ["generate", "--checkpoint", str(d), "--prompt", "x"], "consolidated.01.pth")
    d = write_meta(random_model(tiny_config(), seed=35), tmp_path / "t", mp=2)
    shard = d / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _one_error_line(capsys, ["generate", "--checkpoint", str(d), "--prompt", "x"], "truncated")


def test_missing_hf_shard(capsys, tmp_path, smollm2_gguf):
    d = write_hf(random_model(tiny_config(), seed=36), tmp_path / "hf", shards=2)
    next(d.glob("model-00002-of-00002.safetensors")).unlink()
    _one_error_line(
        capsys, ["generate", "--checkpoint", str(d), "--tokenizer", str(smollm2_gguf), "--prompt", "x"], "missing"
    )


def test_pickled_objects_are_refused(capsys, tmp_path):
    d = write_meta(random_model(tiny_config(), seed=37), tmp_path / "m")
    state = torch.load(d / "consolidated.00.pth", weights_only=True)
    state["extra"] = pathlib.PurePosixPath("x")  # an arbitrary Python object: weights_only refuses it
    torch.save(state, d / "consolidated.00.pth")
    _one_error_line(capsys, ["generate", "--checkpoint", str(d), "--prompt", "x"], "refusing to load")


def test_unsupported_gguf_quantization(capsys, tmp_path):
    path = tmp_path / "q2k.gguf"
    w = GGUFWriter(path, arch="llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((256, 84), dtype=np.uint8), raw_dtype=GGMLQuantizationType.Q2_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _one_error_line(capsys, ["generate", "--checkpoint", str(path), "--prompt", "x"], "Q2_K", "not supported")


def test_prompt_too_long(capsys, tiny_gguf):
    _one_error_line(
        capsys,
        [
            "generate",
            "--checkpoint",
            str(tiny_gguf),
            "--prompt",
            "x" * 40,
            "--max-new-tokens",
            "30",
            "--set",
            "runtime.max_seq_len=64",
        ],
        "runtime.max_seq_len=64",
        "70",
    )


def test_empty_prompt(capsys, tiny_gguf):
    _one_error_line(capsys, ["generate", "--checkpoint", str(tiny_gguf), "--prompt", ""], "empty")


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ("generate.top_q=0.5", "unknown key (did you mean generate.top_p?)"),
        ("parallel.tensr=2", "did you mean parallel.tensor?"),
        ("runtime.max_seq_len=long", "expected int"),
        ("generate.temperature=-1", "must be >= 0"),
        ("runtime.dtype=float8", "must be one of"),
        ("nosection.x=1", "unknown section"),
        ("novalue", "expected dotted.key=value"),
    ],
)
def test_bad_set(capsys, tiny_gguf, setting, needle):
    _one_error_line(capsys, ["generate", "--checkpoint", str(tiny_gguf), "--prompt", "x", "--set", setting], needle)


def test_layout_must_fill_the_world(capsys, tiny_gguf):
    _one_error_line(
        capsys,
        ["generate", "--checkpoint", str(tiny_gguf), "--prompt", "x", "--set", "parallel.tensor=2"],
        "must equal the number of processes (1)",
    )


def test_bad_input_through_the_real_process_is_one_line_and_exit_2(tmp_path):
    r = cli("generate", "--checkpoint", str(tmp_path / "missing.gguf"), "--prompt", "x")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: checkpoint not found: {tmp_path / 'missing.gguf'} "
        f"(give a Meta dir, a Hugging Face dir or a .gguf file)"
    ]
    assert r.stdout == ""
