"""The native decode step: ATen ops per generated token per layer (batch 1, counted from outside around
``LLM.generate``), and the graph-readiness of the static decode forward on CPU.

Readiness stands in for CUDA-graph capturability: the static forward reads nothing back from the device (no
``item``/``tolist``/``is_nonzero``/``_local_scalar_dense``), and its op sequence depends only on the shapes
(batch, table width), never on the values: two steps with different tokens, positions, blocks and context
lengths dispatch the very same ops with the very same shapes. That is what a captured graph replays.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.model_runner import BatchItem
from tests.engine.helpers import assert_idle

HOST_READS = {"_local_scalar_dense", "is_nonzero", "item", "equal"}


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.trace: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket).removeprefix("aten.")
        self.ops[name] += 1
        self.trace.append((name, tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
        return out


def ops_per_token_per_layer(llm: LLM, k: int = 16) -> float:
    prompt = list(range(5, 60))

    def count(n: int) -> int:
        with OpLog() as log:
            llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return sum(log.ops.values())

    count(2)  # warm
    return (count(k + 1) - count(1)) / k / llm.engine.runner.geometry.num_layers


# measured: tiny 14.92, tiny-qwen3 16.92 (13 ops per layer, 15 with Qwen3's q/k norm, 6 per step, and the
# persistent buffers of two decode shapes made once in 16 tokens); HF generate on the same models: ~70-87; the
# HF-module engine path: 91 and 107 (ratios 0.164, 0.158)
@pytest.mark.parametrize(("model", "bound"), [("tiny", 15.0), ("tiny-qwen3", 17.0)])
def test_ops_per_generated_token_per_layer(model, bound):
    llm = LLM(model, num_blocks=64)
    assert llm.engine.runner.model_impl == "native"
    measured = ops_per_token_per_layer(llm)
    assert measured <= bound, f"{model}: {measured:.2f} ATen ops per token per layer"
    hf = LLM(model, num_blocks=64, model_impl="hf")
    assert measured <= 0.2 * ops_per_token_per_layer(hf)
    assert_idle(llm.engine)


def test_a_decode_layer_dispatches_twelve_ops():
    """The static decode step of a Llama once the step's buffers exist: 12 ops per layer when the step appends
    to the resident context, 13 when it gathers it afresh; per step the RoPE matrices (2), the embedding, the
    one write of every layer's K/V to the cache, the final norm and the LM head (the sampler's max makes 7)."""
    llm = LLM("tiny", num_blocks=64)
    runner = llm.engine.runner
    blocks = [1, 2, 3]
    runner.execute([BatchItem(list(range(3, 40)), 0, blocks, True)])
    _decode_trace(runner, [BatchItem([17], 37, blocks, True)])  # the first step of a shape makes its buffers
    gather, _ = _decode_trace(runner, [BatchItem([17], 37, blocks, True)])  # not one token further: gathers
    append, _ = _decode_trace(runner, [BatchItem([18], 38, blocks, True)])
    layers = runner.geometry.num_layers
    assert sum(gather.ops.values()) == 13 * layers + 6, gather.ops
    assert gather.ops["index_select"] == gather.ops["scaled_dot_product_attention"] == layers
    assert sum(append.ops.values()) == 12 * layers + 6, append.ops
    assert append.ops["index_put_"] == layers + 1 and "index_select" not in append.ops


def _decode_trace(runner, items):
    with torch.inference_mode(), OpLog() as log:
        logits = runner.execute(items)
    return log, logits


@pytest.mark.parametrize("model", ["tiny", "tiny-mistral", "tiny-qwen3"])
def test_static_decode_reads_nothing_back_and_depends_only_on_shapes(model):
    llm = LLM(model, num_blocks=64)
    runner = llm.engine.runner
    # prefill two sequences so their caches hold something
    runner.execute([BatchItem(list(range(3, 40)), 0, [1, 2, 3], True), BatchItem(list(range(9, 30)), 0, [7, 8], True)])
    a = [BatchItem([17], 37, [1, 2, 3], True), BatchItem([5], 21, [7, 8], True)]
    b = [BatchItem([250], 40, [9, 10, 11], True), BatchItem([6], 33, [12, 13, 14], True)]  # same shapes
    _decode_trace(runner, a)  # the first step of a shape makes its persistent buffers (as graph warm-up does)
    log_a, logits_a = _decode_trace(runner, a)
    log_b, _ = _decode_trace(runner, b)
    assert not HOST_READS & set(log_a.ops), log_a.ops
    assert log_a.trace == log_b.trace
    assert logits_a.shape == (2, runner.geometry.vocab_size)


def test_static_decode_matches_the_general_path():
    """A pure decode step through the static path and through the general (backend) path agree."""
    llm = LLM("tiny-mistral", num_blocks=64)
    runner = llm.engine.runner
    runner.execute([BatchItem(list(range(3, 140)), 0, list(range(1, 10)), True)])  # past the 96-token window
    items = [BatchItem([17], 137, list(range(1, 10)), True)]
    with torch.inference_mode():
        fast = runner.execute(items).clone()
        general = runner.execute(items, layer_hook=lambda layer: None)  # a hook: the general path
    torch.testing.assert_close(fast, general, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_graphs_capture_and_match_eager():
    prompts = [[(7 * i + j) % 300 + 3 for j in range(20 + 13 * i)] for i in range(5)]
    params = SamplingParams(max_tokens=24, temperature=0)
    graphed = LLM("tiny", num_blocks=256, device="cuda", dtype="float32")
    if graphed.engine.runner.native.graphs is None:
        pytest.skip("no CUDA graphs here (triton backend unavailable)")
    eager = LLM("tiny", num_blocks=256, device="cuda", dtype="float32", cuda_graphs=False)
    want = [o.token_ids for o in eager.generate(prompts, params)]
    assert [o.token_ids for o in graphed.generate(prompts, params)] == want
