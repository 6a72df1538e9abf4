"""The `ecoserve` policy's working state for one scheduling round: per decode or mixed worker, what is
reserved (exact blocks, the plateau bound, members), what is physically free, and the
predicted-usage timeline when a check needs it; fit checks and commits against them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from ecoserve.coordinator.ledger import Shape, Timeline, negated, pending_shape, shape_max
from ecoserve.coordinator.policies.ecoserve.config import EcoServeConfig
from ecoserve.coordinator.policy import SchedulerState, WorkerView
from ecoserve.coordinator.request import Request


@dataclass
class Tallies:
    """Per decode worker (rank ->), as of the round's start and updated by its commits."""

    exact: dict[int, int]  # blocks reserved exactly: sum of blocks(kv at start + horizon)
    linear: dict[int, float]  # the plateau bound of U (RankLedger.linear_blocks)
    members: dict[int, int]  # requests holding reservations (the decode batch it will carry)
    physical: dict[int, int]  # blocks free now less those promised (WorkerView.available_blocks)
    capacity: dict[int, float]  # blocks the timeline may fill (the pool less the margin)


class Round:
    """Per-round working state. A decode worker's timeline is built only when a check needs it:
    while the sum of every cohort's plateau (`RankLedger.linear_blocks`, an upper bound of U at
    all times) plus the candidate's stays within capacity, the candidate fits in O(1). The
    per-worker tallies are read on first use: most rounds only move KV and never need them."""

    def __init__(self, config: EcoServeConfig, state: SchedulerState, decoders: dict[int, WorkerView]) -> None:
        self.config = config
        self.state = state
        self.decoders = decoders
        self.timelines: dict[int, Timeline] = {}
        self.added: dict[int, list[Shape]] = {}  # committed this round before the timeline was built
        self.blocked: set[int] = set()

    @cached_property
    def tallies(self) -> Tallies:
        """The per-worker tallies, counted in one pass on first use."""
        ranks, keep = self.state.ledger.ranks, 1 - self.config.margin
        t = Tallies({}, {}, {}, {}, {})
        for r, w in self.decoders.items():
            led = ranks.get(r)
            t.exact[r] = led.reserved_blocks if led else 0
            t.linear[r] = led.linear_blocks if led else 0.0
            t.members[r] = led.members if led else 0
            t.physical[r] = w.available_blocks
            t.capacity[r] = w.num_blocks * keep
        return t

    @property
    def exact(self) -> dict[int, int]:
        return self.tallies.exact

    @property
    def linear(self) -> dict[int, float]:
        return self.tallies.linear

    @property
    def members(self) -> dict[int, int]:
        return self.tallies.members

    @property
    def physical(self) -> dict[int, int]:
        return self.tallies.physical

    @property
    def capacity(self) -> dict[int, float]:
        return self.tallies.capacity

    def timeline(self, rank: int) -> Timeline:
        tl = self.timelines.get(rank)
        if tl is None:
            w = self.decoders[rank]
            extra = self.added.pop(rank, [])
            tl = self.state.ledger.timeline(rank, w.block_size, w.decode_steps, self.capacity[rank], extra)
            self.timelines[rank] = tl
        return tl

    def pending(self, rank: int, n: int, kv_tokens: int, horizon: int) -> Shape:
        return pending_shape(self.decoders[rank].decode_steps, self.state.ledger.delay(rank), n, kv_tokens, horizon)

    def _plateau(self, rank: int, add: list[Shape], remove: list[Shape]) -> float:
        bs = self.decoders[rank].block_size
        return self.linear[rank] + sum(shape_max(x, bs) for x in add) - sum(shape_max(x, bs) for x in remove)

    def fits(
        self, rank: int, add: list[Shape], remove: list[Shape], new_members: int, exact: int = 0, physical: int = 0,
        slo: float | None = None,
    ) -> bool:
        cfg = self.config
        w = self.decoders[rank]
        if physical > self.physical[rank]:
            return False
        if cfg.pipelining:
            bound = self._plateau(rank, add, remove)
            # The margin is kept free for the misjudged lengths of requests sharing a worker; a
            # worker that holds no reservation shares with nobody, so a cohort may fill its whole
            # pool there (as under exact allocation). Without this a request needing more than
            # (1 - margin) of a pool waited forever although the pool could hold it. There its
            # exact need counts, not the bound (up to a block more per member): a request the
            # front door accepts (prompt + max_tokens within a pool) must fit an idle worker.
            alone = exact or bound
            if bound <= self.capacity[rank] or (self.members[rank] == 0 and not remove and alone <= w.num_blocks):
                peak = bound  # fits whatever the timeline says
            else:
                tl = self.timeline(rank)
                if self._tpot_capped(new_members, slo):
                    peak = tl.peak_with(add, remove)  # exact: the capacity and the TPOT checks both read it
                    if peak > tl.capacity:
                        return False
                elif not tl.fits(add, remove):
                    return False
                else:
                    peak = 0.0
        else:
            if self.exact[rank] + exact > w.num_blocks:
                return False
            peak = self.exact[rank] + exact
        return self._tpot_ok(rank, new_members, peak, slo)

    def _tpot_capped(self, new_members: int, slo: float | None) -> bool:
        cfg = self.config
        return cfg.costs.has_decode_fit and (slo or cfg.slo_tpot_ms) is not None and new_members > 0

    def _tpot_ok(self, rank: int, new_members: int, peak_blocks: float, slo: float | None) -> bool:
        if not self._tpot_capped(new_members, slo):
            return True
        slo = slo or self.config.slo_tpot_ms
        assert slo is not None
        batch = self.members[rank] + new_members
        return self.config.costs.decode_ms(batch, peak_blocks * self.decoders[rank].block_size) <= slo

    def commit(self, rank: int, shape: Shape, exact: int, physical: int = 0, remove: Shape | None = None) -> None:
        self.linear[rank] = self._plateau(rank, [shape], [remove] if remove else [])
        if rank in self.timelines:
            self.timelines[rank].admit(shape, remove=remove)
        else:  # folded in when a check first needs this worker's timeline (a removal as a negated shape)
            self.added.setdefault(rank, []).extend([shape] if remove is None else [shape, negated(remove)])
        self.exact[rank] += exact
        self.members[rank] += shape[0] - (remove[0] if remove else 0)
        self.physical[rank] -= physical

    def drop(self, rank: int, shape: Shape, exact: int) -> None:
        """A victim's reservation leaves the worker."""
        self.linear[rank] = self._plateau(rank, [], [shape])
        if rank in self.timelines:
            self.timelines[rank].drop(shape)
        else:
            self.added.setdefault(rank, []).append(negated(shape))
        self.exact[rank] -= exact
        self.members[rank] -= shape[0]

    def load(self, rank: int) -> float:
        w = self.decoders[rank]
        return (self.linear[rank] if self.config.pipelining else self.exact[rank]) / w.num_blocks

    def place(
        self, members: list[tuple[str, int]], horizon: int, slo: float | None, physical: bool = False,
        ranks: list[int] | None = None,
    ) -> WorkerView | None:
        """The first decode worker of `ranks` (default: all, least-loaded first) where the cohort
        fits; commit it."""
        tokens = sum(t for _, t in members)
        if ranks is None:  # least-loaded first (`load`, read once per worker)
            held = self.linear if self.config.pipelining else self.exact
            order = sorted(self.decoders, key=lambda r: (held[r] / self.decoders[r].num_blocks, r))
        else:
            order = ranks
        for rank in (r for r in order if r not in self.blocked):
            w = self.decoders[rank]
            shape = self.pending(rank, len(members), tokens, horizon)
            exact = sum(w.blocks_for(t + horizon) for _, t in members)
            need = w.blocks_for(tokens) + len(members) if physical else 0
            if self.fits(rank, [shape], [], len(members), exact, need, slo):
                self.commit(rank, shape, exact, need)
                return w
        return None

    def blocks_delta(self, req: Request, new_total: int) -> int:
        w = self.decoders[req.decode_rank]  # type: ignore[index]
        kv = req.num_prefill_tokens
        return w.blocks_for(kv + new_total) - w.blocks_for(kv + (req.predicted_tokens or 0))

    def exact_blocks_of(self, req: Request) -> int:
        w = self.decoders[req.decode_rank]  # type: ignore[index]
        return w.blocks_for(req.num_prefill_tokens + (req.predicted_tokens or 0))
