"""A step's model inputs: the batch as the engine describes it (``BatchItem``) flattened into device tensors
(``StepInputs``) with one host-to-device copy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.attention import SeqAttnInfo


@dataclass(slots=True)
class BatchItem:
    """One sequence's slice of a step: tokens [start, start + len) with their block table."""

    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    needs_logits: bool
    lora: object | None = None  # the LoRAAdapter this sequence runs under (engine.lora), None for the base
    all_logits: bool = False  # logits at every position (prompt logprobs), not only the last


@dataclass(slots=True)
class StepInputs:
    """One step's device tensors, all views of one buffer copied from the host at once."""

    input_ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T]
    slot_blocks: torch.Tensor  # [T]
    slot_offsets: torch.Tensor  # [T]
    logit_rows: torch.Tensor  # [R]
    seqs: list[SeqAttnInfo]
    decode_indices: list[int]
    prefill_indices: list[int]
    decode_block_tables: torch.Tensor | None
    decode_context_lens: torch.Tensor | None
    decode_rows: slice | torch.Tensor | None
    prefill_block_tables: torch.Tensor | None
    prefill_info: torch.Tensor | None


def _split(buf: torch.Tensor, sizes: list[int]) -> list[torch.Tensor | None]:
    """Consecutive views of ``buf`` with these sizes; None for empty ones (cheaper than ``split``)."""
    out: list[torch.Tensor | None] = []
    pos = 0
    for n in sizes:
        out.append(buf[pos : pos + n] if n else None)
        pos += n
    return out


class InputPreparer:
    """Builds each step's ``StepInputs`` for a cache of ``block_size``-token blocks on ``device``."""

    def __init__(self, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device

    def prepare(self, items: list[BatchItem]) -> StepInputs:
        """Flatten the batch on the host into one int64 buffer, copy it to the device once, then slice it.

        One host->device copy per step (pinned and asynchronous on CUDA) instead of one blocking copy per
        tensor, and only views afterwards: no per-sequence block-table tensors, no per-layer index tensors.
        """
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        logit_rows: list[int] = []
        decode_idx: list[int] = []
        prefill_idx: list[int] = []
        geom: list[tuple[int, int, int, int]] = []  # query_start, query_len, context_len, num ctx blocks
        for i, it in enumerate(items):
            n = len(it.token_ids)
            start = len(input_ids)
            p0 = it.start_pos
            ctx = p0 + n
            input_ids += it.token_ids
            if n == 1:
                positions.append(p0)
                slot_blocks.append(it.block_ids[p0 // bs])
                slot_offsets.append(p0 % bs)
                decode_idx.append(i)
            else:
                positions += range(p0, ctx)
                first, last = p0 // bs, (ctx - 1) // bs
                skip = p0 - first * bs
                slot_blocks += [b for b in it.block_ids[first : last + 1] for _ in range(bs)][skip : skip + n]
                slot_offsets += (list(range(bs)) * (last + 1 - first))[skip : skip + n]
                prefill_idx.append(i)
            geom.append((start, n, ctx, (ctx + bs - 1) // bs))
            if it.all_logits:
                logit_rows += range(start, start + n)
            elif it.needs_logits:
                logit_rows.append(start + n - 1)
        num_tokens = len(input_ids)
        host = input_ids
        host += positions
        host += slot_blocks
        host += slot_offsets
        host += logit_rows
        dec_width = max((geom[i][3] for i in decode_idx), default=0)
        for i in decode_idx:
            table = items[i].block_ids[: geom[i][3]]
            host += table
            host += [0] * (dec_width - len(table))
        host += [geom[i][2] for i in decode_idx]
        pre_width = max((geom[i][3] for i in prefill_idx), default=0)
        for i in prefill_idx:
            table = items[i].block_ids[: geom[i][3]]
            host += table
            host += [0] * (pre_width - len(table))
        for i in prefill_idx:
            host += geom[i][:3]
        starts = [geom[i][0] for i in decode_idx]
        # decode rows are usually one run (each is one token); else they need an index tensor
        one_run = not starts or starts[-1] - starts[0] == len(starts) - 1
        if not one_run:
            host += starts
        buf = self._to_device(host)

        sizes = [num_tokens] * 4 + [len(logit_rows), len(decode_idx) * dec_width, len(decode_idx),
                                    len(prefill_idx) * pre_width, 3 * len(prefill_idx), 0 if one_run else len(starts)]
        ids_t, pos_t, blocks_t, offsets_t, logits_t, dec_t, dec_lens_t, pre_t, info_t, rows_t = _split(buf, sizes)
        dec_tables = dec_t.view(len(decode_idx), dec_width) if decode_idx else None
        pre_tables = pre_t.view(len(prefill_idx), pre_width) if prefill_idx else None
        seqs: list[SeqAttnInfo] = [None] * len(items)  # type: ignore[list-item]
        for idx, tables, width in ((decode_idx, dec_tables, dec_width), (prefill_idx, pre_tables, pre_width)):
            if not idx:
                continue
            for i, row in zip(idx, tables.unbind(0), strict=True):  # one call for all the row views
                start, n, ctx, nblk = geom[i]
                seqs[i] = SeqAttnInfo(start, n, ctx, row if nblk == width else row[:nblk])
        rows: slice | torch.Tensor | None = None
        if decode_idx:
            rows = slice(starts[0], starts[0] + len(starts)) if one_run else rows_t
        return StepInputs(
            input_ids=ids_t.view(1, num_tokens),
            positions=pos_t.view(1, num_tokens),
            slot_blocks=blocks_t,
            slot_offsets=offsets_t,
            logit_rows=logits_t if logits_t is not None else buf[:0],  # a chunk mid-prompt: no logits
            seqs=seqs,
            decode_indices=decode_idx,
            prefill_indices=prefill_idx,
            decode_block_tables=dec_tables,
            decode_context_lens=dec_lens_t if decode_idx else None,
            decode_rows=rows,
            prefill_block_tables=pre_tables,
            prefill_info=info_t.view(len(prefill_idx), 3).to(torch.int32) if prefill_idx else None,
        )

    def _to_device(self, host: list[int]) -> torch.Tensor:
        if self.device.type == "cpu":
            return torch.tensor(host, dtype=torch.int64)
        # pinned: the copy is asynchronous, and the caching host allocator keeps the buffer until it is done
        return torch.tensor(host, dtype=torch.int64, pin_memory=True).to(self.device, non_blocking=True)
