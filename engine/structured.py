"""Structured outputs in the engine: one llguidance matcher per constrained request, a token mask per step.

- ``Grammars.matcher`` builds a request's matcher (the tokenizer's llguidance view is made once per engine) and
  feeds it the tokens generated before this worker saw the request (a migration's, the prompt's last
  ``sample_offset``), so a moved request stays on its grammar.
- ``mask`` sets every token the grammar forbids to -inf in the step's logits, for the constrained rows only.
  A row with no constraint costs nothing.
- The sampled token is fed to the matcher when it is recorded (``engine.outputs``); a grammar that is complete
  and admits nothing more ends the request ("stop") at once, without spending a step on EOS.
"""

from __future__ import annotations

import logging
import threading

import torch

from pdserve.engine.sequence import Sequence
from pdserve.engine.structured_outputs import StructuredOutputsParams, _llguidance

logger = logging.getLogger(__name__)


class Grammars:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self._lltok = None
        self._lock = threading.RLock()  # a constrained request waits while the warm-up runs

    def warm_up(self) -> None:
        """Build the tokenizer's llguidance view (0.2 s for tiny-qwen3's 151,936 tokens, measured once; llguidance
        documents ~1 s for real vocabularies), so a worker's first constrained request does not stall every request
        on the engine thread.
        Workers run this on a thread of its own at start (llguidance releases the GIL); errors are only logged."""
        try:
            from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

            with self._lock:
                m = self.matcher(StructuredOutputsParams(choice=["warm"]), [])
                fill_next_token_bitmask(m, allocate_token_bitmask(1, self.vocab_size), 0)
        except Exception as e:  # noqa: BLE001 - a model without a fast tokenizer, no llguidance: requests will say
            logger.info("structured outputs not warmed up: %s", e)

    def _tokenizer(self):
        """The tokenizer as llguidance reads it, sized to the model's logits (made once, by ``warm_up`` or the
        first constrained request)."""
        with self._lock:
            return self._make_tokenizer()

    def _make_tokenizer(self):
        if self._lltok is None:
            from llguidance.hf import from_tokenizer

            eos = self.tokenizer.eos_token_id
            if eos is None:
                eos = min(self.eos_token_ids, default=None)
            try:
                self._lltok = from_tokenizer(self.tokenizer, n_vocab=self.vocab_size, eos_token=eos)
            except ValueError as e:  # a slow (Python) tokenizer
                raise ValueError(f"structured_outputs: not supported for this model's tokenizer ({e})") from None
        return self._lltok

    def matcher(self, params: StructuredOutputsParams, prior: list[int]):
        """A fresh matcher for ``params``, having consumed ``prior``; ValueError naming the field if the grammar is
        not valid or ``prior`` breaks it."""
        llg = _llguidance()
        m = llg.LLMatcher(self._tokenizer(), params.grammar_text(), log_level=0)
        if m.is_error():
            raise ValueError(f"structured_outputs.{params.kind}: {' '.join(m.get_error().split())[:300]}")
        if prior and not m.consume_tokens(prior):
            raise ValueError("structured_outputs: the tokens already generated do not match the constraint")
        return m


def mask(logits: torch.Tensor, seqs: list[Sequence], inplace: bool) -> torch.Tensor:
    """``logits`` [len(seqs), vocab] with what each constrained row's grammar forbids at -inf (a copy unless
    ``inplace`` or no row is constrained)."""
    rows = [i for i, s in enumerate(seqs) if s.matcher is not None]
    if not rows:
        return logits
    from llguidance.torch import (
        allocate_token_bitmask,
        apply_token_bitmask_inplace,
        fill_next_token_bitmask_par,
    )

    bits = allocate_token_bitmask(len(rows), logits.shape[-1])  # int32 words, one bit per token
    # every row's mask at once on llguidance's thread pool (Rust, without the GIL)
    fill_next_token_bitmask_par(_executor(), [(seqs[i].matcher, j) for j, i in enumerate(rows)], bits)
    out = logits if inplace else logits.clone()
    with torch.inference_mode():  # the runner's logits are inference tensors
        if len(rows) == len(seqs):
            apply_token_bitmask_inplace(out, bits.to(out.device, non_blocking=True))
        else:
            index = torch.tensor(rows, dtype=torch.long, device=out.device)
            sub = out.index_select(0, index)
            apply_token_bitmask_inplace(sub, bits.to(out.device, non_blocking=True))  # 7x faster than a bool unpack
            out.index_copy_(0, index, sub)
    return out


_EXECUTOR = None


def _executor():
    """llguidance's thread pool for masks (80 % of the CPUs, at most 32), made once per process."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = _llguidance().LLExecutor()
    return _EXECUTOR


def consume(seq: Sequence, token_id: int) -> bool:
    """Feed a recorded token to the request's matcher; True when the grammar is complete and admits nothing more
    (the request ends). A token the grammar refuses cannot be sampled; if one is recorded anyway (a first token from
    another worker), the matcher's error ends the request too."""
    m = seq.matcher
    if m is None:
        return False
    if not m.consume_token(token_id):
        logger.warning("[%s] token %d breaks its structured_outputs constraint (%s); ending it", seq.request_id,
                       token_id, " ".join(m.get_error().split())[:200])
        return True
    return m.is_stopped()
