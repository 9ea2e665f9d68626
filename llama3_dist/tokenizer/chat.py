"""Chat prompts: HF chat templates (jinja2, rendered as transformers renders them) and Meta's Llama 3 headers."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TokenizerError

# The control tokens of Meta's Llama 3 dialog format; a vocab with all of them gets that format by default.
LLAMA3_CHAT_TOKENS = {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' tojson filter: unlike jinja's, it does not HTML-escape."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a HF chat template in the environment transformers renders it in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template does not compile: {e}; fix or remove the template") from e


def render_chat_template(source: str, messages: list[dict[str, str]], variables: dict[str, str]) -> str:
    """The prompt text of `messages`, as transformers' `apply_chat_template(add_generation_prompt=True)` renders it."""
    try:
        return compile_chat_template(source).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=True, **variables
        )
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template rejected the messages: {e}; fix the roles or content") from e


def llama3_chat_ids(
    messages: list[dict[str, str]], special: dict[str, int], encode: Callable[[str], list[int]]
) -> list[int]:
    """Meta's Llama 3 dialog format; roles and content are plain text (`encode`, no BOS) between control tokens."""
    newlines = encode("\n\n")

    def header(role: str) -> list[int]:
        role = "ipython" if role == "tool" else role  # Meta's name for tool output
        return [special["<|start_header_id|>"], *encode(role), special["<|end_header_id|>"], *newlines]

    ids = [special["<|begin_of_text|>"]]
    for m in messages:
        ids += header(m["role"]) + encode(m["content"].strip()) + [special["<|eot_id|>"]]
    return ids + header("assistant")
