"""Native decoder for the Llama, Qwen2, Qwen3 and Mistral families over the paged KV cache.

Per layer (no per-layer Python beyond attribute reads; the same code runs every step shape):
- RMSNorm as one ``rms_norm``; the residual add rides in the ``addmm`` of the o and down projections;
- one fused QKV projection; q/k views are ``as_strided`` into its output (no split copies);
- Qwen3's q/k norm as one weightless ``rms_norm`` over q and k heads together, times one [heads, D] weight;
- RoPE in place on q and k from a cos/sin table gathered once per step (rotate-half is a matmul with a
  constant +-1 matrix, so it is exact);
- K and V written to the paged cache with one ``index_put_``, then the layer-ready hook, then attention:
  a lean gather + SDPA for pure decode steps on the torch backend, else the registered paged backend;
- one fused gate-up projection; SiLU-and-mul is ``glu`` over [up, gate] times gate (u*sigmoid(g)*g).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.attention import BACKENDS, AttentionMetadata
from pdserve.engine.native.rope import cos_sin_table, inv_freq_and_scaling, rotate_half_matrix
from pdserve.engine.native.spec import NativeSpec


@dataclass(slots=True)
class NativeStep:
    """One step's inputs shared by every layer, derived once per step."""

    meta: AttentionMetadata
    kv_rows: torch.Tensor  # int64 [T, 2]: K and V rows of each new token in a cache seen as [N * 2 * bs, Hkv, D]
    cos: torch.Tensor  # [T, 1, D]
    sin: torch.Tensor  # [T, 1, D]
    row_views: list[torch.Tensor]  # per layer: the cache as [num_blocks * 2 * block_size, Hkv, D]
    head_views: list[torch.Tensor] | None = None  # per layer: the cache as [num_blocks * 2 * bs * Hkv, D]
    gather_idx: torch.Tensor | None = None  # int64 [2 * B * Hkv * C]: lean decode rows of head_views
    masks: dict = field(default_factory=dict)  # sliding window -> bool [B, 1, 1, C] (lean decode only)


class NativeLayer(nn.Module):
    def __init__(self, spec: NativeSpec, layer_idx: int, dtype: torch.dtype, device):
        super().__init__()
        h, d = spec.hidden_size, spec.head_dim
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, d
        self.eps = spec.rms_norm_eps
        self.window = spec.sliding_windows[layer_idx]
        self.scale = d**-0.5
        qkv_out = (spec.num_heads + 2 * spec.num_kv_heads) * d

        def param(*shape):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.input_norm = param(h)
        self.qkv_weight = param(qkv_out, h)
        self.qkv_bias = param(qkv_out) if spec.qkv_bias else None
        # [H + Hkv, D]: q_norm's weight on the query heads' rows, k_norm's on the key heads'
        self.qk_norm = param(spec.num_heads + spec.num_kv_heads, d) if spec.qk_norm else None
        self.o_weight_t = param(spec.num_heads * d, h)  # stored transposed: addmm(residual, attn, W^T)
        self.o_bias = param(h) if spec.o_bias else None
        self.post_norm = param(h)
        i = spec.intermediate_size
        self.gate_up_weight = param(2 * i, h)  # rows: up, then gate (see glu in forward)
        self.gate_up_bias = param(2 * i) if spec.mlp_bias else None
        self.down_weight_t = param(i, h)
        self.down_bias = param(h) if spec.mlp_bias else None

    def forward(self, hidden: torch.Tensor, step: NativeStep, rot: torch.Tensor) -> torch.Tensor:
        nh, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        x = torch.rms_norm(hidden, (hidden.shape[-1],), self.input_norm, self.eps)
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
        t, width = qkv.shape
        off = qkv.storage_offset()
        qk = qkv.as_strided((t, nh + nkv, d), (width, d, 1), off)
        src = qk
        if self.qk_norm is not None:
            src = torch.rms_norm(qk, (d,), None, self.eps) * self.qk_norm
        rotated = torch.matmul(src, rot)
        torch.mul(src, step.cos, out=qk)
        qk.addcmul_(rotated, step.sin)
        kv = qkv.as_strided((t, 2, nkv, d), (width, nkv * d, d, 1), off + nh * d)
        step.row_views[self.layer_idx].index_put_((step.kv_rows,), kv)
        meta = step.meta
        if meta.layer_hook is not None:
            meta.layer_hook(self.layer_idx)
        if step.gather_idx is not None:
            group = nh // nkv
            q = qkv.as_strided((t, nkv, group, d), (width, group * d, d, 1), off)
            # index_select of whole rows, then a view: ~2.5x faster on CPU than advanced indexing
            kv_ctx = step.head_views[self.layer_idx].index_select(0, step.gather_idx)
            k, v = kv_ctx.view(2, t, nkv, -1, d).unbind(0)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=step.masks[self.window], scale=self.scale)
            o = o.view(t, nh * d)
        else:
            q = qkv.as_strided((t, nh, d), (width, d, 1), off)
            cache = meta.kv_caches[self.layer_idx]
            o = BACKENDS[meta.backend](cache, meta, q, self.scale, self.window, None).reshape(t, nh * d)
        hidden = torch.addmm(hidden, o, self.o_weight_t)
        if self.o_bias is not None:
            hidden = hidden + self.o_bias
        x = torch.rms_norm(hidden, (hidden.shape[-1],), self.post_norm, self.eps)
        up_gate = F.linear(x, self.gate_up_weight, self.gate_up_bias)
        i = up_gate.shape[1] // 2
        gate = up_gate.as_strided((t, i), (2 * i, 1), up_gate.storage_offset() + i)
        act = F.glu(up_gate, dim=-1).mul_(gate)  # up * sigmoid(gate) * gate == silu(gate) * up
        hidden = torch.addmm(hidden, act, self.down_weight_t)
        if self.down_bias is not None:
            hidden = hidden + self.down_bias
        return hidden


