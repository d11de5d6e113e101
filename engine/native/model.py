"""Native decoder for the Llama, Qwen2, Qwen3 and Mistral families over the paged KV cache.

Per layer (no per-layer Python beyond attribute reads; the same code runs every step shape):
- RMSNorm as one ``rms_norm``; the residual add rides in the ``addmm`` of the o and down projections;
- projections as ``mm``/``addmm`` on weights stored transposed ([in, out]: on CPU 1-2.5x faster than
  ``linear`` at decode batch sizes, never slower at prefill sizes); one fused QKV projection with columns
  ``[V | Q | K]`` and one fused gate-up projection ``[up | gate]``; q/k/v are views into their output;
- Qwen3's q/k norm as one weightless ``rms_norm`` over q and k heads together, times one [heads, D] weight;
- K and V written to the paged cache with one ``index_put_``, then the layer-ready hook, then attention (the
  static decode step on CPU writes every layer's K/V once, after the last layer: engine.native.decode);
- SiLU-and-mul is ``silu`` of the gate half times the up half, in place (HF's order of rounding).

Two entry points share the weights: ``forward`` (any step: prefill chunks, mixed batches; RoPE in place from a
cos/sin table gathered once per step, rotate-half as a matmul with a constant +-1 matrix; attention through
the registered paged backend) and ``decode`` (the static decode step over ``DecodeBuffers``: every
intermediate written ``out=`` into persistent buffers, RoPE as one ``bmm`` with per-token rotation matrices,
and on the torch backend SDPA over a resident context each step appends to; 12 ATen ops per layer, 14 with q/k
norm, one more on a step that gathers its context afresh).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.attention import BACKENDS, AttentionMetadata, attend
from pdserve.engine.native.rope import (
    cos_sin_table,
    inv_freq_and_scaling,
    rope_matrix_table,
    rotate_half_matrix,
)
from pdserve.engine.native.spec import NativeSpec


@dataclass(slots=True)
class NativeStep:
    """One step's inputs shared by every layer, derived once per step."""

    meta: AttentionMetadata
    kv_rows: torch.Tensor  # int64 [T, 2]: V and K rows of each new token in a cache seen as [N * 2 * bs, Hkv, D]
    cos: torch.Tensor  # [T, 1, D]
    sin: torch.Tensor  # [T, 1, D]
    row_views: list[torch.Tensor]  # per layer: the cache as [num_blocks * 2 * block_size, Hkv, D]
    lora: object | None = None  # a LoRAStep (engine.lora.ops) when an adapter runs in this step
    compiled: object | None = None  # engine.native.compiled.CompiledRegions under --compile


