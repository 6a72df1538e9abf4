"""`ecoserve bench serve --backend openai`: the same open-loop load on any OpenAI-compatible
server, through streamed /v1/completions (token-id or text prompts, greedy, `max_tokens` the
workload's output length).

What differs from the ZeroMQ backend, and why:

- the server says less about itself: its model comes from GET /v1/models (or `--model`), its
  context from the model card's `max_model_len` (vLLM and EcoServe give it), and the vocabulary
  that token-id prompts are drawn from from the model's tokenizer (`--tokenizer`);
- tokens are counted from the stream: each chunk that carries text or no finish reason counts
  as one token received then, and the server's usage (`stream_options.include_usage`), when it
  gives one, fixes the total (a chunk carrying k tokens then counts k, spread over its wait as
  the ZeroMQ backend spreads a delta's tokens). A server that streams one chunk per token,
  as vLLM and EcoServe do, is counted exactly;
- `ignore_eos` and the SLO fields (`slo_ttft_ms`, `slo_tpot_ms`) are not OpenAI's: they are sent
  unless `--strict-openai`, for servers that refuse fields they do not know (outputs may then
  end early at an end-of-sequence token: counted as `output_len_mismatches`);
- the server's own counters (KV use, preemptions, schedule times) are not read: those rows
  say n/a.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Sequence

import httpx2
from tqdm import tqdm

from ecoserve.bench.serve.metrics import BenchResult, RequestResult
from ecoserve.bench.serve.workload import Workload, prompts_for
from ecoserve.client.types import SLO, ServerInfo
from ecoserve.data.workload import WorkloadRequest


@dataclass(frozen=True)
class OpenAITarget:
    """The server: its API root (`.../v1`), the model to ask for, the key to send (or None),
    and whether to send only OpenAI's own fields."""

    base_url: str
    model: str | None = None
    api_key: str | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must be an http:// or https:// URL such as http://127.0.0.1:8000/v1, "
                             f"got {self.base_url!r}")

    @property
    def root(self) -> str:
        return self.base_url.rstrip("/")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


async def fetch_openai_info(target: OpenAITarget, timeout: float, vocab_size: int, max_model_len: int | None) -> ServerInfo:
    """The served model and its context, from GET /v1/models, or ValueError naming why not.
    `max_model_len` stands in when the model card gives none."""
    url = target.root + "/models"
    try:
        async with httpx2.AsyncClient(timeout=timeout) as http:
            reply = await http.get(url, headers=target.headers())
    except httpx2.HTTPError as exc:
        raise ValueError(f"could not reach the OpenAI-compatible server at {url}: {type(exc).__name__}: {exc}") from None
    if reply.status_code != 200:
        raise ValueError(f"GET {url} answered {reply.status_code}: {reply.text[:200]}")
    cards = {c.get("id"): c for c in reply.json().get("data", []) if isinstance(c, dict)}
    model = target.model or (next(iter(cards)) if len(cards) == 1 else None)
    if model is None:
        raise ValueError(f"the server at {target.root} serves {sorted(map(str, cards))}; choose one with --model NAME")
    if target.model is not None and cards and model not in cards:
        raise ValueError(f"the server at {target.root} does not serve --model {model!r}; it serves {sorted(map(str, cards))}")
    context = cards.get(model, {}).get("max_model_len") or max_model_len
    if not isinstance(context, int) or context < 2:
        raise ValueError(f"the server at {target.root} does not give max_model_len for {model!r} in /v1/models; "
                         "give --max-prompt-len and --max-output-len (their sum is taken as its context)")
    return ServerInfo(target.root, model, vocab_size, context, context - 1, context)


async def run_openai_benchmark(
    target: OpenAITarget, info: ServerInfo, workload: Workload, slo: SLO = SLO(), *, seed: int = 0,
    request_timeout: float = 600.0, progress: bool = True,
) -> BenchResult:
    """Send the workload open-loop and measure it as `run_benchmark` does (no server counters)."""
    from ecoserve.bench.serve.run import send_open_loop

    reqs = workload.requests
    if not reqs:
        raise ValueError("no requests to send: every request was dropped by the server's limits")
    prompts = prompts_for(reqs, info.vocab_size, seed)
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(request_timeout), limits=limits) as http:

        def send(i: int, arrival: float, start: float, bar: tqdm[Any]) -> Any:
            return _one(http, target, info.model_id, i, reqs[i], arrival, prompts[i], slo, start, request_timeout, bar)

        results = await send_open_loop(reqs, send, progress)
    return BenchResult(
        sorted(results, key=lambda r: r.index), max(r.end_s for r in results), slo, info, [], {}, {},
        workload.clipped_prompts, workload.clipped_outputs, workload.dropped,
    )


