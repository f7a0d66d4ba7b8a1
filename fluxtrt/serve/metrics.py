"""The server's Prometheus metrics, in a registry of its own (two servers in one process do not share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# What became of a request: the label values of fluxtrt_requests_total.
OUTCOMES = ("ok", "bad_request", "unauthorized", "too_large", "queue_full", "not_ready", "disconnected", "failed")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


class Metrics:
    """Requests by outcome and by LoRA, queue depth, request and edit latency, batch sizes, and whether the model is
    warm."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fluxtrt_requests", "Edit requests by outcome.", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.queue_depth = Gauge("fluxtrt_queue_depth", "Requests waiting for the worker.", registry=r)
        self.request_seconds = Histogram("fluxtrt_request_seconds", "Time from queueing to result, per answered "
                                         "request.", buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.edit_seconds = Histogram("fluxtrt_edit_seconds", "Time of one pipeline call (a batch).",
                                      buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_images = Histogram("fluxtrt_batch_images", "Images made by one pipeline call.",
                                      buckets=BATCH_BUCKETS, registry=r)  # fmt: skip
        self.batches = Counter("fluxtrt_batches", "Pipeline calls by outcome.", ["outcome"], registry=r)
        self.running = Gauge("fluxtrt_running_images", "Images of the pipeline call running now (0: idle).",
                             registry=r)  # fmt: skip
        self.ready = Gauge("fluxtrt_ready", "1 once the model is loaded and warm.", registry=r)
        self.lora_requests = Counter("fluxtrt_lora_requests", "Answered edit requests by LoRA (none: without one).",
                                     ["lora"], registry=r)  # fmt: skip
        self.lora_requests.labels("none")

    def name_loras(self, names) -> None:
        """Show a zero count for each of the server's LoRAs from the start."""
        for name in names:
            self.lora_requests.labels(name)

    def answered(self, lora: str | None, seconds: float) -> None:
        """An edit request answered with its images after ``seconds`` from queueing."""
        self.request_seconds.observe(seconds)
        self.lora_requests.labels(lora or "none").inc()

    def count(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def on_batch(self, images: int, seconds: float, outcome: str) -> None:
        self.batches.labels(outcome).inc()
        if outcome == "ok":
            self.edit_seconds.observe(seconds)
            self.batch_images.observe(images)

    def text(self) -> bytes:
        return generate_latest(self.registry)


def outcome_of(status: int) -> str:
    """The outcome label of an answered request's HTTP status."""
    return {200: "ok", 401: "unauthorized", 413: "too_large"}.get(status) or (
        "bad_request" if status < 500 else "failed"
    )
