"""Random local checkpoints of the native families beyond the presets (other head layouts, tied heads, RoPE
scaling types, short sliding windows, biases, sharded files), written once per test session in HF format."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

BASE = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    vocab_size=300,
    initializer_range=0.1,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# name -> (family, config overrides, save_pretrained max_shard_size or None)
CHECKPOINTS: dict[str, tuple[str, dict, str | None]] = {
    "llama-mha": ("llama", dict(num_key_value_heads=4), None),
    "llama-tied": ("llama", dict(tie_word_embeddings=True), None),
    "llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True), None),
    "llama-rope-linear": ("llama", dict(rope_parameters=dict(rope_type="linear", factor=4.0, rope_theta=10000.0)), None),
    "llama-rope-llama3": ("llama", dict(rope_parameters=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64, rope_theta=500000.0)), None),
    "qwen2-rope-yarn": ("qwen2", dict(rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=256, rope_theta=10000.0)), None),
    "qwen3-gqa4-tied": ("qwen3", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                      tie_word_embeddings=True), None),
    "qwen3-mha-headdim": ("qwen3", dict(num_key_value_heads=4, head_dim=24), None),
    "mistral-window24": ("mistral", dict(sliding_window=24, head_dim=16), None),
    "qwen2-window-some-layers": ("qwen2", dict(use_sliding_window=True, sliding_window=20, max_window_layers=1), None),
    "llama-sharded": ("llama", dict(num_hidden_layers=4), "60KB"),
}

_DIR = Path(tempfile.mkdtemp(prefix="pdserve-native-ckpt-"))


def build_checkpoint(name: str) -> str:
    """The directory of checkpoint ``name`` (built on first use), with the byte tokenizer the engine loads."""
    from pdserve.engine.models import _config_class, _model_class
    from pdserve.engine.tokenizer import build_byte_tokenizer

    out = _DIR / name
    if (out / "config.json").exists():
        return str(out)
    family, overrides, shard = CHECKPOINTS[name]
    config = _config_class(family)(**dict(BASE, **overrides))
    torch.manual_seed(sorted(CHECKPOINTS).index(name) + 100)
    model = _model_class(family)(config)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(out), **kwargs)
    build_byte_tokenizer(out, vocab_size=config.vocab_size)
    return str(out)
