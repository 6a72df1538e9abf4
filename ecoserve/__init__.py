"""EcoServe: disaggregated prefill/decode LLM serving with SLO-aware, KV-cache-aware scheduling.

The offline API mirrors vLLM's::

    from ecoserve import LLM, SamplingParams
    llm = LLM(model="smollm2-135m")
    outputs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "Client", "AsyncClient", "Completion", "SLO", "RequestError", "__version__"]
_CLIENT_NAMES = ("Client", "AsyncClient", "Completion", "SLO", "RequestError")

if TYPE_CHECKING:
    from ecoserve.client import SLO, AsyncClient, Client, Completion, RequestError
    from ecoserve.engine.llm import LLM, RequestOutput
    from ecoserve.params import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy: `import ecoserve` must stay cheap (and torch-free) for the coordinator and simulator.
    if name in ("LLM", "RequestOutput"):
        from ecoserve.engine import llm

        return getattr(llm, name)
    if name == "SamplingParams":
        from ecoserve.params import SamplingParams

        return SamplingParams
    if name in _CLIENT_NAMES:
        from ecoserve import client

        return getattr(client, name)
    raise AttributeError(f"module 'ecoserve' has no attribute {name!r}")
