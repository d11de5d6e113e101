"""The resident decode context of the torch backend on CPU (engine.native.decode): a decode step whose rows are the
previous step's sequences one token further appends the new token to each layer's gathered K/V instead of
gathering the whole context again. On CPU the KV cache is one storage, so the step writes every layer's new K/V
to the paged cache once, after the last layer (``flush``); each layer reads its new token from its context.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine import LLM
from pdserve.engine.model_runner import BatchItem
from tests.engine.test_native_models import check_parity


def _bufs(runner, n: int, width: int):
    return runner.native.buffers.entries[(n, width)]


def _prefill(runner, seqs):
    with torch.inference_mode():
        return runner.execute([BatchItem(toks, 0, blocks, True) for toks, blocks in seqs])


@pytest.mark.parametrize("model", ["tiny", "tiny-mistral", "tiny-qwen3"])
def test_resident_decode_matches_the_general_path(model):
    """Same weights, same tokens: the static path (resident, appending) against the general path step by step,
    through a batch that shrinks and a context that grows past the width of its buffers (both re-gather)."""
    fast, ref = LLM(model, num_blocks=64).engine.runner, LLM(model, num_blocks=64).engine.runner
    lens = [37, 21, 60]
    blocks = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17]]  # held across steps, like a Sequence's
    prompts = [list(range(3 + i, 3 + i + n)) for i, n in enumerate(lens)]
    logits = _prefill(fast, list(zip(prompts, blocks, strict=True)))
    _prefill(ref, list(zip(prompts, blocks, strict=True)))
    rows = [0, 1, 2]
    appended = 0
    for step in range(30):
        if step == 12:
            rows = [0, 2]  # sequence 1 leaves: a new batch shape
        tokens = logits.argmax(-1).tolist()
        items = [BatchItem([tokens[j]], lens[i], blocks[i], True) for j, i in enumerate(rows)]
        with torch.inference_mode():
            logits = fast.execute(items).clone()
            want = ref.execute(items, layer_hook=lambda layer: None)  # a hook: the general path
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
        width = max(lens[i] // 16 + 1 for i in rows)
        bufs = _bufs(fast, len(rows), width)
        assert bufs.resident
        appended += bufs.append
        for i in rows:
            lens[i] += 1
        if step == 11:
            logits = logits[[0, 2]]  # the rows that stay
    assert appended >= 25, appended  # every step but the first of each shape
    assert bufs.flush  # CPU: every layer's K/V reached the paged cache at each step's end, as the general path's
    used = sorted({b for table in blocks for b in table})
    for got, want in zip(fast.native.kv_layers, ref.native.kv_layers, strict=True):
        torch.testing.assert_close(got[used], want[used], rtol=1e-5, atol=1e-5)


def test_append_needs_the_same_sequences_one_token_further():
    runner = LLM("tiny", num_blocks=64).engine.runner
    a, b = [1, 2, 3], [7, 8]
    _prefill(runner, [(list(range(3, 40)), a), (list(range(9, 30)), b)])

    def step(items):
        with torch.inference_mode():
            runner.execute(items)
        return _bufs(runner, len(items), 3).append

    assert not step([BatchItem([5], 37, a, True), BatchItem([6], 21, b, True)])  # a new shape: gathers
    assert step([BatchItem([5], 38, a, True), BatchItem([6], 22, b, True)])
    assert not step([BatchItem([5], 40, a, True), BatchItem([6], 23, b, True)])  # a skipped a position
    assert not step([BatchItem([5], 41, list(a), True), BatchItem([6], 24, b, True)])  # another sequence's table
    assert not step([BatchItem([5], 42, a, True), BatchItem([6], 25, b, True)])  # and back: not the last step's
    assert step([BatchItem([5], 43, a, True), BatchItem([6], 26, b, True)])
    a[1] = 9  # an old block of a changed
    assert not step([BatchItem([5], 44, a, True), BatchItem([6], 27, b, True)])
    assert not step([BatchItem([6], 28, b, True), BatchItem([5], 45, a, True)])  # rows swapped


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3", "tiny-mistral"])
def test_resident_decode_keeps_greedy_parity_with_hf(monkeypatch, preset):
    """Through the engine: its batch items carry each sequence's own block-table list, so steady decode appends."""
    from pdserve.engine.native.executor import NativeExecutor

    appends = []
    forward = NativeExecutor.decode_forward

    def counted(self, bufs):
        appends.append(bufs.append)
        return forward(self, bufs)

    monkeypatch.setattr(NativeExecutor, "decode_forward", counted)
    check_parity(preset, 320)
    assert sum(appends) >= len(appends) // 2, appends
