"""Bad input raises ValueError naming the problem, and the same engine goes on serving correctly."""

from __future__ import annotations

import math

import pytest

from pdserve.engine import (
    LLM,
    CapacityError,
    EngineConfig,
    InvalidRequestError,
    RequestNotFoundError,
    SamplingParams,
)
from tests.engine.helpers import assert_idle

GOOD_PROMPT = [5, 6, 7, 8, 9]
GOOD = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_llm):
    return tiny_llm.generate([GOOD_PROMPT], GOOD)[0].token_ids


def serves(llm, reference):
    """The engine is idle, leak-free and still produces exactly the reference greedy tokens."""
    assert_idle(llm.engine)
    out = llm.generate([GOOD_PROMPT], GOOD)[0]
    assert out.token_ids == reference and out.finish_reason == "length"
    assert_idle(llm.engine)


@pytest.mark.parametrize(
    "prompt,match",
    [
        ("", "prompt: must not be empty"),
        ([], "prompt: must not be empty"),
        ([7] * 2048, "max_model_len 2048"),  # tiny: max_position_embeddings 2048
        ([7] * 5000, "max_model_len"),
        ([5, 320], "token_ids: 320 is outside the vocabulary"),
        ([5, 99999], "token_ids: 99999"),
        ([5, -1], "token_ids: -1"),
        ([5, 6.0], "token_ids: 6.0"),
        ([5, "7"], "token_ids: '7'"),
    ],
)
def test_bad_prompts(tiny_llm, reference, prompt, match):
    with pytest.raises(ValueError, match=match) as e:
        tiny_llm.generate([prompt], SamplingParams(max_tokens=4))
    assert isinstance(e.value, InvalidRequestError)
    serves(tiny_llm, reference)


def test_longest_allowed_prompt_is_served(tiny_llm, reference):
    out = tiny_llm.generate([[7] * 2047], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "length", "stops at max_model_len"
    serves(tiny_llm, reference)


def test_a_bad_prompt_in_a_batch_aborts_the_good_ones_added_before_it(tiny_llm, reference):
    with pytest.raises(ValueError, match="token_ids"):
        tiny_llm.generate([GOOD_PROMPT, [1, 2, 3], [5, 100000]], GOOD)
    serves(tiny_llm, reference)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-5), "max_tokens"),
        (dict(max_tokens=2.5), "max_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.1), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_k=-3), "top_k"),
        (dict(top_k=1.5), "top_k"),
        (dict(seed="x"), "seed"),
        (dict(stop=("",)), "stop"),
        (dict(stop=(3,)), "stop"),
        (dict(stop_token_ids=(-1,)), "stop_token_ids"),
        (dict(stop_token_ids=7), "stop_token_ids"),  # a TypeError before
        (dict(stop=3), "stop"),
        (dict(logprobs=21), "logprobs"),
        (dict(logprobs=-1), "logprobs"),
        (dict(max_tokens=True), "max_tokens"),  # bool is an int: True was max_tokens=1
        (dict(ignore_eos="no"), "ignore_eos"),  # a truthy string ignored EOS
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_edge_sampling_params_are_accepted():
    SamplingParams(top_p=1.0, temperature=0, top_k=-1, logprobs=0, max_tokens=1)
    SamplingParams(top_p=1e-9, top_k=0, logprobs=20, stop=["a"], stop_token_ids=[0])
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop="LORD").stop == ("LORD",)  # one stop string, as vLLM takes it (was 4 characters)
    none = SamplingParams(stop=None, stop_token_ids=None)  # as vLLM takes them (a TypeError before)
    assert none.stop == () and none.stop_token_ids == ()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(model=""), "model"),
        (dict(block_size=12), "block_size"),
        (dict(block_size=0), "block_size"),
        (dict(num_blocks=-1), "num_blocks"),
        (dict(kv_cache_bytes=0), "kv_cache_bytes"),
        (dict(max_model_len=-1), "max_model_len"),
        (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(dtype="float8"), "dtype"),
        (dict(load_format="gguf"), "load_format"),
        (dict(device="tpu"), "device"),
        (dict(hash_seed=2**64), "hash_seed"),
    ],
)
def test_bad_engine_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)


def test_unknown_model_path_and_backend():
    with pytest.raises(ValueError, match="model: no such model directory"):
        LLM("/nonexistent/model/dir")
    with pytest.raises(ValueError, match="model"):
        LLM("./no/such/dir")
    with pytest.raises(ValueError, match="attention_backend"):
        LLM("tiny", num_blocks=8, attention_backend="flash-nope")


