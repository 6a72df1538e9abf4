"""The client against a scripted in-test protocol server (a ROUTER socket in a thread)."""

from __future__ import annotations

import asyncio
import math
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from ecoserve import protocol
from ecoserve.client import SLO, AsyncClient, Client, Completion, Delta, RequestError, ServerInfo
from ecoserve.params import SamplingParams

Handler = Callable[[protocol.Message], list[protocol.Message]]


def finished(rid: str, token_ids: list[int], reason: str = "stop", text: str = "") -> protocol.RequestFinished:
    return protocol.RequestFinished(
        request_id=rid, token_ids=token_ids, text=text, finish_reason=reason, num_prompt_tokens=3, ttft_ms=1.5,
        tpot_ms=0.5, e2e_ms=4.0, queue_ms=0.25, prefill_ms=1.0, transfer_ms=0.1,
    )


def echo(msg: protocol.Message) -> list[protocol.Message]:
    """Finish every request at once: tokens = [len(prompt), max_tokens], text = the prompt upper-cased."""
    if isinstance(msg, protocol.AddRequest):
        prompt = msg.prompt or ""
        return [finished(msg.request_id, [len(prompt), msg.params.max_tokens], "length", prompt.upper())]
    return []


class FakeServer:
    """A ROUTER that answers Hello itself, records every other message and replies via `handler`."""

    def __init__(self, handler: Handler = echo, hello: protocol.Message | None = None) -> None:
        self.handler = handler
        self.hello = hello or protocol.HelloReply(
            protocol_version=protocol.PROTOCOL_VERSION, server_name="fake", model_id="fake-model", vocab_size=1000,
            max_model_len=512, max_prompt_tokens=511, max_request_tokens=512,
        )
        self.received: list[protocol.Message] = []
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind("tcp://127.0.0.1:*")
        self.address: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(5):
                continue
            identity, frame = self._sock.recv_multipart()
            msg = protocol.decode(frame)
            replies = [self.hello] if isinstance(msg, protocol.Hello) else self.handler(msg)
            self.received.append(msg)
            for reply in replies:
                self._sock.send_multipart([identity, protocol.encode(reply)])

    def of_type(self, cls: type) -> list[Any]:
        return [m for m in list(self.received) if isinstance(m, cls)]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"condition not met within {timeout}s; received {self.received}"
            time.sleep(0.002)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()
        self._ctx.term()


@pytest.fixture
def make_server() -> Iterator[Callable[..., FakeServer]]:
    servers: list[FakeServer] = []

    def make(handler: Handler = echo, hello: protocol.Message | None = None) -> FakeServer:
        servers.append(FakeServer(handler, hello))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def streaming(num_tokens: int) -> Handler:
    """Stream `num_tokens` deltas of one token each, then finish."""

    def handler(msg: protocol.Message) -> list[protocol.Message]:
        if not isinstance(msg, protocol.AddRequest):
            return []
        rid = msg.request_id
        ids, texts = [100 + i for i in range(num_tokens)], [f"t{i} " for i in range(num_tokens)]
        deltas: list[protocol.Message] = [protocol.TokenDelta(rid, i, [ids[i]], texts[i]) for i in range(num_tokens)]
        return [*deltas, finished(rid, ids, "length", "".join(texts))]

    return handler


def held_open(msg: protocol.Message) -> list[protocol.Message]:
    """Send two deltas and keep the request running until it is aborted."""
    if isinstance(msg, protocol.AddRequest):
        return [protocol.TokenDelta(msg.request_id, i, [i], "x") for i in range(2)]
    if isinstance(msg, protocol.AbortRequest):
        return [finished(msg.request_id, [0, 1], "abort")]
    return []


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_importing_the_client_does_not_import_torch() -> None:
    code = "import sys, ecoserve.client; from ecoserve import Client, RequestError; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- AsyncClient ---------------------------------------------------------------------------


