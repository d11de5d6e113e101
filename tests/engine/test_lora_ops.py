"""The batched LoRA ops against a per-row reference: grouped (slices and scattered rows, real ranks) and the
dense masked form of the static decode path; slots and LRU; no LoRA work at all in base-only steps."""

from __future__ import annotations

import pytest
import torch

from pdserve import LLM, SamplingParams
from pdserve.engine.lora.adapter import LoRAAdapter, LoRADims
from pdserve.engine.lora.dense import LoRADecodeBuffers
from pdserve.engine.lora.ops import LoRAStep, build_step
from pdserve.engine.lora.slots import LoRASlots
from tests.engine.lora_helpers import make_adapter

DIMS = LoRADims(2, {"q_proj": (8, 8), "k_proj": (8, 4), "v_proj": (8, 4), "o_proj": (8, 8),
                    "gate_proj": (8, 12), "up_proj": (8, 12), "down_proj": (12, 8)})


def _adapter(name: str, rank: int, seed: int, targets=("q_proj", "v_proj", "down_proj")) -> LoRAAdapter:
    g = torch.Generator().manual_seed(seed)
    weights = {(layer, t): (torch.randn(DIMS.shapes[t][0], rank, generator=g),
                            torch.randn(rank, DIMS.shapes[t][1], generator=g))
               for layer in range(2) for t in targets}
    return LoRAAdapter(name, "/x", rank, 1.0, weights, frozenset(targets))


def _reference(x, adapters_per_row, layer, target):
    rows = []
    for xi, a in zip(x, adapters_per_row, strict=True):
        w = a.weights.get((layer, target)) if a is not None else None
        rows.append(torch.zeros(DIMS.shapes[target][1]) if w is None else xi @ w[0] @ w[1])
    return torch.stack(rows)


def test_grouped_and_dense_match_a_per_row_reference():
    slots = LoRASlots(DIMS, 3, 8, torch.float32, torch.device("cpu"))
    a, b, c = _adapter("a", 2, 1), _adapter("b", 8, 2), _adapter("c", 5, 3, targets=("k_proj",))
    items = [a, None, b, a, c]  # a's rows are scattered, b's and c's one run each
    counts = [3, 2, 4, 1, 2]
    row_slots = slots.activate(items)
    assert row_slots[1] == -1 and len(set(row_slots)) == 4
    step = build_step(slots, row_slots, items, counts, torch.device("cpu"))
    assert isinstance(step, LoRAStep) and {type(g.rows).__name__ for g in step.groups} == {"slice", "Tensor"}
    per_row = [it for it, n in zip(items, counts, strict=True) for _ in range(n)]
    x = torch.randn(sum(counts), 8)
    for target in ("q_proj", "k_proj", "down_proj"):
        xin = torch.randn(sum(counts), 12) if target == "down_proj" else x
        out = torch.zeros(sum(counts), DIMS.shapes[target][1])
        step.add(1, target, xin, out)
        torch.testing.assert_close(out, _reference(xin, per_row, 1, target))
    # dense: one token per row, rows past the batch repeat row 0
    dense = LoRADecodeBuffers(slots, 6, torch.device("cpu"))
    dense.fill(row_slots)
    dense.prepare()
    rows = items + [items[0]]
    x = torch.randn(6, 8)
    out = torch.zeros(6, 8)
    dense.add(0, "q_proj", x, out)
    torch.testing.assert_close(out, _reference(x, rows, 0, "q_proj"))
    # fused columns: [V | Q | K] of a QKV output, each delta into its own span
    fused = torch.zeros(6, 16)
    dense.add_fused(0, "qkv", x, fused)
    torch.testing.assert_close(fused[:, 4:12], _reference(x, rows, 0, "q_proj"))
    torch.testing.assert_close(fused[:, :4], _reference(x, rows, 0, "v_proj"))
    torch.testing.assert_close(fused[:, 12:], _reference(x, rows, 0, "k_proj"))


