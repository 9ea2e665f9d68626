"""Text <-> token ids for Llama 3 (Meta tokenizer.model), GGUF and Hugging Face byte-level BPE, all on tiktoken."""

from __future__ import annotations

import base64
import binascii
import functools
import importlib.util
import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
import jinja2.ext
import tiktoken
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama3_dist.errors import TokenizerError

if TYPE_CHECKING:
    import gguf

# Llama 3 (Meta tokenizer.model, GGUF 'llama-bpe', HF Split regex).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
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

# Ids n_base, n_base+1, ... in this order, then <|reserved_special_token_2|> on up to 256 (llama-models 0.3.0).
_LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
]  # fmt: skip
_LLAMA3_N_SPECIALS = 256
_LLAMA3_CHAT_TOKENS = {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}
_STOP_NAMES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")

# tiktoken's regex can overflow its stack on huge inputs and long runs; Meta cuts input at these sizes.
_MAX_CHUNK_CHARS = 400_000
_MAX_RUN_CHARS = 25_000

_GGUF_NORMAL = 1  # tokenizer.ggml.token_type: every other type is a control / user-defined / unused token


class Tokenizer:
    """Text <-> token ids over a tiktoken Encoding, with the model's special tokens."""

    def __init__(
        self,
        encoding: tiktoken.Encoding,
        n_words: int,
        *,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
        stop_ids: set[int],
        chat_template: str | None = None,
        rank_to_id: list[int] | None = None,
    ):
        """Wrap `encoding`, whose ranks are the model ids unless `rank_to_id` maps them.

        Ranks from `n_words` (or `len(rank_to_id)`) on stand for bytes the vocab lacks; encode drops them, as
        HF and llama.cpp do.
        """
        self._enc = encoding
        self._ids = rank_to_id
        self._ranks = None if rank_to_id is None else {i: r for r, i in enumerate(rank_to_id)}
        self._n_ranks = n_words if rank_to_id is None else len(rank_to_id)
        self.n_words = n_words
        ranks = sorted((encoding.encode_single_token(s), s) for s in encoding.special_tokens_set)
        self.special_tokens = {s: r if rank_to_id is None else rank_to_id[r] for r, s in ranks}
        self._allowed_special = frozenset(self.special_tokens)
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.stop_ids = frozenset(stop_ids)
        self._chat_template = chat_template or None  # the source, so a Tokenizer pickles; compiled once, cached
        if self._chat_template:
            _compile_chat_template(self._chat_template)  # fail at load, not at the first chat
        named = {"bos_token": bos_id, "eos_token": eos_id}
        self._template_vars = {k: self.decode([i]) for k, i in named.items() if i is not None}

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token look-alikes stay plain text. `bos` None means `self.add_bos`."""
        ids = self._encode(text, special=False)
        if self.add_bos if bos is None else bos:
            if self.bos_id is None:
                raise TokenizerError("this tokenizer has no BOS token; encode with bos=False")
            ids.insert(0, self.bos_id)
        return ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a whole chat prompt, ending with the header that asks the assistant to reply.

        With a chat template: rendered like transformers' `apply_chat_template(add_generation_prompt=True)`, then
        encoded with special tokens recognised, as transformers does. Without one: Meta's Llama 3 headers if the
        vocab has them (message text is never read as control tokens), else plain "role: content" lines.
        """
        if self._chat_template is not None:
            try:
                text = _compile_chat_template(self._chat_template).render(
                    messages=messages, tools=None, documents=None, add_generation_prompt=True, **self._template_vars
                )
            except jinja2.TemplateError as e:
                raise TokenizerError(f"chat template rejected the messages: {e}; fix the roles or content") from e
            return self._encode(text, special=True)
        if _LLAMA3_CHAT_TOKENS <= self._allowed_special:
            return self._encode_llama3_chat(messages)
        return self.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:")

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Raw bytes of `ids`, for streaming text whose UTF-8 characters span tokens."""
        if ids and not 0 <= min(ids) <= max(ids) < self.n_words:
            bad = next(i for i in ids if not 0 <= i < self.n_words)
            raise TokenizerError(f"token id {bad} is outside the vocabulary of {self.n_words}; check the model")
        return self._enc.decode_bytes(ids if self._ranks is None else [self._ranks[i] for i in ids])

    def _encode_llama3_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Meta's Llama 3 dialog format; roles and content are plain text between control tokens."""
        sp, newlines = self.special_tokens, self.encode("\n\n", bos=False)

        def header(role: str) -> list[int]:
            role = "ipython" if role == "tool" else role  # Meta's name for tool output
            return [sp["<|start_header_id|>"], *self.encode(role, bos=False), sp["<|end_header_id|>"], *newlines]

        ids = [sp["<|begin_of_text|>"]]
        for m in messages:
            ids += header(m["role"]) + self.encode(m["content"].strip(), bos=False) + [sp["<|eot_id|>"]]
        return ids + header("assistant")

    def _encode(self, text: str, special: bool) -> list[int]:
        """Model ids of `text`, reading special-token names as special tokens only if `special`."""
        ranks = []
        for piece in _chunks(text):
            if special:
                ranks += self._enc.encode(piece, allowed_special=self._allowed_special, disallowed_special=())
            else:
                ranks += self._enc.encode_ordinary(piece)  # = encode(allowed_special=set(), disallowed_special=())
        if ranks and max(ranks) >= self._n_ranks:
            ranks = [r for r in ranks if r < self._n_ranks]
        return ranks if self._ids is None else [self._ids[r] for r in ranks]


def _chunks(text: str):
    """Cut `text` into pieces tiktoken can take: at most 400k chars, no (non-)whitespace run over 25k chars."""
    for start in range(0, len(text), _MAX_CHUNK_CHARS):
        block = text[start : start + _MAX_CHUNK_CHARS]
        cut = 0
        if len(block) > _MAX_RUN_CHARS:
            for run in re.finditer(r"\s+|\S+", block):
                for i in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
                    yield block[cut:i]
                    cut = i
        yield block[cut:]


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' tojson filter: unlike jinja's, it does not HTML-escape."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile a HF chat template in the environment transformers renders it in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}; fix or remove the template") from e


# ---------------------------------------------------------------- Llama 3 (Meta tokenizer.model)


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
        _encoding(LLAMA3_PATTERN, ranks, special_ids, source=str(path)),
        len(ranks) + len(specials),
        bos_id=special_ids["<|begin_of_text|>"],
        eos_id=special_ids["<|end_of_text|>"],
        add_bos=True,
        stop_ids={special_ids[s] for s in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")},
    )


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken ranks file (tiktoken's loader caches local files in /tmp by path and goes stale)."""
    hint = "pass Meta's Llama 3 tokenizer.model"
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


def _encoding(pattern: str, ranks: dict[bytes, int], specials: dict[str, int], source: str) -> tiktoken.Encoding:
    """tiktoken.Encoding, with its complaints about the vocab turned into TokenizerError."""
    try:
        return tiktoken.Encoding(Path(source).name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    except ValueError as e:
        raise TokenizerError(f"{source}: tiktoken rejects the vocab ({e}); check the tokenizer file") from None


# ---------------------------------------------------------------- byte-level BPE (GGUF, HF tokenizer.json)


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
    encoding = _encoding(pattern, ranks, {s: rank_of[i] for s, i in specials.items()}, source)
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
