"""Model resolution: presets built locally (no download) and plain HF directories or hub ids.

Presets are written once in HF format (config.json, tokenizer files and, unless dummy, model.safetensors)
to ``<cache>/models/<name>-v<version>`` and loaded through the same from_pretrained path as any checkpoint.
Dummy presets (like vLLM's ``--load-format dummy``) hold no weights; the runner random-inits them.
Shipped presets (``tiny-chat``, the default: a small trained Llama) are HF directories inside the package
(``engine/presets/``), used in place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pdserve.engine import env

PRESET_VERSION = 1


@dataclass(frozen=True, slots=True)
class Preset:
    architecture: str  # "llama" | "qwen2" | "qwen3" | "mistral"
    config: dict
    dummy: bool = False  # no weights on disk: random init at load time
    seed: int = 0
    shipped: bool = False  # a trained checkpoint inside the package (engine/presets/<name>/); config unused


_TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    vocab_size=320,
    initializer_range=0.1,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

DEFAULT_MODEL = "tiny-chat"


def _dummy_llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, max_pos: int) -> dict:
    """A benchmark-sized random Llama config with a 32k vocabulary."""
    return dict(
        _TINY,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        vocab_size=32000,
        initializer_range=0.02,
    )


PRESETS: dict[str, Preset] = {
    # ~5.5M-parameter Llama trained on the King James Bible: readable English, a chat template (the default)
    "tiny-chat": Preset("llama", {}, shipped=True),
    # random weights, the shapes the engine tests assert on
    "tiny": Preset("llama", dict(_TINY)),
    "tiny-qwen2": Preset("qwen2", dict(_TINY, rope_theta=1000000.0), seed=1),
    "tiny-qwen3": Preset("qwen3", dict(_TINY, head_dim=32), seed=2),
    "tiny-mistral": Preset("mistral", dict(_TINY, sliding_window=96), seed=3),
    # a ~110M Llama for CPU benchmarks where per-token compute, not Python overhead, dominates
    "llama-110m-dummy": Preset("llama", _dummy_llama(768, 2048, 12, 12, 4, 4096), dummy=True),
    # Llama-3.2-1B shapes with a 32k vocab: ~1.1B parameters, the GPU benchmark model
    "llama-1b-dummy": Preset("llama", _dummy_llama(2048, 8192, 16, 32, 8, 8192), dummy=True),
}


def _config_class(architecture: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[
        architecture
    ]


def _model_class(architecture: str):
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

    return {
        "llama": LlamaForCausalLM,
        "qwen2": Qwen2ForCausalLM,
        "qwen3": Qwen3ForCausalLM,
        "mistral": MistralForCausalLM,
    }[architecture]


def build_preset(name: str, out_dir: Path) -> None:
    """Write preset ``name`` to ``out_dir`` in HF format. Deterministic for a given torch version."""
    import torch

    from pdserve.engine.tokenizer import build_byte_tokenizer

    preset = PRESETS[name]
    if preset.shipped:
        raise ValueError(f"model: preset {name!r} is shipped trained, not built (see engine/presets/)")
    hf_config = _config_class(preset.architecture)(**preset.config)
    hf_config.save_pretrained(str(out_dir))
    build_byte_tokenizer(out_dir, vocab_size=preset.config["vocab_size"])
    if preset.dummy:
        (out_dir / "pdserve_dummy.json").write_text(json.dumps({"seed": preset.seed}))
        return
    torch.manual_seed(preset.seed)
    model = _model_class(preset.architecture)(hf_config)
    model.save_pretrained(str(out_dir))


def resolve_tokenizer(model: str) -> str:
    """A directory holding ``model``'s tokenizer, built without torch: the router needs only this.

    For a preset whose full checkpoint is not built yet, only its tokenizer is written (to a directory of
    its own), so a router started before its workers never loads torch to build weights."""
    if model not in PRESETS or PRESETS[model].shipped:
        return resolve_model(model)[0]
    full = env.cache_dir() / "models" / f"{model}-v{PRESET_VERSION}"
    if (full / "tokenizer.json").exists():
        return str(full)
    out = env.cache_dir() / "models" / f"{model}-v{PRESET_VERSION}-tokenizer"
    if not (out / "tokenizer.json").exists():
        from pdserve.engine.tokenizer import build_byte_tokenizer

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{model}-tok-", dir=out.parent))
        try:
            build_byte_tokenizer(tmp, vocab_size=PRESETS[model].config["vocab_size"])
            try:
                os.rename(tmp, out)
            except OSError:
                if not (out / "tokenizer.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def resolve_model(model: str) -> tuple[str, bool]:
    """Return (path or hub id, is_dummy). Builds presets on first use; checks local paths exist."""
    if model in PRESETS and PRESETS[model].shipped:
        from pdserve.engine.presets import shipped_path

        return str(shipped_path(model)), False
    if model in PRESETS:
        out = env.cache_dir() / "models" / f"{model}-v{PRESET_VERSION}"
        if not (out / "config.json").exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{model}-", dir=out.parent))
            try:
                build_preset(model, tmp)
                try:
                    os.rename(tmp, out)  # atomic: concurrent builders race safely
                except OSError:
                    if not (out / "config.json").exists():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return str(out), PRESETS[model].dummy
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ValueError(f"model: {model!r} is a path but holds no config.json")
        return str(path), (path / "pdserve_dummy.json").exists()
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise ValueError(f"model: no such model directory {model!r}")
    return model, False  # a hub id: from_pretrained resolves it (from the local HF cache when offline)