def test_dense_decode_keeps_a_row_clean_of_another_slots_overflow():
    """Every row runs every slot's shrink; a slot whose shrink overflows (inf) must not reach the other rows."""
    slots = LoRASlots(DIMS, 2, 4, torch.float32, torch.device("cpu"))
    huge, ok = _adapter("huge", 2, 1), _adapter("ok", 2, 2)
    huge.weights[(0, "q_proj")] = (torch.full((8, 2), 3e38), torch.randn(2, 8))  # finite, x @ A overflows
    items = [huge, None, ok]
    row_slots = slots.activate(items)
    dense = LoRADecodeBuffers(slots, 3, torch.device("cpu"))
    dense.fill(row_slots)
    dense.prepare()
    x = torch.ones(3, 8)
    out = torch.zeros(3, 8)
    dense.add(0, "q_proj", x, out)
    assert not torch.isfinite(out[0]).all(), "the overflowing row itself is not finite"
    torch.testing.assert_close(out[1], torch.zeros(8), msg="a base row gets no delta")
    torch.testing.assert_close(out[2], _reference(x[2:], [ok], 0, "q_proj")[0])


def test_slots_lru_never_evicts_what_the_step_needs():
    slots = LoRASlots(DIMS, 2, 8, torch.float32, torch.device("cpu"))
    a, b, c = _adapter("a", 2, 1), _adapter("b", 8, 2), _adapter("c", 5, 3)
    assert slots.activate([None, None]) is None and slots.num_swaps == 0
    assert slots.activate([a, b]) == [0, 1]
    assert slots.activate([b, c]) == [1, 0]  # a was least recently used
    assert slots.activate([a]) == [1]  # b is now the LRU one (c was used last)
    with pytest.raises(RuntimeError, match="needs 3 adapters"):
        slots.activate([a, b, c])
    c.retired = True  # a retired adapter goes first
    assert slots.activate([a, b]) == [1, 0]
    assert slots.num_swaps == 5
    # a slot holds only its adapter: padding and targets it lacks are zero
    a_all, b_all = slots.stacks[0]["o_proj"]
    assert a_all.abs().sum() == 0 and b_all.abs().sum() == 0
    q_a, _ = slots.stacks[0]["q_proj"]
    assert q_a[:, 8 + 2 : 16].abs().sum() == 0 and q_a[:, 8 : 8 + 2].abs().sum() > 0


@pytest.mark.parametrize("impl", ["native", "hf"])
def test_base_only_steps_do_no_lora_work(tmp_path, monkeypatch, impl):
    llm = LLM("tiny", num_blocks=64, enable_lora=True, model_impl=impl)
    llm.engine.load_adapter("a", make_adapter(llm.engine.runner.model_path, tmp_path / "a", 4, seed=1))
    calls = []
    for cls in (LoRAStep, LoRADecodeBuffers):
        for name in ("add", "prepare"):
            if hasattr(cls, name):
                inner = getattr(cls, name)
                monkeypatch.setattr(cls, name, lambda *a, _i=inner, **k: (calls.append(1), _i(*a, **k))[1])
    params = SamplingParams(max_tokens=6, temperature=0)
    llm.generate([[5, 6, 7], list(range(3, 40))], params)
    assert calls == [] and llm.engine.runner.lora_slots.num_swaps == 0
    llm.generate([[5, 6, 7]], params, lora_name="a")
    assert calls, "the adapter step does run LoRA"


def test_static_decode_in_a_padded_bucket_with_adapters(tmp_path):
    """What a CUDA-graph bucket does, run eagerly: the decode step in buffers larger than the batch (rows past it
    repeat row 0, LoRA slot included) gives the same logits as the exact-size step."""
    from pdserve.engine.native.decode import DecodeBuffers

    llm = LLM("tiny", num_blocks=64, enable_lora=True, model_impl="native")
    eng = llm.engine
    path = eng.runner.model_path
    eng.load_adapter("a", make_adapter(path, tmp_path / "a", 8, seed=4))
    eng.load_adapter("b", make_adapter(path, tmp_path / "b", 4, seed=5))
    ex = eng.runner.native
    inner = ex.decode
    checked = []

    def spy(items, lora_slots=None):
        out = inner(items, lora_slots)
        if lora_slots is not None and len(items) == 3:
            width = max(it.start_pos // ex.block_size + 1 for it in items)
            bufs = DecodeBuffers(ex, 5, width)
            bufs.fill(items, lora_slots)
            bufs.upload()
            torch.testing.assert_close(ex.decode_forward(bufs)[:3], out)
            checked.append(sorted(lora_slots))
        return out

    ex.decode = spy
    outs = llm.generate([[5, 6, 7], list(range(3, 30)), [9] * 20], SamplingParams(max_tokens=5, temperature=0),
                        lora_name=["a", None, "b"])
    assert all(len(o.token_ids) == 5 for o in outs)
    assert len(checked) == 4 and checked[0][0] == -1 and len(set(checked[0])) == 3
