"""Prometheus /metrics of the sim cluster, read with prometheus-client's own parser: its request
counters agree with the coordinator's stats after a small load, its histograms count what was
served, the metrics port answers /metrics alone, and a front door started for /metrics only
(`serve --metrics-port` without --http-port) serves the coordinator's families."""

from __future__ import annotations

import asyncio

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from ecoserve.client import Client
from ecoserve.openai_api.process import HttpSpec, start_http, stop_http
from tests.http.conftest import API_KEY, Server

pytestmark = pytest.mark.timeout(300)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    r = requests.get(url, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[("ecoserve:" + name, tuple(sorted(labels.items())))]


def test_counters_agree_with_stats_and_histograms_fill(sim_server: Server) -> None:
    url = sim_server.base_url.removesuffix("/v1") + "/metrics"
    c = openai.OpenAI(base_url=sim_server.base_url, api_key=API_KEY, max_retries=0, timeout=60)
    model = c.models.list().data[0].id
    before = scrape(url)
    # 1. A small load: two plain completions, one streamed, one chat, one refused.
    for n in (3, 5):
        c.completions.create(model=model, prompt=[1, 2, 3], max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
    chunks = list(c.completions.create(model=model, prompt=[4, 5], max_tokens=6, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True}))
    assert chunks[-1].choices[0].finish_reason == "length"
    c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
                              extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=model, prompt="hi", max_tokens=0)
    # 2. The coordinator's counters are its stats, read at the same moment (nothing is in flight).
    after = scrape(url)
    with Client(sim_server.address, timeout=30) as zmq_client:
        stats = zmq_client.stats()
    assert stats["requests_in_flight"] == 0
    for outcome in ("finished", "aborted", "failed"):
        assert value(after, "requests_total", outcome=outcome) == stats[outcome], outcome
    assert value(after, "requests_total", outcome="finished") - value(before, "requests_total", outcome="finished") == 4
    assert value(after, "workers_alive") == 2 and value(after, "coordinator_up") == 1
    for rank in ("0", "1"):
        capacity = value(after, "kv_capacity_blocks", rank=rank)
        assert capacity == stats[f"rank{rank}.num_blocks"] > 0
        used = value(after, "kv_used_blocks", rank=rank)  # (ended requests' blocks may still be on their way back)
        assert value(after, "kv_cache_usage_perc", rank=rank) == pytest.approx(used / capacity)
    assert value(after, "kv_transfers_total", outcome="done") == stats["transfers_done"] > 0
    assert value(after, "kv_transfer_bytes_total", rank="1", direction="received") > 0  # rank 1 decodes
    assert value(after, "kv_transfer_seconds_total", rank="1", direction="received") > 0
    assert value(after, "schedule_time_seconds_count") > 0 and value(after, "schedule_time_seconds", quantile="0.5") > 0

    # 3. What this front door served, by endpoint and outcome, and its histograms.
    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("http_requests_total", endpoint="completions", outcome="finished") == 3
    assert delta("http_requests_total", endpoint="chat_completions", outcome="finished") == 1
    assert delta("http_requests_total", endpoint="completions", outcome="refused") == 1
    assert delta("generation_tokens_total") == 3 + 5 + 6 + 4
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                      "request_time_per_output_token_seconds"):
        assert delta(f"{histogram}_count") == 4, histogram
        assert value(after, f"{histogram}_bucket", le="+Inf") == value(after, f"{histogram}_count")
    assert delta("time_to_first_token_seconds_sum") > 0
    assert delta("inter_token_latency_seconds_count") == 6 - 1  # the streamed request's gaps


def test_the_metrics_port_serves_metrics_alone(sim_server: Server) -> None:
    assert sim_server.metrics_url is not None
    samples = scrape(sim_server.metrics_url)
    assert value(samples, "workers_alive") == 2
    root = sim_server.metrics_url.removesuffix("/metrics")
    for path in ("/v1/models", "/health", "/version"):
        r = requests.get(root + path, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["message"] == "this port serves /metrics only"


def test_a_front_door_for_metrics_only(sim_server: Server) -> None:
    proc, urls = asyncio.run(start_http(HttpSpec("127.0.0.1", None, metrics_port=0), sim_server.address, 2))
    try:
        assert urls.http is None and urls.metrics is not None
        samples = scrape(urls.metrics + "/metrics")
        with Client(sim_server.address, timeout=30) as zmq_client:
            stats = zmq_client.stats()
        assert value(samples, "requests_total", outcome="finished") == stats["finished"] > 0
        assert value(samples, "time_to_first_token_seconds_count") == 0  # it serves no requests itself
        assert requests.get(urls.metrics + "/v1/models", timeout=30).status_code == 404
    finally:
        stop_http(proc)
