"""A model directory's chat template, as Hugging Face tokenizers define it: Jinja source in tokenizer_config.json's
`chat_template` (a string, or a list of named templates of which "default" is used) or in a chat_template.jinja
file, rendered with `messages`, `add_generation_prompt`, `bos_token` and `eos_token`. Rendering runs in Jinja's
sandbox: a template is data from a model directory, not code to trust."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.api.errors import APIError

CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = _tojson  # Jinja's own escapes <, > and & for HTML; templates want plain JSON
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(source)  # raises jinja2.TemplateSyntaxError
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def load(cls, model_dir: str | Path | None) -> "ChatTemplate | None":
        """The directory's template, or None when it has none; ValueError when it has one that does not load."""
        if model_dir is None:
            return None
        model_dir = Path(model_dir)
        config = {}
        if (model_dir / CONFIG).is_file():
            try:
                config = json.loads((model_dir / CONFIG).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(f"{CONFIG} is not readable JSON: {exc}") from None
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one is for chat
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"),
                          None)
        if source is None and (model_dir / TEMPLATE_FILE).is_file():
            source = (model_dir / TEMPLATE_FILE).read_text()
        if source is None:
            return None
        if not isinstance(source, str):
            raise ValueError(f"{CONFIG}'s chat_template is neither text nor a list of named templates")
        try:
            return cls(source, _token(config.get("bos_token")), _token(config.get("eos_token")))
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template does not compile: {exc}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateRefused as exc:  # the template's own check of the messages (roles out of order, ...)
            raise APIError(422, "invalid_messages", f"the model's chat template refused the messages: {exc}",
                           "messages") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise APIError(422, "invalid_messages", f"the model's chat template failed on these messages: "
                           f"{type(exc).__name__}: {exc}", "messages") from None


class TemplateRefused(Exception):
    pass


def _raise(message: str):
    raise TemplateRefused(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token(value) -> str:
    """A special token as tokenizer_config.json writes it: text, or {"content": text, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""
