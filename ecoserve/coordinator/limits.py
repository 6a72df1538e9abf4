"""Per-client caps on what one client connection holds in flight: requests and prompt tokens.

The server asks `refuse()` before it admits a request, `add()`s what it admitted, and calls
`release()` when the request's terminal event goes out. A refusal names the limit, the
client's current count and the option that sets it.
"""

from __future__ import annotations

from collections.abc import Callable


class ClientLimits:
    def __init__(self, max_requests: int, max_prompt_tokens: int) -> None:
        self.max_requests = max_requests
        self.max_prompt_tokens = max_prompt_tokens
        self.inflight: dict[bytes, dict[str, int]] = {}  # client -> {client request id: prompt tokens}
        self.tokens: dict[bytes, int] = {}  # client -> prompt tokens in flight

    def refuse(self, client: bytes, num_prompt_tokens: int, in_flight: Callable[[str], bool]) -> str | None:
        """Why a new request of `num_prompt_tokens` would put `client` over a limit, or None.

        `in_flight(client_request_id)` says whether the server still holds a request: entries it
        has dropped without a terminal event are forgotten here before a refusal.
        """
        reason = self._over(client, num_prompt_tokens)
        if reason is not None:
            for rid in [rid for rid in self.inflight.get(client, {}) if not in_flight(rid)]:
                self.release(client, rid)
            reason = self._over(client, num_prompt_tokens)
        return reason

    def _over(self, client: bytes, num_prompt_tokens: int) -> str | None:
        requests = len(self.inflight.get(client, ()))
        if requests + 1 > self.max_requests:
            return (
                f"over limit: this client has {requests} requests in flight and the limit is {self.max_requests} "
                "(--max-inflight-per-client); wait for some to finish"
            )
        tokens = self.tokens.get(client, 0)
        if tokens + num_prompt_tokens > self.max_prompt_tokens:
            return (
                f"over limit: this client has {tokens} prompt tokens in flight, and {num_prompt_tokens} more would "
                f"exceed the limit of {self.max_prompt_tokens} (--max-prompt-tokens-per-client); wait for some to finish"
            )
        return None

    def add(self, client: bytes, client_request_id: str, num_prompt_tokens: int) -> None:
        self.inflight.setdefault(client, {})[client_request_id] = num_prompt_tokens
        self.tokens[client] = self.tokens.get(client, 0) + num_prompt_tokens

    def release(self, client: bytes, client_request_id: str) -> None:
        """Forget a request (no-op for one not held)."""
        requests = self.inflight.get(client)
        if requests is None or client_request_id not in requests:
            return
        self.tokens[client] -= requests.pop(client_request_id)
        if not requests:
            del self.inflight[client], self.tokens[client]

    def holds(self, client: bytes, client_request_id: str) -> bool:
        return client_request_id in self.inflight.get(client, ())
