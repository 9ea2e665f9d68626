"""Every bad input is one `error:` line on stderr and exit code 2, within seconds; the README's
bad-input table is run row by row, so it stays true. Tiny valid values (temperature 1e-5) work."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import time
from pathlib import Path

import pytest
import torch
from helpers import launch
from helpers.checkpoints import random_model, tiny_config, write_gguf, write_hf, write_meta

from llama3_dist import cli
from llama3_dist.config import SamplingParams, load_config
from llama3_dist.errors import ConfigError
from llama3_dist.generate import sample

REPO = Path(__file__).resolve().parents[1]
BASE = "generate --checkpoint {ckpt} --prompt hi --max-new-tokens 2"


def readme_rows() -> list[tuple[str, str, str, int]]:
    """(bad input, arguments, message, exit code) of each row of the README's bad-input table."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Reliability") :]
    section = section[: section.index("\n## ", 1)]
    table = section[section.index("| Bad input |") :].split("\n\n")[0]
    rows = []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        what, args, message, code = cells
        rows.append((what, args.strip("`"), message.strip("`"), int(code)))
    return rows


ROWS = readme_rows()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """The files the table's {placeholders} name, written fresh."""
    tmp = tmp_path_factory.mktemp("bad")
    model = random_model(tiny_config(), seed=5)
    ckpt = write_gguf(model, tmp / "tiny.gguf")
    hf = write_hf(model, tmp / "hf")
    corrupt = shutil.copytree(hf, tmp / "corrupt-header")
    st = corrupt / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[8:16] = b"{garbage"  # the JSON header now starts with an unquoted name
    st.write_bytes(bytes(data))
    missing_shard = write_hf(model, tmp / "missing-shard", shards=2)
    (missing_shard / "model-00002-of-00002.safetensors").unlink()
    raw = Path(ckpt).read_bytes()
    (tmp / "truncated.gguf").write_bytes(raw[: len(raw) // 3])
    (tmp / "random.gguf").write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()
    )
    (tmp / "no-checkpoint").mkdir()
    (tmp / "no-checkpoint" / "notes.txt").write_text("not weights\n")
    two = shutil.copytree(hf, tmp / "two-formats")
    for f in write_meta(model, tmp / "meta").iterdir():
        shutil.copy(f, two / f.name)
    (tmp / "text-file").write_text("hello, I am not a tokenizer\n")
    (tmp / "list.yaml").write_text("- model\n- parallel\n")
    (tmp / "broken.yaml").write_text("model: [unclosed\n")
    names = [
        "corrupt-header",
        "missing-shard",
        "truncated.gguf",
        "random.gguf",
        "no-checkpoint",
        "two-formats",
        "text-file",
        "list.yaml",
        "broken.yaml",
    ]
    return {"ckpt": str(ckpt), "missing": str(tmp / "does-not-exist"), **{n: str(tmp / n) for n in names}}


def fill(text: str, inputs: dict[str, str]) -> str:
    return re.sub(r"\{([\w.-]+)\}", lambda m: inputs[m.group(1)], text)


def pattern(message: str, inputs: dict[str, str]) -> str:
    """The table's message as a regex: placeholders become their paths, `…` anything."""
    parts = re.split(r"(\{[\w.-]+\}|…)", message)
    out = ""
    for p in parts:
        if p == "…":
            out += ".+"
        elif re.fullmatch(r"\{[\w.-]+\}", p):
            out += re.escape(inputs[p[1:-1]])
        else:
            out += re.escape(p)
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """cli.main in this process (as fast as it gets); a parse error's SystemExit counts as its code."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_the_readme_table_has_every_bad_input_of_the_issue():
    args = " ".join(a for _, a, _, _ in ROWS)
    for needed in [
        "--set generate.stop=[unclosed",
        "--temperature nan",
        "runtime.timeout_s=inf",
        "--top-p 0",
        "--top-p 1.5",
        "--top-k -1",
        "--max-new-tokens 0",
        "--temperature -",
        "{corrupt-header}",
        "{missing-shard}",
        "{truncated.gguf}",
        "{random.gguf}",
        "{no-checkpoint}",
        "{missing}",
        "--tokenizer {text-file}",
        "--config {list.yaml}",
        "{two-formats}",
    ]:
        assert needed in args, needed


@pytest.mark.parametrize("what,args,message,code", ROWS, ids=[r[0] for r in ROWS])
def test_each_bad_input_is_one_line_and_exit_2(inputs, capsys, what, args, message, code):
    argv = shlex.split(fill(BASE, inputs)) + shlex.split(fill(args, inputs))
    got, out, err = run_cli(argv, capsys)
    lines = [x for x in err.splitlines() if x.strip()]
    assert got == code, (got, err)
    assert out == "" and len(lines) == 1 and "Traceback" not in err, err
    assert re.fullmatch(pattern(message, inputs), lines[0]), (message, lines[0])


@pytest.mark.parametrize("args", ["--temperature nan", "--checkpoint {truncated.gguf}"])
def test_a_real_process_prints_one_line_and_exits_2(inputs, args):
    start = time.monotonic()
    argv = [*shlex.split(fill(BASE, inputs)), *shlex.split(fill(args, inputs))]
    r = launch.run_cli(*argv, env={"OMP_NUM_THREADS": "1"})
    print(f"\n{args}: exit {r.returncode} after {time.monotonic() - start:.1f} s")
    assert r.returncode == 2 and r.stdout == ""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("value", ["nan", ".nan", "NaN", "inf", ".inf", "-.inf", "-inf", "1e999"])
def test_non_finite_numbers_are_rejected_in_sets_and_files(tmp_path, value):
    with pytest.raises(ConfigError, match=r"^runtime.timeout_s: must be a finite number, got"):
        load_config(None, [f"runtime.timeout_s={value}"])
    (tmp_path / "c.yaml").write_text(f"generate:\n  temperature: {value}\n")
    with pytest.raises(ConfigError, match=r"^generate.temperature: must be a finite number, got"):
        load_config(str(tmp_path / "c.yaml"))


def test_exponent_floats_are_numbers():
    # YAML 1.1 reads 1e-5 (no dot) as a string; the loader takes it as the number it is
    assert load_config(None, ["generate.temperature=1e-5"]).generate.temperature == 1e-5
    assert load_config(None, ["runtime.timeout_s=5E1"]).runtime.timeout_s == 50.0
    with pytest.raises(ConfigError, match="generate.temperature: expected float, got 'warm'"):
        load_config(None, ["generate.temperature=warm"])


def test_sampling_ranges_are_checked_with_the_key():
    for params, key in [
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_p=1.01), "top_p"),
        (SamplingParams(top_k=-1), "top_k"),
        (SamplingParams(min_p=-0.1), "min_p"),
        (SamplingParams(min_p=1.5), "min_p"),
        (SamplingParams(max_new_tokens=0), "max_new_tokens"),
        (SamplingParams(temperature=-1e-9), "temperature"),
        (SamplingParams(temperature=float("nan")), "temperature"),
    ]:
        with pytest.raises(ConfigError, match=rf"^request\.{key}: must be"):
            params.check("request.")
    SamplingParams(temperature=1e-5, top_p=1.0, top_k=0, max_new_tokens=1).check()  # edges that are fine


@pytest.mark.parametrize("temperature", [1e-5, 1e-30, 1e-45])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tiny_temperature_samples_the_top_token_without_nan(temperature, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 1000, generator=g) * 30).to(dtype)
    logits[:, :10] = float("-inf")  # masked entries stay harmless
    for top_p, top_k in [(1.0, 0), (0.9, 0), (0.9, 50)]:
        got = sample(logits, SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k), g)
        assert torch.equal(got, logits.float().argmax(-1)), (top_p, top_k)


def test_temperature_1e5_on_the_cli_gives_the_greedy_tokens(inputs, capsys):
    runs = {}
    for t in ("0", "1e-5"):
        code, out, err = run_cli(
            shlex.split(fill(BASE, inputs)) + ["--max-new-tokens", "12", "--temperature", t, "--seed", "3", "--json"],
            capsys,
        )
        assert code == 0, err
        runs[t] = json.loads(out)["tokens"]
    assert len(runs["0"]) == 12 and runs["1e-5"] == runs["0"]