def _proj(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, out=None) -> torch.Tensor:
    if bias is None:
        return torch.mm(x, weight_t, out=out)
    return torch.addmm(bias, x, weight_t, out=out)


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
        self.qkv_weight_t = param(h, qkv_out)  # columns: V, Q, K (see DecodeBuffers for why)
        self.qkv_bias = param(qkv_out) if spec.qkv_bias else None
        # [H + Hkv, D]: q_norm's weight on the query heads' rows, k_norm's on the key heads'
        self.qk_norm = param(spec.num_heads + spec.num_kv_heads, d) if spec.qk_norm else None
        self.o_weight_t = param(spec.num_heads * d, h)  # addmm(residual, attn, W^T)
        self.o_bias = param(h) if spec.o_bias else None
        self.post_norm = param(h)
        i = spec.intermediate_size
        self.gate_up_weight_t = param(h, 2 * i)  # columns: up, then gate (see _mlp)
        self.gate_up_bias = param(2 * i) if spec.mlp_bias else None
        self.down_weight_t = param(i, h)
        self.down_bias = param(h) if spec.mlp_bias else None

    def forward(self, hidden: torch.Tensor, step: NativeStep, rot: torch.Tensor) -> torch.Tensor:
        """Any step shape, attention through the registered paged backend."""
        nh, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        lora = step.lora
        compiled = step.compiled if lora is None else None  # --compile (engine.native.compiled); eager with LoRA
        if compiled is not None:
            qkv = self.attention_input(hidden, step.cos, step.sin, compiled)
        else:
            qkv = self._attention_input_eager(hidden, step, rot)
        t, width = qkv.shape
        off, kd = qkv.storage_offset(), nkv * d
        vk = qkv.as_strided((t, 2, nkv, d), (width, kd + nh * d, d, 1), off)  # V, then K
        step.row_views[self.layer_idx].index_put_((step.kv_rows,), vk)
        meta = step.meta
        if meta.layer_hook is not None:
            meta.layer_hook(self.layer_idx)
        q = qkv.as_strided((t, nh, d), (width, d, 1), off + kd)
        k = qkv.as_strided((t, nkv, d), (width, d, 1), off + kd + nh * d)
        v = qkv.as_strided((t, nkv, d), (width, d, 1), off)
        o = attend(meta.kv_caches[self.layer_idx], meta, q, self.scale, self.window, None, k, v).reshape(t, nh * d)
        hidden = self._o_proj(hidden, o, lora)
        return self._mlp(hidden, None, lora) if compiled is None else self.mlp_compiled(hidden, compiled)

    def _attention_input_eager(self, hidden: torch.Tensor, step: NativeStep, rot: torch.Tensor) -> torch.Tensor:
        """[T, V | Q' | K']: normed input, fused projection (plus any LoRA deltas), q/k norm, RoPE in place."""
        nh, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        x = torch.rms_norm(hidden, (hidden.shape[-1],), self.input_norm, self.eps)
        qkv = _proj(x, self.qkv_weight_t, self.qkv_bias)  # [T, V | Q | K]
        if step.lora is not None:  # each of q, k and v's deltas into its columns, before RoPE and the cache write
            step.lora.add_fused(self.layer_idx, "qkv", x, qkv)
        t, width = qkv.shape
        qk = qkv.as_strided((t, nh + nkv, d), (width, d, 1), qkv.storage_offset() + nkv * d)
        src = qk
        if self.qk_norm is not None:
            src = torch.rms_norm(qk, (d,), None, self.eps) * self.qk_norm
        rotated = torch.matmul(src, rot)
        torch.mul(src, step.cos, out=qk)
        qk.addcmul_(rotated, step.sin)
        return qkv

    def attention_input(self, hidden, cos, sin, compiled) -> torch.Tensor:
        return compiled.attention_input(hidden, self.input_norm, self.qkv_weight_t, self.qkv_bias, self.qk_norm,
                                        cos, sin, self.eps, self.num_kv_heads, self.head_dim)

    def mlp_compiled(self, hidden, compiled) -> torch.Tensor:
        return compiled.mlp(hidden, self.post_norm, self.gate_up_weight_t, self.gate_up_bias, self.down_weight_t,
                            self.down_bias, self.eps)

    def decode(self, hidden: torch.Tensor, bufs, lora=None) -> torch.Tensor:
        """The static decode step over ``DecodeBuffers`` (engine.native.decode); ``lora``: its
        LoRADecodeBuffers when an adapter runs in this step."""
        i = self.layer_idx
        z = bufs.z[i]
        x = torch.rms_norm(hidden, (hidden.shape[-1],), self.input_norm, self.eps)
        _proj(x, self.qkv_weight_t, self.qkv_bias, out=z.qkv)
        if lora is not None:
            lora.add_fused(i, "qkv", x, z.qkv)
        src = z.qk
        if self.qk_norm is not None:
            src = torch.rms_norm(src, (self.head_dim,), None, self.eps) * self.qk_norm
        torch.bmm(src, bufs.rope, out=z.qk_rot)
        if not bufs.flush:  # else the model writes every layer's K/V to the cache after the last layer
            bufs.row_views[i].index_put_((bufs.kv_rows,), z.kv_new)
        if bufs.lean:
            if not bufs.append:  # else the resident context holds the rest (engine.native.decode)
                torch.index_select(bufs.block_views[i], 0, bufs.block_rows, out=bufs.gathered[i])
            if bufs.append or bufs.flush:  # the new token's K/V into the gathered context
                bufs.context_rows[i].index_put_((bufs.append_rows,), z.kv_new)
            o = F.scaled_dot_product_attention(
                z.q_groups, bufs.k_ctx[i], bufs.v_ctx[i], attn_mask=bufs.masks[self.window], scale=self.scale
            )
        else:
            meta = bufs.meta
            o = BACKENDS[meta.backend](meta.kv_caches[i], meta, z.q_heads, self.scale, self.window, None)
        return self._mlp(self._o_proj(hidden, o.reshape(hidden.shape[0], -1), lora), bufs, lora)

    def _o_proj(self, hidden: torch.Tensor, o: torch.Tensor, lora) -> torch.Tensor:
        hidden = torch.addmm(hidden, o, self.o_weight_t)
        if self.o_bias is not None:
            hidden = hidden + self.o_bias
        if lora is not None:
            lora.add(self.layer_idx, "o_proj", o, hidden)
        return hidden

    def _mlp(self, hidden: torch.Tensor, bufs, lora) -> torch.Tensor:
        x = torch.rms_norm(hidden, (hidden.shape[-1],), self.post_norm, self.eps)
        if bufs is None:
            up_gate = _proj(x, self.gate_up_weight_t, self.gate_up_bias)
            if lora is not None:
                lora.add_fused(self.layer_idx, "gate_up", x, up_gate)
            t, i2 = up_gate.shape
            off = up_gate.storage_offset()
            up = up_gate.as_strided((t, i2 // 2), (i2, 1), off)
            act = F.silu(up_gate.as_strided((t, i2 // 2), (i2, 1), off + i2 // 2))
        else:
            up_gate = _proj(x, self.gate_up_weight_t, self.gate_up_bias, out=bufs.up_gate)
            if lora is not None:
                lora.add_fused(self.layer_idx, "gate_up", x, up_gate)
            up, act = bufs.up, torch.ops.aten.silu.out(bufs.gate, out=bufs.act)
        act.mul_(up)  # silu(gate) * up: HF's own rounding (the cost of glu(up, gate) * gate inside the model)
        hidden = torch.addmm(hidden, act, self.down_weight_t)
        if self.down_bias is not None:
            hidden = hidden + self.down_bias
        if lora is not None:
            lora.add(self.layer_idx, "down_proj", act, hidden)
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
        self.lm_head_t = None  # [hidden, vocab]; None: tied to the embeddings
        if not spec.tie_word_embeddings:
            self.lm_head_t = nn.Parameter(
                torch.empty(spec.hidden_size, spec.vocab_size, dtype=dtype, device=device), requires_grad=False
            )
        inv_freq, scaling = inv_freq_and_scaling(hf_config, spec.head_dim)
        cos_sin = cos_sin_table(inv_freq, scaling, max_len, dtype, device)
        self.register_buffer("cos_sin", cos_sin, persistent=False)
        self.register_buffer("rot", rotate_half_matrix(spec.head_dim, dtype, device), persistent=False)
        rope_rows, rope_pattern = rope_matrix_table(cos_sin)
        self.register_buffer("rope_rows", rope_rows, persistent=False)
        self.register_buffer("rope_pattern", rope_pattern, persistent=False)
        self.rope_row_len = 1 + 3 * spec.head_dim
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
        return self._logits(hidden)

    def decode(self, bufs) -> torch.Tensor:
        """The static decode step: float32 logits [bufs.batch, vocab]. The RoPE matrices of the step's
        positions are gathered here once (two ops) for every layer."""
        torch.add(self.rope_pattern, bufs.pos3, alpha=self.rope_row_len, out=bufs.rope_idx)
        torch.take(self.rope_rows, bufs.rope_idx, out=bufs.rope)
        hidden = F.embedding(bufs.ids, self.embed)
        lora = bufs.lora if bufs.lora is not None and bufs.lora.active else None
        if lora is not None:
            lora.prepare()
        for layer in self.layers:
            hidden = layer.decode(hidden, bufs, lora)
        if bufs.flush:  # every layer's new K and V to the paged cache, one op (engine.native.decode)
            bufs.flat_rows.index_put_((bufs.flush_rows,), bufs.work.kv_new_all)
        return self._logits(hidden)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = torch.rms_norm(hidden, (hidden.shape[-1],), self.norm, self.spec.rms_norm_eps)
        if self.lm_head_t is None:
            logits = F.linear(hidden, self.embed)
        else:
            logits = torch.mm(hidden, self.lm_head_t)
        return logits if logits.dtype == torch.float32 else logits.float()

    # ---- HF-named weights ------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):  # noqa: D102 - HF names, see the class docstring
        from pdserve.engine.native.weights import to_hf_state_dict

        return to_hf_state_dict(self)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: D102
        from pdserve.engine.native.weights import load_hf_tensors

        missing = load_hf_tensors(self, state_dict.items(), strict=strict)
        return nn.modules.module._IncompatibleKeys(missing, [])
