"""Served model names (torch-free): what a worker calls its base model, and the ``NAME=PATH`` flags.

A worker serves one base model under one name (``--served-model-name``; default: ``served_name(model)``), and
the router keeps one prefill pool and one decode pool per name. Adapters (``--lora NAME=PATH``) and routes
share that namespace, so a name may be given once across all three.
"""

from __future__ import annotations

import re
from pathlib import Path

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


def check_name(name: str, field: str = "name") -> str:
    """``name`` if it is a usable model, adapter or route name; else ValueError naming ``field``."""
    if not NAME.match(name or ""):
        raise ValueError(f"{field}: {name[:200]!r} is not a valid name (1-128 of letters, digits and ._:/-, "
                         "starting with a letter or digit)")
    return name


def served_name(model: str) -> str:
    """The default served name of ``model``: a preset's name, a local directory's last component, a hub id as is."""
    path = Path(model)
    if model.startswith((".", "/", "~")) or (path.is_dir() and len(path.parts) > 1):
        return path.expanduser().resolve().name or model
    return model


def parse_named(value: str, field: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (NAME, PATH); a bare ``PATH`` (e.g. a preset name) is named by ``served_name``."""
    name, sep, path = value.partition("=")
    if not sep:
        path = value
        name = served_name(value)
    if not path:
        raise ValueError(f"{field}: expected NAME=PATH, got {value!r}")
    return check_name(name, field), path


def check_unique(names: list[str], field: str) -> None:
    """ValueError naming ``field`` and the first name given twice."""
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ValueError(f"{field}: {dup!r} is given twice")


def parse_named_list(values: list[str] | tuple[str, ...], field: str) -> tuple[tuple[str, str], ...]:
    """Every ``NAME=PATH`` of a repeatable flag, names unique."""
    out = tuple(parse_named(v, field) for v in values)
    check_unique([n for n, _ in out], field)
    return out
