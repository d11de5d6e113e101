"""HF checkpoint tensors <-> native parameters: fused QKV (columns V, Q, K) and gate-up (up, gate) projections,
every projection matrix stored transposed ([in, out]), expanded q/k norms; safetensors reading (one file or sharded with ``model.safetensors.index.json``) and the
random init of dummy presets."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _targets(model, name: str):
    """HF tensor name -> list of (parameter, transform) or None for tensors with no native home (rotary
    buffers, a tied head). transform(tensor) writes it into the parameter."""
    spec = model.spec
    d, nh, nkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
    if name == "model.embed_tokens.weight":
        return model.embed, None
    if name == "model.norm.weight":
        return model.norm, None
    if name == "lm_head.weight":
        return (model.lm_head_t, "t") if model.lm_head_t is not None else None
    m = _LAYER.match(name)
    if not m:
        return None
    layer = model.layers[int(m.group(1))] if int(m.group(1)) < len(model.layers) else None
    if layer is None:
        return None
    rest = m.group(2)
    q_cols, kv_cols = nh * d, nkv * d
    spans = {"v_proj": (0, kv_cols), "q_proj": (kv_cols, q_cols), "k_proj": (kv_cols + q_cols, kv_cols)}
    i = spec.intermediate_size
    for proj, (start, n) in spans.items():
        if rest == f"self_attn.{proj}.weight":
            return layer.qkv_weight_t, ("cols", start, n)
        if rest == f"self_attn.{proj}.bias":
            return layer.qkv_bias, (start, n)
    table = {
        "input_layernorm.weight": (layer.input_norm, None),
        "post_attention_layernorm.weight": (layer.post_norm, None),
        "self_attn.o_proj.weight": (layer.o_weight_t, "t"),
        "self_attn.o_proj.bias": (layer.o_bias, None),
        "mlp.up_proj.weight": (layer.gate_up_weight_t, ("cols", 0, i)),
        "mlp.gate_proj.weight": (layer.gate_up_weight_t, ("cols", i, i)),
        "mlp.up_proj.bias": (layer.gate_up_bias, (0, i)),
        "mlp.gate_proj.bias": (layer.gate_up_bias, (i, i)),
        "mlp.down_proj.weight": (layer.down_weight_t, "t"),
        "mlp.down_proj.bias": (layer.down_bias, None),
        "self_attn.q_norm.weight": (layer.qk_norm, ("heads", 0, nh)),
        "self_attn.k_norm.weight": (layer.qk_norm, ("heads", nh, nkv)),
    }
    return table.get(rest)


def _copy_into(param: torch.Tensor, how, tensor: torch.Tensor) -> None:
    if how is None:
        dst, src = param, tensor
    elif how == "t":
        dst, src = param, tensor.t()
    elif how[0] == "heads":
        dst, src = param[how[1] : how[1] + how[2]], tensor[None, :].expand(how[2], -1)
    elif how[0] == "cols":
        dst, src = param[:, how[1] : how[1] + how[2]], tensor.t()
    else:
        dst, src = param[how[0] : how[0] + how[1]], tensor
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"weights: shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
    dst.copy_(src)


def expected_names(model) -> list[str]:
    """Every HF tensor name a complete checkpoint of this model holds."""
    spec = model.spec
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if model.lm_head_t is not None:
        names.append("lm_head.weight")
    per = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
           "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    per += [f"self_attn.{p}_proj.weight" for p in "qkv"]
    if spec.qkv_bias:
        per += [f"self_attn.{p}_proj.bias" for p in "qkv"]
    if spec.o_bias:
        per.append("self_attn.o_proj.bias")
    if spec.mlp_bias:
        per += ["mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias"]
    if spec.qk_norm:
        per += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    return names + [f"model.layers.{i}.{p}" for i in range(spec.num_layers) for p in per]


@torch.no_grad()
def load_hf_tensors(model, items: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> list[str]:
    """Copy HF-named tensors into the model (cast to its dtype). Returns the expected names not seen; with
    ``strict`` a missing one is a ValueError."""
    seen: set[str] = set()
    for name, tensor in items:
        target = _targets(model, name)
        if target is None or target[0] is None:
            continue
        _copy_into(target[0], target[1], tensor)
        seen.add(name)
    missing = [n for n in expected_names(model) if n not in seen]
    if strict and missing:
        raise ValueError(f"weights: checkpoint lacks {len(missing)} tensors, e.g. {missing[0]!r}")
    return missing


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under HF names (views where possible; transposed ones contiguous copies)."""
    out: dict[str, torch.Tensor] = {}
    for name in expected_names(model):
        param, how = _targets(model, name)
        if how is None:
            out[name] = param.detach()
        elif how == "t":
            out[name] = param.detach().t().contiguous()
        elif how[0] == "heads":
            out[name] = param.detach()[how[1]].clone()
        elif how[0] == "cols":
            out[name] = param.detach()[:, how[1] : how[1] + how[2]].t().contiguous()
        else:
            out[name] = param.detach()[how[0] : how[0] + how[1]]
    if model.lm_head_t is None:
        out["lm_head.weight"] = model.embed.detach()
    return out


def safetensors_files(path: str | Path) -> list[Path]:
    """The checkpoint's safetensors files: the shards named by model.safetensors.index.json, else *.safetensors."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    return sorted(path.glob("*.safetensors"))


def _iter_safetensors(files: list[Path]):
    from safetensors import safe_open

    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def load_checkpoint(model, path: str | Path) -> None:
    files = safetensors_files(path)
    if not files:
        raise ValueError(f"model: no safetensors weights in {str(path)!r}")
    load_hf_tensors(model, _iter_safetensors(files), strict=True)


@torch.no_grad()
def init_random(model, seed: int) -> None:
    """Dummy weights: normal(0, initializer_range) matrices and embeddings (pad row zero), unit norms, zero
    biases, drawn from a generator seeded once (deterministic for a given torch version and device). Fused QKV
    and gate-up and the LM head draw in their HF-era layout (fused rows Q, K, V and up, gate) and are stored
    transposed, so a seed gives the same model as before their layout changed."""
    spec = model.spec
    gen = torch.Generator(device=model.device)
    gen.manual_seed(seed)
    q_cols, kv_cols = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    for name, p in model.named_parameters():
        if name.endswith(("qkv_weight_t", "gate_up_weight_t", "lm_head_t")):
            rows = torch.empty(p.shape[1], p.shape[0], dtype=p.dtype, device=p.device)
            rows.normal_(0.0, spec.initializer_range, generator=gen)
            if name.endswith("qkv_weight_t"):  # rows Q, K, V -> columns V, Q, K
                rows = torch.cat((rows[q_cols + kv_cols :], rows[: q_cols + kv_cols]))
            p.copy_(rows.t())
        elif p.dim() >= 2 and not name.endswith("qk_norm"):
            p.normal_(0.0, spec.initializer_range, generator=gen)
        elif "norm" in name:
            p.fill_(1.0)
        else:
            p.zero_()
    if spec.pad_token_id is not None and 0 <= spec.pad_token_id < spec.vocab_size:
        model.embed[spec.pad_token_id].zero_()
