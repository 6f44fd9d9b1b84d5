"""The export's chat template, rendered with jinja2 as transformers' apply_chat_template renders
it (same sandbox, globals and filters), without transformers.

Where the template comes from (as transformers reads a tokenizer folder): chat_template.jinja if
the export has it, else tokenizer_config.json's "chat_template" (a string, or a list of named
templates of which "default" is used). The export copies both files from the checkpoint and
seals them in its manifest. The special tokens the template sees (bos_token, eos_token, ...) are
tokenizer_config.json's.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipo_graphs.errors import PipoUserError

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(PipoUserError):
    """The messages cannot be rendered (the template raised, or a message is malformed)."""


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tag): the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace refusing underscore attributes (as transformers' TemplateNamespace)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with _")


class _Dict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_Dict(), namespace=_Namespace)
    return env


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with."""

    def __init__(self, source: str, special_tokens: dict[str, str]):
        try:
            self.template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise PipoUserError(f"the export's chat template does not parse: {exc}") from None
        self.special_tokens = special_tokens

    @classmethod
    def load(cls, folder: str | Path) -> "ChatTemplate | None":
        """The folder's chat template, or None when it has none."""
        folder = Path(folder)
        config = {}
        if (folder / TOKENIZER_CONFIG).is_file():
            try:
                config = json.loads((folder / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise PipoUserError(f"{folder / TOKENIZER_CONFIG}: not JSON ({exc})") from None
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates
            source = {t.get("name"): t.get("template") for t in source
                      if isinstance(t, dict)}.get("default")
        if (folder / TEMPLATE_FILE).is_file():
            source = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
        if not isinstance(source, str):
            return None
        special = {k: _token_text(config.get(k)) for k in SPECIAL_TOKENS}
        return cls(source, {k: v for k, v in special.items() if v is not None})

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               **kwargs) -> str:
        """The prompt text of a conversation. kwargs (chat_template_kwargs, e.g.
        enable_thinking) reach the template and override the special tokens."""
        messages = [_message(m, i) for i, m in enumerate(messages)]
        try:
            return self.template.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt,
                                        **{**self.special_tokens, **kwargs})
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError,
                IndexError) as exc:  # a template that fails on these messages
            raise ChatTemplateError(f"the chat template refused the messages: {exc}") from None


def _message(message: dict, index: int) -> dict:
    """A message as the template sees it: None values dropped (as transformers does), text
    content parts joined into one string."""
    if not isinstance(message.get("role"), str):
        raise ChatTemplateError(f"messages[{index}] needs a string 'role'")
    out = {k: v for k, v in message.items() if v is not None}
    content = out.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ChatTemplateError(f"messages[{index}].content: only text parts "
                                        "({'type': 'text', 'text': ...}) are supported")
            parts.append(part["text"])
        out["content"] = "\n".join(parts)
    elif content is not None and not isinstance(content, str):
        raise ChatTemplateError(f"messages[{index}].content must be a string or a list of "
                                "text parts")
    reasoning = next((out[k] for k in REASONING_FIELDS if k in out), None)
    if reasoning is not None:  # the names templates read a message's reasoning under
        out = {"thinking": reasoning, **out, "reasoning_content": reasoning}
    return out
