"""Stop strings over streamed text: finds the first stop string and holds back text that might start one."""

from __future__ import annotations


class StopChecker:
    def __init__(self, stop: tuple[str, ...], include: bool = False):
        self.stop = stop
        self.include = include  # vLLM's include_stop_str_in_output: the matched stop string stays in the text
        self.text = ""
        self.emitted = 0
        self.hit = False
        self.matched: str | None = None  # the stop string that hit

    def push(self, delta: str, check: bool = True) -> str:
        """Add decoded text; return the part now safe to stream. Only a stop string that ends in ``delta`` can match
        (as vLLM's); ``check`` False: none may (``min_tokens`` not reached), though text that could start one is
        still held back, for a stop string that ends in a later, checked push."""
        if self.hit:
            return ""
        old = len(self.text)
        self.text += delta
        if not self.stop:
            return self._emit(len(self.text))
        first = -1
        for s in self.stop if check else ():
            i = self.text.find(s, max(0, old - len(s) + 1))
            if i != -1 and (first == -1 or i < first):
                first, self.matched = i, s
        if first != -1:
            self.hit = True
            self.text = self.text[: first + (len(self.matched) if self.include else 0)]
            return self._emit(len(self.text))
        return self._emit(len(self.text) - self._partial_len())

    def flush(self) -> str:
        return self._emit(len(self.text))

    def _partial_len(self) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
