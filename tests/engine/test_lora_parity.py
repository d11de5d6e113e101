"""LoRA greedy parity with transformers + PEFT (float32), on the native and the HF-module paths.

Adapters with random nonzero A and B (PEFT inits B to zero) on all seven targets, ranks 8 and 64, on a Llama
(``tiny``) and a Qwen3 (``tiny-qwen3``: q/k norms, head_dim != hidden / heads), and a Qwen2 (QKV biases) natively. The prompts run batched, with
one spanning many blocks and chunked prefill (a small token budget), so the general path, mixed steps and the
static decode path all carry the adapter.
"""

from __future__ import annotations

import random

import pytest

from pdserve import LLM, SamplingParams
from tests.engine.helpers import assert_idle
from tests.engine.lora_helpers import make_adapter, peft_greedy

MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)


def prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(n)] for n in (1, 7, 33, 150)]


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    return tmp_path_factory.mktemp("lora-parity")


@pytest.mark.parametrize("model, impl", [
    ("tiny", "native"), ("tiny", "hf"), ("tiny-qwen3", "native"), ("tiny-qwen3", "hf"),
    ("tiny-qwen2", "native"),  # biases on q, k and v: the deltas land after them in the fused output
])
def test_greedy_matches_hf_peft(model, impl, adapter_root):
    llm = LLM(model, num_blocks=128, enable_lora=True, model_impl=impl, max_num_batched_tokens=64)
    assert llm.engine.runner.model_impl == impl
    path = llm.engine.runner.model_path
    batch = prompts(5)
    base_ref = peft_greedy(path, None, batch, MAX_TOKENS)
    for rank in (8, 64):
        adapter = make_adapter(path, adapter_root / f"{model}-r{rank}", rank, seed=rank)
        llm.engine.load_adapter(f"r{rank}", adapter)
        ref = peft_greedy(path, adapter, batch, MAX_TOKENS)
        assert ref != base_ref, "the adapter must change the output for this test to mean anything"
        outs = llm.generate(batch, GREEDY, lora_name=f"r{rank}")
        for i, (o, want) in enumerate(zip(outs, ref, strict=True)):
            assert o.token_ids == want, f"rank {rank}, prompt {i} (len {len(batch[i])}): {o.token_ids} != {want}"
        assert_idle(llm.engine)
    assert sorted(llm.engine.adapters()) == ["r64", "r8"]
    assert [o.token_ids for o in llm.generate(batch, GREEDY)] == base_ref, "the base is untouched"
    assert_idle(llm.engine)


def test_rslora_and_partial_targets_match_peft(adapter_root):
    llm = LLM("tiny", num_blocks=64, enable_lora=True, model_impl="native")
    path = llm.engine.runner.model_path
    batch = prompts(9)[:3]
    adapter = make_adapter(path, adapter_root / "rs", 16, seed=3, targets=("q_proj", "v_proj", "down_proj"),
                           alpha=4, use_rslora=True, std=0.08)
    llm.engine.load_adapter("rs", adapter)
    ref = peft_greedy(path, adapter, batch, MAX_TOKENS)
    assert ref != peft_greedy(path, None, batch, MAX_TOKENS)
    assert [o.token_ids for o in llm.generate(batch, GREEDY, lora_name="rs")] == ref
    assert_idle(llm.engine)


def _pattern_adapter(base_path: str, out_dir, seed: int, **config) -> str:
    """A PEFT adapter as trainers often write them: ``target_modules="all-linear"``, per-module ranks and
    alphas (``rank_pattern`` / ``alpha_pattern``) and only some layers (``layers_to_transform``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM", **config)
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(str(out_dir))
    return str(out_dir)


PATTERNS = {
    "all-linear+patterns": dict(target_modules="all-linear", rank_pattern={"q_proj": 4, "mlp.down_proj": 24},
                                alpha_pattern={"v_proj": 3}),
    "some-layers": dict(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[0, 2]),
}


@pytest.mark.parametrize("impl", ["native", "hf"])
@pytest.mark.parametrize("variant", list(PATTERNS))
def test_all_linear_rank_and_alpha_patterns_and_some_layers_match_peft(variant, impl, adapter_root):
    llm = LLM("tiny", num_blocks=64, enable_lora=True, model_impl=impl)
    path = llm.engine.runner.model_path
    adapter = _pattern_adapter(path, adapter_root / f"{variant}-{impl}", seed=3, **PATTERNS[variant])
    llm.engine.load_adapter("patterns", adapter)
    batch = prompts(11)[:3]
    ref = peft_greedy(path, adapter, batch, MAX_TOKENS)
    assert ref != peft_greedy(path, None, batch, MAX_TOKENS)
    assert [o.token_ids for o in llm.generate(batch, GREEDY, lora_name="patterns")] == ref
    assert_idle(llm.engine)
