"""An OpenAI request body, checked, as what the ZeroMQ client takes: a prompt, SamplingParams
and an SLO. Every refusal is an `ApiError` naming the field and what is allowed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ecoserve.params import SLO, SamplingParams

# Fields OpenAI defines that this server cannot honour; a request that sets them is refused
# rather than silently answered differently.
UNSUPPORTED = {
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "echo": "echo is not supported",
    "best_of": "best_of is not supported (one completion per request)",
    "suffix": "suffix is not supported",
    "tools": "tools (function calling) are not supported",
    "functions": "functions (function calling) are not supported",
    "tool_choice": "tools (function calling) are not supported",
    "response_format": "response_format is not supported (plain text only)",
    "logit_bias": "logit_bias is not supported",
    "presence_penalty": "presence_penalty is not supported",
    "frequency_penalty": "frequency_penalty is not supported",
}


MAX_STOP = 4  # stop strings per request, as OpenAI allows


class ApiError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


@dataclass(frozen=True)
class Request:
    """One checked completions or chat request."""

    model: str
    prompt: str | list[int] | list[dict[str, str]]  # chat: the messages, templated by the app
    params: SamplingParams
    slo: SLO | None
    stream: bool
    include_usage: bool
    stop: tuple[str, ...] = ()  # stop strings: the output ends before the first one it contains


def parse(body: object, chat: bool) -> Request:
    """The request in `body` (decoded JSON), or ApiError 400 naming what is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    for name, why in UNSUPPORTED.items():
        if body.get(name) not in (None, False, 0) and not (name == "logit_bias" and body[name] == {}):
            raise bad(name, f"{why} by this server; leave {name} unset")
    n = body.get("n", 1)
    if n not in (None, 1):
        raise bad("n", f"n must be 1 (one choice per request); got {n!r}")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "model is required: a model id from GET /v1/models")
    prompt = _messages(body) if chat else _prompt(body)
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not stream):
        raise bad("stream_options", "stream_options is an object, allowed only with stream: true")
    include_usage = bool(options and options.get("include_usage"))
    return Request(model, prompt, _params(body), _slo(body), stream, include_usage, _stop(body))


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    """OpenAI's `stop`: a string or a list of up to MAX_STOP strings ("" and [] mean none)."""
    stop = body.get("stop")
    if stop is None or stop == "":
        return ()
    strings = [stop] if isinstance(stop, str) else stop
    if not isinstance(strings, list) or not all(isinstance(x, str) and x for x in strings) or len(strings) > MAX_STOP:
        raise bad("stop", f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings; "
                  f"got {stop!r}")
    return tuple(dict.fromkeys(strings))


def _prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        return list(prompt)
    raise bad("prompt", "prompt must be a non-empty string or a non-empty list of token ids (one prompt per request)")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise bad(f"messages[{i}].role", "role must be one of system, developer, user, assistant")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str) for c in content):
                raise bad(f"messages[{i}].content", "content parts must be text parts; images and audio are not supported")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", "content must be a string or a list of text parts")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _params(body: dict[str, Any]) -> SamplingParams:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    fields: dict[str, Any] = {"max_tokens": 16 if max_tokens is None else max_tokens}
    for key in ("temperature", "top_p", "top_k", "seed", "ignore_eos", "stop_token_ids"):
        if body.get(key) is not None:
            fields[key] = body[key]
    if isinstance(fields.get("stop_token_ids"), list):
        fields["stop_token_ids"] = tuple(fields["stop_token_ids"])
    elif "stop_token_ids" in fields:
        raise bad("stop_token_ids", "stop_token_ids must be a list of non-negative token ids")
    if "ignore_eos" in fields and not isinstance(fields["ignore_eos"], bool):
        raise bad("ignore_eos", "ignore_eos must be true or false")
    try:
        return SamplingParams(**fields)
    except (TypeError, ValueError) as exc:
        field = str(exc).split(" ", 1)[0]
        raise bad(name if field == "max_tokens" else field, str(exc).replace("max_tokens", name)) from None


def _slo(body: dict[str, Any]) -> SLO | None:
    ttft, tpot = body.get("slo_ttft_ms"), body.get("slo_tpot_ms")
    if ttft is None and tpot is None:
        return None
    for key, value in (("slo_ttft_ms", ttft), ("slo_tpot_ms", tpot)):
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0)
        if not ok:
            raise bad(key, f"{key} must be a number of milliseconds > 0, or unset; got {value!r}")
    return SLO(ttft_ms=ttft, tpot_ms=tpot)


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(key, f"{key} must be true or false")
    return value
