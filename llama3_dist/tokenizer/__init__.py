"""Text <-> token ids for Llama 3 (Meta tokenizer.model), GGUF and Hugging Face byte-level BPE, all on tiktoken.

base.py: the Tokenizer; chat.py: chat templates and Llama 3 headers; llama3.py: Meta's tokenizer.model;
bpe.py: GGUF / HF tokenizer.json byte-level BPE.
"""

from .base import Tokenizer
from .bpe import GPT2_PATTERN, SMOLLM_PATTERN, gguf_tokenizer, hf_tokenizer
from .llama3 import LLAMA3_PATTERN, default_llama3_tokenizer_path, llama3_tokenizer

__all__ = [
    "GPT2_PATTERN",
    "LLAMA3_PATTERN",
    "SMOLLM_PATTERN",
    "Tokenizer",
    "default_llama3_tokenizer_path",
    "gguf_tokenizer",
    "hf_tokenizer",
    "llama3_tokenizer",
]
