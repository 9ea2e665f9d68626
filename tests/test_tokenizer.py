"""Tokenizers against their references: Meta's llama_models for Llama 3, HF tokenizers/transformers for SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import pickle
import random
import sys
import sysconfig
import types
import unicodedata
from pathlib import Path

import gguf
import pytest
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from transformers import PreTrainedTokenizerFast

from llama3_dist.errors import TokenizerError
from llama3_dist.tokenizer import (
    LLAMA3_PATTERN,
    Tokenizer,
    default_llama3_tokenizer_path,
    gguf_tokenizer,
    hf_tokenizer,
    llama3_tokenizer,
)

VARIED_TEXTS = [
    "",
    "hello world",
    "  leading and trailing spaces  ",
    "Tabs\tand\nnewlines\r\n\n\nand   runs of    spaces\n\t \n",
    "Numbers 1 12 123 1234 12345 3.14159 -42 1e10 0x1F 2024-06-01",
    "Contractions: I'm, you're, it's, we've, they'll, he'd, DON'T, I'M",
    "Unicode: naïve café, Ελληνικά, русский, العربية, עברית, हिन्दी, 中文, 日本語, 한국어, ไทย",
    "Emoji 🙂👍🏽👨‍👩‍👧‍👦🇫🇷 and math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√∞",
    "code: def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "special-looking: <|begin_of_text|> <|eot_id|> <|im_start|>user <|im_end|> <|endoftext|>",
    "\u00a0nbsp\u3000ideographic space\u200bzero width\ufeffbom\x00nul\x7fdel",
]


# ---------------------------------------------------------------- Llama 3


@pytest.fixture(scope="module")
def llama3() -> Tokenizer:
    return llama3_tokenizer(default_llama3_tokenizer_path())


@pytest.fixture(scope="module")
def meta_llama3():
    """Meta's reference tokenizer from the llama-models wheel."""
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer(default_llama3_tokenizer_path())


def test_llama3_known_ids(llama3):
    assert llama3.encode("hello world") == [128000, 15339, 1917]
    assert llama3.encode("hello world", bos=False) == [15339, 1917]
    assert llama3.n_words == 128256 and llama3.add_bos
    sp = llama3.special_tokens
    assert (sp["<|begin_of_text|>"], sp["<|end_of_text|>"]) == (128000, 128001)
    assert (sp["<|start_header_id|>"], sp["<|end_header_id|>"]) == (128006, 128007)
    assert (sp["<|eom_id|>"], sp["<|eot_id|>"], sp["<|python_tag|>"]) == (128008, 128009, 128010)
    assert llama3.stop_ids == {128001, 128008, 128009}
    assert (llama3.bos_id, llama3.eos_id) == (128000, 128001)


def test_llama3_matches_meta_reference(llama3, meta_llama3):
    assert llama3.special_tokens == meta_llama3.special_tokens
    # Long runs exercise the 25k-char splitting tiktoken needs, on both sides.
    long_texts = [" " * 60_000 + "x", "y" * 30_000 + " z", ("word " * 50_000)[:130_000]]
    for text in VARIED_TEXTS + long_texts:
        assert llama3.encode(text) == meta_llama3.encode(text, bos=True, eos=False), repr(text[:80])


def test_llama3_special_text_is_plain_text(llama3):
    text = "stop here <|eot_id|> or <|begin_of_text|>"
    ids = llama3.encode(text, bos=False)
    assert not set(ids) & set(llama3.special_tokens.values())
    assert llama3.decode(ids) == text


def test_llama3_round_trip(llama3):
    for text in VARIED_TEXTS:
        assert llama3.decode(llama3.encode(text, bos=False)) == text
        assert b"".join(llama3.decode_bytes([i]) for i in llama3.encode(text, bos=False)) == text.encode()


def _meta_chat_format(monkeypatch):
    """Meta's ChatFormat; it imports PIL for images only, so a stub stands in where Pillow is absent."""
    if importlib.util.find_spec("PIL") is None:
        pil = types.ModuleType("PIL")
        pil.Image = types.ModuleType("PIL.Image")
        pil.Image.Image = type("Image", (), {})
        monkeypatch.setitem(sys.modules, "PIL", pil)
        monkeypatch.setitem(sys.modules, "PIL.Image", pil.Image)
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return ChatFormat(MetaTokenizer(default_llama3_tokenizer_path())), RawMessage


