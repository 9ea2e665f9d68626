"""The Tokenizer: text <-> token ids over a tiktoken Encoding, with the model's special tokens."""

from __future__ import annotations

import re
from pathlib import Path

import tiktoken

from ..errors import TokenizerError
from .chat import LLAMA3_CHAT_TOKENS, compile_chat_template, llama3_chat_ids, render_chat_template

# tiktoken's regex can overflow its stack on huge inputs and long runs; Meta cuts input at these sizes.
_MAX_CHUNK_CHARS = 400_000
_MAX_RUN_CHARS = 25_000


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
            compile_chat_template(self._chat_template)  # fail at load, not at the first chat
        named = {"bos_token": bos_id, "eos_token": eos_id}
        self._template_vars = {k: self.decode([i]) for k, i in named.items() if i is not None}

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's chat template (Jinja source), or None: Meta's Llama 3 headers or plain lines."""
        return self._chat_template

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
            text = render_chat_template(self._chat_template, messages, self._template_vars)
            return self._encode(text, special=True)
        if LLAMA3_CHAT_TOKENS <= self._allowed_special:
            return llama3_chat_ids(messages, self.special_tokens, lambda text: self.encode(text, bos=False))
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


def make_encoding(pattern: str, ranks: dict[bytes, int], specials: dict[str, int], source: str) -> tiktoken.Encoding:
    """tiktoken.Encoding, with its complaints about the vocab turned into TokenizerError."""
    try:
        return tiktoken.Encoding(Path(source).name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    except ValueError as e:
        raise TokenizerError(f"{source}: tiktoken rejects the vocab ({e}); check the tokenizer file") from None
