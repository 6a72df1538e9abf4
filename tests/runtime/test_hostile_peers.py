"""Hostile peers against one real `ecoserve serve --engine sim --auth curve` cluster with small
per-client limits (DESIGN §10: bad input gets a clear error and changes nothing else):

1. thousands of hostile frames from an authenticated client, each answered by exactly one
   ErrorReply, then a valid request is served by the same, still-complete cluster;
2. valid requests at the boundary values of every sampling knob are served without harm;
3. per-client limits refuse with "over limit" and leave the client's other requests alone;
4. a stray process on the worker control channel can neither register nor inject messages;
5. the client holding an authorized key (made by `ecoserve keys generate`) is served; peers
   without one (no keys, an unknown key, the wrong server key, a plain socket) get no reply at
   all, and their clients time out with a message naming authentication.

The reply rule: every message ZeroMQ delivers to the front door (any part count, up to its
MAXMSGSIZE of 4 x MAX_FRAME_BYTES) gets exactly one ErrorReply, in order; a larger message makes
ZeroMQ drop that connection before the coordinator sees it, so it gets no reply at all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
import zmq
import zmq.asyncio

from ecoserve import SamplingParams
from ecoserve import protocol as p
from ecoserve.auth import ClientKeys, load_client_keys
from ecoserve.local_cluster import child_pids, local_cluster
from ecoserve.bench.serve.run import fetch_server_info
from ecoserve.cli import main
from ecoserve.client import SLO, AsyncClient, Client, RequestError
from tests.runtime.frames import FIELDS, VALID, add

LIMIT_REQUESTS, LIMIT_TOKENS = 4, 600
SIM = ("--engine", "sim", "--sim-time-scale", "0.2", "--threads-per-worker", "1")
INT_FIELDS = ("max_tokens", "top_k", "seed")
OUT_OF_RANGE_INTS = [2**63, 2**63 + 1, 2**64 - 1]  # msgpack carries them; int64 does not
PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    assert main(["keys", "generate", "--out", str(folder)]) == 0
    assert main(["keys", "generate", "--out", str(folder), "--client", "stranger"]) == 0
    (folder / "authorized_clients" / "stranger.pub").unlink()  # a well-formed key the server does not know
    return folder


@pytest.fixture(scope="module")
def served(keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    limits = ("--max-inflight-per-client", str(LIMIT_REQUESTS), "--max-prompt-tokens-per-client", str(LIMIT_TOKENS))
    auth = ("--auth", "curve", "--keys", str(keys))
    with local_cluster("tiny-llama", 1, 1, 0, *SIM, *limits, *auth, log_dir=tmp_path_factory.mktemp("serve")) as addr:
        yield addr


def hostile_frames(n: int, seed: int = 0) -> list[tuple[list[bytes], set[str]]]:
    """`n` hostile messages (as multipart lists), each with the reply codes it may get."""
    rng = random.Random(seed)
    fields = FIELDS
    junk: list[object] = [None, True, -1, 2**64 - 1, 1.5, float("inf"), "x", b"raw", [], [[1]], {"k": {"k": 1}},
                          msgpack.ExtType(3, b"pickle?"), "\u2603" * 50]
    bad_values: tuple[dict[str, object], ...] = (  # refused by the front door, naming the request
        dict(prompt="", prompt_token_ids=None), dict(prompt="hi"), dict(prompt_token_ids=None),
        dict(prompt_token_ids=[]), dict(prompt_token_ids=[10**9]), dict(prompt_token_ids=[-1]),
        dict(max_tokens=10**9), dict(request_id=""), dict(request_id="x" * 500), dict(stop_token_ids=[10**9]),
        dict(stop_token_ids=[7] * 5000), dict(prompt_token_ids=[5] * 20_000),
        dict(prompt="word " * 50_000, prompt_token_ids=None),
    )
    # Values SamplingParams / SLO refuse: since protocol 4 they travel nested and are refused
    # when the frame is decoded (their own checks, their own words), before any request exists,
    # and the reply still names the request (bad_request), as it did when the front door checked.
    bad_nested: tuple[dict[str, object], ...] = (
        dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0),
        dict(stop_token_ids=[-1]), dict(slo_ttft_ms=-1.0),
    )
    invalid_values = [add(**v) for v in bad_values]  # each frame built once: the big ones are slow to pack
    invalid_nested = [add(**v) for v in bad_nested]
    many_fields = [msgpack.packb(["AddRequest", {**VALID, **{f"extra{i}": i for i in range(n)}}]) for n in (1, 40, 3000)]
    too_big = add(prompt_token_ids=[1] * 700_000)  # over the front door's frame size
    kinds: list[Callable[[], tuple[list[bytes], set[str]]]] = [
        lambda: ([rng.randbytes(rng.randrange(0, 300))], {"bad_frame"}),
        lambda: ([msgpack.packb(rng.choice([{"a": 1}, 1, None, [], ["AddRequest"], ["AddRequest", 1], [1, {}], "x"]))],
                 {"bad_frame"}),
        lambda: ([rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdf\x7f\xff\xff\xff", b"\xdb\xff\xff\xff\xf0", b"\x91" * 5000,
                              b"\x92\xa5Hello\xde\xff\xff"])], {"bad_frame"}),
        lambda: ([msgpack.packb([rng.choice(["Pickle", "Shutdown", "RegisterWorker", "TokenEvents", "x" * 70]), {}])],
                 {"bad_frame"}),
        lambda: ([p.encode(p.TokenEvents(rank=0, request_ids=["c0:a"], token_ids=[1], finish_reasons=["stop"],
                                            preempted=[], free_blocks=9))], {"bad_frame"}),  # a worker's message
        lambda: ([rng.choice(invalid_values)], {"bad_request"}),
        lambda: ([rng.choice(invalid_nested)], {"bad_request"}),
        lambda: ([wrong_type(rng, fields, junk)], {"bad_frame"}),
        lambda: ([add(**{rng.choice(INT_FIELDS): rng.choice(OUT_OF_RANGE_INTS)})], {"bad_frame"}),
        lambda: ([msgpack.packb(["AddRequest", dict(rng.sample(sorted(VALID.items()), rng.randrange(len(VALID))))])],
                 {"bad_frame"}),
        lambda: ([rng.choice(many_fields)], {"bad_frame"}),
        lambda: ([msgpack.packb(["AbortRequest", {"request_id": rng.choice([5, None, "never-sent"])}])],
                 {"bad_frame", "unknown_request"}),
        lambda: ([msgpack.packb(["Hello", {"protocol_version": rng.choice([0, 1, 99, -(2**63)]), "client_name": "x"}])],
                 {"version"}),
        lambda: ([msgpack.packb(["GetStats", {"extra": 1}])], {"bad_frame"}),
        lambda: ([b""], {"bad_frame"}),
        lambda: ([b"a", b"b"][: rng.randrange(2, 3)] + [b"c"] * rng.randrange(0, 40), {"bad_frame"}),
        lambda: ([too_big], {"bad_frame"}),
    ]
    return [rng.choice(kinds)() for _ in range(n)]


def wrong_type(rng: random.Random, fields: list[str], junk: list[object]) -> bytes:
    """An AddRequest with one field of a type the protocol refuses."""
    while True:
        frame = add(**{rng.choice(fields): rng.choice(junk)})
        try:
            p.decode(frame)
        except p.RefusedValue:
            continue  # a right type with a refused value (top_p=-1): bad_request, the bad_values' kind
        except p.ProtocolError:
            return frame


def raw_socket(ctx: zmq.Context[zmq.Socket[bytes]], addr: str, keys: Path, hello: bool = True) -> zmq.Socket[bytes]:
    """A bare DEALER holding the authorized client key."""
    mine = load_client_keys(keys)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = mine.server_public, mine.public, mine.secret
    sock.connect(addr)
    if hello:
        sock.send(p.encode(p.Hello(p.PROTOCOL_VERSION, "fuzz")))
        assert sock.poll(30_000) and isinstance(p.decode(sock.recv()), p.HelloReply)
    return sock


def pids(stats: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in stats.items() if k.endswith("pid")}


def test_thousands_of_hostile_frames_each_get_one_error_and_service_goes_on(served: str, keys: Path) -> None:
    with Client(served, auth_keys=keys) as client:
        before = client.stats()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = raw_socket(ctx, served, keys)
    frames = hostile_frames(4000)
    replies: list[p.ErrorReply] = []
    window = 50  # in flight at once: far below the ROUTER's send high-water mark
    for start in range(0, len(frames), window):
        chunk = frames[start:start + window]
        for parts, _ in chunk:
            sock.send_multipart(parts)
        for parts, _ in chunk:
            assert sock.poll(30_000), f"no reply to a hostile frame {parts[0][:40]!r}"
            replies.append(p.decode(sock.recv()))
    assert not sock.poll(300), "a frame got more than one reply"
    for (parts, codes), reply in zip(frames, replies):
        assert isinstance(reply, p.ErrorReply) and reply.code in codes and reply.message, (parts[0][:60], reply)
        assert len(reply.message) < 1000, reply.message[:200]
    messages = " ".join(r.message for r in replies)
    for expected in ("exceeds the maximum", "unknown message type", "not valid MessagePack", "exactly one frame",
                     "unexpected fields", "exactly one of prompt", "prompt token ids must be in", "at most 1024",
                     "protocol version", "no request", "max_tokens must be an integer >= 1",
                     "top_p must be in (0, 1]", "the TTFT SLO must be a number of milliseconds > 0"):
        assert expected in messages, f"no error said {expected!r}"

    # Larger than ZeroMQ's MAXMSGSIZE: that connection is dropped, unanswered; the server carries on.
    big = raw_socket(ctx, served, keys, hello=False)
    big.send(b"\x00" * (4 * p.MAX_FRAME_BYTES + 1))
    assert not big.poll(1000)
    for s in (sock, big):
        s.close()
    ctx.term()

    with Client(served, auth_keys=keys) as client:
        done = client.generate([1, 2, 3, 4], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        after = client.stats()
    assert len(done.token_ids) == 5 and done.finish_reason == "length"
    assert pids(after) == pids(before), "a process was restarted"
    assert after["workers_alive"] == 2 and after["finished"] == before["finished"] + 1 and after["failed"] == 0


def test_boundary_values_of_valid_requests_are_served_without_harm(served: str, keys: Path) -> None:
    """Extreme but allowed sampling values reach the workers' sampler: none may crash a worker
    (a temperature of 5e-324 once made every probability nan and killed the prefill rank)."""
    extremes = [
        dict(temperature=5e-324), dict(temperature=1e-300, top_p=5e-324), dict(temperature=1e308),
        dict(temperature=1.0, top_p=5e-324), dict(temperature=0.7, top_k=2**63 - 1), dict(temperature=0.7, top_k=1),
        dict(temperature=1.0, seed=2**63 - 1), dict(temperature=1.0, seed=-(2**63)), dict(max_tokens=1),
        dict(stop_token_ids=tuple(range(1024))),
    ]

    async def run() -> tuple[list[str], dict[str, float], dict[str, float]]:
        async with await AsyncClient.connect(served, timeout=30, auth_keys=keys) as client:
            before = await client.stats()
            reasons = []
            for values in extremes:
                params = SamplingParams(**{"max_tokens": 6, "ignore_eos": True, **values})  # type: ignore[arg-type,dict-item]
                done = await client.generate([1, 2, 3], params, slo=SLO(ttft_ms=5e-324, tpot_ms=1e308), timeout=60)
                reasons.append(done.finish_reason)
            return reasons, before, await client.stats()

    reasons, before, after = asyncio.run(run())
    assert set(reasons) <= {"length", "stop"}
    assert after["workers_alive"] == 2 and after["failed"] == before["failed"] and pids(after) == pids(before)


def test_per_client_limits_refuse_with_over_limit_and_change_nothing_else(served: str, keys: Path) -> None:
    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)

    async def run() -> None:
        connect = functools.partial(AsyncClient.connect, served, timeout=30, auth_keys=keys)
        async with await connect() as a, await connect() as b:
            held = [asyncio.ensure_future(a.generate([i + 1] * 20, long)) for i in range(LIMIT_REQUESTS)]
            await asyncio.sleep(0.05)  # all four sent (and admitted) before the fifth
            with pytest.raises(RequestError) as over:
                await a.generate([9] * 20, long)
            assert over.value.code == "over_limit"
            text = str(over.value)
            assert "over limit" in text and f"has {LIMIT_REQUESTS} requests in flight" in text
            assert f"limit is {LIMIT_REQUESTS}" in text and "--max-inflight-per-client" in text
            other = await b.generate([5] * 500, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
            assert len(other.token_ids) == 3, "another client is not limited by this one's requests"
            with pytest.raises(RequestError) as tokens:  # 500 + 200 prompt tokens > 600, from one client
                await asyncio.gather(b.generate([5] * 500, long), b.generate([6] * 200, long))
            assert tokens.value.code == "over_limit" and "prompt tokens in flight" in str(tokens.value)
            assert f"limit of {LIMIT_TOKENS}" in str(tokens.value)
            done = await asyncio.gather(*held)
            assert [len(d.token_ids) for d in done] == [400] * LIMIT_REQUESTS, "the refusal harmed admitted requests"
            again = await asyncio.gather(*(a.generate([3] * 10, SamplingParams(max_tokens=2)) for _ in range(LIMIT_REQUESTS)))
            assert len(again) == LIMIT_REQUESTS, "finished requests no longer count"

    asyncio.run(run())


def serve_pid(client_port: int) -> int:
    """The `ecoserve serve` child listening on `client_port` (other modules' clusters, such as a
    session-wide one, may be running beside it)."""
    for pid in child_pids(os.getpid()):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"ecoserve.cli" in cmd and b"serve" in cmd and client_port in listening_ports(pid):
            return pid
    raise AssertionError(f"no `ecoserve serve` child process listening on port {client_port}")


def listening_ports(pid: int) -> set[int]:
    """TCP ports `pid` listens on (Linux /proc: its socket inodes, matched in the tcp tables)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        link = os.readlink(fd)
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def test_a_stray_process_can_neither_register_nor_inject_control_messages(served: str, keys: Path) -> None:
    """Strays on the control channel (any identity, a registered rank's identity included) send
    a registration with a wrong secret and forged worker messages about a live request; the
    request ends with its own tokens, no worker is declared lost, and every frame is refused."""
    client_port = int(served.rsplit(":", 1)[1])
    (control_port,) = listening_ports(serve_pid(client_port)) - {client_port}
    control = f"tcp://127.0.0.1:{control_port}"
    registration = p.RegisterWorker(
        protocol_version=p.PROTOCOL_VERSION, secret="guess", rank=0, role="prefill", pid=os.getpid(), num_blocks=10**6,
        block_size=16, max_num_batched_tokens=512, model_id="x", dtype="float32", num_layers=1, num_kv_heads=1,
        head_dim=1, vocab_size=10, max_model_len=10,
    )
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    def lies(rid: str) -> list[object]:
        ids = [f"c{n}:{rid}" for n in range(40)]  # the coordinator's id for the request: guessable
        return [
            registration, dataclasses.replace(registration, rank=1, role="decode"),
            p.WorkerFailed(rank=1, request_id=None, message="stray says rank 1 died"),
            p.WorkerFailed(rank=0, request_id=ids[0], message="stray fails a request"),
            p.Heartbeat(rank=1, free_blocks=10**9, num_running=0, num_waiting=0),
            p.TokenEvents(rank=1, request_ids=ids, token_ids=[7] * 40, finish_reasons=["stop"] * 40, preempted=[],
                          free_blocks=0),
            p.PrefillDone(rank=0, request_id=ids[1], first_token=7, finish_reason="stop"),
            p.Released(rank=1, request_id=ids[2]),
        ]

    async def run() -> tuple[list[int], list[int], dict[str, float], dict[str, float], list[tuple[bytes, object]], int]:
        async with await AsyncClient.connect(served, timeout=30, auth_keys=keys) as client:
            before = await client.stats()
            stream = client.stream([11, 12, 13], params)
            first = asyncio.Event()

            async def consume() -> list[int]:
                out: list[int] = []
                async for delta in stream:
                    out += delta.token_ids
                    first.set()
                return out

            victim = asyncio.ensure_future(consume())
            await asyncio.wait_for(first.wait(), 60)
            ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
            strays = []
            for identity in (b"stray", b"rank-7", b"rank-0", b"rank-1"):  # rank-0/1 are in use: ZeroMQ refuses those
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.IDENTITY, identity)
                sock.connect(control)
                strays.append(sock)
            frames = [[p.encode(m)] for m in lies(stream.request_id)] + [[b"\xc1 junk"], [b"two", b"parts"]]
            for sock in strays:
                for parts in frames:
                    sock.send_multipart(parts)
            answers: list[tuple[bytes, object]] = []
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                for sock in strays:
                    while sock.poll(50):
                        answers.append((bytes(sock.getsockopt(zmq.IDENTITY)), p.decode(sock.recv())))  # type: ignore[arg-type]
            for sock in strays:
                sock.close()
            ctx.term()
            tokens = await victim
            again = await client.generate([11, 12, 13], params)
            return tokens, again.token_ids, before, await client.stats(), answers, len(frames)

    tokens, again, before, after, answers, sent = asyncio.run(run())
    assert tokens == again and len(tokens) == 200, "an injected token or finish reached the request"
    assert after["workers_alive"] == 2 and after["workers_lost"] == before["workers_lost"] and pids(after) == pids(before)
    assert after["failed"] == before["failed"]
    # Two strays reached the socket; every frame of theirs was refused; the clashing two never got in.
    assert after["control_frames_refused"] - before["control_frames_refused"] == 2 * sent
    # Only refusals came back, to the sockets that asked, never a control message.
    assert sorted((ident, type(m).__name__) for ident, m in answers) == [
        (b"rank-7", "RegisterReply"), (b"rank-7", "RegisterReply"), (b"stray", "RegisterReply"), (b"stray", "RegisterReply"),
    ], answers
    assert all(not m.accepted and "wrong cluster secret" in m.message for _, m in answers)  # type: ignore[attr-defined]


