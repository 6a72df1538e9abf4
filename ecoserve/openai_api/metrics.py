"""Prometheus metrics of the HTTP front door (DESIGN §10), named as vLLM names its own under an
`ecoserve:` prefix, and written by prometheus-client.

Two sources, nothing computed beyond them:

- the coordinator's counters and gauges (`AsyncClient.stats()`), read again on every scrape:
  requests by outcome and lifecycle status, queues (per response-length bucket under the
  ecoserve policy), KV blocks per worker, preemptions, extensions, length predictions, KV
  transfers, the coordinator's own schedule and dispatch times. They count every client's
  requests, ZeroMQ ones included;
- what this process sees of the requests it serves: its requests by outcome, their tokens,
  and latency histograms (TTFT, TPOT, E2E and the queue/prefill/transfer split are the
  coordinator's timings of each finished request; inter-token latency is the gap between the
  deltas a stream receives here, a delta of k tokens counting as k gaps of 1/k of its wait).
  A process serving `--metrics-port` alone serves no requests, so these stay empty there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ecoserve.client import Completion

PREFIX = "ecoserve:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# vLLM's buckets (seconds), so dashboards built for it read these.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_GAP_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                     40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
# The coordinator's lifecycle statuses (docs/structure.md) that count as running or waiting.
RUNNING = ("prefilling", "transferring", "decoding")
WAITING = ("waiting_prefill", "preempted")
QUEUES = {"waiting_prefill": "queue_waiting_prefill", "retry_backoff": "queue_retry_backoff",
          "kv_waiting": "queue_kv_waiting", "near_limit": "queue_near_limit", "preempted": "queue_preempted",
          "releasing": "requests_releasing"}
OUTCOMES = ("finished", "aborted", "failed", "refused")


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def _labelled(kind: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str, doc: str, label: str,
              values: Iterable[tuple[str, float]]) -> Metric:
    family = kind(PREFIX + name, doc, labels=[label])
    for key, value in values:
        family.add_metric([key], value)
    return family


def _per_rank(stats: dict[str, float], prefix: str, suffix: str) -> list[tuple[str, float]]:
    """(rank, value) of every key `prefix<rank>suffix`, by rank."""
    out = []
    for key, value in stats.items():
        if key.startswith(prefix) and key.endswith(suffix):
            rank = key[len(prefix):len(key) - len(suffix)]
            if rank.isdigit():
                out.append((rank, value))
    return sorted(out, key=lambda kv: int(kv[0]))


def _summary(name: str, doc: str, stats: dict[str, float], key: str, scale: float) -> Metric:
    """The coordinator's reservoir `key` (count, p50, p99, max) as a summary in seconds."""
    family = Metric(PREFIX + name, doc, "summary")
    for q, part in (("0.5", "p50"), ("0.99", "p99"), ("1.0", "max")):
        family.add_sample(PREFIX + name, {"quantile": q}, stats.get(f"{key}.{part}", 0.0) * scale)
    family.add_sample(PREFIX + name + "_count", {}, stats.get(f"{key}.count", 0.0))
    return family


