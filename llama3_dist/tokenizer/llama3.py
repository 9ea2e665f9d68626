"""Meta's Llama 3 tokenizer.model: tiktoken ranks plus Llama 3's 256 special tokens."""

from __future__ import annotations

import base64
import binascii
import importlib.util
import os
from pathlib import Path

from ..errors import TokenizerError
from .base import Tokenizer, make_encoding

# Llama 3 (Meta tokenizer.model, GGUF 'llama-bpe', HF Split regex).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# Ids n_base, n_base+1, ... in this order, then <|reserved_special_token_2|> on up to 256 (llama-models 0.3.0).
_LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
]  # fmt: skip
_LLAMA3_N_SPECIALS = 256


def default_llama3_tokenizer_path() -> Path:
    """The Llama 3 tokenizer.model shipped in the llama-models wheel."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("llama_models is not installed; run: pip install --no-deps llama-models==0.3.0")
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise TokenizerError(f"{path} is missing; reinstall: pip install --no-deps llama-models==0.3.0")
    return path


def llama3_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Llama 3 tokenizer from Meta's tokenizer.model (one 'base64(token) rank' per line)."""
    ranks = _read_tiktoken_ranks(Path(path))
    specials = list(_LLAMA3_NAMED_SPECIALS)
    specials += [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + _LLAMA3_N_SPECIALS - len(specials))]
    special_ids = {s: len(ranks) + i for i, s in enumerate(specials)}
    return Tokenizer(
        make_encoding(LLAMA3_PATTERN, ranks, special_ids, source=str(path)),
        len(ranks) + len(specials),
        bos_id=special_ids["<|begin_of_text|>"],
        eos_id=special_ids["<|end_of_text|>"],
        add_bos=True,
        stop_ids={special_ids[s] for s in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")},
    )


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken ranks file (tiktoken's loader caches local files in /tmp by path and goes stale)."""
    hint = "pass Meta's Llama 3 tokenizer.model, a Hugging Face dir or a .gguf"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read tokenizer {path}: {e}; {hint}") from None
    ranks = {}
    for n, line in enumerate(lines, 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{path}:{n} is not '<base64 token> <rank>'; {hint}") from None
    if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([b]) not in ranks for b in range(256)):
        raise TokenizerError(f"{path} does not rank all 256 bytes and its tokens as 0, 1, 2, ...; {hint}")
    return ranks
