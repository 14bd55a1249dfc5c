"""Prometheus metrics of one app, in its own CollectorRegistry (so tests can build several apps).

Per-request counters and histograms are recorded by the routes as the stream goes by; the
engine's gauges (queue, batch, caches) are read from `engine.stats()` when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from prompt_store.sync import StorePoller
from server.engine.handle import RequestHandle
from server.engine.loop import EngineStats

# Label values that cannot be task names (those start with a letter or digit), so never collide.
BASE_LABEL = "_base"  # a request with no task: the base model alone
UNKNOWN_LABEL = "_unknown"  # a refused request whose task is not served (bounds label cardinality)

# ok; cancelled: the client left; client_error: refused or failed with a 4xx (the request was at fault);
# server_error: a 5xx (overloaded, shutting down, or a failure of the server's own).
Outcome = Literal["ok", "cancelled", "client_error", "server_error"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def task_label(task: str | None) -> str:
    return BASE_LABEL if task is None else task


class Metrics:
    def __init__(self, engine_stats: Callable[[], EngineStats | None], prompt_count: Callable[[], int],
                 store_poller: Callable[[], StorePoller | None] = lambda: None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "promptswap_requests", "Generation requests by task and outcome (ok; cancelled: client gone; "
            "client_error: a 4xx, the request was at fault; server_error: a 5xx, overload or a server failure).",
            ["task", "outcome"], registry=self.registry,
        )
        self.generated_tokens = Counter(
            "promptswap_generated_tokens", "Tokens generated, by task and the request's outcome.",
            ["task", "outcome"], registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "promptswap_time_to_first_token_seconds", "From request arrival to its first generated token.",
            ["task"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.latency = Histogram(
            "promptswap_request_latency_seconds", "From request arrival to its last token.",
            ["task"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine_stats, prompt_count))
        self.registry.register(_StoreCollector(store_poller))

    def render(self, accept: str | None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def refused(self, task_label_value: str, outcome: Outcome) -> None:
        """A request refused before it ran."""
        self.requests.labels(task_label_value, outcome).inc()

    def finished(self, handle: RequestHandle, outcome: Outcome) -> None:
        """Record an admitted request that ended (call once per request): its times come from the engine."""
        task = task_label(handle.task)
        ttft = handle.time_to_first_token
        if ttft is not None:
            self.time_to_first_token.labels(task).observe(ttft)
        if outcome == "ok":
            self.latency.labels(task).observe(handle.elapsed)
        self.requests.labels(task, outcome).inc()
        self.generated_tokens.labels(task, outcome).inc(handle.generated_tokens)


class _EngineCollector:
    """Reads the engine's state at scrape time, so the numbers are never stale."""

    def __init__(self, engine_stats: Callable[[], EngineStats | None], prompt_count: Callable[[], int]) -> None:
        self.engine_stats = engine_stats
        self.prompt_count = prompt_count

    def describe(self):
        return []  # the families depend on whether the engine is up; do not pre-register them

    def collect(self):
        stats = self.engine_stats()
        if stats is None:  # before startup or after shutdown
            return
        gauges = (
            ("promptswap_queue_depth", "Requests waiting to run (preempted ones included).", stats.waiting),
            ("promptswap_running_requests", "Requests in the running batch.", stats.running),
            ("promptswap_kv_cache_bytes", "Bytes allocated for the KV page pool now.", stats.kv_bytes),
            ("promptswap_kv_cache_budget_bytes", "Byte budget of the KV page pool.", stats.kv_budget_bytes),
            ("promptswap_kv_pages_total", "Pages in the KV pool (the budget, in pages).", stats.kv_pages_total),
            ("promptswap_kv_pages_used", "KV pages held by running requests, task prefixes and the prefix cache.",
             stats.kv_pages_used),
            ("promptswap_kv_pages_shared", "KV pages held by task prefixes, shared by their requests.",
             stats.kv_pages_shared),
            ("promptswap_kv_pages_cached", "Full KV pages kept by automatic prefix caching (read by running "
             "requests, or idle until the pool needs them).", stats.kv_pages_cached),
            ("promptswap_prompt_cache_bytes", "Bytes of task prefixes in the KV pool (in use or cached).",
             stats.prompt_cache_bytes),
            ("promptswap_prompt_cache_budget_bytes", "Bytes that idle task prefixes may keep in the KV pool.",
             stats.prompt_cache_budget_bytes),
            ("promptswap_prompts", "Task prompts the registry serves.", self.prompt_count()),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily(
            "promptswap_preemptions", "Requests preempted because the KV pool ran out (resumed by recomputing).",
            value=stats.preemptions,
        )
        yield CounterMetricFamily(
            "promptswap_prompt_cache_hits", "Requests whose task prefix was already on the device.",
            value=stats.prompt_cache_hits,
        )
        yield CounterMetricFamily(
            "promptswap_prompt_cache_misses", "Requests whose task prefix had to be computed.",
            value=stats.prompt_cache_misses,
        )
        yield CounterMetricFamily(
            "promptswap_prefix_cache_queries", "Text tokens looked up in the automatic prefix cache when a request "
            "was admitted (a resumed request counts again).", value=stats.prefix_cache_queries,
        )
        yield CounterMetricFamily(
            "promptswap_prefix_cache_hits", "Of the text tokens looked up, those whose keys and values were "
            "computed already (for the same task prefix and tokens before them) and reused.",
            value=stats.prefix_cache_hits,
        )


class _StoreCollector:
    """A shared prompt store's health, as this replica sees it (only with --prompt-store)."""

    def __init__(self, poller: Callable[[], StorePoller | None]) -> None:
        self.poller = poller

    def describe(self):
        return []

    def collect(self):
        poller = self.poller()
        if poller is None:
            return
        yield GaugeMetricFamily("promptswap_prompt_store_failures",
                                "Consecutive polls of the shared prompt store that failed (0: it answers).",
                                value=poller.failures)
        age = poller.seconds_since_success()
        if age is not None:
            yield GaugeMetricFamily("promptswap_prompt_store_sync_age_seconds",
                                    "Seconds since the shared prompt store last answered a poll.", value=age)
