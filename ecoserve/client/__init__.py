"""The public client of an ecoserve server: `Client` (blocking) and `AsyncClient` (asyncio).

    from ecoserve import SamplingParams
    from ecoserve.client import Client

    with Client("tcp://127.0.0.1:5555") as client:
        print(client.generate("The capital of France is", SamplingParams(max_tokens=8)).text)
        for delta in client.stream("Once upon a time"):
            print(delta.text, end="")

`Client` runs an `AsyncClient` on a private event loop in a daemon thread; both have the same
methods. Importing this module does not import torch.
"""

from ecoserve.client.aio import AsyncClient, AsyncStream
from ecoserve.client.sync import Client, Stream
from ecoserve.client.types import Completion, Delta, RequestError, ServerInfo
from ecoserve.params import SLO

__all__ = ["AsyncClient", "AsyncStream", "Client", "Completion", "Delta", "RequestError", "SLO", "ServerInfo", "Stream"]