def test_llama3_chat_matches_meta_chat_format(llama3, monkeypatch):
    chat_format, RawMessage = _meta_chat_format(monkeypatch)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say <|eot_id|> twice.\nThen stop."},
        {"role": "assistant", "content": "<|eot_id|> <|eot_id|>"},
        {"role": "user", "content": "Thanks 🙂"},
        {"role": "tool", "content": '{"result": 42}'},
    ]
    expected = chat_format.encode_dialog_prompt([RawMessage(**m) for m in messages]).tokens
    assert llama3.encode_chat(messages) == expected


def test_llama3_chat_structure(llama3):
    sp, newlines = llama3.special_tokens, llama3.encode("\n\n", bos=False)
    assert newlines == [271]
    ids = llama3.encode_chat([{"role": "user", "content": "  Hi <|eot_id|>  "}])
    header = lambda role: [sp["<|start_header_id|>"], *llama3.encode(role, bos=False), sp["<|end_header_id|>"], 271]
    body = llama3.encode("Hi <|eot_id|>", bos=False)  # stripped, plain text
    assert ids == [128000, *header("user"), *body, sp["<|eot_id|>"], *header("assistant")]
    assert ids.count(sp["<|eot_id|>"]) == 1


# ---------------------------------------------------------------- SmolLM2 (GGUF byte-level BPE)


@pytest.fixture(scope="module")
def smollm_reader(smollm2_gguf) -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm(smollm_reader) -> Tokenizer:
    return gguf_tokenizer(smollm_reader)


def _reference(reader: gguf.GGUFReader, *, plain: bool) -> HFTokenizer:
    """HF's original SmolLM2 pipeline over the GGUF's own vocab and merges; `plain` reads specials as text."""
    field = lambda key: reader.fields[key].contents()
    tokens, kinds = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in field("tokenizer.ggml.merges")]
    tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, kinds) if k != 1])
    tok.encode_special_tokens = plain
    return tok


