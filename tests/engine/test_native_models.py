"""Native models (engine.native) against transformers: greedy parity with HF ``generate`` in float32 on CPU for
every preset and for local random checkpoints covering MHA, GQA ratios, tied heads, biases, Qwen3 q/k norm with
odd head sizes, each RoPE scaling type, sliding windows shorter than the prompt (all layers or some) and sharded
safetensors; model_impl resolution; weights that round-trip through HF names.
"""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.engine import LLM, EngineConfig, SamplingParams
from pdserve.engine.native import resolve_model_impl
from tests.engine.helpers import assert_idle, hf_greedy, hf_model
from tests.engine.native_checkpoints import CHECKPOINTS, build_checkpoint

MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


def prompts(seed: int, vocab: int, n: int = 6, max_len: int = 120) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, max_len] + [rng.randint(2, max_len) for _ in range(n - 2)]
    return [[rng.randrange(3, vocab) for _ in range(k)] for k in lengths]


def check_parity(model: str, vocab: int, **kw) -> LLM:
    llm = LLM(model, num_blocks=128, model_impl="native", max_num_batched_tokens=97, **kw)
    assert llm.engine.runner.model_impl == "native"
    batch = prompts(len(model), vocab)
    expected = hf_greedy(llm.engine.runner.model_path, batch, MAX_TOKENS)
    outs = llm.generate(batch, GREEDY)
    for i, (o, want) in enumerate(zip(outs, expected, strict=True)):
        assert o.token_ids == want, f"{model} prompt {i} (len {len(batch[i])}): {o.token_ids} != {want}"
    assert_idle(llm.engine)
    return llm


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"])
def test_presets_match_hf(preset):
    check_parity(preset, 320)


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_checkpoints_match_hf(name):
    check_parity(build_checkpoint(name), 300)


def test_sharded_checkpoint_loads_every_shard():
    from pdserve.engine.native.weights import safetensors_files

    path = build_checkpoint("llama-sharded")
    assert len(safetensors_files(path)) > 3
    llm = LLM(path, num_blocks=16, model_impl="native")
    ref = hf_model(path).state_dict()
    mine = llm.engine.runner.model.state_dict()
    assert sorted(mine) == sorted(k for k in ref if "rotary" not in k)
    for name, t in mine.items():
        assert torch.equal(t, ref[name]), name


def test_state_dict_round_trips_through_hf_names():
    """Weights move between the native model and transformers' class unchanged (benches rely on it)."""
    a = LLM("tiny-qwen3", num_blocks=16, model_impl="native")
    b = LLM("tiny-qwen3", num_blocks=16, model_impl="native", load_format="dummy")
    b.engine.runner.model.load_state_dict(a.engine.runner.model.state_dict())
    batch = prompts(3, 320, n=3)
    assert [o.token_ids for o in a.generate(batch, GREEDY)] == [o.token_ids for o in b.generate(batch, GREEDY)]


def test_model_impl_resolution():
    from transformers import GPT2Config, LlamaConfig

    assert resolve_model_impl("auto", LlamaConfig()) == "native"
    assert resolve_model_impl("hf", LlamaConfig()) == "hf"
    assert resolve_model_impl("auto", GPT2Config()) == "hf"
    with pytest.raises(ValueError, match="model_impl"):
        resolve_model_impl("native", GPT2Config())
    dynamic = LlamaConfig(rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0))
    assert resolve_model_impl("auto", dynamic) == "hf"
    with pytest.raises(ValueError, match="model_impl"):
        EngineConfig(model_impl="fast")
    with pytest.raises(ValueError, match="cuda_graphs"):
        EngineConfig(cuda_graphs="on")


def test_hf_impl_still_runs_and_agrees():
    batch = prompts(5, 320, n=4)
    hf = LLM("tiny", num_blocks=64, model_impl="hf")
    assert hf.engine.runner.model_impl == "hf" and hf.engine.runner.native is None
    native = LLM("tiny", num_blocks=64)
    assert native.engine.runner.model_impl == "native"
    assert [o.token_ids for o in hf.generate(batch, GREEDY)] == [o.token_ids for o in native.generate(batch, GREEDY)]


def test_dummy_presets_and_bf16_run():
    llm = LLM("tiny", num_blocks=64, load_format="dummy", dtype="bfloat16")
    model = llm.engine.runner.model
    assert model.dtype == torch.bfloat16 and llm.engine.runner.kv.layers[0].dtype == torch.bfloat16
    outs = llm.generate(prompts(9, 320, n=3), GREEDY)
    assert all(len(o.token_ids) == MAX_TOKENS or o.finish_reason == "stop" for o in outs)
    assert_idle(llm.engine)


def test_layer_hook_runs_once_per_layer_after_its_kv_is_written():
    llm = LLM("tiny-qwen3", num_blocks=64)
    runner = llm.engine.runner
    from pdserve.engine.model_runner import BatchItem

    calls = []
    block_ids = [3, 4]

    def hook(layer):  # the KV of this layer's new tokens is in the cache already
        calls.append((layer, runner.kv.layers[layer][3, 0, :5].abs().sum().item() > 0))

    runner.execute([BatchItem(list(range(5, 10)), 0, block_ids, True)], layer_hook=hook)
    runner.execute([BatchItem([11], 5, block_ids, True)], layer_hook=hook)  # decode steps call it too
    n = runner.geometry.num_layers
    assert calls == [(i, True) for i in range(n)] * 2
