r"""LoRA adapters in PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``): loaded, validated
against the model's projection shapes, and kept on the host ready to copy into a device slot.

Each (layer, target) pair holds ``a_t`` [in, r] and ``b_t`` [r, out] (the transposes of PEFT's ``lora_A`` and
``lora_B``) with the scale (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` under ``use_rslora``) folded into
``b_t``, so applying it is ``out += (x @ a_t) @ b_t``.

What is applied is what the tensors hold: ``target_modules`` may be a list of the supported projections, or a
string (PEFT's ``"all-linear"`` or a regex), and ``layers_to_transform`` simply leaves tensors out. Per-module
``rank_pattern`` and ``alpha_pattern`` are matched against each module's name as PEFT matches them (the first
key ``k`` with ``re.match(rf"(.*\.)?({k})$", name)``), so modules may have ranks of their own up to
``max_lora_rank``; the adapter's ``rank`` is the largest.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_UIDS = itertools.count(1)


@dataclass(frozen=True, slots=True)
class LoRADims:
    """(in, out) features of every target projection of one model, and its layer count."""

    num_layers: int
    shapes: dict[str, tuple[int, int]]

    @classmethod
    def from_hf(cls, hf_config) -> LoRADims:
        c = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        h, heads = c.hidden_size, c.num_attention_heads
        d = getattr(c, "head_dim", None) or h // heads
        kv = (getattr(c, "num_key_value_heads", None) or heads) * d
        i = c.intermediate_size
        shapes = {"q_proj": (h, heads * d), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (heads * d, h),
                  "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        return cls(c.num_hidden_layers, shapes)


@dataclass(eq=False, slots=True)
class LoRAAdapter:
    """One loaded adapter. ``uid`` tells two loads under one name apart; ``retired`` marks one that was unloaded
    or replaced while requests still ran on it (they finish on these weights; nothing they compute is cached)."""

    name: str
    path: str
    rank: int
    scale: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, target) -> (a_t, b_t)
    targets: frozenset[str]
    uid: int = field(default_factory=lambda: next(_UIDS))
    retired: bool = False


def _bad(path: str, why: str) -> ValueError:
    return ValueError(f"adapter {path!r}: {why}")


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise _bad(str(path), "no such directory")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise _bad(str(path), "no adapter_config.json (expected a PEFT LoRA directory)")
    if not (path / "adapter_model.safetensors").is_file():
        raise _bad(str(path), "no adapter_model.safetensors")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise _bad(str(path), f"adapter_config.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise _bad(str(path), "adapter_config.json is not a JSON object")
    return cfg


@dataclass(frozen=True, slots=True)
class _Scaling:
    rank: int
    alpha: float
    rslora: bool
    rank_pattern: dict
    alpha_pattern: dict

    @staticmethod
    def _pattern(patterns: dict, module: str):
        return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", module)), None)

    def of(self, p: str, module: str) -> tuple[int, float]:
        """(rank, scale) of one module, by PEFT's pattern rules."""
        rank = self._pattern(self.rank_pattern, module)
        alpha = self._pattern(self.alpha_pattern, module)
        rank, alpha = (self.rank if rank is None else rank), (self.alpha if alpha is None else alpha)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise _bad(p, f"rank_pattern gives {module} rank {rank!r}")
        return rank, float(alpha / math.sqrt(rank) if self.rslora else alpha / rank)


def _check_config(p: str, cfg: dict, max_rank: int) -> _Scaling:
    """The scaling of a supported config; ValueError for anything this engine cannot apply exactly."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _bad(p, f"peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    rank = cfg.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise _bad(p, f"r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise _bad(p, f"rank {rank} exceeds max_lora_rank {max_rank}")
    targets = cfg.get("target_modules")
    if isinstance(targets, list) and targets:  # a string ("all-linear", a regex): the tensors say what is targeted
        bad = [t for t in targets if t not in TARGETS]
        if bad:
            raise _bad(p, f"target module {bad[0]!r} is not supported; targets must be among {', '.join(TARGETS)}")
    elif not isinstance(targets, str) or not targets:
        raise _bad(p, f"target_modules must list some of {', '.join(TARGETS)} (or be a string)")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if cfg.get(key, ok) not in (ok, None):
            raise _bad(p, f"{key}={cfg[key]!r} is not supported")
    if cfg.get("modules_to_save"):
        raise _bad(p, "modules_to_save is not supported")
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        value = cfg.get(key) or {}
        if not isinstance(value, dict) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                  for v in value.values()):
            raise _bad(p, f"{key} must map module patterns to numbers")
        try:
            for k in value:
                re.compile(k)
        except re.error as e:
            raise _bad(p, f"{key}: bad pattern ({e})") from None
        patterns[key] = value
    alpha = cfg.get("lora_alpha", rank)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise _bad(p, f"lora_alpha must be a number, got {alpha!r}")
    return _Scaling(rank, float(alpha), bool(cfg.get("use_rslora")), patterns["rank_pattern"],
                    patterns["alpha_pattern"])


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path / "adapter_model.safetensors"), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise _bad(str(path), f"cannot read adapter_model.safetensors ({e})") from None


def load_adapter(name: str, path: str, dims: LoRADims, max_rank: int, dtype: torch.dtype) -> LoRAAdapter:
    """Read and validate a PEFT LoRA directory; ValueError with a one-line reason for anything wrong."""
    root = Path(path).expanduser()
    scaling = _check_config(path, _read_config(root), max_rank)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    modules: dict[tuple[int, str], str] = {}
    for key, tensor in _read_tensors(root).items():
        m = _KEY.search(key)
        if m is None:
            raise _bad(path, f"unexpected tensor {key!r} (only lora_A/lora_B of {', '.join(TARGETS)})")
        layer, target, ab = int(m.group(1)), m.group(2), m.group(3)
        if target not in TARGETS:
            raise _bad(path, f"target module {target!r} is not supported; targets must be among {', '.join(TARGETS)}")
        if layer >= dims.num_layers:
            raise _bad(path, f"tensor {key!r} names layer {layer} but the model has {dims.num_layers}")
        pairs.setdefault((layer, target), {})[ab] = tensor
        modules[(layer, target)] = key[: m.start(3) - len(".lora_")].removeprefix("base_model.model.")
    if not pairs:
        raise _bad(path, "adapter_model.safetensors holds no LoRA tensors")
    weights = {}
    for (layer, target), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise _bad(path, f"layer {layer} {target}: lora_{'B' if 'A' in ab else 'A'} is missing")
        fan_in, fan_out = dims.shapes[target]
        a, b = ab["A"], ab["B"]
        rank, scale = scaling.of(path, modules[(layer, target)])
        if rank > max_rank:
            raise _bad(path, f"rank {rank} exceeds max_lora_rank {max_rank}")
        if tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise _bad(path, f"layer {layer} {target}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                             f"rank {rank} and the model's {fan_in} -> {fan_out} projection")
        a_t = a.t().to(dtype).contiguous()
        b_t = (b.float() * scale).t().to(dtype).contiguous()
        for t, which in ((a_t, "lora_A"), (b_t, "lora_B")):  # a NaN or inf would reach every row of a batch
            if not bool(torch.isfinite(t).all()):
                raise _bad(path, f"layer {layer} {target}: {which} has NaN or infinite values (in {dtype})")
        weights[(layer, target)] = (a_t, b_t)
    targets = frozenset(t for _, t in weights)
    rank = max(a_t.shape[1] for a_t, _ in weights.values())
    return LoRAAdapter(name, str(root), rank, scaling.of(path, "")[1], weights, targets)  # scale: the default one
