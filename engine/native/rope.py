"""Rotary position embeddings: inverse frequencies for the RoPE scaling types of the Llama, Qwen2/3 and
Mistral families (default, linear, llama3, yarn; HF's formulas in ``transformers.modeling_rope_utils``), and a
cos/sin table built once at load so a step only gathers rows of it.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_parameters(hf_config) -> dict:
    """The config's RoPE parameters as one dict with ``rope_type`` and ``rope_theta`` (old and new HF formats)."""
    params = getattr(hf_config, "rope_parameters", None)
    if not params:
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params = dict(params)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _default(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))


def _llama3(p: dict, base: float, dim: int) -> torch.Tensor:
    inv_freq = _default(base, dim)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(p: dict, base: float, dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_position / orig

    def mscale_of(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attention_factor = mscale_of(factor, m) / mscale_of(factor, m_all) if m and m_all else mscale_of(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def inv_freq_and_scaling(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim // 2] in float32, attention scaling applied to cos and sin)."""
    p = rope_parameters(hf_config)
    kind = p["rope_type"]
    base = float(p.get("rope_theta", 10000.0))
    dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
    if dim != head_dim:
        raise ValueError(f"rope: partial rotary embeddings are not supported natively (dim {dim} of {head_dim})")
    if kind == "default":
        return _default(base, dim), 1.0
    if kind == "linear":
        return _default(base, dim) / p["factor"], 1.0
    if kind == "llama3":
        return _llama3(p, base, dim), 1.0
    if kind == "yarn":
        return _yarn(p, base, dim, hf_config.max_position_embeddings)
    raise ValueError(f"rope: scaling type {kind!r} is not supported natively; supported: {SUPPORTED_ROPE_TYPES}")


def cos_sin_table(inv_freq: torch.Tensor, scaling: float, max_len: int, dtype, device) -> torch.Tensor:
    """[max_len, 2, 1, head_dim]: cos then sin per position (a middle axis of 1 broadcasts over heads), computed
    like HF's rotary module (float32 ``position * inv_freq``, then cast to the model dtype)."""
    freqs = torch.arange(max_len, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    table = torch.stack((emb.cos() * scaling, emb.sin() * scaling), dim=1)[:, :, None, :]
    return table.to(device=device, dtype=dtype).contiguous()


def rotate_half_matrix(head_dim: int, dtype, device) -> torch.Tensor:
    """R [D, D] with ``x @ R == rotate_half(x) == cat(-x2, x1)``: one matmul instead of two slices, a neg and a
    cat. Its entries are 0 and +-1, so the product is exact."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    idx = torch.arange(half)
    r[idx + half, idx] = -1.0
    r[idx, idx + half] = 1.0
    return r.to(device=device, dtype=dtype)


def rope_matrix_table(cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For the decode step's RoPE as one batched matmul: ``(rows, pattern)`` such that
    ``take(rows, pattern + pos * rows_per_pos)`` is M_pos [D, D] with ``x @ M_pos == x*cos + rotate_half(x)*sin``.

    rows: flat [max_len * (1 + 3D)], per position ``[0, cos, sin, -sin]``; pattern: int64 [D, D] indexing into one
    position's row (M = diag(cos) + R diag(sin), R the rotate-half matrix). Every entry of M is a copied table
    value or an exact zero.
    """
    max_len, _, _, dim = cos_sin.shape
    cos, sin = cos_sin[:, 0, 0], cos_sin[:, 1, 0]
    rows = torch.cat((torch.zeros_like(cos[:, :1]), cos, sin, -sin), dim=1).reshape(-1).contiguous()
    half = dim // 2
    k = torch.arange(dim)
    pattern = torch.zeros(dim, dim, dtype=torch.int64)
    pattern[k, k] = 1 + k
    low = k[:half]  # column k < half: rotate_half gives -x[k + half]
    pattern[low + half, low] = 1 + 2 * dim + low
    high = k[half:]  # column k >= half: rotate_half gives x[k - half]
    pattern[high - half, high] = 1 + dim + high
    return rows, pattern.to(cos_sin.device)
