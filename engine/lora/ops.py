"""Batched multi-LoRA for the general step path (prefill chunks, mixed batches): ``out += scale * B(A x)`` for
the rows of every adapter in the step, on top of the base projection.

Rows are grouped by slot on the host when the step is built, so the device work is one ``mm`` pair per adapter
present (at most ``max_loras``), never a Python loop over rows: a group that is one run of rows (the usual
case: a request's tokens are contiguous in the flattened batch) works on slices; a scattered one uses
``index_select`` + ``index_add_`` with an index tensor uploaded once per step. Each group uses only its
adapter's real rank (a column slice of the zero-padded stacks), so the FLOPs are exactly the LoRA FLOPs, which
matters for prefill where compute, not weight reads, dominates. (The static decode path uses the masked dense
form in engine.lora.dense instead: fixed shapes for CUDA graphs.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.lora.slots import LoRASlots


@dataclass(slots=True)
class LoRAGroup:
    slot: int
    rank: int
    targets: frozenset[str]
    rows: slice | torch.Tensor  # rows of the flattened step


class LoRAStep:
    """One step's LoRA mapping, passed explicitly to the model: which rows run which slot."""

    def __init__(self, slots: LoRASlots, groups: list[LoRAGroup]):
        self.slots = slots
        self.groups = groups

    def add(self, layer: int, target: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out [T, out] (a view is fine) += the delta of ``target`` in ``layer`` for x [T, in]."""
        a_all, b_all = self.slots.stacks[layer][target]
        big_r = self.slots.max_rank
        for g in self.groups:
            if target not in g.targets:
                continue
            lo = g.slot * big_r
            a, b = a_all[:, lo : lo + g.rank], b_all[lo : lo + g.rank]
            if isinstance(g.rows, slice):
                out[g.rows].addmm_(torch.mm(x[g.rows], a), b)
            else:
                out.index_add_(0, g.rows, torch.mm(torch.mm(x.index_select(0, g.rows), a), b))

    def add_fused(self, layer: int, fused: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """The deltas of a native fused projection (``qkv`` or ``gate_up``), each into its columns of ``out``."""
        for target, start, n in self.slots.spans[fused]:
            self.add(layer, target, x, out[:, start : start + n])


def build_step(slots: LoRASlots, row_slots: list[int], adapters: list, row_counts: list[int],
               device: torch.device) -> LoRAStep:
    """The step's groups from each item's slot (-1: base), its adapter and its number of rows."""
    rows: dict[int, list[int]] = {}
    owner: dict[int, object] = {}
    start = 0
    for slot, adapter, n in zip(row_slots, adapters, row_counts, strict=True):
        if slot >= 0:
            rows.setdefault(slot, []).extend(range(start, start + n))
            owner[slot] = adapter
        start += n
    groups = []
    for slot, ids in rows.items():
        one_run = ids[-1] - ids[0] == len(ids) - 1
        sel = slice(ids[0], ids[-1] + 1) if one_run else torch.tensor(ids, dtype=torch.int64, device=device)
        adapter = owner[slot]
        groups.append(LoRAGroup(slot, adapter.rank, adapter.targets, sel))
    return LoRAStep(slots, groups)
