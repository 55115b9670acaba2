"""Renders a model's chat template in Jinja's immutable sandbox.

A chat template ships with the model, so it is untrusted code. It is rendered only in
:class:`jinja2.sandbox.ImmutableSandboxedEnvironment` (no attribute tricks, no mutation of
the objects it is given), never through ``tokenizer.apply_chat_template``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from bastion.runtimes.base import RuntimeInputError
from bastion.wire.protocol import ChatMessage

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class ChatTemplateError(Exception):
    """Raised by a template through `raise_exception`; its text never reaches the client."""


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    # Hugging Face templates expect `tojson` to keep non-ASCII text as is.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def special_token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def find_template_source(
    template_file: bytes | None, tokenizer_config: Mapping[str, Any]
) -> str | None:
    """The chat template text: chat_template.jinja's bytes, else tokenizer_config's
    chat_template."""
    if template_file is not None:
        return template_file.decode("utf-8")
    source = tokenizer_config.get("chat_template")
    if isinstance(source, str):
        return source
    if isinstance(source, list):
        # Several named templates: the one called "default" is the chat template.
        for entry in source:
            if isinstance(entry, Mapping) and entry.get("name") == "default":
                template = entry.get("template")
                return template if isinstance(template, str) else None
    return None


class ChatTemplate:
    """A compiled chat template; `render` turns messages into the prompt text."""

    def __init__(self, source: str, bos_token: str | None, eos_token: str | None) -> None:
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, autoescape=False
        )
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"the chat template does not compile (line {exc.lineno})") from exc
        self._bos_token = bos_token or ""
        self._eos_token = eos_token or ""

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """Render `messages` with the generation prompt; RuntimeInputError if it refuses."""
        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
            )
        except ChatTemplateError:
            # The template's own message may quote the conversation, so it is not passed on.
            raise RuntimeInputError(
                "The model's chat template rejected these messages (check the roles and "
                "their order).",
                code="invalid_messages",
            ) from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise RuntimeInputError(
                f"The model's chat template failed to render ({type(exc).__name__}).",
                code="invalid_messages",
            ) from None
