"""Loads an HF causal LM and runs flattened variable-length batches over the paged KV cache."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve.engine.attention import (
    ATTN_IMPL,
    BACKENDS,
    AttentionMetadata,
    SeqAttnInfo,
    register_with_transformers,
)
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_cache import KVCache, KVCacheSpec, LayoutFingerprint
from pdserve.engine.models import resolve_model
from pdserve.engine.native import load_native, resolve_model_impl

logger = logging.getLogger(__name__)


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """The backend to run: ``auto`` is triton on CUDA when its kernels load and fit the GPU, else torch.

    An explicit ``triton`` that cannot run here, or an unregistered name, is a ValueError naming the field.
    """
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        from pdserve.engine.kernels import load_triton_backend, self_check

        usable, why = load_triton_backend(device)
        if usable:
            why = self_check(device)
            usable = not why
        if name == "auto":
            if not usable and device.type == "cuda":
                logger.warning("attention backend: triton not used (%s); using torch", why)
            return "triton" if usable else "torch"
        if not usable:
            raise ValueError(f"attention_backend: 'triton' cannot run here: {why}")
    if name == "auto":
        return "torch"
    if name not in BACKENDS:  # checked here: backends register at run time
        raise ValueError(f"attention_backend: unknown backend {name!r}; registered: {sorted(BACKENDS)}")
    return name


@dataclass(slots=True)
class BatchItem:
    """One sequence's slice of a step: tokens [start, start + len) with their block table."""

    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    needs_logits: bool


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


@dataclass(frozen=True, slots=True)
class ModelGeometry:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position: int


def _geometry(hf_config) -> ModelGeometry:
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelGeometry(
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab_size=text.vocab_size,
        max_position=getattr(text, "max_position_embeddings", 4096),
    )


