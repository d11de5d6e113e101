"""Frozen, validated configuration for the engine."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.models import DEFAULT_MODEL
from pdserve.engine.priority import DEFAULT_AGING_S

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype: unknown dtype {name!r}; choose one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything the engine needs to run one model.

    model: a preset name (``tiny-chat``, the default; ``tiny``, ``tiny-qwen2``, ``llama-1b-dummy``...), a local HF directory or a hub id.
    num_blocks: KV blocks per layer; 0 means derive from ``kv_cache_bytes``.
    attention_backend: a registered attention backend (``torch``, ``triton``) or ``auto``: triton on CUDA
    when it is installed and usable, else torch.
    model_impl: ``native`` (engine.native: Llama, Qwen2, Qwen3, Mistral), ``hf`` (transformers' modules over
    the paged attention) or ``auto``: native for those families, hf for any other architecture.
    cuda_graphs: capture the native decode step into CUDA graphs per batch-size bucket at start-up (CUDA and
    the triton backend only; elsewhere the same static decode path runs eagerly).
    compile: torch.compile the native model's dense regions (norms, projections, RoPE, MLP) of prefill and
    mixed steps, at start-up (engine.native.compiled); ignored, with a warning, where the model runs on HF modules.
    async_output: ``on``: make a step's outputs (detokenized text, stop strings, logprob dicts) after the next
    step's forward and sampling are queued and before their tokens are read back (engine.stepper); ``off``: each
    step's outputs are made before ``step`` returns; ``auto`` (the default): on for CUDA devices, off on CPU, where
    the forward runs as it is queued and the overlap gains nothing (bench/overlap_bench.py).
    """

    model: str = DEFAULT_MODEL
    revision: str = "main"
    device: str = "cpu"
    dtype: str = "auto"
    block_size: int = 16
    num_blocks: int = 0
    kv_cache_bytes: int = 256 * 1024 * 1024
    max_model_len: int = 0
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    enable_prefix_caching: bool = True
    hash_seed: int = 0
    seed: int = 0
    load_format: str = "auto"
    attention_backend: str = "auto"
    model_impl: str = "auto"
    cuda_graphs: bool = True
    compile: bool = False
    async_output: str = "auto"
    priority_aging_s: float = DEFAULT_AGING_S  # seconds of waiting worth one priority level; 0: none (engine.priority)
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 64
    lora_modules: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: must be a preset name, a local directory or a hub id")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size: must be a positive power of two, got {self.block_size}")
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks: must be >= 0, got {self.num_blocks}")
        if self.num_blocks == 0 and self.kv_cache_bytes <= 0:
            raise ValueError("kv_cache_bytes: must be > 0 when num_blocks is 0")
        if self.max_model_len < 0:
            raise ValueError(f"max_model_len: must be >= 0, got {self.max_model_len}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens: must be > 0, got {self.max_num_batched_tokens}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs: must be > 0, got {self.max_num_seqs}")
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        if not -(2**63) <= self.hash_seed < 2**63:
            raise ValueError(f"hash_seed: must fit in a signed 64-bit integer, got {self.hash_seed}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format: must be 'auto' or 'dummy', got {self.load_format!r}")
        if not self.attention_backend or not isinstance(self.attention_backend, str):
            raise ValueError(f"attention_backend: must be 'auto' or a backend name, got {self.attention_backend!r}")
        if self.model_impl not in ("auto", "native", "hf"):
            raise ValueError(f"model_impl: must be 'auto', 'native' or 'hf', got {self.model_impl!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs: must be a bool, got {self.cuda_graphs!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile: must be a bool, got {self.compile!r}")
        if self.async_output not in ("auto", "on", "off"):
            raise ValueError(f"async_output: must be 'auto', 'on' or 'off', got {self.async_output!r}")
        if self.compile and self.model_impl == "hf":
            raise ValueError("compile: needs the native model implementation (model_impl 'native' or 'auto')")
        if not self.priority_aging_s >= 0 or self.priority_aging_s == float("inf"):
            raise ValueError(f"priority_aging_s: must be >= 0 and finite, got {self.priority_aging_s}")
        self._check_lora()
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device: must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    def _check_lora(self) -> None:
        if not isinstance(self.enable_lora, bool):
            raise ValueError(f"enable_lora: must be a bool, got {self.enable_lora!r}")
        if not isinstance(self.max_loras, int) or isinstance(self.max_loras, bool) or self.max_loras < 1:
            raise ValueError(f"max_loras: must be an integer >= 1, got {self.max_loras!r}")
        rank = self.max_lora_rank
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= 512:
            raise ValueError(f"max_lora_rank: must be an integer in [1, 512], got {rank!r}")
        if not isinstance(self.lora_modules, tuple):
            raise ValueError(f"lora_modules: must be a tuple of (name, path) pairs, got {type(self.lora_modules).__name__}")
        names = set()
        for pair in self.lora_modules:
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(x, str) and x for x in pair)):
                raise ValueError(f"lora_modules: each entry must be a (name, path) pair of non-empty strings, got {pair!r}")
            if pair[0] in names:
                raise ValueError(f"lora_modules: adapter name {pair[0]!r} appears twice")
            names.add(pair[0])
        if self.lora_modules and not self.enable_lora:
            raise ValueError("lora_modules: adapters given but enable_lora is False")

    def use_async_output(self) -> bool:
        return self.async_output == "on" or (self.async_output == "auto" and self.device.startswith("cuda"))

    def use_cuda_graphs(self) -> bool:
        return self.cuda_graphs and self.device.startswith("cuda")

    def torch_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return parse_dtype(self.dtype)
        return torch.float32 if self.device == "cpu" else torch.bfloat16
