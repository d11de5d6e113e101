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
    register_with_transformers,
)
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_cache import KVCache, KVCacheSpec, LayoutFingerprint
from pdserve.engine.lora.ops import build_step
from pdserve.engine.models import resolve_model
from pdserve.engine.native import load_native, resolve_model_impl
from pdserve.engine.step_inputs import BatchItem, InputPreparer

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
        self.inputs = InputPreparer(config.block_size, self.device)
        self._no_mask = torch.empty(1, 1, 0, 0, dtype=torch.bool, device=self.device)
        self.lora_slots, self.lora_context = None, None  # engine.lora: device slots; the HF wrappers' context
        if config.enable_lora:
            from pdserve.engine.lora.adapter import LoRADims
            from pdserve.engine.lora.hf import wrap_hf_model
            from pdserve.engine.lora.slots import LoRASlots

            dims = LoRADims.from_hf(self.hf_config)
            self.lora_slots = LoRASlots(dims, config.max_loras, config.max_lora_rank, self.dtype, self.device)
            if self.model_impl == "hf":
                self.lora_context = wrap_hf_model(self.model)
        self.native = None
        if self.model_impl == "native":
            from pdserve.engine.native.executor import NativeExecutor

            self.native = NativeExecutor(
                self.model, self.kv.layers, config.block_size, self.attention_backend, self.max_model_len,
                lora_slots=self.lora_slots,
            )
            if config.compile:
                from pdserve.engine.native.compiled import CompiledRegions

                self.native.compiled = CompiledRegions(self.model)
            if config.use_cuda_graphs():
                from pdserve.engine.native.graphs import capture_decode_graphs

                self.native.graphs = capture_decode_graphs(self.native, config.max_num_seqs)
        elif config.compile:
            logger.warning("compile: %s runs on HF modules (no native implementation); not compiled",
                           self.hf_config.model_type)

    @property
    def num_blocks(self) -> int:
        return self.kv.spec.num_blocks

    @torch.inference_mode()
    def execute(
        self, items: list[BatchItem], layer_hook: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Run one flattened step. Returns float32 logits: one row per item with needs_logits, or n rows for an item
        of n tokens with all_logits (engine.prompt_logprobs)."""
        # each item's LoRA slot after swapping in the step's adapters; None: no adapter, no LoRA work at all
        slots = self.lora_slots.activate([it.lora for it in items]) if self.lora_slots is not None else None
        if self.native is not None and layer_hook is None and self.native.is_decode(items):
            return self.native.decode(items, slots)  # the static (graph-ready) decode path
        inputs = self.inputs.prepare(items)
        lora = None
        if slots is not None:
            lora = build_step(self.lora_slots, slots, [it.lora for it in items],
                              [len(it.token_ids) for it in items], self.device)
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
            return self.native.forward(inputs, meta, lora)
        if self.lora_context is not None:
            self.lora_context.step = lora  # read by the wrapped projections during this forward only
        try:
            return self._hf_forward(inputs, meta)
        finally:
            if self.lora_context is not None:
                self.lora_context.step = None

    def _hf_forward(self, inputs, meta: AttentionMetadata) -> torch.Tensor:
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
