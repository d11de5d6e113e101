"""Structured outputs: what a request's text must match (a JSON schema, any JSON object, a regex, one of a list of
choices, or a grammar), as vLLM's ``StructuredOutputsParams`` names it. Enforced token by token by llguidance
(``engine.structured``): a token that would break the constraint is never drawn.

Torch-free (the router checks a request's constraint before routing it): this module turns the parameters into an
llguidance grammar and validates it. ``grammar`` is llguidance's Lark dialect; a GBNF grammar (``root ::= ...``,
as llama.cpp and xgrammar take) is converted. JSON is generated compact (no free whitespace), so a constrained
answer is not padded out to ``max_tokens`` with blanks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

MAX_SPEC_CHARS = 64 * 1024  # a schema, regex or grammar
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1024
KINDS = ("json", "json_object", "regex", "choice", "grammar")


def _llguidance():
    try:
        import llguidance
    except ImportError:  # a dependency of pdserve: missing only on a machine that installed without it
        raise ValueError("structured_outputs: this installation lacks llguidance (pip install llguidance)") from None
    return llguidance


@dataclass(frozen=True, slots=True)
class StructuredOutputsParams:
    """Exactly one of: ``json`` (a JSON schema, as a dict or JSON text), ``json_object`` (True: any JSON object),
    ``regex``, ``choice`` (the text is one of these strings) or ``grammar`` (Lark, or GBNF). Raises ValueError
    naming the field."""

    json: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs: set exactly one of {', '.join(KINDS)}"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.json is not None:
            if isinstance(self.json, dict):
                object.__setattr__(self, "json", json.dumps(self.json))  # key order kept: it is the output's
            elif not isinstance(self.json, str):
                raise ValueError(f"structured_outputs.json: expected a JSON schema (an object or its text), got "
                                 f"{type(self.json).__name__}")
        if self.json_object not in (None, True, False):
            raise ValueError(f"structured_outputs.json_object: must be true or false, got {self.json_object!r}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not isinstance(self.choice, list | tuple):
                raise ValueError("structured_outputs.choice: expected a list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
            if not 1 <= len(self.choice) <= MAX_CHOICES:
                raise ValueError(f"structured_outputs.choice: 1 to {MAX_CHOICES} choices, got {len(self.choice)}")
            for c in self.choice:
                if not isinstance(c, str) or not c or len(c) > MAX_CHOICE_CHARS:
                    raise ValueError(f"structured_outputs.choice: each choice must be a non-empty string of at most "
                                     f"{MAX_CHOICE_CHARS} characters, got {c!r:.60}")
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or len(value) > MAX_SPEC_CHARS):
                raise ValueError(f"structured_outputs.{name}: must be a non-empty string of at most {MAX_SPEC_CHARS} "
                                 f"characters")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def grammar_text(self) -> str:
        """The llguidance grammar; raises ValueError naming the field if it is not valid."""
        return _grammar(self.kind, self.spec)

    @property
    def spec(self) -> str:
        """The constraint as one string (choices as a JSON list): what ``_grammar`` caches on."""
        kind = self.kind
        if kind == "json_object":
            return ""
        if kind == "choice":
            return json.dumps(list(self.choice))
        return getattr(self, kind)


@lru_cache(maxsize=256)
def _grammar(kind: str, spec: str) -> str:
    llg = _llguidance()
    matcher = llg.LLMatcher
    if kind in ("json", "json_object"):
        schema = '{"type": "object"}' if kind == "json_object" else spec
        try:
            grammar = matcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except ValueError as e:
            raise ValueError(f"structured_outputs.json: not a JSON object: {e}") from None
    elif kind == "regex":
        grammar = matcher.grammar_from_regex(spec)
    elif kind == "choice":
        grammar = matcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(spec)))
    else:
        lark = spec
        if "::=" in spec:  # GBNF
            from llguidance.gbnf_to_lark import gbnf_to_lark

            try:
                lark = gbnf_to_lark(spec)
            except Exception as e:  # noqa: BLE001 - the converter raises its own error types
                raise ValueError(f"structured_outputs.grammar: not a valid GBNF grammar: {e}") from None
        grammar = matcher.grammar_from_lark(lark)
    error = matcher.validate_grammar(grammar)
    if error:
        field = "json" if kind == "json_object" else kind
        raise ValueError(f"structured_outputs.{field}: {' '.join(error.split())[:300]}")
    return grammar