@pytest.fixture(scope="module")
def smollm_hf(smollm_reader) -> PreTrainedTokenizerFast:
    """transformers tokenizer equivalent to the GGUF's, with its chat template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_reference(smollm_reader, plain=False),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        chat_template=smollm_reader.fields["tokenizer.chat_template"].contents(),
    )


# Characters whose UTF-8 bytes SmolLM2's vocab lacks: both sides drop them, but HF may then merge the neighbours
# (see test_smollm2_drops_bytes_missing_from_vocab), so the corpus leaves them out.
_SMOLLM_MISSING = {chr(c) for c in (0x04, 0x06, 0x13, 0x14, 0x16, 0x1D)}


def _corpus_chunks() -> list[str]:
    """About 3.3 MB of deterministic text in chunks of ~10 lines: code, numbers, whitespace, scripts, specials."""
    rng = random.Random(1234)
    parts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):  # code
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(parts[-1])
        if size > 2_000_000:
            break
    parts.append(" ".join(str(rng.randrange(10 ** rng.randrange(1, 25))) for _ in range(20_000)))
    pieces = ["1", " 2", "3.5", ",", "x9", "  7", "\n8", "\t", "a  1", "'s1", "١٢٣", "½", "Ⅻ", "²"]
    parts.append("".join(rng.choice(pieces) for _ in range(20_000)))  # digits next to everything
    blanks = [" ", "  ", "\t", "\n", "\r\n", "\n\n", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u00a0", "x", ".", "1"]
    parts.append("".join(rng.choice(blanks) for _ in range(60_000)))
    ranges = [(0x20, 0x24F), (0x370, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x10A0, 0x11FF), (0x2000, 0x214F),
              (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFF00, 0xFFEF), (0x10000, 0x1007F),
              (0x1D400, 0x1D7FF), (0x1F300, 0x1F64F), (0x1F900, 0x1F9FF)]  # fmt: skip
    chars = [chr(c) for a, b in ranges for c in range(a, b + 1) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    for _ in range(3000):
        length = rng.randrange(1, 200)
        parts.append("".join(rng.choice(chars) if rng.random() < 0.8 else rng.choice(" \n\t") for _ in range(length)))
    words = ["don't", "I'M", "we'll", "they've", "it's", "'s", "''", "you'RE", "'d", "<|im_end|>", "<|endoftext|>",
             "<|im_start|>user", " <|eot_id|>", "<repo_name>", "naïve", "\u200b", "\x00", "\x7f", "\u3000"]  # fmt: skip
    parts.append("".join(rng.choice(words) + rng.choice(["", " ", "  ", "\n", "1"]) for _ in range(30_000)))
    text = "".join(c for c in "".join(parts) if c not in _SMOLLM_MISSING)
    lines = text.splitlines(keepends=True)
    return ["".join(lines[i : i + 10]) for i in range(0, len(lines), 10)]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    chunks = _corpus_chunks()
    assert sum(len(c.encode()) for c in chunks) >= 3_000_000
    return chunks


def _assert_same(chunks: list[str], expected: list[list[int]], got: list[list[int]], tok: Tokenizer) -> None:
    """Fail at the first token where two tokenizations of `chunks` disagree, showing the text around it."""
    for n, (want, have) in enumerate(zip(expected, got, strict=True)):
        if want != have:
            k = next(i for i, (a, b) in enumerate(zip(want + [None], have + [None])) if a != b)
            window = slice(max(0, k - 3), k + 4)
            pytest.fail(
                f"chunk {n} of {len(chunks)}, token {k}, text {tok.decode(want[window])!r}\n"
                f"  reference {want[window]} = {[tok.decode([i]) for i in want[window]]}\n"
                f"  ours      {have[window]} = {[tok.decode([i]) for i in have[window]]}",
                pytrace=False,
            )


def test_smollm2_matches_hf_tokenizers_on_corpus(smollm, smollm_reader, corpus):
    reference = [e.ids for e in _reference(smollm_reader, plain=True).encode_batch(corpus)]
    _assert_same(corpus, reference, [smollm.encode(chunk) for chunk in corpus], smollm)


def test_smollm2_round_trip_on_corpus(smollm, corpus):
    text = "".join(corpus)
    ids = smollm.encode(text)
    assert smollm.decode(ids) == text
    assert b"".join(smollm.decode_bytes(ids[i : i + 7]) for i in range(0, len(ids), 7)) == text.encode()


def test_smollm2_metadata(smollm):
    assert not smollm.add_bos and smollm.encode("Hi") == [26843]  # no BOS on raw prompts
    assert (smollm.bos_id, smollm.eos_id, smollm.n_words) == (1, 2, 49152)
    assert smollm.stop_ids == {smollm.special_tokens["<|im_end|>"], smollm.special_tokens["<|endoftext|>"]}
    assert len(smollm.special_tokens) == 17 and smollm.special_tokens["<|im_start|>"] == 1
    assert smollm.encode("<|im_end|>") != [2]  # plain text


def _apply_chat_template(hf: PreTrainedTokenizerFast, messages: list[dict[str, str]]) -> list[int]:
    return hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]


def test_smollm2_chat_matches_transformers(smollm, smollm_hf):
    hi = [{"role": "user", "content": "Hi"}]
    ids = smollm.encode_chat(hi)
    assert ids == _apply_chat_template(smollm_hf, hi)
    assert "You are a helpful AI assistant named SmolLM" in smollm.decode(ids)  # the default system prompt
    chat = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?\n"},
    ]
    assert smollm.encode_chat(chat) == _apply_chat_template(smollm_hf, chat)


def test_tokenizers_pickle(llama3, smollm):
    """Ranks may receive a tokenizer through pickling (spawned processes)."""
    chat = [{"role": "user", "content": "Hi 42"}]
    for tok in (llama3, smollm):
        copy = pickle.loads(pickle.dumps(tok))
        assert copy.encode("Hi 42") == tok.encode("Hi 42") and copy.encode_chat(chat) == tok.encode_chat(chat)


def test_smollm2_drops_bytes_missing_from_vocab(smollm, smollm_reader):
    reference = _reference(smollm_reader, plain=True)
    for text in ["a\x04b", "\x04", "x \x1d y", "\U00040000"]:  # missing char in a piece of its own: same as HF
        assert smollm.encode(text) == reference.encode(text).ids, repr(text)
    # Inside one piece HF merges across the dropped byte ("!!"); here it still splits the piece, as in llama.cpp.
    assert smollm.encode("!\x04!") == smollm.encode("!") * 2


# ---------------------------------------------------------------- Hugging Face directories


def test_hf_dir_matches_gguf(smollm, smollm_hf, corpus, tmp_path):
    smollm_hf.save_pretrained(tmp_path)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    tok = hf_tokenizer(tmp_path)
    sample = corpus[::20]
    _assert_same(sample, [smollm.encode(c) for c in sample], [tok.encode(c) for c in sample], tok)
    assert tok.special_tokens == smollm.special_tokens and tok.stop_ids == smollm.stop_ids
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.n_words) == (1, 2, False, 49152)
    chat = [{"role": "user", "content": "Hi"}]
    assert tok.encode_chat(chat) == smollm.encode_chat(chat)


# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_hf_dir_llama3_matches_meta(llama3, corpus, tmp_path, monkeypatch):
    """A Llama 3 tokenizer.json as transformers converts it from tokenizer.model (Split regex, BOS processor)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's loader would otherwise copy the file into /tmp
    path = str(default_llama3_tokenizer_path())
    reference = TikTokenConverter(vocab_file=path, extra_special_tokens=list(llama3.special_tokens)).converted()
    bos = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 128000)])
    reference.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), bos])
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_CHAT_TEMPLATE}
    tok = hf_tokenizer(_write_hf_dir(tmp_path / "llama3", reference, config))
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.add_bos) == (128256, 128000, 128009, True)
    assert tok.special_tokens == llama3.special_tokens and tok.stop_ids == llama3.stop_ids
    reference.encode_special_tokens = True
    sample = VARIED_TEXTS + corpus[::10]
    _assert_same(sample, [e.ids for e in reference.encode_batch(sample)], [tok.encode(c) for c in sample], tok)
    _assert_same(sample, [llama3.encode(c) for c in sample], [tok.encode(c) for c in sample], tok)
    chat = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi there"}]
    assert tok.encode_chat(chat) == llama3.encode_chat(chat)


