"""``--compile``: torch.compile for the dense parts of the native model's general step (prefill chunks and mixed
batches), with dynamic token counts and no graph break (``fullgraph=True``).

Two regions per layer, each one function shared by every layer (the weights are arguments, so one compiled graph
serves them all): the attention input (input RMSNorm, fused QKV projection, Qwen3's q/k norm, RoPE) and the MLP
(post-attention RMSNorm, gate-up projection, SiLU-and-mul, down projection plus the residual). Attention stays
eager: it goes through the paged backend, whose per-sequence Python is not a graph. Inductor fuses the
elementwise work (norms, RoPE, SiLU-and-mul) around the GEMMs.

The static decode step is not compiled: on CUDA it is captured into CUDA graphs (engine.native.graphs); on CPU
it already dispatches 12 ops per layer with every intermediate in a persistent buffer. Steps that run a LoRA
adapter take the eager path (the adapter's deltas go between the projection and RoPE).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def attention_input(hidden, norm_w, qkv_w_t, qkv_b, qk_norm, cos, sin, eps: float, num_kv_heads: int,
                    head_dim: int) -> torch.Tensor:
    """[T, H] -> [T, V | Q' | K']: the fused projection's column order, q and k rotated (and normed)."""
    x = torch.rms_norm(hidden, (hidden.shape[-1],), norm_w, eps)
    qkv = torch.mm(x, qkv_w_t) if qkv_b is None else torch.addmm(qkv_b, x, qkv_w_t)
    kd = num_kv_heads * head_dim
    v, qk = qkv[:, :kd], qkv[:, kd:].unflatten(1, (-1, head_dim))
    if qk_norm is not None:
        qk = torch.rms_norm(qk, (head_dim,), None, eps) * qk_norm
    half = head_dim // 2  # rotate-half by slices: elementwise, fused (the eager path's +-1 matmul is exact too)
    qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
    return torch.cat((v, qk.flatten(1)), dim=1)


def mlp(hidden, norm_w, gate_up_w_t, gate_up_b, down_w_t, down_b, eps: float) -> torch.Tensor:
    """hidden + down(silu(gate) * up), ``gate_up`` columns ``[up | gate]`` (engine.native.model)."""
    x = torch.rms_norm(hidden, (hidden.shape[-1],), norm_w, eps)
    up_gate = torch.mm(x, gate_up_w_t) if gate_up_b is None else torch.addmm(gate_up_b, x, gate_up_w_t)
    up, gate = up_gate.chunk(2, dim=1)
    out = torch.addmm(hidden, F.silu(gate) * up, down_w_t)
    return out if down_b is None else out + down_b


class CompiledRegions:
    """The two compiled functions, warmed up on construction so that the first request does not pay the
    compile (tens of seconds on a small CPU)."""

    def __init__(self, model):
        # automatic dynamic shapes: the warm-up's second token count makes the token axis (and only it) symbolic;
        # dynamic=True would make every size and int argument symbolic, and the generated CPU loops ran 2x slower
        self.attention_input = torch.compile(attention_input, fullgraph=True)
        self.mlp = torch.compile(mlp, fullgraph=True)
        t0 = time.monotonic()
        self._warm(model)
        logger.info("compiled the native model's dense regions in %.1f s", time.monotonic() - t0)

    def _warm(self, model) -> None:
        layer = model.layers[0]
        with torch.inference_mode():
            for t in (1, 5, 9):  # 1 is its own graph (size-1 specialization); 9 makes the token axis dynamic
                hidden = torch.zeros(t, model.spec.hidden_size, dtype=model.dtype, device=model.device)
                positions = torch.arange(t, device=model.device)  # as the executor gathers them (inference tensors)
                cos, sin = model.cos_sin.index_select(0, positions).unbind(1)
                layer.attention_input(hidden, cos, sin, self)
                layer.mlp_compiled(hidden, self)
