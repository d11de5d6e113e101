"""Engine fixtures: offline engines on the locally built presets, built once per session."""

from __future__ import annotations

import pytest

from engine import LLM


@pytest.fixture(scope="session")
def tiny_llm():
    return LLM("tiny", num_blocks=256)