def test_the_authorized_client_is_served(served: str, keys: Path) -> None:
    with Client(served, auth_keys=keys, timeout=30) as client:
        done = client.generate([1, 2, 3], PARAMS)
        assert len(done.token_ids) == 4 and client.server_info is not None and client.server_info.vocab_size > 0
    assert asyncio.run(fetch_server_info(served, 30, str(keys))).vocab_size > 0  # `bench serve --auth-keys`


def test_unauthenticated_peers_get_no_reply_and_the_server_carries_on(served: str, keys: Path) -> None:
    """All at once (each waits out a 2 s timeout): no keys, an unknown key, the wrong server key,
    and a plain socket sending a Hello and junk."""
    genuine, stranger = load_client_keys(keys), load_client_keys(keys, "stranger")
    impostor = ClientKeys(server_public=stranger.public, public=genuine.public, secret=genuine.secret)

    async def refused(auth_keys: ClientKeys | None) -> str:
        with pytest.raises(TimeoutError) as exc:
            await AsyncClient.connect(served, timeout=2, auth_keys=auth_keys)
        return str(exc.value)

    async def plain() -> bool:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(served)
        await sock.send(p.encode(p.Hello(p.PROTOCOL_VERSION, "plain")))
        await sock.send(b"\xc1 junk")
        answered = bool(await sock.poll(2000))
        sock.close()
        ctx.term()
        return answered

    async def run() -> tuple[list[str], bool]:
        *errors, answered = await asyncio.gather(refused(None), refused(stranger), refused(impostor), plain())
        return errors, answered

    (no_keys, unknown, wrong_server), answered = asyncio.run(run())
    assert "may not be running there, or it requires authentication" in no_keys and "auth_keys" in no_keys
    assert "refused this client's key" in unknown and "authorized_clients" in unknown
    assert "refused this client's key" in wrong_server
    assert not answered, "an unauthenticated socket got a reply"
    with Client(served, auth_keys=keys, timeout=30) as client:
        assert len(client.generate([4, 5, 6], PARAMS).token_ids) == 4
        assert client.stats()["workers_alive"] == 2
