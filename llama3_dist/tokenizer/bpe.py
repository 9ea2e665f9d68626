"""Byte-level BPE tokenizers (GPT-2 style) from a GGUF file's metadata or a HF tokenizer.json, on tiktoken."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import tiktoken

from ..errors import TokenizerError
from .base import Tokenizer, make_encoding
from .llama3 import LLAMA3_PATTERN

if TYPE_CHECKING:
    import gguf

# GPT-2 (HF ByteLevel(use_regex=True)).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# HF Sequence[Digits(individual_digits=True), ByteLevel] as one regex: every digit is a piece of its own and
# ends the text GPT-2 sees, so a whitespace run right before a digit is trailing and stays whole.
SMOLLM_PATTERN = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"

# tokenizer.ggml.pre (llama.cpp's names) -> pattern.
_GGUF_PRE = {
    "smollm": SMOLLM_PATTERN,
    "gpt-2": GPT2_PATTERN,
    "default": GPT2_PATTERN,
    "llama-bpe": LLAMA3_PATTERN,
    "llama3": LLAMA3_PATTERN,
    "llama-v3": LLAMA3_PATTERN,
}
_LLAMA3_PRE = {"llama-bpe", "llama3", "llama-v3"}

_STOP_NAMES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")

_GGUF_NORMAL = 1  # tokenizer.ggml.token_type: every other type is a control / user-defined / unused token


def _gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, as char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(b for b in range(256) if b not in printable)})
    return table


_BYTE_OF_CHAR = _gpt2_byte_alphabet()


def _byte_level_bpe(
    pattern: str, vocab: dict[str, int], merges: list[tuple[str, str]], specials: dict[str, int], source: str
) -> tuple[tiktoken.Encoding, int, list[int] | None]:
    """tiktoken Encoding that reproduces HF's merge-order BPE over a GPT-2 byte-level `vocab`.

    tiktoken merges the adjacent pair whose concatenation has the lowest rank, HF the pair listed first in
    `merges`; ranking each token by the first merge that builds it gives both the same order. Ranks are the
    model ids when ids grow in merge order (SmolLM2's do), else a rank -> id list maps them. tiktoken also
    takes a piece that is a whole token as is: llama.cpp's (and HF's) ignore_merges, harmless when every
    token is built by its own merges (true of SmolLM2). Returns (encoding, n_words, rank_to_id or None).
    """

    def to_bytes(token: str) -> bytes:
        try:
            return bytes(_BYTE_OF_CHAR[c] for c in token)
        except KeyError:
            message = f"{source}: token {token!r} is not GPT-2 byte-level text; only byte-level BPE is supported"
            raise TokenizerError(message) from None

    order = sorted(i for t, i in vocab.items() if len(to_bytes(t)) == 1)
    seen = set(order)
    for a, b in merges:
        i = vocab.get(a + b)
        if i is None or a not in vocab or b not in vocab:
            raise TokenizerError(f"{source}: merge {a!r} {b!r} does not match the vocab; the file is corrupt")
        if i not in seen:
            seen.add(i)
            order.append(i)
    order += sorted(set(vocab.values()) - seen)  # no merge builds them: only whole-piece look-ups can reach them
    n_words = max([*vocab.values(), *specials.values()]) + 1
    rank_to_id = None if all(a < b for a, b in zip(order, order[1:])) else order + sorted(specials.values())
    rank_of = {i: r for r, i in enumerate(rank_to_id or range(n_words))}
    ranks = {to_bytes(t): rank_of[i] for t, i in vocab.items()}
    # A byte the vocab lacks would make tiktoken panic: rank it past the end, where encode drops it.
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]
    ranks.update({b: len(rank_of) + n for n, b in enumerate(missing)})
    encoding = make_encoding(pattern, ranks, {s: rank_of[i] for s, i in specials.items()}, source)
    return encoding, n_words, rank_to_id


def _stop_ids(specials: dict[str, int], *ids: int | None) -> set[int]:
    """The given ids plus the usual end-of-turn specials present in the vocab."""
    return {i for i in ids if i is not None} | {specials[s] for s in _STOP_NAMES if s in specials}


def gguf_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    """Byte-level BPE tokenizer ('gpt2' model) from a GGUF file's tokenizer.ggml.* metadata."""
    source = str(getattr(reader.data, "filename", None) or "GGUF file")

    def field(key: str, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    model = field("tokenizer.ggml.model")
    if model != "gpt2":
        raise TokenizerError(f"{source}: tokenizer.ggml.model {model!r} is not supported; only 'gpt2' (byte-level BPE)")
    pre = field("tokenizer.ggml.pre", "default")  # llama.cpp's fallback when the key is absent
    if pre not in _GGUF_PRE:
        supported = ", ".join(sorted(_GGUF_PRE))
        raise TokenizerError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported; supported: {supported}")
    tokens, merges = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.merges")
    if tokens is None or merges is None:
        raise TokenizerError(f"{source}: tokenizer.ggml.tokens or .merges is missing; re-convert the model")
    types = field("tokenizer.ggml.token_type") or [_GGUF_NORMAL] * len(tokens)
    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == _GGUF_NORMAL}
    specials = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind != _GGUF_NORMAL}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    encoding, n_words, rank_to_id = _byte_level_bpe(_GGUF_PRE[pre], vocab, pairs, specials, source)
    bos, eos = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
    return Tokenizer(
        encoding,
        n_words,
        bos_id=bos,
        eos_id=eos,
        # llama.cpp: BPE vocabs add BOS only for llama3-style pre-tokenizers, unless the file says otherwise
        add_bos=bool(field("tokenizer.ggml.add_bos_token", pre in _LLAMA3_PRE)),
        stop_ids=_stop_ids(specials, eos, *(field(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom"))),
        chat_template=field("tokenizer.chat_template"),
        rank_to_id=rank_to_id,
    )


def hf_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Byte-level BPE tokenizer from a HF directory: tokenizer.json, plus tokenizer_config.json if present."""
    directory = Path(directory)
    spec = _read_json(directory / "tokenizer.json")
    config_path = directory / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    source = str(directory / "tokenizer.json")

    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
        raise TokenizerError(f"{source}: model {model.get('type')!r} is not byte-level BPE; only that is supported")
    if spec.get("normalizer"):
        raise TokenizerError(f"{source}: normalizer {spec['normalizer'].get('type')!r} is not supported; need none")
    pattern = _hf_pattern(spec.get("pre_tokenizer"), source)
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    vocab = {t: i for t, i in model.get("vocab", {}).items() if t not in specials}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    encoding, n_words, rank_to_id = _byte_level_bpe(pattern, vocab, merges, specials, source)

    def token_id(key: str) -> int | None:
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token  # an AddedToken
        if token is not None and token not in specials and token not in vocab:
            raise TokenizerError(f"{config_path}: {key} {token!r} is not in the vocabulary; fix the file")
        return specials.get(token, vocab.get(token))

    bos, eos = token_id("bos_token"), token_id("eos_token")
    return Tokenizer(
        encoding,
        n_words,
        bos_id=bos,
        eos_id=eos,
        add_bos=bos is not None and _adds_bos(spec.get("post_processor"), bos),
        stop_ids=_stop_ids(specials, eos),
        chat_template=_hf_chat_template(directory, config),
        rank_to_id=rank_to_id,
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TokenizerError(f"cannot read {path}: {e}; pass a Hugging Face model directory") from e


def _hf_pattern(pre: dict | None, source: str) -> str:
    """The tiktoken regex for a byte-level tokenizer.json pre_tokenizer."""
    pre = pre or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds and kinds[-1] == "ByteLevel" and not steps[-1].get("add_prefix_space", False):
        first, regex = steps[0], steps[-1].get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            return GPT2_PATTERN
        if kinds == ["Digits", "ByteLevel"] and first.get("individual_digits") and regex:
            return SMOLLM_PATTERN
        # tiktoken drops text its regex skips where HF's Isolated keeps it; byte-level Split regexes
        # (Llama 3's among them) match every character, so both agree.
        isolated = first.get("behavior") == "Isolated" and not first.get("invert")
        if kinds == ["Split", "ByteLevel"] and not regex and isolated and "Regex" in first.get("pattern", {}):
            return first["pattern"]["Regex"]
    raise TokenizerError(
        f"{source}: pre_tokenizer {'+'.join(map(str, kinds)) or None} is not supported; supported: ByteLevel, "
        "Digits(individual_digits)+ByteLevel, Split(Regex, Isolated)+ByteLevel(use_regex=false), no prefix space"
    )


def _adds_bos(post: dict | None, bos_id: int) -> bool:
    """Whether a tokenizer.json post_processor puts the BOS token in front of a single sequence."""
    post = post or {}
    if post.get("type") == "Sequence":
        return any(_adds_bos(p, bos_id) for p in post.get("processors", []))
    first = (post.get("single") or [{}])[0].get("SpecialToken") if post.get("type") == "TemplateProcessing" else None
    return first is not None and post.get("special_tokens", {}).get(first["id"], {}).get("ids") == [bos_id]


def _hf_chat_template(directory: Path, config: dict) -> str | None:
    """chat_template.jinja if present, else tokenizer_config.json's chat_template (the 'default' one of a list)."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template
