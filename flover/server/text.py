"""A completion's text as its tokens arrive: whole characters only, and cut before a stop string.

A token can end inside a character (a byte tokenizer emits one byte of a
three-byte character at a time), so the text of the ids so far may end in
U+FFFD until the next token completes it; that tail is held back. A stop
string may begin in one token and end in a later one, so the longest tail
that could begin a stop string is held back too; when a stop string
appears, the text ends just before it, as OpenAI's ``stop`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete character


class TextStream:
    """Text pieces of a growing list of token ids, joined they equal ``tokenizer.decode`` of them all."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read]: the last settled piece, decoded again as context for the next
        self.read = 0
        self.pending = ""  # decoded, not yet released: it may begin a stop string
        self.stopped = False  # a stop string appeared; nothing more is released

    def add(self, token: int) -> str:
        """The text that ``token`` releases (often "", mid-character or mid-stop-string)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        settled = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if text.endswith(REPLACEMENT) or len(text) <= len(settled):
            return ""  # an incomplete character: wait for the next token
        self.pending += text[len(settled) :]
        self.prefix, self.read = self.read, len(self.ids)  # the next decode starts at a character boundary
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once the request has ended (an unfinished character shows as U+FFFD)."""
        if self.stopped:
            return ""
        settled = self.tokenizer.decode(self.ids[self.prefix : self.read])
        self.pending += self.tokenizer.decode(self.ids[self.prefix :])[len(settled) :]
        self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        hold = 0 if final else self._stop_prefix_length()
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out

    def _stop_prefix_length(self) -> int:
        """Length of the longest tail of ``pending`` that is the start of a stop string."""
        longest = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:k]):
                    longest = k
                    break
        return longest