def test_handshake_and_generate(make_server: Callable[..., FakeServer]) -> None:
    server = make_server()

    async def main() -> Completion:
        async with AsyncClient(server.address, client_name="tester") as client:
            assert client.server_name == "fake"
            assert client.server_info == ServerInfo("fake", "fake-model", 1000, 512, 511, 512)
            params = SamplingParams(max_tokens=7, temperature=0, seed=3)
            return await client.generate("hello", params, slo=SLO(ttft_ms=200))

    out = asyncio.run(main())
    assert (out.token_ids, out.text, out.finish_reason, out.num_prompt_tokens) == ([5, 7], "HELLO", "length", 3)
    timings = (out.ttft_ms, out.tpot_ms, out.e2e_ms, out.queue_ms, out.prefill_ms, out.transfer_ms)
    assert timings == (1.5, 0.5, 4.0, 0.25, 1.0, 0.1)
    hello = server.of_type(protocol.Hello)[0]
    assert (hello.protocol_version, hello.client_name) == (protocol.PROTOCOL_VERSION, "tester")
    add = server.of_type(protocol.AddRequest)[0]
    assert add.request_id == out.request_id and len(add.request_id) == 32
    assert (add.prompt, add.prompt_token_ids, add.params.max_tokens, add.params.temperature, add.params.seed) == (
        "hello", None, 7, 0.0, 3)
    assert add.params == SamplingParams(max_tokens=7, temperature=0, seed=3) and add.slo == SLO(ttft_ms=200)
    assert (add.slo.ttft_ms, add.slo.tpot_ms, add.stream) == (200.0, None, False)


def test_token_id_prompt_and_default_params(make_server: Callable[..., FakeServer]) -> None:
    server = make_server()

    async def main() -> None:
        async with AsyncClient(server.address) as client:
            await client.generate([1, 2, 3])

    asyncio.run(main())
    add = server.of_type(protocol.AddRequest)[0]
    defaults = SamplingParams()
    assert (add.prompt, add.prompt_token_ids) == (None, [1, 2, 3])
    assert (add.params.max_tokens, add.params.top_p, add.params.top_k, add.params.stop_token_ids, add.params.ignore_eos) == (
        defaults.max_tokens, defaults.top_p, defaults.top_k, (), False)
    assert add.params == defaults and add.slo is None


def test_bad_arguments_fail_in_the_caller(make_server: Callable[..., FakeServer]) -> None:
    server = make_server()

    async def main() -> None:
        async with AsyncClient(server.address) as client:
            with pytest.raises(ValueError, match="prompt is empty"):
                await client.generate("")
            with pytest.raises(TypeError, match="SamplingParams"):
                await client.generate("x", {"max_tokens": 3})  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="timeout"):
                await client.generate("x", timeout=0)

    asyncio.run(main())
    with pytest.raises(ValueError, match="ttft_ms"):
        SLO(ttft_ms=-1)
    assert server.of_type(protocol.AddRequest) == []


def test_there_is_one_slo_class_and_it_says_what_is_allowed() -> None:
    import ecoserve
    from ecoserve import params
    from ecoserve.client import types
    from ecoserve.sim import experiment

    assert ecoserve.SLO is params.SLO and types.SLO is params.SLO and experiment.SLO is params.SLO
    assert SLO() == SLO(None, None) and SLO(250, 100) == SLO(ttft_ms=250, tpot_ms=100)
    for bad in (0, -1, math.inf, math.nan, True, "5"):
        with pytest.raises(ValueError, match=r"SLO.tpot_ms: the TPOT SLO must be a number of milliseconds > 0 .*or None"):
            SLO(ttft_ms=1, tpot_ms=bad)  # type: ignore[arg-type]
    assert SLO(ttft_ms=100).met_by(ttft_ms=100, tpot_ms=1e9) and not SLO(ttft_ms=100).met_by(100.5, 0)
    assert SLO().met_by(1e9, 1e9) and not SLO(tpot_ms=5).met_by(0, 6)


