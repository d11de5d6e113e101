"""Async output processing (EngineConfig.async_output, engine.engine.LLMEngine.step).

A step's tokens are recorded at once; their outputs (text, stop strings, logprob dicts) are made by the next
``step`` while that step's forward runs on the engine's forward thread. These tests check that nothing a user
sees changes (tokens, text, finish reasons, logprobs), that the overlap really happens, and the edges: a request a
stop string ends (its next row is dropped), aborts between steps, a failing forward, a reused request id, and
prefill-only requests that hold their blocks.
"""

from __future__ import annotations

import threading

import pytest

from pdserve import LLM, SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.errors import InvalidRequestError
from tests.engine.helpers import assert_idle


@pytest.fixture(scope="module")
def engines():
    return {mode: LLM("tiny-chat", num_blocks=256, async_output=mode) for mode in ("on", "off")}


PROMPTS = ["Hello, how are you?", "What is the capital of France?", "Tell me a story about a dog.",
           "Count: one two three", "Why is the sky blue?", "Name three colors."]


def _outputs(llm: LLM, params: list[SamplingParams]):
    outs = llm.generate(PROMPTS, params)
    assert_idle(llm.engine)
    return [(o.token_ids, o.text, o.finish_reason, o.logprobs) for o in outs]


class Streams:
    """Each listened request's outputs (or its error), and an event set when it ends."""

    def __init__(self, loop: EngineLoop, *rids: str):
        self.loop = loop
        self.got: dict[str, list] = {rid: [] for rid in rids}
        self.done = {rid: threading.Event() for rid in rids}

    def listen(self, rid: str) -> None:
        def deliver(item):
            self.got[rid].append(item)
            if isinstance(item, BaseException) or item.finished:
                self.done[rid].set()

        self.loop.listen(rid, deliver)

    def wait(self) -> bool:
        return all(d.wait(20) for d in self.done.values())


def failing_forward(eng, when):
    """Make ``eng.runner.execute`` raise while ``when()`` holds (undo with ``del eng.runner.execute``)."""
    execute = eng.runner.execute

    def failing(*a, **k):
        if when():
            raise RuntimeError("injected forward failure")
        return execute(*a, **k)

    eng.runner.execute = failing


def wait_idle(loop: EngineLoop) -> None:
    for _ in range(500):
        if loop.call(lambda e: not e.has_unfinished()).result(10):
            return
        threading.Event().wait(0.01)


def test_auto_is_off_on_cpu_and_a_bad_value_is_refused():
    assert not EngineConfig().use_async_output()
    assert EngineConfig(async_output="on").use_async_output()
    assert EngineConfig(device="cuda", async_output="auto").use_async_output()
    assert not EngineConfig(device="cuda", async_output="off").use_async_output()
    with pytest.raises(ValueError, match="async_output"):
        EngineConfig(async_output=True)


def test_outputs_equal_the_synchronous_engine_for_every_kind_of_ending(engines):
    """Greedy and seeded rows; EOS, stop tokens, max_tokens and stop strings end them; logprobs on some."""
    base = engines["off"].generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True, temperature=0))
    # stop strings that do occur: a piece of what each prompt generates, so those requests end early
    stops = [o.text[5:8] for o in base]
    assert all(len(s) == 3 for s in stops)
    params = []
    for i, stop in enumerate(stops):
        seeded = dict(temperature=0.9, seed=100 + i) if i % 2 else dict(temperature=0)
        params.append(SamplingParams(
            max_tokens=[24, 9, 24, 17, 24, 24][i], stop=[stop] if i in (0, 2, 3) else None,
            stop_token_ids=[base[4].token_ids[6]] if i == 4 else None, ignore_eos=i != 5,
            logprobs=2 if i in (1, 2) else None, **seeded,
        ))
    on, off = _outputs(engines["on"], params), _outputs(engines["off"], params)
    assert on == off
    reasons = [r for _, _, r, _ in on]
    assert reasons[0] == reasons[2] == "stop" and reasons[1] == "length"  # the stop strings ended these
    assert len(on[0][0]) < 24 and stops[0] not in on[0][1]
    assert all(len(lp) == len(t) for t, _, _, lp in (on[1], on[2]))