def _load_model(path: str, dummy: bool, config: EngineConfig, dtype: torch.dtype):
    """(hf_config, model, impl): impl is ``native`` (engine.native) or ``hf`` (transformers' modules)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    register_with_transformers()
    try:
        hf_config = AutoConfig.from_pretrained(path, revision=config.revision)
    except (OSError, ValueError) as e:
        raise ValueError(f"model: cannot load {config.model!r}: {e}") from None
    impl = resolve_model_impl(config.model_impl, hf_config)
    dummy = dummy or config.load_format == "dummy"
    seed = config.seed
    marker = Path(path) / "pdserve_dummy.json"
    if dummy and marker.exists():
        seed = json.loads(marker.read_text()).get("seed", seed)
    if impl == "native":
        max_len = _geometry(hf_config).max_position
        model = load_native(hf_config, path, dummy, seed, dtype, torch.device(config.device), max_len)
        return hf_config, model, impl
    if dummy:
        torch.manual_seed(seed)
        with torch.device(config.device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation=ATTN_IMPL)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path, revision=config.revision, dtype=dtype, attn_implementation=ATTN_IMPL
            )
        except (OSError, ValueError) as e:
            raise ValueError(f"model: cannot load {config.model!r}: {e}") from None
    return hf_config, model.to(config.device).eval(), impl


def _split(buf: torch.Tensor, sizes: list[int]) -> list[torch.Tensor | None]:
    """Consecutive views of ``buf`` with these sizes; None for empty ones (cheaper than ``split``)."""
    out: list[torch.Tensor | None] = []
    pos = 0
    for n in sizes:
        out.append(buf[pos : pos + n] if n else None)
        pos += n
    return out


class ModelRunner:
    def __init__(self, config: EngineConfig, shared_kv: bool = False):
        register_with_transformers()
        self.config = config
        self.device = torch.device(config.device)
        self.attention_backend = resolve_attention_backend(config.attention_backend, self.device)
        self.dtype = config.torch_dtype()
        path, dummy = resolve_model(config.model)
        self.model_path = path
        self.hf_config, self.model, self.model_impl = _load_model(path, dummy, config, self.dtype)
        self.geometry = g = _geometry(self.hf_config)
        self.max_model_len = min(config.max_model_len or g.max_position, g.max_position)
        spec0 = KVCacheSpec(
            g.num_layers, 1, config.block_size, g.num_kv_heads, g.head_dim, self.dtype, config.device
        )
        num_blocks = config.num_blocks or max(
            1, config.kv_cache_bytes // (spec0.layer_bytes() * g.num_layers)
        )
        self.kv = KVCache(
            KVCacheSpec(
                g.num_layers,
                num_blocks,
                config.block_size,
                g.num_kv_heads,
                g.head_dim,
                self.dtype,
                config.device,
            ),
            shared=shared_kv,
        )
        self.fingerprint = LayoutFingerprint(
            model_id=config.model,
            revision=config.revision,
            num_layers=g.num_layers,
            num_kv_heads=g.num_kv_heads,
            head_dim=g.head_dim,
            block_size=config.block_size,
            dtype=str(self.dtype).removeprefix("torch."),
            hash_seed=config.hash_seed,
        )
        logger.info(
            "loaded %s (%s): %d layers, %d kv heads x %d, %d KV blocks of %d tokens on %s/%s, attention %s",
            config.model,
            self.model_impl,
            g.num_layers,
            g.num_kv_heads,
            g.head_dim,
            num_blocks,
            config.block_size,
            config.device,
            self.fingerprint.dtype,
            self.attention_backend,
        )
        self._no_mask = torch.empty(1, 1, 0, 0, dtype=torch.bool, device=self.device)
        self.native = None
        if self.model_impl == "native":
            from pdserve.engine.native.executor import NativeExecutor

            self.native = NativeExecutor(
                self.model, self.kv.layers, config.block_size, self.attention_backend, self.max_model_len
            )
            if config.use_cuda_graphs():
                from pdserve.engine.native.graphs import capture_decode_graphs

                self.native.graphs = capture_decode_graphs(self.native, config.max_num_seqs)

    @property
    def num_blocks(self) -> int:
        return self.kv.spec.num_blocks

    @torch.inference_mode()
    def execute(
        self, items: list[BatchItem], layer_hook: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Run one flattened step. Returns float32 logits [num items with needs_logits, vocab]."""
        if self.native is not None and layer_hook is None and self.native.is_decode(items):
            return self.native.decode(items)  # the static (graph-ready) decode path
        inputs = self._prepare(items)
        meta = AttentionMetadata(
            kv_caches=self.kv.layers,
            block_size=self.config.block_size,
            slot_blocks=inputs.slot_blocks,
            slot_offsets=inputs.slot_offsets,
            seqs=inputs.seqs,
            decode_indices=inputs.decode_indices,
            prefill_indices=inputs.prefill_indices,
            decode_block_tables=inputs.decode_block_tables,
            decode_context_lens=inputs.decode_context_lens,
            backend=self.attention_backend,
            layer_hook=layer_hook,
            decode_rows=inputs.decode_rows,
            prefill_block_tables=inputs.prefill_block_tables,
            prefill_info=inputs.prefill_info,
        )
        if self.native is not None:
            return self.native.forward(inputs, meta)
        out = self.model(
            input_ids=inputs.input_ids,
            position_ids=inputs.positions,
            # a prepared 4-D mask makes transformers skip mask creation, whose packed-sequence check reads a
            # device tensor back to the host (a sync) every step; pdserve attention never looks at it
            attention_mask=self._no_mask,
            use_cache=False,
            # every row (a pure decode step): keep all, a view, rather than an index copy
            logits_to_keep=0 if inputs.logit_rows.numel() == inputs.input_ids.shape[1] else inputs.logit_rows,
            pd_meta=meta,
        )
        return out.logits[0].float()

    def _prepare(self, items: list[BatchItem]) -> StepInputs:
        """Flatten the batch on the host into one int64 buffer, copy it to the device once, then slice it.

        One host->device copy per step (pinned and asynchronous on CUDA) instead of one blocking copy per
        tensor, and only views afterwards: no per-sequence block-table tensors, no per-layer index tensors.
        """
        bs = self.config.block_size
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
            if it.needs_logits:
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
