"""Bad input raises ValueError naming the problem, and the engine keeps serving."""

from __future__ import annotations

import math

import pytest

from engine import LLM, EngineConfig, SamplingParams


def serves(llm):
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0))[0]
    assert len(out.token_ids) == 3 or out.finish_reason == "stop"
    llm.engine.check_integrity()


@pytest.mark.parametrize(
    "prompt,kwargs,match",
    [
        ("", {}, "prompt"),
        ([], {}, "prompt"),
        ([7] * 5000, {}, "max_model_len"),
        ([5, 99999], {}, "token_ids"),
        ([5, -1], {}, "token_ids"),
    ],
)
def test_bad_prompts(tiny_llm, prompt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_llm.generate([prompt], SamplingParams(max_tokens=4))
    serves(tiny_llm)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-5), "max_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(top_k=-3), "top_k"),
        (dict(stop=("",)), "stop"),
        (dict(stop_token_ids=(-1,)), "stop_token_ids"),
        (dict(logprobs=99), "logprobs"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_unknown_model_path_and_bad_config():
    with pytest.raises(ValueError, match="model"):
        LLM("/nonexistent/model/dir")
    for kwargs, field in [(dict(block_size=12), "block_size"), (dict(max_num_seqs=0), "max_num_seqs"),
                          (dict(dtype="float8"), "dtype"), (dict(device="tpu"), "device"),
                          (dict(max_num_batched_tokens=0), "max_num_batched_tokens")]:
        with pytest.raises(ValueError, match=field):
            EngineConfig(**kwargs)


def test_duplicate_request_id_and_too_big_for_the_cache(tiny_llm):
    eng = tiny_llm.engine
    eng.add_request("dup", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="request_id"):
        eng.add_request("dup", [5, 6], SamplingParams(max_tokens=2))
    eng.abort("dup")
    small = LLM("tiny", num_blocks=4)
    with pytest.raises(ValueError, match="KV blocks"):
        small.generate([[5] * 60], SamplingParams(max_tokens=30))
    serves(small)
    serves(tiny_llm)