def test_path_without_config_json(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        LLM(str(tmp_path))


def test_duplicate_request_id(tiny_llm, reference):
    eng = tiny_llm.engine
    eng.add_request("dup", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="request_id: 'dup' is already in use"):
        eng.add_request("dup", [7, 8], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="request_id"):
        eng.reserve("dup", 4)
    assert eng.seqs["dup"].prompt_token_ids == [5, 6], "the first request is untouched"
    assert eng.abort("dup") and not eng.abort("dup")
    serves(tiny_llm, reference)


def test_request_id_of_a_held_prefill_is_in_use(tiny_llm, reference):
    """A finished prefill-only request holds its blocks for the transfer; reusing its id must not
    overwrite (and so leak) them, nor let a later release free the newcomer's blocks."""
    eng = tiny_llm.engine
    eng.add_request("held", list(range(10, 50)), GOOD, prefill_only=True)
    while eng.has_unfinished():
        eng.step()
    assert list(eng.held) == ["held"]
    with pytest.raises(ValueError, match="request_id: 'held' is already in use"):
        eng.add_request("held", list(range(10, 50)), GOOD, prefill_only=True)
    with pytest.raises(ValueError, match="request_id"):
        eng.reserve("held", 40)
    eng.check_integrity()
    assert eng.release("held") and not eng.release("held")
    serves(tiny_llm, reference)


def test_too_big_for_the_kv_cache():
    small = LLM("tiny", num_blocks=4)
    with pytest.raises(ValueError, match="needs up to 6 KV blocks but the cache has 4"):
        small.generate([[5] * 60], SamplingParams(max_tokens=30))
    ok = small.generate([[5] * 60], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(ok.token_ids) == 4
    assert_idle(small.engine)


def test_bad_reservations_and_prefilled_requests(tiny_llm, reference):
    eng = tiny_llm.engine
    with pytest.raises(RequestNotFoundError, match="no reservation"):
        eng.add_prefilled_request("ghost", [5, 6], 7, GOOD)
    with pytest.raises(CapacityError, match="KV blocks"):
        eng.reserve("huge", 16 * 1000)
    eng.reserve("r", 20)  # 2 blocks
    with pytest.raises(ValueError, match="first_token_id"):
        eng.add_prefilled_request("r", list(range(5, 25)), 999, GOOD)
    with pytest.raises(ValueError, match="prompt_token_ids: 40 tokens do not fit the 2 reserved blocks"):
        eng.add_prefilled_request("r", list(range(5, 45)), 7, GOOD)
    with pytest.raises(ValueError, match="prompt"):
        eng.add_prefilled_request("r", [], 7, GOOD)
    assert list(eng.reservations) == ["r"], "a refused hand-off keeps its reservation for a retry or a cancel"
    eng.check_integrity()
    assert eng.cancel_reservation("r") and not eng.cancel_reservation("r")
    assert not eng.release("nobody") and not eng.abort("nobody")
    serves(tiny_llm, reference)


@pytest.mark.parametrize("prompts", [[1.5], ["a", None], [[5, 6], 7], [{"x": 1}], None, 7])
def test_a_prompt_of_the_wrong_type_is_a_value_error(tiny_llm, reference, prompts):
    """It was a TypeError from deep inside ("'float' object is not iterable"). A dict is vLLM's prompt form and
    needs its keys."""
    with pytest.raises(ValueError, match="prompts?: (expected a string|a dict prompt needs)"):
        tiny_llm.generate(prompts, GOOD)
    serves(tiny_llm, reference)


@pytest.mark.parametrize("priorities", [[1], [1, 2, 3], ["x", 1], [1.5, 2]])
def test_priorities_must_be_one_integer_per_prompt(tiny_llm, reference, priorities):
    """A short list was an IndexError, a long one was ignored, a string a TypeError from the scheduler."""
    with pytest.raises(ValueError, match="priorities"):
        tiny_llm.generate([GOOD_PROMPT, GOOD_PROMPT], GOOD, priorities=priorities)
    serves(tiny_llm, reference)


def test_mismatched_sampling_params_list(tiny_llm, reference):
    with pytest.raises(ValueError, match="sampling_params"):
        tiny_llm.generate([GOOD_PROMPT, GOOD_PROMPT], [GOOD])
    assert tiny_llm.generate([], GOOD) == []
    serves(tiny_llm, reference)