def request_body(target: OpenAITarget, model: str, prompt: str | list[int], max_tokens: int, slo: SLO) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if not target.strict:
        body["ignore_eos"] = True
        body |= {k: v for k, v in (("slo_ttft_ms", slo.ttft_ms), ("slo_tpot_ms", slo.tpot_ms)) if v is not None}
    return body


async def _one(
    http: httpx2.AsyncClient, target: OpenAITarget, model: str, index: int, req: WorkloadRequest, arrival_s: float,
    prompt: str | list[int], slo: SLO, start: float, timeout: float, bar: tqdm[Any],
) -> RequestResult:
    loop = asyncio.get_running_loop()
    lag_ms = (loop.time() - start - arrival_s) * 1e3
    stream = _Stream()
    status, error = "ok", None
    try:
        await asyncio.wait_for(stream.read(http, target, request_body(target, model, prompt, req.output_len, slo),
                                           start), timeout)
    except asyncio.TimeoutError:  # leaving closes the connection: the server aborts the request
        status, error = "lost", f"no end of the stream within {timeout:g} s; closed"
    except (httpx2.HTTPError, _Failed) as exc:
        status, error = "failed", str(exc) or type(exc).__name__
    finally:
        bar.update(1)
    return RequestResult(
        index, arrival_s, lag_ms, stream.prompt_tokens or req.prompt_len, req.output_len, status, loop.time() - start,
        stream.token_times() if status == "ok" else [], finish_reason=stream.finish_reason, error=error,
    )


class _Failed(Exception):
    """The server answered with an error (a status, or an error event in the stream)."""


class _Stream:
    """One streamed completion as it arrives: when each token-carrying chunk came, and usage."""

    def __init__(self) -> None:
        self.chunk_times: list[float] = []
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    async def read(self, http: httpx2.AsyncClient, target: OpenAITarget, body: dict[str, Any], start: float) -> None:
        loop = asyncio.get_running_loop()
        async with http.stream("POST", target.root + "/completions", json=body, headers=target.headers()) as reply:
            if reply.status_code != 200:
                text = (await reply.aread()).decode(errors="replace")
                raise _Failed(f"HTTP {reply.status_code}: {_message(text)}")
            async for line in reply.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return
                self._chunk(json.loads(data), loop.time() - start)
        if self.finish_reason is None:
            raise _Failed("the stream ended without a finish reason")

    def _chunk(self, chunk: dict[str, Any], now: float) -> None:
        if "error" in chunk:
            raise _Failed(_message(json.dumps(chunk)))
        for choice in chunk.get("choices") or []:
            if choice.get("text") or choice.get("finish_reason") is None:
                self.chunk_times.append(now)
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
        usage = chunk.get("usage")
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens")
            self.completion_tokens = usage.get("completion_tokens")

    def token_times(self) -> list[float]:
        """One receipt time per token: the chunks', fitted to the server's token count."""
        from ecoserve.bench.serve.run import _add_tokens

        n = len(self.chunk_times) if self.completion_tokens is None else self.completion_tokens
        if n == len(self.chunk_times) or not self.chunk_times:
            return list(self.chunk_times)
        times: list[float] = []
        for now, k in zip(self.chunk_times, _split(n, len(self.chunk_times))):
            if k:
                _add_tokens(times, now, k)
        return times


def _split(total: int, parts: int) -> Sequence[int]:
    """`total` as `parts` near-equal counts, the larger ones first."""
    q, r = divmod(total, parts)
    return [q + (i < r) for i in range(parts)]


def _message(text: str) -> str:
    """The message of an OpenAI error body, else the text itself (shortened)."""
    try:
        body = json.loads(text)
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:300]