def _write_hf_dir(directory: Path, tok: HFTokenizer, config: dict) -> Path:
    directory.mkdir(exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_hf_dir_ids_out_of_merge_order(smollm_reader, corpus, tmp_path):
    """A vocab whose ids do not grow in merge order needs the rank -> id map."""
    field = lambda key: smollm_reader.fields[key].contents()
    tokens = field("tokenizer.ggml.tokens")
    shuffled = list(range(17, len(tokens)))
    random.Random(0).shuffle(shuffled)
    vocab = {t: i for t, i in zip(tokens, [*range(17), *shuffled])}
    reference = HFTokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in field("tokenizer.ggml.merges")]))
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    reference.decoder = decoders.ByteLevel()
    reference.add_special_tokens([AddedToken(t, special=True) for t in tokens[:17]])
    reference.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    tok = hf_tokenizer(_write_hf_dir(tmp_path / "shuffled", reference, {"bos_token": "<|im_start|>"}))
    assert tok.add_bos and tok.bos_id == 1
    reference.encode_special_tokens = True
    sample = corpus[::10]
    expected = [e.ids for e in reference.encode_batch(sample)]
    _assert_same(sample, expected, [tok.encode(c) for c in sample], tok)
    assert all(tok.decode(ids[1:]) == c for ids, c in zip(expected, sample))


def test_hf_dir_split_regex_pre_tokenizer(smollm_reader, corpus, tmp_path):
    """Llama 3 style tokenizer.json: Split(regex) + ByteLevel(use_regex=False)."""
    reference = _reference(smollm_reader, plain=True)
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(pattern=Regex(LLAMA3_PATTERN), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )  # fmt: skip
    tok = hf_tokenizer(_write_hf_dir(tmp_path / "split", reference, {}))
    sample = corpus[::10]
    _assert_same(sample, [e.ids for e in reference.encode_batch(sample)], [tok.encode(c) for c in sample], tok)


# ---------------------------------------------------------------- bad input