class NativeCausalLM(nn.Module):
    """Embeddings, layers, final norm and LM head; logits only for the rows that sample.

    ``state_dict()`` and ``load_state_dict()`` speak HF parameter names (fused weights split and joined on
    the way), so weights move between this model and transformers' own classes unchanged.
    """

    def __init__(self, spec: NativeSpec, hf_config, max_len: int, dtype: torch.dtype, device):
        super().__init__()
        self.spec = spec
        self.embed = nn.Parameter(
            torch.empty(spec.vocab_size, spec.hidden_size, dtype=dtype, device=device), requires_grad=False
        )
        self.layers = nn.ModuleList(NativeLayer(spec, i, dtype, device) for i in range(spec.num_layers))
        self.norm = nn.Parameter(torch.empty(spec.hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.lm_head = None
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Parameter(torch.empty_like(self.embed), requires_grad=False)
        inv_freq, scaling = inv_freq_and_scaling(hf_config, spec.head_dim)
        self.register_buffer("cos_sin", cos_sin_table(inv_freq, scaling, max_len, dtype, device), persistent=False)
        self.register_buffer("rot", rotate_half_matrix(spec.head_dim, dtype, device), persistent=False)
        self.generation_config = None  # set by the loader (eos ids)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def forward(self, input_ids: torch.Tensor, step: NativeStep, logit_rows: torch.Tensor | None) -> torch.Tensor:
        """input_ids [T] -> float32 logits [R, vocab] for ``logit_rows`` (all T rows when None)."""
        hidden = F.embedding(input_ids, self.embed)
        rot = self.rot
        for layer in self.layers:
            hidden = layer(hidden, step, rot)
        if logit_rows is not None:
            hidden = hidden.index_select(0, logit_rows)
        hidden = torch.rms_norm(hidden, (hidden.shape[-1],), self.norm, self.spec.rms_norm_eps)
        head = self.embed if self.lm_head is None else self.lm_head
        return F.linear(hidden, head).float()

    # ---- HF-named weights ------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):  # noqa: D102 - HF names, see the class docstring
        from pdserve.engine.native.weights import to_hf_state_dict

        return to_hf_state_dict(self)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: D102
        from pdserve.engine.native.weights import load_hf_tensors

        missing = load_hf_tensors(self, state_dict.items(), strict=strict)
        return nn.modules.module._IncompatibleKeys(missing, [])
