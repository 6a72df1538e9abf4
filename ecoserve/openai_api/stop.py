"""OpenAI's `stop` strings over a stream of text: what may be sent, and where the output ends.

The output ends just before the earliest occurrence of any stop string. Text that could still
turn out to begin a stop string (a suffix that is a prefix of one) is held back until the next
piece decides it, so nothing past a stop string is ever sent.
"""

from __future__ import annotations


class StopScan:
    """Feed the text as it is generated; `feed` returns what may be sent now."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        if not stops or not all(stops):
            raise ValueError("stop strings must be a non-empty tuple of non-empty strings")
        self.stops = stops
        self.text = ""  # everything generated so far
        self.sent = 0  # text[:sent] was returned
        self.matched = False

    def feed(self, piece: str) -> str:
        """The text that may be sent after `piece`; once a stop string matched, none ever again."""
        if self.matched:
            return ""
        self.text += piece
        # A match cannot start before `sent`: text that could begin one was held back.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            self.matched = True
            end = min(hits)
        else:
            end = len(self.text) - self._held()
        out, self.sent = self.text[self.sent:end], end
        return out

    def flush(self) -> str:
        """The generation ended without a match: the text still held back."""
        if self.matched:
            return ""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out

    def _held(self) -> int:
        """Length of the longest proper suffix of the unsent text that begins a stop string."""
        tail = self.text[self.sent:]
        for k in range(min(len(tail), max(map(len, self.stops)) - 1), 0, -1):
            if any(s.startswith(tail[-k:]) for s in self.stops):
                return k
        return 0