def test_version_mismatch_raises_request_error(make_server: Callable[..., FakeServer]) -> None:
    server = make_server(hello=protocol.ErrorReply(None, "version", "server speaks protocol 2, client sent 1"))
    with pytest.raises(RequestError, match="server speaks protocol 2") as info:
        asyncio.run(AsyncClient.connect(server.address))
    assert info.value.code == "version" and info.value.request_id is None


def test_connect_timeout_names_the_address() -> None:
    address = free_address()
    timeout = 0.2
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=f"{address}.*may not be running"):
        asyncio.run(AsyncClient.connect(address, timeout=timeout))
    # It waits out its timeout, and then gives up: the slack covers an event loop's start and a
    # loaded 2-core runner's scheduling delays (a connect that hung would blow it).
    assert timeout <= time.monotonic() - started < timeout + 3.0


def test_stream_yields_deltas_in_order_then_completion(make_server: Callable[..., FakeServer]) -> None:
    server = make_server(streaming(5))

    async def main() -> tuple[list[Delta], Completion | None]:
        async with AsyncClient(server.address) as client:
            stream = client.stream("hi")
            deltas = [d async for d in stream]
            return deltas, stream.completion

    deltas, completion = asyncio.run(main())
    assert [d.index for d in deltas] == [0, 1, 2, 3, 4]
    assert [t for d in deltas for t in d.token_ids] == [100, 101, 102, 103, 104]
    assert completion is not None and completion.text == "".join(d.text for d in deltas)
    assert server.of_type(protocol.AddRequest)[0].stream is True
    assert server.of_type(protocol.AbortRequest) == []


@pytest.mark.parametrize("how", ["break", "aclose", "async_with", "cancel"])
def test_leaving_a_stream_early_aborts_it(make_server: Callable[..., FakeServer], how: str) -> None:
    server = make_server(held_open)

    async def main() -> str:
        async with AsyncClient(server.address) as client:
            stream = client.stream("hi")
            if how == "break":
                async for _ in stream:
                    break
            elif how == "aclose":
                iterator = aiter(stream)
                await anext(iterator)
                await stream.aclose()
            elif how == "async_with":
                async with stream:
                    async for _ in stream:
                        break
            else:
                async def consume() -> None:
                    async for _ in stream:
                        pass

                task = asyncio.create_task(consume())
                await asyncio.to_thread(server.wait_for, lambda: len(server.of_type(protocol.AddRequest)) == 1)
                task.cancel()
                await asyncio.wait([task])
            await asyncio.to_thread(server.wait_for, lambda: len(server.of_type(protocol.AbortRequest)) == 1)
            assert stream.completion is None
            return stream.request_id

    rid = asyncio.run(main())
    assert server.of_type(protocol.AbortRequest) == [protocol.AbortRequest(rid)]


def test_timeout_raises_and_aborts(make_server: Callable[..., FakeServer]) -> None:
    def handler(msg: protocol.Message) -> list[protocol.Message]:
        return [protocol.StatsReply({})] if isinstance(msg, protocol.GetStats) else held_open(msg)

    server = make_server(handler)

    async def main() -> None:
        async with AsyncClient(server.address) as client:
            expected = r"request [0-9a-f]{32} did not finish within its timeout of 0.1s; the client stopped waiting"
            with pytest.raises(TimeoutError, match=expected) as info:
                await client.generate("slow", timeout=0.1)
            assert "aborted on the server" not in str(info.value)  # the client cannot know that it was
            await asyncio.to_thread(server.wait_for, lambda: len(server.of_type(protocol.AbortRequest)) == 1)
            assert await client.stats() == {}  # still usable; the late "abort" reply was dropped

    asyncio.run(main())
    add, abort = server.of_type(protocol.AddRequest)[0], server.of_type(protocol.AbortRequest)[0]
    assert abort.request_id == add.request_id


