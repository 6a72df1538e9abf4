"""Per-client caps on requests and prompt tokens in flight: refusals name the limit and the
current count; releases (and requests the server no longer holds) free the room again."""

from __future__ import annotations

from ecoserve.coordinator.limits import ClientLimits

A, B = b"client-a", b"client-b"


def test_the_request_cap_refuses_naming_limit_and_count_and_spares_other_clients() -> None:
    limits = ClientLimits(max_requests=2, max_prompt_tokens=1000)
    held = {"r1", "r2"}
    for rid in sorted(held):
        assert limits.refuse(A, 10, held.__contains__) is None
        limits.add(A, rid, 10)
    reason = limits.refuse(A, 10, held.__contains__)
    assert reason is not None and reason.startswith("over limit")
    assert "has 2 requests in flight and the limit is 2 (--max-inflight-per-client)" in reason
    assert limits.refuse(B, 10, set().__contains__) is None, "another client has its own count"
    limits.release(A, "r1")
    assert limits.refuse(A, 10, held.__contains__) is None


def test_the_prompt_token_cap_counts_tokens_in_flight() -> None:
    limits = ClientLimits(max_requests=100, max_prompt_tokens=500)
    limits.add(A, "big", 400)
    reason = limits.refuse(A, 101, {"big"}.__contains__)
    assert reason is not None and "400 prompt tokens in flight, and 101 more would exceed the limit of 500" in reason
    assert limits.refuse(A, 100, {"big"}.__contains__) is None
    limits.release(A, "big")
    limits.release(A, "big")  # twice, or unknown: no-op
    limits.release(B, "never")
    assert limits.inflight == {} and limits.tokens == {}, "nothing kept for idle clients"


def test_requests_the_server_dropped_without_a_terminal_event_are_forgotten_before_refusing() -> None:
    limits = ClientLimits(max_requests=1, max_prompt_tokens=10**6)
    limits.add(A, "gone", 5)
    assert limits.refuse(A, 5, lambda rid: rid == "gone") is not None
    assert limits.refuse(A, 5, lambda rid: False) is None and not limits.holds(A, "gone")
