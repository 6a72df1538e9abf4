"""Fault injection for tests: `ECOSERVE_FAULT` (ecoserve/envs.py) makes a worker rank misbehave
on purpose. Inert unless the variable names the rank.

Faults, each `RANK:NAME=VALUE`:

- `die_after_tokens=N` (decode, mixed): SIGKILL itself once it has reported N output tokens.
- `die_on_send=N` (prefill): SIGKILL itself when its N-th SendKV arrives, before sending (the
  decode side's receive is posted and waits on a dead peer).
- `die_on_receive=N` (decode): SIGKILL itself right after taking its N-th ReceiveKV (the
  prefill side then sends to a dead peer).
- `drop_send=N` (prefill): the N-th transfer it is told to send never starts, as if lost,
  until the coordinator aborts it (then it is sent, so the pair's sequence stays in step); the
  receiver misses its deadline.
- `delay_send_ms=MS` (prefill): every transfer starts MS milliseconds late; with
  `delay_sends=N`, only its first N.
- `clock_lag_ms=MS` (any): its wall clock reads MS milliseconds behind the coordinator's, so it
  keeps each transfer's deadline that much longer than its peer (two hosts' clocks disagree).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass, fields, replace
from typing import Any, NoReturn

from ecoserve.envs import fault_injection

log = logging.getLogger(__name__)

_COUNTS = ("die_after_tokens", "die_on_send", "die_on_receive", "drop_send", "delay_sends")


@dataclass(frozen=True)
class Faults:
    die_after_tokens: int | None = None
    die_on_send: int | None = None
    die_on_receive: int | None = None
    drop_send: int | None = None
    delay_send_ms: float = 0.0
    delay_sends: int | None = None  # None: every send
    clock_lag_ms: float = 0.0

    @classmethod
    def parse(cls, spec: str, rank: int) -> Faults:
        """This rank's faults in `spec` (see the module docstring); ValueError naming a bad entry."""
        faults = cls()
        names = [f.name for f in fields(cls)]
        for entry in filter(None, (e.strip() for e in spec.split(";"))):
            where, _, setting = entry.partition(":")
            name, sep, value = setting.partition("=")
            if not where.strip().isdigit() or not sep or name not in names:
                raise ValueError(
                    f"ECOSERVE_FAULT entry {entry!r}: give RANK:NAME=VALUE with NAME one of {names}"
                )
            if int(where) != rank:
                continue
            try:
                parsed: int | float = int(value) if name in _COUNTS else float(value)
            except ValueError:
                raise ValueError(f"ECOSERVE_FAULT entry {entry!r}: {value!r} is not a number") from None
            if parsed < (1 if name in _COUNTS else 0):
                raise ValueError(f"ECOSERVE_FAULT entry {entry!r}: counts start at 1, delays at 0")
            values: dict[str, Any] = {name: parsed}
            faults = replace(faults, **values)
        return faults

    @classmethod
    def for_rank(cls, rank: int) -> Faults:
        return cls.parse(fault_injection(), rank)

    def send_delay_s(self, send_no: int) -> float:
        """How late send number `send_no` (from 1) starts: inf for a dropped one."""
        if send_no == self.drop_send:
            return float("inf")
        if self.delay_sends is not None and send_no > self.delay_sends:
            return 0.0
        return self.delay_send_ms / 1e3

    @staticmethod
    def die(rank: int, why: str) -> NoReturn:
        print(f"rank {rank}: ECOSERVE_FAULT: killing this worker ({why})", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        raise SystemExit(137)  # not reached
