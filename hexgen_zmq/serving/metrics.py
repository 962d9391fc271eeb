"""The gateway's Prometheus metrics: what it measures itself per request (outcome, TTFT, time per output
token, end-to-end latency, tokens) and what the broker reports in its status at each scrape (queue,
requests running per pipeline; per stage requests cached, KV blocks used and free, bad messages, steps,
seconds stepping, tokens and requests stepped, bytes sent per hop; failed requests by code).

One CollectorRegistry per gateway rather than prometheus_client's global one, so several gateways (or
tests) in one process do not collide. Names follow Prometheus conventions: `hexgen_` prefix, the unit in
the name, `_total` on counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from hexgen_zmq.wire.messages import StatusReply

disable_created_metrics()  # no `_created` series beside every counter and histogram: they only add noise

# Seconds; from a fast GPU's few ms to a loaded CPU's seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class BrokerCollector:
    """Turns the broker's latest StatusReply into metric families at each scrape."""

    def __init__(self):
        self.status: StatusReply | None = None

    def describe(self):
        return []  # families vary with the deployment; nothing to check at registration

    def collect(self):
        up = GaugeMetricFamily("hexgen_broker_up", "Whether the broker answered the last status request (1) or not")
        up.add_metric([], 0.0 if self.status is None else 1.0)
        yield up
        status = self.status
        if status is None:
            return
        queued = GaugeMetricFamily("hexgen_broker_queued_requests", "Requests waiting at the broker for KV room")
        queued.add_metric([], status.queued)
        running = GaugeMetricFamily("hexgen_broker_running_requests", "Requests dispatched to a pipeline")
        running.add_metric([], sum(p.in_flight for p in status.pipelines))
        in_flight = GaugeMetricFamily("hexgen_pipeline_in_flight_requests", "Requests in flight per pipeline",
                                      labels=["pipeline"])
        ready = GaugeMetricFamily("hexgen_pipeline_ready", "1 when every stage of the pipeline reported ready",
                                  labels=["pipeline"])
        healthy = GaugeMetricFamily("hexgen_pipeline_healthy", "1 unless the pipeline lost a stage",
                                    labels=["pipeline"])
        cached = GaugeMetricFamily("hexgen_stage_cached_requests", "Requests holding KV cache on a stage",
                                   labels=["pipeline", "stage"])
        used = GaugeMetricFamily("hexgen_stage_kv_blocks_used", "KV cache blocks in use on a stage",
                                 labels=["pipeline", "stage"])
        free = GaugeMetricFamily("hexgen_stage_kv_blocks_free", "KV cache blocks free on a stage",
                                 labels=["pipeline", "stage"])
        stage_bad = CounterMetricFamily("hexgen_stage_bad_messages", "Messages a stage rejected since it started",
                                        labels=["pipeline", "stage"])
        steps = CounterMetricFamily("hexgen_stage_steps", "Micro-batches a stage computed since it started",
                                    labels=["pipeline", "stage"])
        step_seconds = CounterMetricFamily("hexgen_stage_step_seconds", "Seconds a stage spent computing micro-batches "
                                           "(over hexgen_stage_steps_total: the mean step time)",
                                           labels=["pipeline", "stage"])
        step_tokens = CounterMetricFamily("hexgen_stage_step_tokens", "Token rows of the micro-batches a stage "
                                          "computed (over hexgen_stage_steps_total: the mean batch size in tokens)",
                                          labels=["pipeline", "stage"])
        step_requests = CounterMetricFamily("hexgen_stage_step_requests", "Requests (segments) of the micro-batches "
                                            "a stage computed (over steps: the mean batch size in requests)",
                                            labels=["pipeline", "stage"])
        sent = CounterMetricFamily("hexgen_stage_sent_bytes", "Bytes a stage sent per hop: to the next stage "
                                   "(micro-batches, or the last stage's feedback to the first) or to the broker "
                                   "(sampled tokens)", labels=["pipeline", "stage", "to"])
        for p in status.pipelines:
            for stage, c in sorted((getattr(p, "stage_counters", {}) or {}).items()):
                labels = [p.id, stage]
                steps.add_metric(labels, c.steps_total)
                step_seconds.add_metric(labels, c.step_seconds_total)
                step_tokens.add_metric(labels, c.step_tokens_total)
                step_requests.add_metric(labels, c.step_requests_total)
                sent.add_metric([*labels, "next"], c.bytes_sent_total)
                sent.add_metric([*labels, "broker"], c.broker_bytes_sent_total)
            in_flight.add_metric([p.id], p.in_flight)
            ready.add_metric([p.id], float(p.ready))
            healthy.add_metric([p.id], float(p.healthy))
            for stage, n in sorted(p.cached_requests.items()):
                cached.add_metric([p.id, stage], n)
            # reported by brokers whose status carries them (fields added later, read with defaults)
            totals = getattr(p, "kv_blocks_total", {}) or {}
            for stage, n in sorted((getattr(p, "kv_blocks_used", {}) or {}).items()):
                used.add_metric([p.id, stage], n)
                if stage in totals:
                    free.add_metric([p.id, stage], totals[stage] - n)
            for stage, n in sorted((getattr(p, "bad_messages", {}) or {}).items()):
                stage_bad.add_metric([p.id, stage], n)
        yield from (queued, running, in_flight, ready, healthy, cached, used, free, stage_bad, steps, step_seconds,
                    step_tokens, step_requests, sent)
        bad = CounterMetricFamily("hexgen_broker_bad_messages", "Malformed or unexpected messages the broker rejected")
        bad.add_metric([], getattr(status, "bad_messages", 0))
        yield bad
        failed = CounterMetricFamily("hexgen_broker_requests_failed", "Requests the broker failed, by error code",
                                     labels=["code"])
        for code, n in sorted((getattr(status, "requests_failed", {}) or {}).items()):
            failed.add_metric([code], n)
        yield failed