def test_a_step_queues_its_forward_before_making_the_last_outputs_and_reads_back_after(engines):
    """The overlap's order, which on CUDA is the overlap itself (the forward and the sampler only queue kernels
    there; ``results`` is the step's one read-back): execute, then the last step's outputs, then the read-back."""
    eng = engines["on"].engine
    events: list[str] = []
    execute, emit, launch = eng.runner.execute, eng.outputs.emit, eng.sampler.launch

    def spy_execute(*a, **k):
        events.append("execute")
        return execute(*a, **k)

    def spy_emit(*a, **k):
        events.append("emit")
        return emit(*a, **k)

    def spy_launch(*a, **k):
        launched = launch(*a, **k)
        results = launched.results

        def spy_results():
            events.append("read")
            return results()

        launched.results = spy_results
        return launched

    eng.runner.execute, eng.outputs.emit, eng.sampler.launch = spy_execute, spy_emit, spy_launch
    try:
        out = engines["on"].generate(PROMPTS[:2], SamplingParams(max_tokens=4, ignore_eos=True))
    finally:
        del eng.runner.execute, eng.outputs.emit, eng.sampler.launch
    assert [len(o.token_ids) for o in out] == [4, 4]
    # the prefill has nothing to overlap; each decode step makes the two outputs of the step before in between;
    # the last call only makes outputs
    assert events == ["execute", "read"] + ["execute", "emit", "emit", "read"] * 3 + ["emit", "emit"]


def test_outputs_come_one_step_later_and_the_engine_stays_busy_until_made(engines):
    eng = engines["on"].engine
    eng.add_request("late", "Hello", SamplingParams(max_tokens=1))
    assert eng.step() == []  # the prefill's token is recorded, its output not made yet
    assert eng.has_unfinished() and "late" in eng.unemitted_ids()
    with pytest.raises(InvalidRequestError, match="already in use"):  # its last output is still to come
        eng.add_request("late", "Hello", SamplingParams(max_tokens=1))
    (out,) = eng.step()
    assert out.request_id == "late" and out.finished and out.finish_reason.value == "length"
    assert not eng.has_unfinished() and eng.unemitted_ids() == []
    assert_idle(eng)


def test_an_abort_between_steps_drops_the_recorded_output(engines):
    eng = engines["on"].engine
    eng.add_request("gone", "Hello", SamplingParams(max_tokens=10, ignore_eos=True))
    eng.add_request("kept", "Hello", SamplingParams(max_tokens=3, ignore_eos=True))
    eng.step()
    assert eng.abort("gone")
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert {o.request_id for o in outs} == {"kept"}
    assert sum(len(o.new_token_ids) for o in outs) == 3
    assert_idle(eng)


def test_a_failing_forward_still_delivers_the_outputs_made_and_fails_the_rest():
    llm = LLM("tiny", num_blocks=64, async_output="on")
    eng = llm.engine
    loop = EngineLoop(eng, name="async-fail").start()
    streams = Streams(loop, "short", "long")
    got = streams.got

    def add(e):
        # "short" finished in the step before: the forward that overlaps its last output fails
        failing_forward(e, lambda: "short" not in e.seqs)
        for rid, n in (("short", 2), ("long", 50)):
            streams.listen(rid)
            e.add_request(rid, "Hello", SamplingParams(max_tokens=n, ignore_eos=True))

    try:
        loop.call(add).result(10)
        assert streams.wait()
        assert [len(o.new_token_ids) for o in got["short"]] == [1, 1] and got["short"][-1].finished
        assert isinstance(got["long"][-1], RuntimeError)
        loop.call(lambda e: delattr(e.runner, "execute")).result(10)
        # still serving, and nothing leaked
        out = loop.call(lambda e: e.add_request("after", "Hi", SamplingParams(max_tokens=2))).result(10)
        assert out.request_id == "after"
        wait_idle(loop)
        loop.call(assert_idle).result(10)
    finally:
        loop.stop()


