"""Multi-LoRA for the native static decode step (engine.native.decode) and its CUDA graphs.

The shapes of a decode step are fixed by its batch size, so this form avoids any data-dependent shape: each row
runs every slot's shrink (``x @ A_all``, [rows, S * R]), a per-row mask over slots sets the slots the row does
not use to zero (a fill, not a multiply: another slot's overflow, inf * 0, must not turn this row into NaN), and
one expand (``@ B_all``) adds the delta. Decode is bound by reading weights, and this
reads each resident adapter's A and B once per step, as a grouped form would; the extra FLOPs (S * R columns
per row) are small at decode batch sizes. The row -> slot indices live in a persistent buffer (filled on the
host before each step, copied in with the other inputs), and the mask is derived from it inside the step, so a
captured graph stays valid as adapters come and go (swaps copy into the same stack tensors).
"""

from __future__ import annotations

import numpy as np
import torch

from pdserve.engine.lora.slots import LoRASlots


class LoRADecodeBuffers:
    def __init__(self, slots: LoRASlots, batch: int, device: torch.device):
        s, big_r = slots.num_slots, slots.max_rank
        self.slots, self.batch, self.device = slots, batch, device
        if device.type == "cpu":  # the step reads the host array in place
            self.idx = torch.full((batch,), -1, dtype=torch.int64)
            self.host = self.idx.numpy()
        else:
            self.idx = torch.full((batch,), -1, dtype=torch.int64, device=device)
            self.host = np.full(batch, -1, dtype=np.int64)
        self.slot_ids = torch.arange(s, device=device).view(1, s)
        self.miss = torch.empty(batch, s, dtype=torch.bool, device=device)  # slots a row does not use
        self.miss3 = self.miss.view(batch, s, 1)
        self.shrunk = torch.empty(batch, s * big_r, dtype=slots.dtype, device=device)
        self.shrunk3 = self.shrunk.view(batch, s, big_r)
        self.active = False  # any adapter in this step (else the layers skip LoRA entirely)

    def fill(self, row_slots: list[int] | None) -> None:
        """Each row's slot (-1: base); rows past the batch repeat row 0, like the other padded inputs."""
        self.active = row_slots is not None
        if row_slots is None:
            return
        n = len(row_slots)
        self.host[:n] = row_slots
        self.host[n:] = row_slots[0]

    def upload(self) -> None:
        if self.device.type != "cpu":
            self.idx.copy_(torch.from_numpy(self.host).pin_memory(), non_blocking=True)

    def prepare(self) -> None:
        """Once per step, before the layers: the [rows, S] slot mask from the row indices (graph-safe)."""
        torch.ne(self.idx.view(-1, 1), self.slot_ids, out=self.miss)

    def add(self, layer: int, target: str, x: torch.Tensor, out: torch.Tensor) -> None:
        a_all, b_all = self.slots.stacks[layer][target]
        torch.mm(x, a_all, out=self.shrunk)
        self.shrunk3.masked_fill_(self.miss3, 0.0)
        out.addmm_(self.shrunk, b_all)

    def add_fused(self, layer: int, fused: str, x: torch.Tensor, out: torch.Tensor) -> None:
        for target, start, n in self.slots.spans[fused]:
            self.add(layer, target, x, out[:, start : start + n])