def stats_families(stats: dict[str, float]) -> list[Metric]:
    """The coordinator's stats (`AsyncClient.stats()`) as metric families."""
    s = stats.get
    status = [(k.removeprefix("status."), v) for k, v in sorted(stats.items()) if k.startswith("status.")]
    by_status = dict(status)
    preempt_causes = [("policy_swap", s("preemptions_swap", 0.0)), ("policy_recompute", s("preemptions_recompute", 0.0)),
                      ("out_of_blocks", s("preemptions_local", 0.0))]
    exact = s("predicted", 0.0) - s("under_predicted", 0.0) - s("over_predicted", 0.0)
    capacity = dict(_per_rank(stats, "rank", ".num_blocks"))
    used = _per_rank(stats, "worker.", ".used_blocks")
    families: list[Metric] = [
        _gauge("coordinator_up", "1 when the coordinator answered this scrape's stats call", 1.0),
        _labelled(CounterMetricFamily, "requests", "requests that ended, by outcome (every front door)", "outcome",
                  [(o, s(o, 0.0)) for o in ("finished", "aborted", "failed")]),
        _gauge("num_requests_running", "requests prefilling, transferring KV or decoding",
               sum(by_status.get(k, 0.0) for k in RUNNING)),
        _gauge("num_requests_waiting", "requests waiting for prefill or preempted",
               sum(by_status.get(k, 0.0) for k in WAITING)),
        _labelled(GaugeMetricFamily, "num_requests", "requests in flight by lifecycle status", "status", status),
        _labelled(GaugeMetricFamily, "queue_length", "the coordinator's queues", "queue",
                  [(q, s(key, 0.0)) for q, key in QUEUES.items()]),
        _labelled(GaugeMetricFamily, "rl_bucket_queue_length",
                  "requests waiting for prefill per predicted response-length bucket (ecoserve policy)", "bucket",
                  [(k.removeprefix("queue_bucket."), v) for k, v in stats.items() if k.startswith("queue_bucket.")]),
        _labelled(GaugeMetricFamily, "kv_used_blocks", "KV blocks in use per worker rank", "rank", used),
        _labelled(GaugeMetricFamily, "kv_reserved_blocks", "KV blocks reserved per worker rank", "rank",
                  _per_rank(stats, "worker.", ".reserved_blocks")),
        _labelled(GaugeMetricFamily, "kv_lent_blocks",
                  "KV reservations beyond the physical pool per worker rank (lent by KVC pipelining)", "rank",
                  _per_rank(stats, "worker.", ".lent_blocks")),
        _labelled(GaugeMetricFamily, "kv_capacity_blocks", "KV blocks in each worker rank's pool", "rank",
                  sorted(capacity.items(), key=lambda kv: int(kv[0]))),
        _labelled(GaugeMetricFamily, "kv_cache_usage_perc", "share of each worker rank's KV pool in use (0-1)", "rank",
                  [(r, v / capacity[r]) for r, v in used if capacity.get(r)]),
        _counter("num_preemptions", "preemptions of decoding requests", s("preemptions", 0.0)),
        _labelled(CounterMetricFamily, "preemptions_by_cause",
                  "preemptions the policy ordered (by how the worker did it) or a worker made out of blocks", "cause",
                  preempt_causes),
        _counter("reservation_extensions", "KV reservations extended by a bucket (under-predicted lengths)",
                 s("extensions", 0.0)),
        _labelled(CounterMetricFamily, "rl_predictions", "finished requests with a length prediction, by its error",
                  "outcome", [("exact", exact), ("under", s("under_predicted", 0.0)),
                              ("over", s("over_predicted", 0.0))]),
        _gauge("rl_prediction_mean_abs_error_tokens", "mean |predicted - actual| response length of finished requests",
               s("prediction_mean_abs_error", 0.0)),
        _labelled(CounterMetricFamily, "kv_transfers", "KV transfers that ended, by outcome", "outcome",
                  [("done", s("transfers_done", 0.0)), ("failed", s("transfers_failed", 0.0))]),
        _gauge("kv_transfers_in_flight", "KV transfers planned and not yet ended", s("transfers_in_flight", 0.0)),
        _summary("schedule_time_seconds", "one scheduling decision of the policy (a uniform sample)", stats,
                 "schedule_call_us", 1e-6),
        _summary("dispatch_latency_seconds", "a request's arrival at the coordinator to its dispatch (a uniform sample)",
                 stats, "dispatch_ms", 1e-3),
        _gauge("workers_alive", "worker ranks alive", s("workers_alive", 0.0)),
        _counter("workers_lost", "worker ranks declared lost", s("workers_lost", 0.0)),
        _counter("request_retries", "requests retried after a lost worker or a failed KV transfer", s("retries", 0.0)),
    ]
    for what, unit in (("bytes", "bytes"), ("seconds", "seconds")):
        family = CounterMetricFamily(PREFIX + f"kv_transfer_{what}", f"KV transfer {unit} moved per worker rank "
                                     "(posting to completion, each side counted on its own rank)",
                                     labels=["rank", "direction"])
        for direction in ("sent", "received"):
            for rank, value in _per_rank(stats, "rank", f".kv_{direction}_{what}"):
                family.add_metric([rank, direction], value)
        families.append(family)
    return families


