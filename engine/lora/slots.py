"""Device slots for resident LoRA adapters, swapped in least-recently-used order.

Per (layer, target) one pair of stacked, zero-padded weights: ``a_t`` [in, S * R] and ``b_t`` [S * R, out] for
S = ``max_loras`` slots of rank R = ``max_lora_rank`` (slot s owns columns / rows [s * R, (s + 1) * R)). The
stacks are allocated once, so their addresses never change (CUDA graphs read them); a swap copies an adapter's
host weights into its slot's columns. Adapters are kept by identity (``uid``): a reload under the same name is
a different adapter and never reuses the old slot's contents.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from pdserve.engine.lora.adapter import TARGETS, LoRAAdapter, LoRADims


def fused_spans(dims: LoRADims) -> dict[str, list[tuple[str, int, int]]]:
    """The native model's fused projections: (target, first column, columns) of each part. QKV columns are
    ``[V | Q | K]`` and gate-up ``[up | gate]`` (engine.native.weights)."""
    q, kv, i = dims.shapes["q_proj"][1], dims.shapes["k_proj"][1], dims.shapes["up_proj"][1]
    return {"qkv": [("v_proj", 0, kv), ("q_proj", kv, q), ("k_proj", kv + q, kv)],
            "gate_up": [("up_proj", 0, i), ("gate_proj", i, i)]}


class LoRASlots:
    def __init__(self, dims: LoRADims, num_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device):
        self.dims = dims
        self.num_slots, self.max_rank, self.dtype, self.device = num_slots, max_rank, dtype, device
        width = num_slots * max_rank
        self.stacks: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [
            {t: (torch.zeros(dims.shapes[t][0], width, dtype=dtype, device=device),
                 torch.zeros(width, dims.shapes[t][1], dtype=dtype, device=device)) for t in TARGETS}
            for _ in range(dims.num_layers)
        ]
        self.spans = fused_spans(dims)
        self.occupant: list[LoRAAdapter | None] = [None] * num_slots
        self.resident: OrderedDict[int, int] = OrderedDict()  # adapter uid -> slot, least recently used first
        self.num_swaps = 0

    def slot_of(self, adapter: LoRAAdapter) -> int | None:
        return self.resident.get(adapter.uid)

    def activate(self, adapters: list[LoRAAdapter | None]) -> list[int] | None:
        """The slot of each adapter (-1 for None) after swapping in the missing ones, or None when every entry is
        None (a base-only step: no LoRA work at all). Only adapters outside this list are evicted; the scheduler
        keeps the distinct ones within ``num_slots``."""
        needed = {a.uid: a for a in adapters if a is not None}
        if not needed:
            return None
        if len(needed) > self.num_slots:
            raise RuntimeError(f"lora: a step needs {len(needed)} adapters but there are {self.num_slots} slots")
        for uid, adapter in needed.items():
            if uid not in self.resident:
                self._install(self._victim(needed), adapter)
            self.resident.move_to_end(uid)
        return [-1 if a is None else self.resident[a.uid] for a in adapters]

    def evict(self, adapter: LoRAAdapter) -> bool:
        """Free an adapter's slot (an unloaded adapter no request runs on any more)."""
        slot = self.resident.pop(adapter.uid, None)
        if slot is None:
            return False
        self.occupant[slot] = None
        return True

    def _victim(self, needed: dict[int, LoRAAdapter]) -> int:
        """A free slot, else the slot of a retired adapter, else the least recently used one; never one in
        ``needed``."""
        for slot, occ in enumerate(self.occupant):
            if occ is None:
                return slot
        idle = [uid for uid in self.resident if uid not in needed]
        uid = next((u for u in idle if self.occupant[self.resident[u]].retired), idle[0])
        slot = self.resident.pop(uid)
        self.occupant[slot] = None
        return slot

    @torch.no_grad()
    def _install(self, slot: int, adapter: LoRAAdapter) -> None:
        r0 = slot * self.max_rank
        for layer, stack in enumerate(self.stacks):
            for target, (a_all, b_all) in stack.items():
                a_all[:, r0 : r0 + self.max_rank].zero_()  # padding and absent targets contribute nothing
                b_all[r0 : r0 + self.max_rank].zero_()
                w = adapter.weights.get((layer, target))
                if w is not None:  # each module at its own rank (rank_pattern); the rest stays zero
                    r = w[0].shape[1]
                    a_all[:, r0 : r0 + r].copy_(w[0], non_blocking=True)
                    b_all[r0 : r0 + r].copy_(w[1], non_blocking=True)
        self.occupant[slot] = adapter
        self.resident[adapter.uid] = slot
        self.num_swaps += 1
