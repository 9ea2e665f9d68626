"""The server's Prometheus metrics, in a registry of their own (one per server)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    """Requests running / waiting, KV slots in use, token counters, TTFT and inter-token latency."""

    def __init__(self, n_slots: int):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("llama3_dist_requests_running", "Sequences decoding in a KV-cache slot", registry=r)
        self.waiting = Gauge("llama3_dist_requests_waiting", "Sequences waiting for a free slot", registry=r)
        self.slots_in_use = Gauge("llama3_dist_kv_slots_in_use", "KV-cache slots holding a sequence", registry=r)
        self.slots_total = Gauge("llama3_dist_kv_slots_total", "KV-cache slots (runtime.max_batch_size)", registry=r)
        self.slots_total.set(n_slots)
        self.prompt_tokens = Counter("llama3_dist_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("llama3_dist_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter(
            "llama3_dist_sequences_finished", "Sequences ended, by reason", ["finish_reason"], registry=r
        )
        self.ttft = Histogram(
            "llama3_dist_time_to_first_token_seconds",
            "From arrival to the first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "llama3_dist_inter_token_latency_seconds",
            "Between consecutive tokens of a sequence",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def text(self) -> bytes:
        return generate_latest(self.registry)
