"""A model's generation_config.json fills the sampling fields a request leaves unset (router.sampling_defaults), as
vLLM's server does; what a request sets wins; a default no request could carry is left out, not blamed on clients."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.request import RequestParser
from pdserve.router.sampling_defaults import load_defaults, with_defaults
from pdserve.router.server import RouterConfig

QWEN3 = {"bos_token_id": 1, "do_sample": True, "eos_token_id": 2, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
         "repetition_penalty": 1.25, "max_new_tokens": 64}


def _dir(tmp_path, cfg) -> str:
    (tmp_path / "generation_config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return str(tmp_path)


def test_a_models_defaults_fill_what_a_request_leaves_unset(tmp_path):
    defaults = load_defaults(_dir(tmp_path, QWEN3), "qwen3")
    parser = RequestParser(tokenizer=None, defaults=defaults)
    unset = parser.sampling(pb.SamplingParams())
    assert (unset.top_k, unset.max_tokens) == (20, 64)
    assert unset.temperature == pytest.approx(0.6) and unset.top_p == pytest.approx(0.95)
    assert unset.repetition_penalty == 1.25 and unset.min_p == 0.0  # not in the file: the API's default
    mine = parser.sampling(pb.SamplingParams(temperature=0, top_k=0, max_tokens=5, repetition_penalty=1.0))
    assert (mine.temperature, mine.top_k, mine.max_tokens, mine.repetition_penalty) == (0.0, 0, 5, 1.0)
    assert mine.top_p == pytest.approx(0.95)  # still unset: the model's
    plain = RequestParser(tokenizer=None).sampling(pb.SamplingParams())  # none given: the API's defaults
    assert (plain.temperature, plain.top_p, plain.top_k, plain.max_tokens) == (1.0, 1.0, 0, 16)


def test_defaults_no_request_could_carry_are_left_out_with_a_warning(tmp_path, caplog):
    bad = {"temperature": -1, "top_k": "twenty", "min_p": 0.05, "max_new_tokens": 1 << 40}
    with caplog.at_level(logging.WARNING, logger="pdserve.router.sampling_defaults"):
        defaults = load_defaults(_dir(tmp_path, bad), "m")
    assert [f.name for f, _ in defaults.ListFields()] == ["min_p"]
    text = caplog.text
    assert "temperature=-1" in text and "top_k='twenty'" in text and "max_new_tokens=" in text
    assert with_defaults(pb.SamplingParams(min_p=0.5), defaults).min_p == 0.5


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_an_unreadable_generation_config_gives_no_defaults(tmp_path, content):
    assert not load_defaults(_dir(tmp_path, content)).ListFields()
    assert not load_defaults(tmp_path / "missing").ListFields()


def test_router_config_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="generation_config: must be one of auto, none"):
        RouterConfig(generation_config="vllm")


def test_a_cluster_applies_its_models_defaults_unless_told_not_to(tmp_path):
    """End to end: a model whose generation_config.json asks for greedy decoding and 5 tokens."""
    from pdserve.deploy.local import LocalCluster
    from pdserve.engine.models import resolve_model
    from tests.cluster.conftest import generate

    model = tmp_path / "greedy-model"
    shutil.copytree(resolve_model("tiny")[0], model)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "temperature": 0.0,
                                                              "max_new_tokens": 5}))
    req = pb.GenerateRequest(token_ids=[5, 6, 7, 8], sampling=pb.SamplingParams(ignore_eos=True))
    greedy = pb.GenerateRequest(token_ids=[5, 6, 7, 8], sampling=pb.SamplingParams(temperature=0, max_tokens=5,
                                                                                   ignore_eos=True))
    with LocalCluster(0, 1, model=str(model)) as c:
        got = [t for r in generate(c.router_address, req) for t in r.token_ids]
        want = [t for r in generate(c.router_address, greedy) for t in r.token_ids]
        assert got == want and len(got) == 5
    with LocalCluster(0, 1, model=str(model), router_args=["--generation-config", "none"]) as c:
        got = [t for r in generate(c.router_address, req) for t in r.token_ids]
        assert len(got) == 16  # the API's default max_tokens
