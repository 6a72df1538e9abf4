"""The `ecoserve` policy's PT queue: one FIFO queue per RL bucket, and a cursor that walks one
bucket during a round without changing it."""

from __future__ import annotations

from typing import Iterator

from ecoserve.coordinator.policy import FIFOQueue
from ecoserve.coordinator.request import Request


class BucketQueues(FIFOQueue):
    """One FIFO queue per predicted horizon (the RL bucket bound), plus arrival order overall."""

    def __init__(self) -> None:
        super().__init__()
        self.buckets: dict[int, dict[str, Request]] = {}

    def push(self, req: Request) -> None:
        assert req.predicted_tokens is not None, "on_admit predicts before the request is queued"
        super().push(req)
        self.buckets.setdefault(req.predicted_tokens, {})[req.request_id] = req

    def remove(self, request_id: str) -> bool:
        req = self._items.get(request_id)
        if req is None:
            return False
        super().remove(request_id)
        assert req.predicted_tokens is not None
        queue = self.buckets[req.predicted_tokens]
        del queue[request_id]
        if not queue:
            del self.buckets[req.predicted_tokens]
        return True

    def lengths(self) -> dict[str, int]:
        return {str(b): len(q) for b, q in sorted(self.buckets.items())}


class Cursor:
    """Walks one bucket queue in order during a round (the queue itself does not change)."""

    def __init__(self, items: Iterator[Request]) -> None:
        self.items = items
        self.buffer: list[Request] = []

    def peek(self, i: int = 0) -> Request | None:
        while len(self.buffer) <= i:
            nxt = next(self.items, None)
            if nxt is None:
                return None
            self.buffer.append(nxt)
        return self.buffer[i]

    @property
    def head(self) -> Request | None:
        return self.peek(0)

    def pop(self) -> Request:
        head = self.peek(0)
        assert head is not None
        return self.buffer.pop(0)
