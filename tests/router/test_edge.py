"""The router's edge conversions: worker load and layout fingerprint, KV events, forwarded sampling."""

from __future__ import annotations

import dataclasses
import re

import pytest

from pdserve.engine.layout import LayoutFingerprint
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.stats import LoadStats
from pdserve.protos import pdserve_pb2 as pb
from pdserve.router.edge import events_from_proto, load_from_proto, load_to_proto
from pdserve.router.load import WorkerLoad
from pdserve.router.membership import Worker
from pdserve.router.policy import kv_bytes_per_token
from pdserve.serving import convert

FP = LayoutFingerprint(model_id="tiny", revision="main", num_layers=4, num_kv_heads=2, head_dim=32,
                       block_size=16, dtype="bfloat16", hash_seed=-(2**63))


def test_fingerprint_round_trips_through_its_proto():
    msg = convert.fingerprint_to_proto(FP)
    assert isinstance(msg, pb.LayoutFingerprint) and msg.block_size == 16
    assert convert.fingerprint_from_proto(pb.LayoutFingerprint.FromString(msg.SerializeToString())) == FP


@pytest.mark.parametrize("field", ["num_layers", "num_kv_heads", "head_dim", "block_size", "dtype"])
def test_fingerprint_from_proto_names_the_unusable_field(field):
    msg = convert.fingerprint_to_proto(FP)
    msg.ClearField(field)
    with pytest.raises(ValueError, match=f"fingerprint: {field}"):
        convert.fingerprint_from_proto(msg)


def test_worker_load_is_typed_once_per_poll_and_reported_back_unchanged():
    stats = LoadStats(num_running=2, num_waiting=1, num_queued_tokens=40, num_free_blocks=7, num_total_blocks=9)
    msg = convert.load_to_proto(stats, fingerprint=FP, worker_id="w", role="decode", address="d:1", vocab_size=1000,
                                max_model_len=64, device="cpu")
    msg = pb.WorkerLoad.FromString(msg.SerializeToString())  # what the router receives
    load = load_from_proto(msg)
    assert isinstance(load, WorkerLoad) and load.fingerprint == FP
    assert (load.num_running, load.num_queued_tokens, load.vocab_size, load.host) == (2, 40, 1000, msg.host)
    with pytest.raises(dataclasses.FrozenInstanceError):
        load.num_running = 3
    assert load_to_proto(load) == msg
    w = Worker("d:1", "decode", None, None, load=load)
    assert w.layout() is FP or w.layout() == FP
    assert kv_bytes_per_token(load) == FP.block_bytes() / 16 * 4 == 2 * 2 * 32 * 2 * 4


def test_a_missing_or_unusable_fingerprint_is_none():
    assert load_from_proto(pb.WorkerLoad()).fingerprint is None
    bad = pb.WorkerLoad(fingerprint=pb.LayoutFingerprint(model_id="x"))
    load = load_from_proto(bad)
    assert load.fingerprint is None and Worker("d:1", "decode", None, None, load=load).layout() is None
    assert kv_bytes_per_token(load) == 0.0
    unknown = load_from_proto(pb.WorkerLoad(fingerprint=convert.fingerprint_to_proto(
        dataclasses.replace(FP, dtype="float4"))))
    assert unknown.fingerprint.dtype == "float4" and kv_bytes_per_token(unknown) == 0.0


def test_kv_events_become_domain_batches():
    ev = events_from_proto(pb.KVEventBatch(stored=[1, 2], evicted=[3], snapshot=True, cleared=False, seq=4))
    assert (ev.stored, ev.evicted, ev.snapshot, ev.cleared, ev.seq) == ((1, 2), (3,), True, False, 4)


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(max_tokens=3, temperature=0.0, top_k=5, seed=11, stop=("x",), stop_token_ids=(2,),
                   ignore_eos=True, logprobs=0),
    SamplingParams(temperature=0.5, top_p=0.25, logprobs=3),
    SamplingParams(max_tokens=9, presence_penalty=-1.5, frequency_penalty=0.75, repetition_penalty=1.25, min_p=0.125,
                   min_tokens=4),
    SamplingParams(logit_bias={7: -100, 3: 2.5}, allowed_token_ids=(9, 3, 7),
                   structured_outputs={"json": {"type": "object"}}),
    SamplingParams(structured_outputs={"choice": ["a", "b"]}, stop=("x",), include_stop_str_in_output=True),
])
def test_forwarded_sampling_is_what_was_validated(params):
    msg = convert.sampling_to_proto(params)
    assert convert.sampling_from_proto(msg) == params
    migrated = convert.sampling_to_proto(params, num_sent=2)  # both budgets count the new worker's tokens only
    assert (migrated.max_tokens, migrated.min_tokens) == (params.max_tokens - 2, max(0, params.min_tokens - 2))
    assert convert.sampling_from_proto(migrated) == dataclasses.replace(
        params, max_tokens=params.max_tokens - 2, min_tokens=max(0, params.min_tokens - 2))


@pytest.mark.parametrize("field, value, message", [
    ("presence_penalty", 2.5, "presence_penalty: must be a number in [-2, 2]"),
    ("frequency_penalty", float("nan"), "frequency_penalty: must be a number in [-2, 2]"),
    ("repetition_penalty", 0.0, "repetition_penalty: must be a finite number > 0"),
    ("repetition_penalty", float("inf"), "repetition_penalty: must be a finite number > 0"),
    ("min_p", 1.5, "min_p: must be a number in [0, 1]"),
    ("min_tokens", 17, "min_tokens: must be an integer in [0, max_tokens=16]"),
    ("min_tokens", -1, "min_tokens: must be an integer in [0, max_tokens=16]"),
])
def test_bad_penalties_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        convert.sampling_from_proto(pb.SamplingParams(**{field: value}))
