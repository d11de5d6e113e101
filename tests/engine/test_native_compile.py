"""``compile=True`` (``--compile``): the native model's dense regions under torch.compile with fullgraph=True
(a graph break is an error), compiled at start-up, shape-generic, and equal to the eager model."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from pdserve.engine import LLM, SamplingParams
from pdserve.engine.model_runner import BatchItem

PROMPTS = [list(range(5, 40)), list(range(9, 60)), list(range(3, 150))]


@pytest.mark.parametrize("model", ["tiny", "tiny-qwen3", "tiny-qwen2"])  # plain, q/k norm, QKV biases
def test_compiled_prefill_matches_eager_and_never_recompiles(model):
    eager, compiled = LLM(model, num_blocks=64), LLM(model, num_blocks=64, compile=True)
    assert compiled.engine.runner.native.compiled is not None and eager.engine.runner.native.compiled is None
    items = [BatchItem(p, 0, list(range(1 + 10 * i, 11 + 10 * i)), True) for i, p in enumerate(PROMPTS)]
    regions, calls = compiled.engine.runner.native.compiled, []
    for name in ("attention_input", "mlp"):
        fn = getattr(regions, name)
        setattr(regions, name, lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a))
    frames = counters["frames"]["ok"]
    with torch.inference_mode():
        want, got = eager.engine.runner.execute(items), compiled.engine.runner.execute(items)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    layers = compiled.engine.runner.geometry.num_layers
    assert calls.count("attention_input") == calls.count("mlp") == layers  # every layer of the step, compiled
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert [o.token_ids for o in compiled.generate(PROMPTS, sp)] == [o.token_ids for o in eager.generate(PROMPTS, sp)]
    assert counters["frames"]["ok"] == frames  # the start-up warm-up compiled every shape these steps needed


def test_compile_needs_the_native_implementation():
    with pytest.raises(ValueError, match="compile: needs the native model implementation"):
        LLM("tiny", model_impl="hf", compile=True)


def test_compiled_engine_serves_adapters_and_the_base_alike(tmp_path):
    """A step that runs an adapter takes the eager path (its deltas go between the projection and RoPE); base-only
    steps run compiled: both give what the uncompiled engine gives."""
    from tests.engine.lora_helpers import make_adapter

    path = LLM("tiny", num_blocks=8).engine.runner.model_path
    adapter = make_adapter(path, tmp_path / "ad", rank=8, seed=3)
    kw = dict(num_blocks=128, enable_lora=True, lora_modules=[("ad", adapter)])
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    loras = ["ad", None, "ad"]
    want = [o.token_ids for o in LLM("tiny", **kw).generate(PROMPTS, sp, lora_name=loras)]
    compiled = LLM("tiny", compile=True, **kw)
    assert [o.token_ids for o in compiled.generate(PROMPTS, sp, lora_name=loras)] == want
    assert [o.token_ids for o in compiled.generate(PROMPTS, sp)] == [
        o.token_ids for o in LLM("tiny", **kw).generate(PROMPTS, sp)]
