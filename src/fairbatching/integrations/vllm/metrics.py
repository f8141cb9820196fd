"""The Prefill Admission Budget as Prometheus gauges, served from the engine process on its own port.

vLLM's engine core runs in its own process, apart from the API server whose /metrics vLLM serves, so the
scheduler exports on ``FAIRBATCHING_METRICS_HOST:FAIRBATCHING_METRICS_PORT`` (a router scrapes every node there).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from fairbatching.policies.admission import AdmissionBudget


@dataclass
class PabGauges:
    tokens: Gauge
    seconds: Gauge
    decode_share: Gauge
    queued_seconds: Gauge
    free_slots: Gauge
    steps: Gauge
    fallbacks: Gauge

    def update(self, budget: AdmissionBudget, steps: int, fallbacks: int) -> None:
        self.tokens.set(budget.tokens)
        self.seconds.set(budget.seconds)
        self.decode_share.set(budget.decode_share)
        self.queued_seconds.set(budget.queued_seconds)
        self.free_slots.set(budget.free_slots)
        self.steps.set(steps)
        self.fallbacks.set(fallbacks)


def make_gauges(registry: CollectorRegistry) -> PabGauges:
    def gauge(name: str, doc: str) -> Gauge:
        return Gauge(f"fairbatching_{name}", doc, registry=registry)

    return PabGauges(
        tokens=gauge("prefill_admission_budget_tokens", "Prompt tokens this node can still admit within its TTFT"),
        seconds=gauge("prefill_admission_budget_seconds", "GPU seconds free for new prefill within the TTFT"),
        decode_share=gauge("decode_share", "Share of GPU time running decodes need to hold their TPOT"),
        queued_seconds=gauge("queued_prefill_seconds", "Prefill work already committed, in GPU seconds"),
        free_slots=gauge("free_sequence_slots", "Sequence slots free (max_num_seqs - running)"),
        steps=gauge("scheduler_steps", "Scheduling steps taken"),
        fallbacks=gauge("scheduler_fallbacks", "Steps the policy planned nothing and vLLM decided"),
    )


def start_pab_exporter(port: int, host: str = "127.0.0.1") -> PabGauges:
    """Serve the gauges on ``host:port`` (loopback unless told otherwise: a scheduler's internals are not public)."""
    registry = CollectorRegistry()
    gauges = make_gauges(registry)
    start_http_server(port, addr=host, registry=registry)
    return gauges