def _one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and message
    return message


def test_missing_or_garbage_tokenizer_model(tmp_path):
    with pytest.raises(TokenizerError) as e:
        llama3_tokenizer(tmp_path / "nope.model")
    assert "nope.model" in _one_line(e)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    with pytest.raises(TokenizerError) as e:
        llama3_tokenizer(garbage)
    assert "garbage.model" in _one_line(e) and "tokenizer.model" in _one_line(e)
    garbage.write_text("aGVsbG8= 0\nnot a line\n")
    with pytest.raises(TokenizerError, match=r"garbage.model:2 is not"):
        llama3_tokenizer(garbage)
    garbage.write_text("aGVsbG8= 0\n")
    with pytest.raises(TokenizerError, match="256 bytes"):
        llama3_tokenizer(garbage)
    with pytest.raises(TokenizerError):
        llama3_tokenizer(tmp_path)  # a directory


def _write_tiny_gguf(path: Path, model: str = "gpt2", pre: str = "gpt-2") -> Path:
    """A GGUF holding only a byte-level vocab: 256 bytes, merges to "hi" and " hi", two control tokens."""
    table = _gpt2_chars()
    tokens = [table[b] for b in range(256)] + ["hi", "\u0120hi", "<|im_start|>", "<|im_end|>"]
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 258 + [3, 3])
    writer.add_token_merges(["h i", "\u0120 hi"])
    writer.add_bos_token_id(258)
    writer.add_eos_token_id(259)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gpt2_chars() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (written out here so the test does not trust the module's)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in printable)})
    return table


def test_tiny_gguf_and_unsupported_gguf(tmp_path):
    tok = gguf_tokenizer(gguf.GGUFReader(_write_tiny_gguf(tmp_path / "ok.gguf")))
    assert tok.encode("hi hi!") == [256, 257, 33] and not tok.add_bos and tok.stop_ids == {259}
    assert tok.encode_chat([{"role": "user", "content": "hi"}])[:4] == [117, 115, 101, 114]  # no template: "user: "
    assert gguf_tokenizer(gguf.GGUFReader(_write_tiny_gguf(tmp_path / "l3.gguf", pre="llama-bpe"))).add_bos
    with pytest.raises(TokenizerError) as e:
        gguf_tokenizer(gguf.GGUFReader(_write_tiny_gguf(tmp_path / "pre.gguf", pre="weird-pre")))
    assert "'weird-pre'" in _one_line(e) and "smollm" in _one_line(e)
    with pytest.raises(TokenizerError) as e:
        gguf_tokenizer(gguf.GGUFReader(_write_tiny_gguf(tmp_path / "spm.gguf", model="llama")))
    assert "'llama'" in _one_line(e) and "gpt2" in _one_line(e)


def test_unsupported_hf_dir(smollm_reader, tmp_path):
    with pytest.raises(TokenizerError) as e:
        hf_tokenizer(tmp_path / "missing")
    assert "tokenizer.json" in _one_line(e)
    reference = _reference(smollm_reader, plain=False)
    reference.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(TokenizerError) as e:
        hf_tokenizer(_write_hf_dir(tmp_path / "metaspace", reference, {}))
    assert "Metaspace" in _one_line(e)
    wordpiece = HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(TokenizerError, match="'WordPiece' is not byte-level BPE"):
        hf_tokenizer(_write_hf_dir(tmp_path / "wordpiece", wordpiece, {}))


def test_chat_template_errors_are_one_line(smollm_reader, tmp_path):
    reference = _reference(smollm_reader, plain=False)
    config = {"chat_template": "{{ raise_exception('roles must alternate') }}"}
    tok = hf_tokenizer(_write_hf_dir(tmp_path / "raises", reference, config))
    with pytest.raises(TokenizerError, match="roles must alternate"):
        tok.encode_chat([{"role": "user", "content": "Hi"}])
    with pytest.raises(TokenizerError, match="does not compile"):
        hf_tokenizer(_write_hf_dir(tmp_path / "broken", reference, {"chat_template": "{% for %}"}))


def test_decode_rejects_unknown_ids(smollm):
    with pytest.raises(TokenizerError, match="49152"):
        smollm.decode([5, 49152])