class GatewayMetrics:
    """Every metric of one gateway, in its own registry."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hexgen_requests", "HTTP generation requests by endpoint and outcome "
                                "(success, an error code, client_disconnected, unauthorized, "
                                "unsupported_parameter)",
                                ["endpoint", "outcome"], registry=r)
        self.finished = Counter("hexgen_request_finish_reasons", "Successful requests by finish_reason",
                                ["finish_reason"], registry=r)
        self.in_progress = Gauge("hexgen_requests_in_progress", "Generation requests being served now",
                                 registry=r)
        self.ttft = Histogram("hexgen_time_to_first_token_seconds", "From receiving the request to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("hexgen_time_per_output_token_seconds",
                              "Mean time between output tokens after the first, per request", buckets=TPOT_BUCKETS,
                              registry=r)
        self.e2e = Histogram("hexgen_e2e_request_latency_seconds", "From receiving the request to its last token",
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("hexgen_prompt_tokens", "Prompt tokens of requests served", registry=r)
        self.generation_tokens = Counter("hexgen_generation_tokens", "Tokens generated (streamed or returned)",
                                         registry=r)
        self.broker = BrokerCollector()
        r.register(self.broker)

    def observe(self, endpoint: str, outcome: str, prompt_tokens: int, tokens: int, start: float,
                first_at: float | None, end: float, finish_reason: str | None = None) -> None:
        """Record one request that has ended (successfully or not)."""
        self.requests.labels(endpoint, outcome).inc()
        if finish_reason is not None:
            self.finished.labels(finish_reason).inc()
        if prompt_tokens and first_at is not None:  # a prompt the pipeline ran, not one refused
            self.prompt_tokens.inc(prompt_tokens)
        if tokens:
            self.generation_tokens.inc(tokens)
        if first_at is not None:
            self.ttft.observe(first_at - start)
            if tokens > 1:
                self.tpot.observe((end - first_at) / (tokens - 1))
        if outcome == "success":
            self.e2e.observe(end - start)
