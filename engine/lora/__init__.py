"""LoRA adapters for the engine (issue 16).

- ``adapter``: PEFT directories (adapter_config.json + adapter_model.safetensors) loaded and validated into
  host-side ``LoRAAdapter`` objects (scale folded into B);
- ``registry``: the engine's adapters by name (load, replace, unload; retiring the old one and dropping its
  prefix-cache blocks);
- ``slots``: ``max_loras`` device slots of stacked, zero-padded weights, swapped in LRU order;
- ``ops``: the grouped batched op of the general step path; ``dense``: the masked op of the static decode
  path (CUDA-graph safe);
- ``hf``: the ``nn.Linear`` wrappers of the HF-module path.

Block hashes of a request under an adapter carry ``engine.hashing.adapter_extra(name)`` (torch-free, shared
with the router's prefix index).
"""
