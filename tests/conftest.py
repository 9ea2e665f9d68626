"""Shared fixtures: asset paths (installed wheels, located with find_spec) and the session's tiny checkpoints.

The `gpu` marker (tests/gpu) is deselected by default (pyproject addopts); `pytest -m gpu tests/gpu` selects it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.assets import llama3_tokenizer_path, smollm2_gguf_path
from helpers.checkpoints import random_model, tiny_config, write_gguf
from helpers.tiny import TinyCheckpoints
from transformers import LlamaForCausalLM

from llama3_dist import kernels


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def llama3_tokenizer_model() -> Path:
    return llama3_tokenizer_path()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyCheckpoints:
    """Every tiny variant x format, written once per session on first use (helpers/tiny.py)."""
    return TinyCheckpoints(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_model(tiny) -> LlamaForCausalLM:
    """The transformers oracle behind tiny_meta, tiny_meta_mp2, tiny_hf and tiny_gguf."""
    return tiny.model()


@pytest.fixture(scope="session")
def tiny_meta(tiny) -> Path:
    return tiny.path(fmt="meta")


@pytest.fixture(scope="session")
def tiny_meta_mp2(tiny) -> Path:
    return tiny.path(fmt="meta-mp2")


@pytest.fixture(scope="session")
def tiny_hf(tiny) -> Path:
    return tiny.path(fmt="hf")


@pytest.fixture(scope="session")
def long_gguf(tmp_path_factory) -> Path:
    """A tiny random GGUF whose greedy generation from LONG_PROMPT does not stop at EOS for a long time
    (seed 41): a fault injected after its first token lands mid-generation."""
    return write_gguf(random_model(tiny_config(), seed=41), tmp_path_factory.mktemp("long") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_gguf(tiny) -> Path:
    """A random 4-layer model with a byte-level vocab: any text is a valid prompt."""
    return tiny.path(fmt="gguf")


@pytest.fixture
def force(monkeypatch):
    """force(name): set LLAMA3_DIST_KERNELS=name and redo the kernel dispatch; restored after the test."""

    def set_variant(name: str) -> None:
        monkeypatch.setenv("LLAMA3_DIST_KERNELS", name)
        kernels.reset()

    yield set_variant
    monkeypatch.delenv("LLAMA3_DIST_KERNELS", raising=False)
    kernels.reset()
