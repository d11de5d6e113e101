"""Loads an HF causal LM and runs flattened variable-length batches over the paged KV cache."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.attention import ATTN_IMPL, BACKENDS, AttentionMetadata, SeqAttnInfo, register_with_transformers
from engine.config import EngineConfig
from engine.kv_cache import KVCache, KVCacheSpec, LayoutFingerprint
from engine.models import resolve_model

logger = logging.getLogger(__name__)


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """The backend to run: ``auto`` is triton on CUDA when its kernels load and fit the GPU, else torch.

    An explicit ``triton`` that cannot run here, or an unregistered name, is a ValueError naming the field.
    """
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        from engine.kernels import load_triton_backend, self_check

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
    from transformers import AutoConfig, AutoModelForCausalLM

    register_with_transformers()
    try:
        hf_config = AutoConfig.from_pretrained(path, revision=config.revision)
    except (OSError, ValueError) as e:
        raise ValueError(f"model: cannot load {config.model!r}: {e}") from None
    if dummy or config.load_format == "dummy":
        seed = config.seed
        marker = Path(path) / "pdserve_dummy.json"
        if marker.exists():
            seed = json.loads(marker.read_text()).get("seed", seed)
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
    return hf_config, model.to(config.device).eval()


class ModelRunner:
    def __init__(self, config: EngineConfig, shared_kv: bool = False):
        register_with_transformers()
        self.config = config
        self.device = torch.device(config.device)
        self.attention_backend = resolve_attention_backend(config.attention_backend, self.device)
        self.dtype = config.torch_dtype()
        path, dummy = resolve_model(config.model)
        self.model_path = path
        self.hf_config, self.model = _load_model(path, dummy, config, self.dtype)
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
            "loaded %s: %d layers, %d kv heads x %d, %d KV blocks of %d tokens on %s/%s, attention %s",
            config.model,
            g.num_layers,
            g.num_kv_heads,
            g.head_dim,
            num_blocks,
            config.block_size,
            config.device,
            self.fingerprint.dtype,
            self.attention_backend,
        )

    @property
    def num_blocks(self) -> int:
        return self.kv.spec.num_blocks

    @torch.inference_mode()
    def execute(
        self, items: list[BatchItem], layer_hook: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Run one flattened step. Returns float32 logits [num items with needs_logits, vocab]."""
        bs = self.config.block_size
        dev = self.device
        input_ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        seqs: list[SeqAttnInfo] = []
        logit_rows: list[int] = []
        decode_idx: list[int] = []
        prefill_idx: list[int] = []
        for i, it in enumerate(items):
            n = len(it.token_ids)
            start = len(input_ids)
            input_ids.extend(it.token_ids)
            pos = range(it.start_pos, it.start_pos + n)
            positions.extend(pos)
            slot_blocks.extend(it.block_ids[p // bs] for p in pos)
            slot_offsets.extend(p % bs for p in pos)
            ctx = it.start_pos + n
            num_ctx_blocks = (ctx + bs - 1) // bs
            seqs.append(SeqAttnInfo(start, n, ctx, torch.tensor(it.block_ids[:num_ctx_blocks], device=dev)))
            (decode_idx if n == 1 else prefill_idx).append(i)
            if it.needs_logits:
                logit_rows.append(start + n - 1)
        dec_tables = dec_lens = None
        if decode_idx:
            width = max(len(seqs[i].block_table) for i in decode_idx)
            tables = [items[i].block_ids[: len(seqs[i].block_table)] for i in decode_idx]
            dec_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=dev)
            dec_lens = torch.tensor([seqs[i].context_len for i in decode_idx], device=dev)
        meta = AttentionMetadata(
            kv_caches=self.kv.layers,
            block_size=bs,
            slot_blocks=torch.tensor(slot_blocks, device=dev),
            slot_offsets=torch.tensor(slot_offsets, device=dev),
            seqs=seqs,
            decode_indices=decode_idx,
            prefill_indices=prefill_idx,
            decode_block_tables=dec_tables,
            decode_context_lens=dec_lens,
            backend=self.attention_backend,
            layer_hook=layer_hook,
        )
        out = self.model(
            input_ids=torch.tensor([input_ids], device=dev),
            position_ids=torch.tensor([positions], device=dev),
            use_cache=False,
            logits_to_keep=torch.tensor(logit_rows, device=dev, dtype=torch.long),
            pd_meta=meta,
        )
        return out.logits[0].float()