def test_error_reply_raises_request_error(make_server: Callable[..., FakeServer]) -> None:
    def handler(msg: protocol.Message) -> list[protocol.Message]:
        assert isinstance(msg, protocol.AddRequest)
        return [protocol.ErrorReply(msg.request_id, "bad_request", "max_tokens 7 exceeds the limit of 4")]

    server = make_server(handler)

    async def main() -> None:
        async with AsyncClient(server.address) as client:
            with pytest.raises(RequestError) as info:
                await client.generate("x", SamplingParams(max_tokens=7))
            err, rid = info.value, server.of_type(protocol.AddRequest)[0].request_id
            assert (err.code, err.message, err.request_id) == ("bad_request", "max_tokens 7 exceeds the limit of 4", rid)
            assert "max_tokens 7 exceeds the limit of 4" in str(err)

    asyncio.run(main())
    assert server.of_type(protocol.AbortRequest) == []  # a terminal error needs no abort


def test_abort_returns_an_abort_completion(make_server: Callable[..., FakeServer]) -> None:
    server = make_server(held_open)

    async def main() -> None:
        async with AsyncClient(server.address) as client:
            task = asyncio.create_task(client.generate("x"))
            await asyncio.to_thread(server.wait_for, lambda: len(server.of_type(protocol.AddRequest)) == 1)
            rid = server.of_type(protocol.AddRequest)[0].request_id
            assert await client.abort(rid) is True
            out = await task
            assert (out.request_id, out.finish_reason, out.token_ids) == (rid, "abort", [0, 1])
            assert await client.abort(rid) is False  # no longer in flight

    asyncio.run(main())


def test_fifty_concurrent_generates_are_demultiplexed(make_server: Callable[..., FakeServer]) -> None:
    pending: list[protocol.AddRequest] = []
    rng = random.Random(0)

    def handler(msg: protocol.Message) -> list[protocol.Message]:
        assert isinstance(msg, protocol.AddRequest)
        pending.append(msg)
        if len(pending) < 50:
            return []
        rng.shuffle(pending)  # answer everything at once, out of order, deltas interleaved
        replies: list[protocol.Message] = [protocol.TokenDelta(m.request_id, 0, [1], "") for m in pending]
        return replies + [echo(m)[0] for m in reversed(pending)]

    server = make_server(handler)

    async def main() -> list[Completion]:
        async with AsyncClient(server.address) as client:
            calls = (client.generate("p" * i, SamplingParams(max_tokens=i)) for i in range(1, 51))
            return await asyncio.gather(*calls)

    outs = asyncio.run(main())
    assert [o.token_ids for o in outs] == [[i, i] for i in range(1, 51)]
    assert [o.text for o in outs] == ["P" * i for i in range(1, 51)]
    assert len({o.request_id for o in outs}) == 50


def test_stats_is_a_fifo_that_survives_a_timed_out_call(make_server: Callable[..., FakeServer]) -> None:
    held: list[protocol.Message] = []
    count = [0]

    def handler(msg: protocol.Message) -> list[protocol.Message]:
        assert isinstance(msg, protocol.GetStats)
        count[0] += 1
        held.append(protocol.StatsReply({"n": float(count[0])}))
        if count[0] == 1:  # hold the first reply until the second request arrives
            return []
        replies, held[:] = list(held), []
        return replies

    server = make_server(handler)

    async def main() -> None:
        async with AsyncClient(server.address) as client:
            with pytest.raises(TimeoutError, match="no stats reply"):
                await client.stats(timeout=0.05)
            assert await client.stats() == {"n": 2.0}  # reply 1 went to the abandoned call
            together = await asyncio.gather(client.stats(), client.stats(), client.stats())
            assert together == [{"n": 3.0}, {"n": 4.0}, {"n": 5.0}]

    asyncio.run(main())


