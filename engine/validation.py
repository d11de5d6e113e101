"""Request admission checks: the one place prompts, token ids and sampling limits are validated against the
model (vocabulary, context length) and the KV cache (blocks a request may need at worst)."""

from __future__ import annotations

from pdserve.engine.errors import InvalidRequestError
from pdserve.engine.sampling_params import SamplingParams


class RequestValidator:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, block_size: int, num_blocks: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.num_blocks = num_blocks

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt: must not be empty")
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        if not isinstance(prompt, list | tuple):
            raise InvalidRequestError(f"prompt: expected a string or a list of token ids, got {prompt!r:.80}")
        return list(prompt)

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise InvalidRequestError("prompt: must not be empty")
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token_ids: {bad[0]!r} is outside the vocabulary [0, {self.vocab_size})"
            )
        named = [t for t in params.token_ids_used if t >= self.vocab_size]
        if named:
            raise InvalidRequestError(f"sampling: token id {named[0]} (in logit_bias or allowed_token_ids) is outside "
                                      f"the vocabulary [0, {self.vocab_size})")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt: {len(token_ids)} tokens leaves no room to generate within max_model_len {self.max_model_len}"
            )
        worst = min(len(token_ids) + params.max_tokens, self.max_model_len)
        need = (worst + self.block_size - 1) // self.block_size
        if need > self.num_blocks:
            raise InvalidRequestError(
                f"prompt: needs up to {need} KV blocks but the cache has {self.num_blocks}; lower max_tokens"
            )

    def validate_prefilled(
        self, prompt_token_ids: list[int], first_token_id: int, num_reserved_blocks: int, params: SamplingParams
    ) -> None:
        """A KV hand-off: the prompt as ``validate`` checks it, its fit in the reserved blocks, its first token."""
        self.validate(prompt_token_ids, params)
        if num_reserved_blocks * self.block_size < len(prompt_token_ids):
            raise InvalidRequestError(
                f"prompt_token_ids: {len(prompt_token_ids)} tokens do not fit the {num_reserved_blocks} reserved blocks"
            )
        if not 0 <= first_token_id < self.vocab_size:
            raise InvalidRequestError(f"first_token_id: {first_token_id} is outside the vocabulary")
