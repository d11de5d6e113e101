"""The offline API in vLLM's shape: ``RequestOutput.outputs[i]``, dict prompts, ``SamplingParams(n=...)``,
``use_tqdm``; a script written for vLLM's ``LLM.generate`` runs unchanged."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pdserve import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_outputs_have_vllms_shape_and_the_top_level_fields_agree(tiny_llm):
    (out,) = tiny_llm.generate("Hello there", GREEDY, use_tqdm=False)
    assert out.prompt == "Hello there" and out.prompt_token_ids and out.finished
    (first,) = out.outputs
    assert first.index == 0 and len(first.token_ids) == 6 and first.finish_reason == "length"
    assert (out.token_ids, out.text, out.finish_reason) == (first.token_ids, first.text, first.finish_reason)
    assert first.cumulative_logprob is None  # no logprobs asked


def test_dict_prompts_mean_what_they_mean_in_vllm(tiny_llm):
    ids = tiny_llm.tokenizer.encode("Hello there")
    by_text, by_ids, plain = tiny_llm.generate(
        [{"prompt": "Hello there"}, {"prompt_token_ids": ids}, "Hello there"], GREEDY)
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids == plain.outputs[0].token_ids
    assert by_ids.prompt is None and by_ids.prompt_token_ids == ids
    with pytest.raises(ValueError, match="'text' is not supported"):
        tiny_llm.generate({"text": "Hello"}, GREEDY)
    # a cache salt isolates a tenant's prefix cache; nothing here would honour it, so it is refused, not ignored
    with pytest.raises(ValueError, match="'cache_salt' is not supported"):
        tiny_llm.generate({"prompt": "Hello there", "cache_salt": "user-1"}, GREEDY)
    # an image would be silently dropped: refused instead
    with pytest.raises(ValueError, match="'multi_modal_data' is not supported"):
        tiny_llm.generate({"prompt": "Hello", "multi_modal_data": {"image": object()}}, GREEDY)
    assert plain.prompt_logprobs is None


def test_n_gives_n_completions_seeded_ones_reproducible_and_distinct(tiny_llm):
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=3, ignore_eos=True, logprobs=0)
    (a,) = tiny_llm.generate("Once upon a time", params)
    (b,) = tiny_llm.generate("Once upon a time", params)
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1, "n seeded samples should differ"
    (one,) = tiny_llm.generate("Once upon a time", SamplingParams(max_tokens=8, temperature=1.0, seed=7,
                                                                   ignore_eos=True, logprobs=0))
    assert a.outputs[0].token_ids == one.outputs[0].token_ids  # completion 0 is the n=1 request
    lp = a.outputs[1]
    assert lp.cumulative_logprob == pytest.approx(sum(d[t] for t, d in zip(lp.token_ids, lp.logprobs, strict=True)))
    (greedy,) = tiny_llm.generate("Once upon a time", SamplingParams(max_tokens=5, temperature=0, n=2))
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


@pytest.mark.parametrize("n", [0, -1, 129, True, 1.5])
def test_a_bad_n_is_refused(n):
    with pytest.raises(ValueError, match="n:"):
        SamplingParams(n=n)


def test_an_error_midway_leaves_no_request_behind():
    llm = LLM("tiny", num_blocks=64)
    with pytest.raises(ValueError):
        llm.generate(["Hello", {"bad": 1}], SamplingParams(max_tokens=2, n=2))
    assert not llm.engine.has_unfinished() and llm.engine.seqs == {}
    with pytest.raises(ValueError, match="token"):  # refused by the engine after the first prompt's 2 were added
        llm.generate([[5, 6, 7], [10**9]], SamplingParams(max_tokens=2, n=2))
    assert not llm.engine.has_unfinished() and llm.engine.seqs == {}
    llm.engine.check_integrity()


def test_logprobs_are_vllms_logprob_objects_with_rank_and_decoded_token(tiny_llm):
    (greedy,) = tiny_llm.generate("Once upon a time", SamplingParams(max_tokens=4, temperature=0, logprobs=3))
    out = greedy.outputs[0]
    for t, step in zip(out.token_ids, out.logprobs, strict=True):
        assert len(step) == 3 and step[t].rank == 1  # greedy: the sampled token is the most likely
        by_rank = sorted(step.values(), key=lambda lp: lp.rank)
        assert [lp.rank for lp in by_rank] == [1, 2, 3]
        assert [lp.logprob for lp in by_rank] == sorted((lp.logprob for lp in by_rank), reverse=True)
        assert all(type(lp.logprob) is float and lp.logprob == lp for lp in step.values())  # still a float
        assert {i: lp.decoded_token for i, lp in step.items()} == {i: tiny_llm.tokenizer.decode([i]) for i in step}
    steps = zip(out.token_ids, out.logprobs, strict=True)
    assert out.cumulative_logprob == pytest.approx(sum(d[t].logprob for t, d in steps))
    (sampled,) = tiny_llm.generate("Once upon a time", SamplingParams(max_tokens=8, temperature=2.0, seed=1,
                                                                       ignore_eos=True, logprobs=2))
    for t, step in zip(sampled.outputs[0].token_ids, sampled.outputs[0].logprobs, strict=True):
        top = [i for i in step if step[i].rank is not None]
        assert sorted(step[i].rank for i in top) == [1, 2]  # the top 2 ranked; a sampled token outside: rank None
        assert step[t].rank is None or step[t].rank in (1, 2)


CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
                 "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_chat_renders_like_the_router_and_generates_from_the_rendered_tokens(tiny_llm):
    from pdserve.router.chat import ChatTemplate

    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    parts = [conv[0], {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]
    a, b = tiny_llm.chat([conv, parts], GREEDY, chat_template=CHAT_TEMPLATE)
    want = ChatTemplate(CHAT_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"}).render(conv)
    assert a.prompt == b.prompt == want
    assert a.prompt_token_ids == tiny_llm.get_tokenizer().encode(want, add_special_tokens=False)
    (direct,) = tiny_llm.generate({"prompt_token_ids": a.prompt_token_ids}, GREEDY)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == direct.outputs[0].token_ids
    (single,) = tiny_llm.chat(conv, GREEDY, chat_template=CHAT_TEMPLATE)  # one conversation, not a list of them
    assert single.outputs[0].token_ids == a.outputs[0].token_ids


def test_chat_without_a_template_or_with_bad_messages_is_a_value_error(tiny_llm):
    with pytest.raises(ValueError, match="chat_template"):  # the tiny preset's tokenizer has no template
        tiny_llm.chat([{"role": "user", "content": "Hello"}], GREEDY)
    for bad in ([], "Hello", [{"content": "x"}], [[{"role": "user", "content": 3}]],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]):
        with pytest.raises(ValueError, match="messages"):
            tiny_llm.chat(bad, GREEDY, chat_template=CHAT_TEMPLATE)


def test_vllms_engine_arguments_that_mean_something_here_are_taken(caplog):
    llm = LLM(model="tiny", num_blocks=64, tensor_parallel_size=1, enforce_eager=True, trust_remote_code=True,
              dtype="half", gpu_memory_utilization=0.9)
    assert llm.engine.config.cuda_graphs is False and llm.engine.config.dtype == "float16"
    assert "gpu_memory_utilization=0.9 is ignored" in caplog.text
    assert LLM(model="tiny", num_blocks=64, dtype="float").engine.config.dtype == "float32"
    for bad, name in (({"tensor_parallel_size": 2}, "tensor_parallel_size"),
                      ({"pipeline_parallel_size": 4}, "pipeline_parallel_size"),
                      ({"enforce_eager": "yes"}, "enforce_eager"),
                      ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization")):
        with pytest.raises(ValueError, match=name):
            LLM(model="tiny", num_blocks=64, **bad)


def test_stop_reason_names_the_stop_string_or_token_id_as_in_vllm(tiny_llm):
    long = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    (free,) = tiny_llm.generate("Once upon a time", long)
    assert free.outputs[0].stop_reason is None and free.outputs[0].finish_reason == "length"
    stop_id = free.outputs[0].token_ids[3]
    (by_id,) = tiny_llm.generate("Once upon a time", replace(long, stop_token_ids=(stop_id,)))
    assert (by_id.outputs[0].finish_reason, by_id.outputs[0].stop_reason) == ("stop", stop_id)
    assert by_id.outputs[0].token_ids[-1] == stop_id
    text = free.outputs[0].text
    word = text[len(text) // 2:len(text) // 2 + 2]
    (by_str,) = tiny_llm.generate("Once upon a time", replace(long, stop=("never-in-this-text", word)))
    assert (by_str.outputs[0].finish_reason, by_str.outputs[0].stop_reason) == ("stop", word)
    assert word not in by_str.outputs[0].text


def test_vllms_lora_request_loads_the_adapter_on_first_use_and_serves_it(tmp_path):
    from collections import namedtuple

    from tests.engine.lora_helpers import make_adapter

    LoRARequest = namedtuple("LoRARequest", "lora_name lora_int_id lora_path")  # vLLM's fields and order
    llm = LLM(model="tiny", num_blocks=64, enable_lora=True, max_lora_rank=16)
    path = make_adapter(llm.engine.runner.model_path, tmp_path / "a", 8, seed=1)
    base, tuned = llm.generate(["Hello", "Hello"], GREEDY, lora_request=[None, LoRARequest("sql", 1, path)])
    assert llm.engine.adapters() == ["sql"]
    (by_name,) = llm.generate("Hello", GREEDY, lora_name="sql")
    assert tuned.outputs[0].token_ids == by_name.outputs[0].token_ids != base.outputs[0].token_ids
    with pytest.raises(ValueError, match="lora_request"):
        llm.generate("Hello", GREEDY, lora_request=LoRARequest("other", 2, ""))
    with pytest.raises(ValueError, match="lora_request"):
        llm.generate("Hello", GREEDY, lora_request="sql")


def test_sampling_params_may_be_a_tuple_and_anything_else_is_a_value_error(tiny_llm):
    a, b = tiny_llm.generate(["Hello", "Hello"], (GREEDY, replace(GREEDY, max_tokens=3)))
    assert len(a.outputs[0].token_ids) == 6 and len(b.outputs[0].token_ids) == 3
    for bad in ({"max_tokens": 3}, [GREEDY, {"max_tokens": 3}], 0.5):
        with pytest.raises(ValueError, match="sampling_params"):
            tiny_llm.generate(["Hello", "Hello"], bad)


def test_default_sampling_params_come_from_generation_config_and_take_assignments_as_in_vllms_examples(tmp_path):
    import json
    import shutil

    from pdserve.engine.models import resolve_model

    src, _ = resolve_model("tiny")
    shutil.copytree(src, tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 7,
         "repetition_penalty": 1.1, "min_p": 0.05}))
    llm = LLM(model=str(tmp_path / "m"), num_blocks=64)
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.6, 0.9, 0, 7)
    assert (params.repetition_penalty, params.min_p) == (1.1, 0.05)
    params.max_tokens = 5  # vLLM's examples/offline_inference/basic/generate.py does this
    params.temperature = 0
    params.stop = "x"
    assert (params.max_tokens, params.temperature, params.stop) == (5, 0, ("x",))
    with pytest.raises(ValueError, match="max_tokens"):
        params.max_tokens = 0
    assert params.max_tokens == 5
    (out,) = llm.generate("Hello", params)
    assert len(out.outputs[0].token_ids) <= 5
    (default,) = llm.generate("Hello")  # no params: the generation config's (max_new_tokens 7)
    assert len(default.outputs[0].token_ids) <= 7 and default.outputs[0].finish_reason in ("length", "stop")
    assert LLM("tiny", num_blocks=64).get_default_sampling_params() == SamplingParams()
    assert SamplingParams() == LLM("tiny", num_blocks=64).get_default_sampling_params()
    assert repr(params).startswith("SamplingParams(max_tokens=5,")