def test_connection_level_error_and_close_fail_pending_calls(make_server: Callable[..., FakeServer]) -> None:
    def handler(msg: protocol.Message) -> list[protocol.Message]:
        if isinstance(msg, protocol.AddRequest) and msg.prompt == "poison":
            return [protocol.ErrorReply(None, "shutting_down", "the server is draining")]
        return []

    server = make_server(handler)

    async def main() -> None:
        client = await AsyncClient.connect(server.address)
        waiting = asyncio.create_task(client.generate("x"))
        await asyncio.sleep(0.01)
        with pytest.raises(RequestError, match="draining"):
            await client.generate("poison")
        with pytest.raises(RequestError, match="draining"):
            await waiting
        with pytest.raises(RequestError):
            await client.stats()
        await client.close()

        client = await AsyncClient.connect(server.address)
        waiting = asyncio.create_task(client.generate("x"))
        await asyncio.sleep(0.01)
        await client.close()
        with pytest.raises(ConnectionError, match="closed"):
            await waiting
        with pytest.raises(ConnectionError, match="closed"):
            await client.generate("y")
        await client.close()

    asyncio.run(main())


def test_a_server_that_goes_away_fails_pending_calls_as_unreachable(make_server: Callable[..., FakeServer]) -> None:
    server = make_server(held_open)

    async def main() -> None:
        async with AsyncClient(server.address) as client:
            deltas = client.stream("x").__aiter__()
            await deltas.__anext__()
            waiting = asyncio.create_task(client.generate("y"))
            await asyncio.to_thread(server.wait_for, lambda: len(server.of_type(protocol.AddRequest)) == 2)
            await asyncio.to_thread(server.close)  # its socket closes: the connection drops

            async def rest_of_stream() -> None:
                async for _ in deltas:
                    pass

            for call in (rest_of_stream(), waiting, client.stats()):
                with pytest.raises(RequestError) as info:
                    await asyncio.wait_for(call, 10)
                assert info.value.code == "server_unreachable"
                assert f"the ecoserve server at {server.address} is unreachable" in info.value.message

    asyncio.run(main())


# --- Client (sync) -------------------------------------------------------------------------


def test_sync_client_basics(make_server: Callable[..., FakeServer]) -> None:
    def handler(msg: protocol.Message) -> list[protocol.Message]:
        if isinstance(msg, protocol.GetStats):
            return [protocol.StatsReply({"running": 1.0})]
        if isinstance(msg, protocol.AddRequest) and msg.stream:
            return streaming(3)(msg)
        if isinstance(msg, protocol.AddRequest) and msg.prompt == "bad":
            return [protocol.ErrorReply(msg.request_id, "failed", "worker died")]
        return echo(msg)

    server = make_server(handler)
    with Client(server.address) as client:
        assert client.generate("abc", SamplingParams(max_tokens=2)).text == "ABC"
        stream = client.stream("s")
        assert [d.index for d in stream] == [0, 1, 2]
        assert stream.completion is not None and stream.completion.token_ids == [100, 101, 102]
        outs = client.generate_many(["a" * i for i in range(1, 21)], SamplingParams(max_tokens=4))
        assert [o.token_ids for o in outs] == [[i, 4] for i in range(1, 21)]
        assert client.stats() == {"running": 1.0}
        with pytest.raises(RequestError, match="worker died") as info:
            client.generate("bad")
        assert info.value.code == "failed"
    with pytest.raises(ConnectionError, match="closed"):
        client.generate("after close")


@pytest.mark.parametrize("how", ["break", "close", "timeout"])
def test_sync_stream_early_exit_and_timeout_abort(make_server: Callable[..., FakeServer], how: str) -> None:
    server = make_server(held_open)
    with Client(server.address) as client:
        if how == "timeout":
            with pytest.raises(TimeoutError, match="timeout of 0.1s"):
                client.generate("x", timeout=0.1)
            rid = server.of_type(protocol.AddRequest)[0].request_id
        else:
            stream = client.stream("x")
            rid = stream.request_id
            if how == "break":
                for _ in stream:
                    break
            else:
                next(iter(stream))
                stream.close()
            # the sync stream waits for the abort to be sent before returning
            assert stream.completion is None
        server.wait_for(lambda: len(server.of_type(protocol.AbortRequest)) == 1)
    assert server.of_type(protocol.AbortRequest) == [protocol.AbortRequest(rid)]


def test_sync_connect_timeout() -> None:
    with pytest.raises(TimeoutError, match="may not be running"):
        Client(free_address(), timeout=0.2)
