"""LoRA on the HF-module path (engine.model_runner with transformers' own modules): each target ``nn.Linear``
of each decoder layer is wrapped so that, after the base projection, it adds the step's deltas.

The step's mapping (engine.lora.ops.LoRAStep) reaches the wrappers through one ``LoRAContext`` object the runner
owns and hands to every wrapper at wrap time: the runner sets ``context.step`` right before the forward and
clears it right after (transformers does not forward extra arguments into ``nn.Linear`` calls). No module-level
state; a step without adapters leaves it None and the wrappers add nothing.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from pdserve.engine.lora.adapter import TARGETS

_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


class LoRAContext:
    __slots__ = ("step",)

    def __init__(self):
        self.step = None  # a LoRAStep during a forward that has adapters, else None


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, layer_idx: int, target: str, context: LoRAContext):
        super().__init__()
        self.base = base
        self.layer_idx, self.target = layer_idx, target
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        step = self.context.step
        if step is not None:
            step.add(self.layer_idx, self.target, x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1]))
        return y


def wrap_hf_model(model: nn.Module) -> LoRAContext:
    """Wrap every target projection of ``model`` in place; returns the context the runner sets per step."""
    context = LoRAContext()
    found = []
    for name, module in model.named_modules():
        m = _NAME.search(name)
        if m and m.group(2) in TARGETS and isinstance(module, nn.Linear):
            found.append((name, int(m.group(1)), m.group(2), module))
    if not found:
        raise ValueError("enable_lora: found no q/k/v/o/gate/up/down projections to adapt in this model")
    for name, layer, target, module in found:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(module, layer, target, context))
    return context
