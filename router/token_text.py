"""Token ids -> their text for logprobs on the public API, so clients need no tokenizer of their own.

Each id is decoded alone (as vLLM does for logprobs): a token that is part of a multi-byte character reads as
U+FFFD. Decoded once per id and kept in a bounded cache; filled only for requests that asked for logprobs.
"""

from __future__ import annotations

from pdserve.protos import pdserve_pb2 as pb

MAX_CACHED = 1 << 16


class TokenTexts:
    def __init__(self, tokenizer, max_cached: int = MAX_CACHED):
        self.tokenizer = tokenizer
        self.max_cached = max_cached
        self._texts: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            try:
                text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            except (ValueError, TypeError, OverflowError, IndexError):
                text = ""
            if len(self._texts) >= self.max_cached:
                self._texts.clear()
            self._texts[token_id] = text
        return text

    def fill(self, resp: pb.GenerateResponse) -> None:
        """Set ``token_text`` on every logprob entry of ``resp`` (the sampled id and each alternative) and on every
        prompt logprob entry."""
        for entry in resp.prompt_logprobs:
            texts = entry.token_text
            texts[entry.token_id] = self.text(entry.token_id)
            for token_id in entry.top_ids:
                texts[token_id] = self.text(token_id)
        for lp in resp.logprobs:
            texts = lp.token_text
            texts[lp.token_id] = self.text(lp.token_id)
            for token_id in lp.top:
                texts[token_id] = self.text(token_id)
