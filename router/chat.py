"""Chat messages -> prompt text: the model's chat template, rendered the way transformers renders it.

The router stays torch-free, so it does not call ``apply_chat_template``; it renders the same Jinja template
in the same sandboxed environment HF builds (``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols``
extension, ``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape HTML, and the tokenizer's
special tokens such as ``bos_token`` / ``eos_token`` as variables) with ``add_generation_prompt=True``. The
rendered text is then tokenized with ``add_special_tokens=False``, as HF does: the template writes its own
BOS. The template comes from ``tokenizer_config.json`` (``chat_template``: a string, or a list of named
templates of which ``default`` is used) or from ``chat_template.jinja`` beside it.

Only what the router needs to protect itself is checked here (roles, count and size); a template that
refuses a conversation (``raise_exception``) is the client's error, INVALID_ARGUMENT with its message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from pdserve.engine.errors import InvalidRequestError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 1024
MAX_MESSAGES_CHARS = 4 * 1024 * 1024  # all contents together, like the prompt's limit


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def read_chat_template(model_dir: str | Path) -> tuple[str | None, dict[str, str]]:
    """(template source or None, special tokens by name) from a model directory."""
    model_dir = Path(model_dir)
    config: dict = {}
    cfg_file = model_dir / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            config = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            logger.warning("cannot read %s: %s", cfg_file, e)
    specials = {k: t for k, v in config.items() if k.endswith("_token") and (t := _token_text(v)) is not None}
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja_file = model_dir / "chat_template.jinja"
    if not isinstance(template, str) and jinja_file.is_file():
        template = jinja_file.read_text()
    return (template if isinstance(template, str) and template.strip() else None), specials


def _environment():
    """The sandboxed Jinja environment transformers compiles chat templates in (chat_template_utils)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


class ChatTemplate:
    """A compiled chat template with the model's special tokens; ``render`` and ``encode`` one conversation."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        import jinja2

        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat_template: does not compile: {e}") from None
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def load(cls, model_dir: str | Path) -> ChatTemplate | None:
        """The model's template, or None when it has none (or one that does not compile: logged)."""
        source, specials = read_chat_template(model_dir)
        if source is None:
            return None
        try:
            return cls(source, specials)
        except ValueError as e:
            logger.warning("%s: %s; chat messages will be refused", model_dir, e)
            return None

    def render(self, messages: Sequence[dict[str, str]]) -> str:
        import jinja2

        try:
            return self._template.render(messages=list(messages), add_generation_prompt=True,
                                         **self.special_tokens)
        except jinja2.TemplateError as e:  # raise_exception, a sandbox refusal, an undefined being called
            raise InvalidRequestError(f"messages: the chat template refused them: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise InvalidRequestError(f"messages: the chat template failed on them: {e}") from None


def check_messages(messages: Sequence) -> list[dict[str, str]]:
    """``pb.ChatMessage``-like objects -> plain dicts, refusing a bad role or too many / too large."""
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequestError(f"messages: at most {MAX_MESSAGES} messages, got {len(messages)}")
    out, total = [], 0
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidRequestError(f"messages[{i}].role: {m.role!r} is not one of {', '.join(ROLES)}")
        total += len(m.content)
        if total > MAX_MESSAGES_CHARS:
            raise InvalidRequestError(f"messages: contents longer than {MAX_MESSAGES_CHARS} characters in all")
        out.append({"role": m.role, "content": m.content})
    return out


def encode_chat(chat: ChatTemplate | None, messages: Sequence, tokenizer, model: str = "") -> tuple[int, ...]:
    """Checked messages -> the rendered template's token ids (no special tokens added beyond the template's)."""
    plain = check_messages(messages)
    if chat is None:
        name = f"model {model!r}" if model else "the model"
        raise InvalidRequestError(f"messages: {name} has no chat template; send prompt or token_ids instead")
    token_ids = tuple(tokenizer.encode(chat.render(plain), add_special_tokens=False))
    if not token_ids:
        raise InvalidRequestError("messages: the chat template renders them to no tokens")
    return token_ids
