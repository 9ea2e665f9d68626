"""Configs and presets: every preset validates and plans, config errors name the key, `plan` against measured memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama3_dist.args import PRESETS, preset_args
from llama3_dist.checkpoint import open_checkpoint
from llama3_dist.cli import main
from llama3_dist.config import ConfigError, load_config
from llama3_dist.plan import parse_bytes, plan

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# Parameter counts Meta publishes (8B: 8.03B, 70B: 70.6B, 405B: 405.9B, 1B: 1.24B, 3B: 3.21B).
PARAMS = {
    "llama3-8b": 8.03e9,
    "llama3.1-8b": 8.03e9,
    "llama3-70b": 70.55e9,
    "llama3.1-70b": 70.55e9,
    "llama3.1-405b": 405.85e9,
    "llama3.2-1b": 1.236e9,
    "llama3.2-3b": 3.213e9,
}


def test_there_is_a_preset_for_every_layout_the_docs_promise():
    names = {c.stem for c in CONFIGS}
    assert {
        "smollm2-135m",
        "smollm2-135m-tp2",
        "smollm2-135m-pp2",
        "smollm2-135m-tp2-pp2",
        "llama3-8b",
        "llama3-8b-tp2",
        "llama3.1-8b",
        "llama3.1-70b-tp8",
        "llama3.1-405b-tp8-pp2",
        "llama3.2-1b",
        "llama3.2-3b",
    } <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_preset_validates_and_plans(config):
    cfg = load_config(str(config))
    if cfg.model.preset is not None:
        args = preset_args(cfg.model.preset)
    else:
        args = open_checkpoint(cfg.model.checkpoint or _embedded()).args
    rows = plan(cfg, args)
    assert len(rows) == cfg.parallel.tensor * cfg.parallel.pipeline
    assert all(r.param_bytes > 0 and r.kv_cache_bytes > 0 for r in rows)
    layers = {r.layers for r in rows}
    assert len(layers) == cfg.parallel.pipeline  # one layer range per stage


def _embedded():
    from llama3_dist.checkpoint import default_checkpoint

    return default_checkpoint()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_shapes_are_the_real_models(preset):
    args = preset_args(preset)
    want_ffn = {
        "llama3-8b": 14336,
        "llama3.1-8b": 14336,
        "llama3-70b": 28672,
        "llama3.1-70b": 28672,
        "llama3.1-405b": 53248,
        "llama3.2-1b": 8192,
        "llama3.2-3b": 8192,
    }[preset]
    assert args.hidden_dim == want_ffn
    cfg = load_config(None, [f"model.preset={preset}"])
    [row] = plan(cfg, args)
    n_params = row.param_bytes / 4  # float32
    assert abs(n_params - PARAMS[preset]) / PARAMS[preset] < 0.01


def test_70b_tp8_and_405b_tp8_pp2_fit_80gib_and_split_evenly():
    for name, size in (("llama3.1-70b-tp8", 8), ("llama3.1-405b-tp8-pp2", 16)):
        cfg = load_config(str(REPO / "configs" / f"{name}.yaml"))
        rows = plan(cfg, preset_args(cfg.model.preset), parse_bytes("80GiB"))
        assert len(rows) == size and all(r.fits for r in rows)
        assert max(r.param_bytes for r in rows) / min(r.param_bytes for r in rows) < 1.1


def test_plan_cli_table_json_and_fit(capsys):
    assert main(["plan", "--config", str(REPO / "configs" / "llama3.1-405b-tp8-pp2.yaml"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 16 and {
        "rank",
        "stage",
        "tp_rank",
        "param_bytes",
        "kv_cache_bytes",
        "workspace_bytes",
        "total_bytes",
        "fits",
    } <= set(rows[0])
    assert main(["plan", "--config", str(REPO / "configs" / "llama3-8b.yaml"), "--device-memory", "8GiB"]) == 1
    out = capsys.readouterr().out
    assert "NO" in out and "largest rank" in out
    assert main(["plan", "--device-memory", "lots"]) == 2
    assert "--device-memory" in capsys.readouterr().err


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="parallel.backend: nccl needs runtime.device=cuda"):
        load_config(None, ["parallel.backend=nccl"])
    with pytest.raises(ConfigError, match="model.preset: must be one of"):
        load_config(None, ["model.preset=llama5"])
    with pytest.raises(ConfigError, match="generate.top_p: must be in"):
        load_config(None, ["generation.top_p=2"])  # `generation` is accepted as the section's other name
    bad = REPO / "configs" / "smollm2-135m.yaml"
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(bad) + ".missing")