def test_prefill_only_requests_hold_their_blocks_in_the_step_that_ends_them(engines):
    eng = engines["on"].engine
    eng.add_request("pf", "Hello there, prefill only", SamplingParams(max_tokens=5), prefill_only=True)
    assert eng.step() == []
    assert "pf" in eng.held and "pf" not in eng.seqs  # held for the transfer before its output is made
    (out,) = eng.step()
    assert out.finished and out.new_token_ids
    assert eng.release("pf")
    assert_idle(eng)


def test_a_failing_step_keeps_the_hold_of_a_prefill_only_request_whose_last_output_it_made():
    """Async output: a prefill-only request ends (its blocks held for its transfer) in one step, its output comes in
    the next. If that next step's forward fails, the output already went out (the request ended well and its
    transfer goes on reading the held blocks): the failure must not abort it, which would free them under it."""
    llm = LLM("tiny", num_blocks=64, async_output="on")
    eng = llm.engine
    loop = EngineLoop(eng, name="async-fail-held").start()
    streams = Streams(loop, "pf", "long")
    got = streams.got

    def add(e):
        failing_forward(e, lambda: "pf" in e.held)  # pf ended in the step before: this forward overlaps its output
        streams.listen("long")
        e.add_request("long", "Hello", SamplingParams(max_tokens=50, ignore_eos=True))
        streams.listen("pf")
        e.add_request("pf", "Hello there, prefill only", SamplingParams(max_tokens=5), prefill_only=True)

    try:
        loop.call(add).result(10)
        assert streams.wait()
        assert got["pf"][-1].finished and isinstance(got["long"][-1], RuntimeError)
        assert loop.call(lambda e: "pf" in e.held).result(10)  # still held: its transfer owns it until release
        loop.call(lambda e: delattr(e.runner, "execute")).result(10)
        assert loop.call(lambda e: e.release("pf")).result(10)
        loop.call(assert_idle).result(10)
    finally:
        loop.stop()


def test_a_failure_before_the_forward_still_makes_the_last_steps_outputs(engines):
    """The scheduler (or a connector's callback) failing must not lose the outputs the step had still to make."""
    eng = engines["on"].engine
    eng.add_request("before", "Hello", SamplingParams(max_tokens=1))
    eng.add_request("other", "Hello again", SamplingParams(max_tokens=4, ignore_eos=True))
    eng.step()
    assert "before" in eng.unemitted_ids()

    def broken():
        raise RuntimeError("injected scheduler failure")

    eng.scheduler.schedule = broken
    made = []
    try:
        with pytest.raises(RuntimeError, match="injected"):
            eng.step(emit=made.extend)
    finally:
        del eng.scheduler.schedule
    assert [o.request_id for o in made if o.finished] == ["before"]
    assert eng.unemitted_ids() == []
    eng.abort("other")
    while eng.has_unfinished():
        eng.step()
    assert_idle(eng)


def test_the_step_histogram_sees_only_calls_that_ran_a_forward():
    llm = LLM("tiny", num_blocks=64, async_output="on")
    loop = EngineLoop(llm.engine, name="async-hist")
    seen = []
    loop.on_step = seen.append
    loop.start()
    try:
        loop.call(lambda e: e.add_request("h", "Hello", SamplingParams(max_tokens=3, ignore_eos=True))).result(10)
        wait_idle(loop)
        assert loop.call(lambda e: e.num_steps).result(10) == 3  # prefill, then 2 decode steps
        assert len(seen) == 3  # the 4th call only made the last output
    finally:
        loop.stop()
