"""Tokenizers: loading, the locally built byte-level tokenizer, and incremental detokenization."""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map used by byte-level BPE."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def build_byte_tokenizer(out_dir: Path, vocab_size: int = 259) -> None:
    """Write a byte-level tokenizer (3 specials + 256 bytes, padded with unused tokens to vocab_size) in HF
    format (tokenizer.json + tokenizer_config.json). Uses only ``tokenizers``: no torch, no transformers."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size: byte tokenizer needs >= 259 ids, got {vocab_size}")
    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[_bytes_to_unicode()[b]] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"<|unused{len(vocab)}|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": 1 << 30,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class LightTokenizer:
    """Encoding only, from a model's ``tokenizer.json`` through the ``tokenizers`` library: no torch and no
    transformers, so the router (which only counts and hashes token ids) stays light. Special tokens are
    added by the file's post-processor, exactly as the fast HF tokenizer built from the same file does."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


def load_light_tokenizer(path: str):
    """A torch-free encoder when the model ships ``tokenizer.json``; otherwise (slow-only tokenizers)
    fall back to transformers, which loads torch."""
    file = Path(path) / "tokenizer.json"
    if file.is_file():
        return LightTokenizer(file)
    return load_tokenizer(path)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without splitting multi-byte characters."""

    def __init__(self, tokenizer, prompt_token_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.vocab_len = len(tokenizer)
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        # decode with a few prompt tokens of context so leading-space rules match a full decode
        if prompt_token_ids:
            self.ids = list(prompt_token_ids[-4:])
            self.prefix_offset = 0
            self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if 0 <= i < self.vocab_len]
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if new_text.endswith("\ufffd") or len(new_text) <= len(prefix_text):
            return ""  # incomplete character: wait for more bytes
        delta = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return delta

    def flush(self) -> str:
        """Text still held back (an unfinished character); call once the sequence ends."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
