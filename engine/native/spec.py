"""What a native model needs from an HF config: one frozen record, read once at load."""

from __future__ import annotations

from dataclasses import dataclass

# HF architecture name -> family
NATIVE_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
}


def family_of(hf_config) -> str | None:
    """The native family of an HF config, or None when no native implementation covers it."""
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in NATIVE_ARCHITECTURES:
            return NATIVE_ARCHITECTURES[arch]
    return {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral"}.get(
        getattr(hf_config, "model_type", None)
    )


@dataclass(frozen=True, slots=True)
class NativeSpec:
    family: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]  # per layer
    pad_token_id: int | None
    initializer_range: float

    @staticmethod
    def from_hf(hf_config) -> NativeSpec:
        family = family_of(hf_config)
        if family is None:
            raise ValueError(f"model_impl: no native implementation for {getattr(hf_config, 'architectures', None)}")
        c = hf_config
        heads = c.num_attention_heads
        layers = c.num_hidden_layers
        window = getattr(c, "sliding_window", None)
        layer_types = getattr(c, "layer_types", None)
        if family == "mistral" or not layer_types:
            windows = (window,) * layers if family == "mistral" else (None,) * layers
        else:
            windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        attention_bias = bool(getattr(c, "attention_bias", False))
        if getattr(c, "hidden_act", "silu") != "silu":
            raise ValueError(f"model_impl: native models need hidden_act 'silu', got {c.hidden_act!r}")
        return NativeSpec(
            family=family,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            vocab_size=c.vocab_size,
            rms_norm_eps=c.rms_norm_eps,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or (family in ("llama", "qwen3") and attention_bias),
            o_bias=family in ("llama", "qwen3") and attention_bias,
            mlp_bias=family == "llama" and bool(getattr(c, "mlp_bias", False)),
            qk_norm=family == "qwen3",
            sliding_windows=tuple(int(w) if w else None for w in windows),
            pad_token_id=getattr(c, "pad_token_id", None),
            initializer_range=getattr(c, "initializer_range", 0.02),
        )
