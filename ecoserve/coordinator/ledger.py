"""Decode-side KV reservations and the predicted-usage timeline (DESIGN §4.1; our definitions).

A *cohort* is the requests one admission reserved together on one decode worker: the same
bucket, dispatched to prefill together, predicted to start decoding together and to produce
the same number of tokens `horizon`. Time is counted in the decode worker's own steps (one
token per running request per step), so the timeline needs no clock model.

For a cohort of `n` members holding `P` KV tokens when they start, the blocks it holds at a
step t (t >= now) are bounded by the ramp-plateau shape

    f(t) = n + (P + n * min(t - a, horizon)) / block_size     for t < end, 0 after,

(the `n` covers each member's last partly filled block). `a` is the step the first member
started decoding, or `now` while none has; `end` is the step the last member started (or
`now + start_delay` while some have not) plus `horizon`. Each shape only grows until it ends,
so the worker's usage U(t) = sum of shapes peaks just before some cohort's end: the peak is
the maximum over one breakpoint per cohort. The policy evaluates U at those breakpoints once
per scheduling round (`Timeline`), after which checking a candidate cohort costs O(cohorts)
and admitting it updates the breakpoints in O(cohorts).

`start_delay` bounds, in decode steps, how long a reserved cohort may wait for prefill and
transfer; the ledger widens it to twice the longest delay it has observed, so the bound
follows the real pipeline. A start later than that is a misprediction like any other: the
workers enforce physical capacity, and the policy's extension/preemption path repairs it.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Cohort:
    cohort_id: int
    rank: int
    horizon: int  # tokens each member is reserved to produce from its start
    admitted_step: int
    members: dict[str, int] = field(default_factory=dict)  # request id -> KV tokens at its start
    pending: set[str] = field(default_factory=set)  # members not decoding yet
    prompt_tokens: int = 0
    first_start: int | None = None
    last_start: int | None = None

    def shape(self, now: int, delay: int) -> tuple[int, int, int, int, int]:
        """(n, P, a, horizon, end) of the usage bound at step `now`."""
        a = self.first_start if self.first_start is not None else now
        base = now + delay if self.pending else (self.last_start if self.last_start is not None else now)
        # Members still here past their predicted end hold their whole reservation (they wait
        # at the cap for an extension or a preemption) for at least this step.
        return len(self.members), self.prompt_tokens, a, self.horizon, max(base + self.horizon, now + 1)


@dataclass
class RankLedger:
    rank: int
    block_size: int
    cohorts: dict[int, Cohort] = field(default_factory=dict)
    reserved_blocks: int = 0  # sum over members of blocks(kv at start + horizon): exact allocation
    plateau_tokens: int = 0  # sum over members of KV at start + horizon
    members: int = 0
    max_delay_seen: int = 0
    version: int = 0  # bumped by every change to the cohorts: keys `raw`'s cache
    _raw: tuple[int, np.ndarray] | None = None
    _timeline: tuple[tuple[float, ...], Timeline] | None = None

    def raw(self) -> np.ndarray:
        """Per cohort (n, P, first start, pending, last start, horizon), NaN for a start not yet
        seen; rebuilt only after the cohorts changed, as scheduling rounds read it far more often."""
        if self._raw is None or self._raw[0] != self.version:
            nan = math.nan
            rows = np.array(
                [(len(c.members), c.prompt_tokens, nan if c.first_start is None else c.first_start, 1.0 if c.pending else 0.0,
                  nan if c.last_start is None else c.last_start, c.horizon) for c in self.cohorts.values()],
                dtype=np.float64,
            ).reshape(-1, 6)
            self._raw = (self.version, rows)
        return self._raw[1]

    @property
    def linear_blocks(self) -> float:
        """Sum over cohorts of their shape's maximum, n + (P + n * horizon) / block_size: an
        upper bound of U(t) at every t, so a candidate that fits under it needs no timeline."""
        return self.members + self.plateau_tokens / self.block_size


class ReservationLedger:
    """Per decode worker: the cohorts holding reservations there. Plain data, no torch."""

    def __init__(self, start_delay: int = 32) -> None:
        if start_delay < 0:
            raise ValueError(f"start_delay must be >= 0 decode steps, got {start_delay}")
        self.start_delay = start_delay
        self.ranks: dict[int, RankLedger] = {}
        self.where: dict[str, Cohort] = {}  # request id -> its cohort
        self._ids = itertools.count()

    def rank(self, rank: int, block_size: int) -> RankLedger:
        led = self.ranks.get(rank)
        if led is None:
            led = self.ranks[rank] = RankLedger(rank, block_size)
        return led

    def delay(self, rank: int) -> int:
        led = self.ranks.get(rank)
        return max(self.start_delay, 2 * led.max_delay_seen) if led else self.start_delay

    def add(self, rank: int, block_size: int, horizon: int, members: list[tuple[str, int]], step: int) -> Cohort:
        """Reserve for `members` ((request id, KV tokens at start), ...) producing `horizon` tokens each."""
        if horizon < 1 or not members:
            raise ValueError(f"a cohort needs horizon >= 1 and members, got {horizon} and {len(members)}")
        led = self.rank(rank, block_size)
        cohort = Cohort(next(self._ids), rank, horizon, step)
        for rid, tokens in members:
            if rid in self.where:
                raise ValueError(f"request {rid} already holds a reservation")
            cohort.members[rid] = tokens
            cohort.pending.add(rid)
            cohort.prompt_tokens += tokens
            led.reserved_blocks += -(-(tokens + horizon) // block_size)
            led.plateau_tokens += tokens + horizon
            self.where[rid] = cohort
        led.members += len(members)
        led.cohorts[cohort.cohort_id] = cohort
        led.version += 1
        return cohort

    def started(self, rid: str, step: int) -> None:
        """The member's KV is on its decode worker and it decodes from `step`."""
        cohort = self.where.get(rid)
        if cohort is None or rid not in cohort.pending:
            return
        cohort.pending.discard(rid)
        cohort.first_start = step if cohort.first_start is None else min(cohort.first_start, step)
        cohort.last_start = step if cohort.last_start is None else max(cohort.last_start, step)
        led = self.ranks[cohort.rank]
        led.max_delay_seen = max(led.max_delay_seen, step - cohort.admitted_step)
        led.version += 1

    def remove(self, rid: str) -> Cohort | None:
        """Drop the member's reservation (it ended, was preempted, or moves to a new cohort)."""
        cohort = self.where.pop(rid, None)
        if cohort is None:
            return None
        led = self.ranks[cohort.rank]
        tokens = cohort.members.pop(rid)
        cohort.pending.discard(rid)
        cohort.prompt_tokens -= tokens
        led.reserved_blocks -= -(-(tokens + cohort.horizon) // led.block_size)
        led.plateau_tokens -= tokens + cohort.horizon
        led.members -= 1
        led.version += 1
        if not cohort.members:
            del led.cohorts[cohort.cohort_id]
        return cohort

    def member_shape(self, rid: str, now: int) -> Shape | None:
        """The bound one member contributes (its share of its cohort's shape)."""
        cohort = self.where.get(rid)
        if cohort is None:
            return None
        _, _, a, h, end = cohort.shape(now, self.delay(cohort.rank))
        return (1, cohort.members[rid], a, h, end)

    def rehome(self, rid: str, horizon: int, started: int) -> Cohort:
        """Move a decoding member into a cohort of its own with a new horizon (an extension)."""
        cohort = self.where[rid]
        tokens = cohort.members[rid]
        block_size = self.ranks[cohort.rank].block_size
        self.remove(rid)
        new = self.add(cohort.rank, block_size, horizon, [(rid, tokens)], started)
        self.started(rid, started)
        return new

    def reservation_tokens(self, rid: str) -> int | None:
        cohort = self.where.get(rid)
        return None if cohort is None else cohort.members[rid] + cohort.horizon

    def timeline(self, rank: int, block_size: int, now: int, capacity: float, extra: list[Shape] = ()) -> Timeline:  # type: ignore[assignment]
        led = self.rank(rank, block_size)
        delay = self.delay(rank)
        key = (led.version, now, delay, capacity, block_size)
        if not extra and led._timeline is not None and led._timeline[0] == key:
            # Rounds read a worker's timeline far more often than its cohorts or its step change.
            # A Timeline's methods rebind its arrays and never write into them, so a shallow copy
            # leaves the cached one as built.
            return copy.copy(led._timeline[1])
        rows = cohort_shapes(led.raw(), now, delay)
        if extra:
            rows = np.concatenate([rows, np.array(extra, dtype=np.float64).reshape(-1, 5)])
        tl = Timeline(block_size, now, capacity, delay, rows)
        if not extra:
            led._timeline = (key, copy.copy(tl))
        return tl

    def assert_empty(self) -> None:
        left = {r: led.members for r, led in self.ranks.items() if led.members or led.reserved_blocks}
        if left or self.where:
            raise AssertionError(f"reservations left on ranks {left}; requests {sorted(self.where)[:5]}")


Shape = tuple[int, int, int, int, int]  # (n, P, a, horizon, end)


def pending_shape(now: int, delay: int, n: int, kv_tokens: int, horizon: int) -> Shape:
    """A cohort reserved at `now` that starts decoding within `delay` steps."""
    return (n, kv_tokens, now, horizon, now + delay + horizon)


def negated(shape: Shape) -> Shape:
    """The shape that cancels `shape` (U is linear in n and P): how a removal joins a sum of shapes."""
    n, p, a, h, end = shape
    return (-n, -p, a, h, end)


def shape_max(shape: Shape, block_size: int) -> float:
    """The most blocks the shape's bound ever reaches (its plateau)."""
    n, p, _, h, _ = shape
    return n + (p + n * h) / block_size


def cohort_shapes(raw: np.ndarray, now: int, delay: int) -> np.ndarray:
    """`Cohort.shape(now, delay)` of every cohort of `RankLedger.raw()`, as rows of an array."""
    n, p, first, pending, last, h = raw.T
    a = np.where(np.isnan(first), now, first)
    base = np.where(pending > 0, now + delay, np.where(np.isnan(last), now, last))
    return np.stack([n, p, a, h, np.maximum(base + h, now + 1)], axis=1)


def _values(shapes: np.ndarray, t: np.ndarray, block_size: int) -> np.ndarray:
    """U contributed by `shapes` (rows of n, P, a, horizon, end) at each time in `t`: O(rows x times)."""
    if not len(shapes):
        return np.zeros(len(t))
    n, p, a, h, end = (shapes[:, i : i + 1] for i in range(5))
    tt = t[None, :]
    vals = n + (p + n * np.minimum(tt - a, h)) / block_size
    return np.where(tt < end, vals, 0.0).sum(axis=0)  # type: ignore[no-any-return]


class _Sweep:
    """U(t) of fixed shapes in O(log rows) per time, for shapes whose ramp ends by their end
    (a + h <= end, true of every shape the ledger makes). A shape adds its plateau
    w = n + (P + n h) / bs while t < end, less n (a + h - t) / bs while its ramp runs
    (t < a + h), so U(t) is two suffix sums over the shapes sorted by end and by a + h. Every
    term is a multiple of 1/bs, so with a power-of-two block size the sums are exact and equal
    `_values` bit for bit."""

    def __init__(self, shapes: np.ndarray, block_size: int) -> None:
        n, p, a, h, end = shapes.T
        plateau = n + (p + n * h) / block_size
        by_end = np.argsort(end, kind="stable")
        self.ends = end[by_end]
        self.w = np.concatenate([np.cumsum(plateau[by_end][::-1])[::-1], [0.0]])
        ramp_end = a + h
        by_ramp = np.argsort(ramp_end, kind="stable")
        n_r = n[by_ramp]
        self.ramps = ramp_end[by_ramp]
        self.nr = np.concatenate([np.cumsum((n_r * self.ramps)[::-1])[::-1], [0.0]])
        self.nn = np.concatenate([np.cumsum(n_r[::-1])[::-1], [0.0]])
        self.block_size = block_size
        self._lists: tuple[list[float], ...] | None = None

    @staticmethod
    def of(shapes: np.ndarray, block_size: int) -> _Sweep | None:
        if len(shapes) < 8 or bool(np.any(shapes[:, 2] + shapes[:, 3] > shapes[:, 4])):
            return None  # few rows: the direct evaluation is as quick
        return _Sweep(shapes, block_size)

    def at(self, t: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.ends, t, side="right")  # the first shape still present at t
        j = np.searchsorted(self.ramps, t, side="right")  # the first shape still ramping at t
        return self.w[i] - (self.nr[j] - t * self.nn[j]) / self.block_size  # type: ignore[no-any-return]

    def at_one(self, t: float) -> float:
        if self._lists is None:
            self._lists = tuple(x.tolist() for x in (self.ends, self.w, self.ramps, self.nr, self.nn))
        ends, w, ramps, nr, nn = self._lists
        i = bisect.bisect_right(ends, t)
        j = bisect.bisect_right(ramps, t)
        return w[i] - (nr[j] - t * nn[j]) / self.block_size


def _values_one(shape: Shape | np.ndarray, t: np.ndarray, block_size: int) -> np.ndarray:
    """U of one shape at each time in `t`."""
    n, p, a, h, end = (float(x) for x in shape)
    vals = n + (p + n * np.minimum(t - a, h)) / block_size
    vals[t >= end] = 0.0
    return vals  # type: ignore[no-any-return]


class Timeline:
    """U(t) of one decode worker at its cohorts' breakpoints, for one scheduling round.

    Breakpoints are kept sorted with prefix and suffix maxima of U, so the usual check of one
    candidate is O(log cohorts): U only grows between breakpoints and the candidate only grows
    until it ends, so if max(U before its end) + its own peak and max(U after its end) are
    within capacity, it fits. Only a candidate that bound does not clear is evaluated exactly,
    in O(cohorts).
    """

    def __init__(self, block_size: int, now: int, capacity: float, delay: int, shapes: list[Shape] | np.ndarray) -> None:
        self.block_size = block_size
        self.now = now
        self.capacity = capacity
        self.delay = delay
        self.shapes = np.array(shapes, dtype=np.float64).reshape(-1, 5)
        points = np.maximum(now, self.shapes[:, 4] - 1) if len(self.shapes) else np.array([float(now)])
        self.points = np.sort(points)
        self._sweep = _Sweep.of(self.shapes, block_size)  # valid until a shape is admitted or dropped
        self.usage = self._sweep.at(self.points) if self._sweep else _values(self.shapes, self.points, block_size)
        self._refresh()

    def _usage_at(self, t: float) -> float:
        if self._sweep is not None:
            return self._sweep.at_one(t)
        return float(_values(self.shapes, np.array([t], dtype=np.float64), self.block_size)[0])

    def _refresh(self) -> None:
        self._pts: list[float] = self.points.tolist()
        self._prefix: list[float] = np.maximum.accumulate(self.usage).tolist()
        self._suffix: list[float] = np.maximum.accumulate(self.usage[::-1])[::-1].tolist()

    @property
    def peak(self) -> float:
        return self._prefix[-1]

    def pending(self, n: int, kv_tokens: int, horizon: int) -> Shape:
        return pending_shape(self.now, self.delay, n, kv_tokens, horizon)

    def fits_one(self, shape: Shape, capacity: float | None = None) -> bool:
        """Whether U plus `shape` stays within capacity; O(log cohorts) when clearly so."""
        cap = self.capacity if capacity is None else capacity
        n, p, a, h, end = shape
        last = max(self.now, end - 1)
        own_peak = n + (p + n * min(last - a, h)) / self.block_size
        j = bisect.bisect_left(self._pts, last)
        k = len(self._pts)
        before = self._prefix[min(j, k - 1)]
        after = self._suffix[j + 1] if j + 1 < k else 0.0
        if before + own_peak <= cap and after <= cap:
            return True
        return self.peak_with([shape]) <= cap

    def peak_with(self, add: list[Shape], remove: list[Shape] | None = None) -> float:
        """Peak of U with `add` admitted and `remove` gone, exactly: O(cohorts) per shape."""
        bs = self.block_size
        if len(add) == 1 and not remove:  # the usual check, without the general case's arrays
            shape = add[0]
            own1 = max(self.now, shape[4] - 1)  # its own breakpoint
            n, p, a, h, _ = shape
            own_val = self._usage_at(own1)
            if own1 < shape[4]:
                own_val += n + (p + n * min(own1 - a, h)) / bs
            return max(float((self.usage + _values_one(shape, self.points, bs)).max()), own_val)
        added = np.array(add, dtype=np.float64).reshape(-1, 5)
        usage = self.usage + _values(added, self.points, bs)
        own = np.maximum(self.now, added[:, 4] - 1)  # each added shape's own breakpoint
        own_usage = _values(self.shapes, own, bs) + _values(added, own, bs)
        if remove:
            removed = np.array(remove, dtype=np.float64).reshape(-1, 5)
            usage -= _values(removed, self.points, bs)
            own_usage -= _values(removed, own, bs)
        return float(max(usage.max(), own_usage.max() if len(own_usage) else 0.0))

    def fits(self, add: list[Shape], remove: list[Shape] | None = None) -> bool:
        if len(add) == 1 and not remove:
            return self.fits_one(add[0])
        return self.peak_with(add, remove) <= self.capacity

    def admit(self, shape: Shape, remove: Shape | None = None) -> None:
        """Fold an admitted shape in (and `remove` out): O(cohorts)."""
        bs = self.block_size
        row = np.array([shape], dtype=np.float64)
        own = np.array([max(self.now, shape[4] - 1)], dtype=np.float64)
        own_usage = _values(self.shapes, own, bs) + _values(row, own, bs)
        usage = self.usage + _values(row, self.points, bs)
        rows = [self.shapes, row]
        if remove:
            gone = np.array([remove], dtype=np.float64) * _NEGATE
            own_usage += _values(gone, own, bs)
            usage += _values(gone, self.points, bs)
            rows.append(gone)
        i = int(np.searchsorted(self.points, own[0]))
        self.points = np.insert(self.points, i, own[0])
        self.usage = np.insert(usage, i, own_usage[0])
        self.shapes = np.concatenate(rows)
        self._sweep = None
        self._refresh()

    def drop(self, shape: Shape) -> None:
        """Take a shape out (a victim preempted): O(cohorts)."""
        row = np.array([shape], dtype=np.float64) * _NEGATE
        self.usage = self.usage + _values(row, self.points, self.block_size)
        self.shapes = np.concatenate([self.shapes, row])
        self._sweep = None
        self._refresh()


_NEGATE = np.array([-1.0, -1.0, 1.0, 1.0, 1.0])  # f is linear in (n, P): negated rows subtract