class _StatsCollector(Collector):
    """The last stats the coordinator gave, as families; none while it does not answer."""

    def __init__(self) -> None:
        self.stats: dict[str, float] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.stats is None:
            yield _gauge("coordinator_up", "1 when the coordinator answered this scrape's stats call", 0.0)
            return
        yield from stats_families(self.stats)


@dataclass
class RequestTimes:
    """What one served request showed this process: when each delta came (its own clock, s)."""

    token_times: list[float] = field(default_factory=list)  # one per token

    def add(self, now: float, num_tokens: int) -> None:
        """`num_tokens` arrived at `now`: spread over the wait since the last one."""
        if not self.token_times:
            self.token_times.extend([now] * num_tokens)
            return
        last = self.token_times[-1]
        self.token_times.extend(last + (now - last) * (j + 1) / num_tokens for j in range(num_tokens))


class FrontDoorMetrics:
    """This process's registry: the coordinator's stats and the requests served here."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._stats = _StatsCollector()
        self.registry.register(self._stats)
        r = self.registry

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, buckets=buckets, registry=r)

        self.http_requests = Counter(PREFIX + "http_requests", "completion requests this HTTP front door answered, "
                                     "by endpoint and outcome", ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "prompt tokens of requests finished here", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "tokens generated for requests finished here",
                                         registry=r)
        self.ttft = histogram("time_to_first_token_seconds", "arrival to first token (the coordinator's timing)",
                              TTFT_BUCKETS)
        self.tpot = histogram("request_time_per_output_token_seconds", "mean gap after the first token, per request "
                              "(the coordinator's timing)", TOKEN_GAP_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "gaps between tokens as streams receive them here",
                             TOKEN_GAP_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "arrival to last token (the coordinator's timing)",
                             REQUEST_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "arrival to the start of prefill", REQUEST_BUCKETS)
        self.prefill = histogram("request_prefill_time_seconds", "prefill start to first token", REQUEST_BUCKETS)
        self.transfer = histogram("request_transfer_time_seconds", "first token to decoding (KV transfer)",
                                  REQUEST_BUCKETS)
        for endpoint in ("completions", "chat_completions"):  # every series from the start, at 0
            for outcome in OUTCOMES:
                self.http_requests.labels(endpoint, outcome)

    def served(self, endpoint: str, outcome: str, done: Completion | None = None, times: RequestTimes | None = None,
               num_tokens: int | None = None) -> None:
        """One request ended here with `outcome`; `done` (its Completion) when it finished, with
        `num_tokens` the tokens it is billed for (fewer than generated when a stop string cut it)."""
        self.http_requests.labels(endpoint, outcome).inc()
        if done is None or outcome != "finished":
            return
        self.prompt_tokens.inc(done.num_prompt_tokens)
        self.generation_tokens.inc(len(done.token_ids) if num_tokens is None else num_tokens)
        ms = 1e-3
        if done.token_ids:
            self.ttft.observe(done.ttft_ms * ms)
            self.e2e.observe(done.e2e_ms * ms)
            self.queue.observe(done.queue_ms * ms)
            self.prefill.observe(done.prefill_ms * ms)
            self.transfer.observe(done.transfer_ms * ms)
        if len(done.token_ids) > 1:
            self.tpot.observe(done.tpot_ms * ms)
        if times is not None:
            for a, b in zip(times.token_times, times.token_times[1:]):
                self.itl.observe(b - a)

    def render(self, stats: dict[str, float] | None) -> bytes:
        """The exposition text, with `stats` (None: the coordinator did not answer)."""
        self._stats.stats = stats
        return generate_latest(self.registry)
