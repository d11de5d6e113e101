"""Bad adapters and LoRA settings: a ValueError with a one-line reason (the engine keeps serving), an unknown
adapter a not-found domain error naming it."""

from __future__ import annotations

import json
import shutil

import grpc
import pytest
from safetensors.torch import load_file, save_file

from pdserve import LLM, SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.engine.errors import AdapterNotFoundError, RequestNotFoundError
from pdserve.serving.errors import status_for
from tests.engine.helpers import assert_idle
from tests.engine.lora_helpers import make_adapter

GREEDY = SamplingParams(max_tokens=4, temperature=0)


@pytest.fixture(scope="module")
def llm_and_good(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-bad")
    llm = LLM("tiny", num_blocks=32, enable_lora=True, max_lora_rank=16)
    good = make_adapter(llm.engine.runner.model_path, root / "good", 8, seed=1)
    too_big = make_adapter(llm.engine.runner.model_path, root / "r32", 32, seed=2)
    llm.engine.load_adapter("good", good)
    return llm, good, too_big, root


def _variant(good: str, dst, config=None, tensors=None):
    """A copy of the good adapter with its config and/or tensors edited."""
    shutil.copytree(good, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        save_file(tensors(load_file(str(dst / "adapter_model.safetensors"))), str(dst / "adapter_model.safetensors"))
    return str(dst)


def _rename_first(ts, new_key):
    key = sorted(ts)[0]
    ts[new_key] = ts.pop(key)
    return ts


def _reshape_first_a(ts):
    key = next(k for k in sorted(ts) if "lora_A" in k)
    ts[key] = ts[key][:, :-1].contiguous()
    return ts


def _drop_first_b(ts):
    ts.pop(next(k for k in sorted(ts) if "lora_B" in k))
    return ts


def _fill_first_b(ts, value):
    key = next(k for k in sorted(ts) if "lora_B" in k)
    ts[key] = ts[key].clone().fill_(value)
    return ts


def _fill_first_a(ts, value):
    key = next(k for k in sorted(ts) if "lora_A" in k)
    ts[key] = ts[key].clone()
    ts[key][0, 0] = value
    return ts


CASES = [
    ("missing dir", lambda g, d: str(d / "nope"), "no such directory"),
    ("no config", lambda g, d: (d.mkdir(), str(d))[1], "no adapter_config.json"),
    ("no weights", lambda g, d: (shutil.copytree(g, d), (d / "adapter_model.safetensors").unlink(), str(d))[2],
     "no adapter_model.safetensors"),
    ("bad json", lambda g, d: (shutil.copytree(g, d), (d / "adapter_config.json").write_text("{"), str(d))[2],
     "not valid JSON"),
    ("bad target", lambda g, d: _variant(g, d, config={"target_modules": ["q_proj", "lm_head"]}),
     "target module 'lm_head' is not supported"),
    ("dora", lambda g, d: _variant(g, d, config={"use_dora": True}), "use_dora=True is not supported"),
    ("bad rank", lambda g, d: _variant(g, d, config={"r": 0}), "r must be a positive integer"),
    ("rank pattern 0", lambda g, d: _variant(g, d, config={"rank_pattern": {"q_proj": 0}}), "rank_pattern gives"),
    ("shape", lambda g, d: _variant(g, d, tensors=_reshape_first_a), "do not fit rank 8"),
    ("missing B", lambda g, d: _variant(g, d, tensors=_drop_first_b), "lora_B is missing"),
    ("stray tensor", lambda g, d: _variant(
        g, d, tensors=lambda ts: _rename_first(ts, "base_model.model.lm_head.lora_A.weight")), "unexpected tensor"),
    ("layer", lambda g, d: _variant(g, d, tensors=lambda ts: _rename_first(
        ts, "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight")), "names layer 9 but the model has 4"),
    ("nan", lambda g, d: _variant(g, d, tensors=lambda ts: _fill_first_b(ts, float("nan"))), "lora_B has NaN"),
    ("inf", lambda g, d: _variant(g, d, tensors=lambda ts: _fill_first_a(ts, float("inf"))), "lora_A has NaN"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_adapter_dirs_are_value_errors(llm_and_good, case):
    llm, good, _, root = llm_and_good
    _, make, message = case
    path = make(good, root / case[0].replace(" ", "-"))
    with pytest.raises(ValueError, match=message) as info:
        llm.engine.load_adapter("bad", path)
    assert "\n" not in str(info.value) and path in str(info.value)
    assert llm.engine.adapters() == ["good"]
    assert len(llm.generate([[5, 6, 7]], GREEDY, lora_name="good")[0].token_ids) == 4, "still serving"
    assert_idle(llm.engine)


def test_rank_above_max_lora_rank_and_a_failed_replace_keeps_the_old(llm_and_good):
    llm, good, too_big, _ = llm_and_good
    before = llm.generate([[5, 6, 7]], GREEDY, lora_name="good")[0].token_ids
    with pytest.raises(ValueError, match="rank 32 exceeds max_lora_rank 16"):
        llm.engine.load_adapter("good", too_big)
    assert llm.generate([[5, 6, 7]], GREEDY, lora_name="good")[0].token_ids == before
    with pytest.raises(ValueError, match="name: adapter names must be non-empty"):
        llm.engine.load_adapter("", good)
    assert_idle(llm.engine)


def test_unknown_adapter_is_a_not_found_error_naming_it(llm_and_good):
    llm, *_ = llm_and_good
    with pytest.raises(AdapterNotFoundError, match="'nope'") as info:
        llm.engine.add_request("x", [5, 6], GREEDY, lora_name="nope")
    assert isinstance(info.value, RequestNotFoundError)
    assert status_for(info.value) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(AdapterNotFoundError, match="'nope'"):
        llm.engine.reserve("y", 10, lora_name="nope")
    assert llm.engine.reservations == {} and llm.engine.seqs == {}
    with pytest.raises(AdapterNotFoundError, match="'nope'"):
        llm.generate([[5, 6], [7, 8]], GREEDY, lora_name=[None, "nope"])
    assert_idle(llm.engine)


def test_lora_without_enable_lora():
    eng = LLM("tiny", num_blocks=16).engine
    with pytest.raises(ValueError, match="enable_lora"):
        eng.load_adapter("a", "/nonexistent")
    with pytest.raises(AdapterNotFoundError, match="LoRA is not enabled"):
        eng.add_request("x", [5, 6], GREEDY, lora_name="a")
    assert eng.adapters() == [] and not eng.unload_adapter("a")
    assert eng.runner.lora_slots is None


@pytest.mark.parametrize("kwargs, field", [
    (dict(enable_lora=1), "enable_lora"),
    (dict(enable_lora=True, max_loras=0), "max_loras"),
    (dict(enable_lora=True, max_lora_rank=0), "max_lora_rank"),
    (dict(enable_lora=True, max_lora_rank=1024), "max_lora_rank"),
    (dict(enable_lora=True, lora_modules=[("a", "/x")]), "lora_modules"),
    (dict(enable_lora=True, lora_modules=(("a", ""),)), "lora_modules"),
    (dict(enable_lora=True, lora_modules=(("a", "/x"), ("a", "/y"))), "lora_modules"),
    (dict(lora_modules=(("a", "/x"),)), "lora_modules"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        EngineConfig(model="tiny", **kwargs)


def test_reading_an_adapter_changes_nothing_until_it_is_installed(llm_and_good):
    """Workers read adapters off the engine thread (``read_adapter``) and install them between steps."""
    llm, good, _, _ = llm_and_good
    before = llm.engine.adapters()
    adapter = llm.engine.read_adapter("later", good)
    assert llm.engine.adapters() == before and "later" not in before
    with pytest.raises(AdapterNotFoundError, match="later"):
        llm.generate([[5, 6, 7]], GREEDY, lora_name="later")
    llm.engine.install_adapter(adapter)
    assert "later" in llm.engine.adapters()
    want = llm.generate([[5, 6, 7]], GREEDY, lora_name="good")[0].token_ids
    assert llm.generate([[5, 6, 7]], GREEDY, lora_name="later")[0].token_ids == want  # the same files
    assert llm.engine.unload_adapter("later")
    assert_idle(llm.engine)
    with pytest.raises(ValueError, match="no such directory"):
        llm.engine.read_adapter("x", str(llm_and_good[3] / "missing"))
