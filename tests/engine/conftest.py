"""Engine fixtures: offline engines and HF references on the locally built presets, built once per session.

The presets are written to the session's PDSERVE_CACHE_DIR (see tests/conftest.py) on first use; the HF
reference models are loaded from the very same checkpoint directory the engine loaded.
"""

from __future__ import annotations

import pytest
import torch

from pdserve import LLM
from tests.engine.helpers import assert_idle


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread for the engine tests (restored afterwards).

    On the 2-core box the tiny models gain nothing from a second thread, and when anything else runs
    (another test process, a worker) OpenMP's spinning threads make a step ~30x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llm():
    return LLM("tiny", num_blocks=256)


@pytest.fixture(autouse=True)
def _tiny_llm_left_clean(request):
    """Every test that borrows the shared engine must hand it back idle and leak-free."""
    yield
    if "tiny_llm" in request.fixturenames:
        assert_idle(request.getfixturevalue("tiny_llm").engine)
