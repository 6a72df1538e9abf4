"""A worker rank dies with the launcher that started it, at any stage: loading the model,
joining the torch.distributed world, registering, serving.

Nobody else would stop it (workers ignore SIGINT and SIGTERM, see ecoserve/launcher.py), and a
rank loading a large model holds its memory until `register()` gives up minutes later.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_S = 0.5  # the watchdog's period where the parent-death signal is unavailable


def exit_with_launcher(launcher_pid: int) -> None:
    """Make this process exit within 1 s of `launcher_pid`'s death, which must be its parent.

    On Linux the kernel sends SIGKILL the moment the parent exits (PR_SET_PDEATHSIG; SIGKILL
    because workers ignore SIGTERM, and with the coordinator gone there is nothing to drain).
    A parent that died before the signal was armed has already made us an orphan: the
    `getppid()` check right after closes that race. Elsewhere a daemon thread polls `getppid()`
    every `POLL_S` seconds. Call it first thing in the worker process.
    """
    armed = _arm_parent_death_signal()
    if os.getppid() != launcher_pid:
        _launcher_gone()
    if not armed:
        threading.Thread(target=_watch, args=(launcher_pid,), name="launcher-watchdog", daemon=True).start()


def _arm_parent_death_signal() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _watch(launcher_pid: int) -> None:
    while os.getppid() == launcher_pid:
        time.sleep(POLL_S)
    _launcher_gone()


def _launcher_gone() -> None:
    print(f"error: worker pid {os.getpid()}: its launcher exited; stopping", file=sys.stderr, flush=True)
    os._exit(1)  # nothing to flush or release: the coordinator is gone with the launcher
