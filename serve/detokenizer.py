"""Incremental detokenization and stop strings (the server's job; the engine only sees token ids).

Decoding one token at a time is wrong for byte-level BPE: a multi-byte character spans tokens
and decodes to U+FFFD until its last byte arrives. Like vLLM, keep a small window of already
emitted tokens as context, decode window and window+new, and emit the difference only once it
no longer ends in a partial character.

Stop strings: the text is held back by ``max(len(stop)) - 1`` characters while streaming so a
stop string split across tokens is never sent before it is recognized; the match and what
follows it are dropped (OpenAI semantics).
"""

from __future__ import annotations

from typing import Protocol

_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_ids: list[int], skip_ids: set[int] | None = None) -> None:
        self.tok = tokenizer
        self.skip = skip_ids or set()
        ctx = [t for t in prompt_ids[-_CONTEXT_TOKENS:] if t not in self.skip]
        self.ids: list[int] = list(ctx)
        self.prefix_offset = 0
        self.read_offset = len(ctx)

    def push(self, new_ids: list[int]) -> str:
        """Add generated ids; return the newly completed text (may be empty)."""
        self.ids.extend(t for t in new_ids if t not in self.skip)
        if len(self.ids) == self.read_offset:
            return ""
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(_REPLACEMENT):
            return ""  # mid-character: wait for more bytes
        self.prefix_offset = max(self.read_offset, len(self.ids) - _CONTEXT_TOKENS)
        self.read_offset = len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """At the end: whatever is left, even a partial character (as U+FFFD)."""
        if len(self.ids) == self.read_offset:
            return ""
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tok.decode(self.ids[self.prefix_offset :])
        self.read_offset = len(self.ids)
        return full[len(prefix) :]


class StopChecker:
    """Finds the first stop string in the generated text; tells how much text is safe to emit."""

    def __init__(self, stops: list[str] | None) -> None:
        self.stops = [s for s in (stops or []) if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # all generated text so far (up to a stop)
        self.emitted = 0  # characters of self.text already sent
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Append ``piece``; return what may be sent now. Sets ``stopped`` at a stop string."""
        if self.stopped or not piece:
            return ""
        start = max(0, len(self.text) - self.hold)
        self.text += piece
        cut = self._find(start)
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            return self._take(len(self.text))
        return self._take(len(self.text) - self.hold)

    def finish(self) -> str:
        """Generation ended: release the held-back tail."""
        return self._take(len(self.text))

    def _find(self, start: int) -> int | None:
        best: int | None = None
        for s in self.stops:
            i = self.text.find(s, start)
            if i != -1 and (best is None or i < best):
                best = i
        return best

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out
