"""`Client`: the blocking client, an `AsyncClient` on a private event loop in a daemon thread."""

from __future__ import annotations

import asyncio
import queue
import threading
import weakref
from collections.abc import Coroutine, Generator, Sequence
from typing import Any, TypeVar, Union

from ecoserve.client.aio import AsyncClient, AsyncStream, AuthKeys
from ecoserve.client.liveness import DEFAULT_HEARTBEAT_TIMEOUT_S
from ecoserve.client.types import SLO, Completion, Delta, RequestError, ServerInfo
from ecoserve.params import SamplingParams

__all__ = ["Client", "Stream"]

_T = TypeVar("_T")
_END = object()  # the pump's "the stream ended normally"
_Item = Union[Delta, BaseException, object]


class Stream:
    """The deltas of one streamed request, as a regular iterator; read it once.

    `completion` is set when the iteration ends normally. Leaving early (break, `close()`,
    leaving `with`) aborts the request on the server before returning.
    """

    def __init__(self, client: Client, stream: AsyncStream) -> None:
        self._client = client
        self._stream = stream
        self._iterator: weakref.ref[Generator[Delta, None, None]] | None = None
        self._used = False

    @property
    def request_id(self) -> str:
        return self._stream.request_id

    @property
    def completion(self) -> Completion | None:
        return self._stream.completion

    def __iter__(self) -> Generator[Delta, None, None]:
        if self._used:
            raise RuntimeError(f"stream {self.request_id} was already iterated or closed; a stream is read once")
        self._used = True
        iterator = self._iterate()
        self._iterator = weakref.ref(iterator)  # weak: a `break` drops the generator, which aborts
        return iterator

    def _iterate(self) -> Generator[Delta, None, None]:
        items: queue.Queue[_Item] = queue.Queue()
        pump = self._client._call(_start_pump(self._stream, items))
        try:
            while True:
                item = items.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, Delta)
                yield item
        finally:
            self._client._cancel(pump)

    def close(self) -> None:
        self._used = True
        iterator = self._iterator() if self._iterator is not None else None
        if iterator is not None:
            iterator.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def _start_pump(stream: AsyncStream, items: queue.Queue[_Item]) -> asyncio.Task[None]:
    async def pump() -> None:
        try:
            async for delta in stream:
                items.put(delta)
        except Exception as exc:  # cancellation is not reported: the reader has gone
            items.put(exc)
        else:
            items.put(_END)

    return asyncio.get_running_loop().create_task(pump())


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.wait([task])


class Client:
    """A blocking client; connects on construction and raises TimeoutError if the server is not there.

    `auth_keys`: for a server started with `--auth curve`; `heartbeat_timeout` (default 10 s): how
    long the server may stay silent, heartbeats included, before every pending call fails with
    `RequestError` code "server_unreachable" (see AsyncClient).
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 10.0,
        client_name: str = "ecoserve-client",
        auth_keys: AuthKeys = None,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"ecoserve-client {address}", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            connect = AsyncClient.connect(
                address, timeout=timeout, client_name=client_name, auth_keys=auth_keys, heartbeat_timeout=heartbeat_timeout
            )
            self._client = self._call(connect)
        except BaseException:
            self._stop_loop()
            raise

    @property
    def address(self) -> str:
        return self._client.address

    @property
    def server_name(self) -> str | None:
        return self._client.server_name

    @property
    def server_info(self) -> ServerInfo | None:
        """The model and the request limits the server announced in the handshake."""
        return self._client.server_info

    def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        slo: SLO | None = None,
        timeout: float | None = None,
    ) -> Completion:
        """Run one request to its end; `timeout` (seconds, None = no limit) aborts it when it expires."""
        return self._call(self._client.generate(prompt, params, slo=slo, timeout=timeout))

    def stream(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        slo: SLO | None = None,
        timeout: float | None = None,
    ) -> Stream:
        """A stream of the request's deltas; the request is sent when the iteration starts."""
        return Stream(self, self._client.stream(prompt, params, slo=slo, timeout=timeout))

    def generate_many(
        self,
        prompts: Sequence[str | list[int]],
        params: SamplingParams | None = None,
        *,
        slo: SLO | None = None,
        timeout: float | None = None,
    ) -> list[Completion]:
        """Run all prompts concurrently, completions in prompt order; the first failure aborts the rest."""
        return self._call(self._client.generate_many(prompts, params, slo=slo, timeout=timeout))

    def abort(self, request_id: str) -> bool:
        """Abort an in-flight request; False when no request with that id is in flight here."""
        return self._call(self._client.abort(request_id))

    def stats(self, *, timeout: float | None = None) -> dict[str, float]:
        return self._call(self._client.stats(timeout=timeout))

    def close(self) -> None:
        """Abort what is in flight, close the socket and stop the loop thread; closing twice is fine."""
        if self._closed:
            return
        try:
            self._call(self._client.close())
        finally:
            self._stop_loop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run `coro` on the loop thread and wait; an interrupt here cancels it (and so aborts)."""
        if self._closed:
            coro.close()
            raise ConnectionError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def _cancel(self, task: asyncio.Task[None]) -> None:
        if self._closed or task.done():
            return
        if threading.current_thread() is self._thread:
            task.cancel()  # a stream dropped on the loop thread itself: waiting would deadlock
        else:
            self._call(_cancel_and_wait(task))

    def _stop_loop(self) -> None:
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
