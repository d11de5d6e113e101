"""Models shipped inside the package (``tiny-chat``) and the script that trains them."""

from __future__ import annotations

from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent
# preset name -> directory (beside this file) holding an HF-format checkpoint
SHIPPED: dict[str, str] = {"tiny-chat": "tiny-chat"}


def shipped_path(name: str) -> Path:
    """The directory of shipped preset ``name``; ``ValueError`` if its files are missing (a broken install)."""
    path = SHIPPED_DIR / SHIPPED[name]
    if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
        raise ValueError(f"model: preset {name!r} should ship in {path}, but its files are missing")
    return path
