"""The HTTP spellings of structured outputs -> ``pb.StructuredOutputs``, or a 400 naming the field.

OpenAI's ``response_format`` (``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema": {"schema":
...}}``; ``"text"`` is free text), vLLM's ``structured_outputs`` object (``json``, ``json_object``, ``regex``,
``choice``, ``grammar``) and its older ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``.
At most one may constrain a request. Shapes are checked here; the router checks the schema, regex or grammar
itself, so both APIs refuse the same constraints with the same words.
"""

from __future__ import annotations

import json

from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.gateway.errors import bad_field

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_KINDS = ("json", "json_object", "regex", "choice", "grammar")


def _one(field: str, kind: str, value) -> pb.StructuredOutputs:
    if kind == "json":
        if isinstance(value, dict):
            return pb.StructuredOutputs(json=json.dumps(value))
        if isinstance(value, str):
            return pb.StructuredOutputs(json=value)
        raise bad_field(field, "expected a JSON schema (an object, or its text)")
    if kind == "json_object":
        if not isinstance(value, bool):
            raise bad_field(field, f"expected true or false, got {value!r:.40}")
        return pb.StructuredOutputs(json_object=value)
    if kind == "choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise bad_field(field, "expected a list of strings")
        return pb.StructuredOutputs(choice=pb.Choices(values=value))
    if not isinstance(value, str):
        raise bad_field(field, "expected a string")
    return pb.StructuredOutputs(**{kind: value})


def _response_format(rf) -> pb.StructuredOutputs | None:
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise bad_field("response_format", 'expected an object with a "type"')
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return pb.StructuredOutputs(json_object=True)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise bad_field("response_format.json_schema", 'expected {"name": ..., "schema": {...}}')
        return pb.StructuredOutputs(json=json.dumps(spec["schema"]))
    raise bad_field("response_format.type", f"expected text, json_object or json_schema, got {kind!r:.40}")


def structured_of(body: dict) -> pb.StructuredOutputs | None:
    """The request's one constraint (None: free text)."""
    found: list[tuple[str, pb.StructuredOutputs]] = []
    if body.get("response_format") is not None:
        rf = _response_format(body["response_format"])
        if rf is not None:
            found.append(("response_format", rf))
    for field, kind in _GUIDED.items():
        if body.get(field) is not None:
            found.append((field, _one(field, kind, body[field])))
    so = body.get("structured_outputs")
    if so is not None:
        if not isinstance(so, dict):
            raise bad_field("structured_outputs", "expected an object")
        given = [(k, v) for k, v in so.items() if v is not None and v is not False]
        unknown = [k for k, _ in given if k not in _KINDS]
        if unknown:
            raise bad_field(f"structured_outputs.{unknown[0]}", f"not supported (supported: {', '.join(_KINDS)})")
        if len(given) != 1:
            raise bad_field("structured_outputs", f"set exactly one of {', '.join(_KINDS)}")
        kind, value = given[0]
        found.append((f"structured_outputs.{kind}", _one(f"structured_outputs.{kind}", kind, value)))
    if len(found) > 1:
        raise bad_field(found[1][0], f"conflicts with {found[0][0]}: a request takes one constraint")
    return found[0][1] if found else None
