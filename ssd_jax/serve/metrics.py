"""The server's Prometheus metrics (GET /metrics), on a registry of its own so several
servers (tests) can live in one process."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)


class ServeMetrics:
  content_type = CONTENT_TYPE_LATEST

  def __init__(self):
    r = self.registry = CollectorRegistry()
    p = "ssd_jax_"
    self.requests_received = Counter(p + "requests_received", "Requests queued.", registry=r)
    self.requests_finished = Counter(p + "requests_finished", "Requests ended, by reason "
                                     "(stop, length, abort, error).", ["reason"], registry=r)
    self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of finished requests.",
                                 registry=r)
    self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated.", registry=r)
    self.ttft = Histogram(p + "time_to_first_token_seconds", "Arrival to first token.",
                          buckets=_LATENCY_BUCKETS, registry=r)
    self.itl = Histogram(p + "inter_token_latency_seconds", "Between two output tokens of "
                         "a request (tokens that arrive together share the gap).",
                         buckets=_ITL_BUCKETS, registry=r)
    self.e2e = Histogram(p + "request_latency_seconds", "Arrival to finish.",
                         buckets=_LATENCY_BUCKETS, registry=r)
    self.rounds = Counter(p + "decode_rounds", "Decode rounds, summed over requests.",
                          registry=r)
    self.accepted = Counter(p + "accepted_draft_tokens", "SD/SSD draft tokens accepted.",
                            registry=r)
    self.lookups = Counter(p + "ssd_cache_lookups", "SSD speculation cache lookups.",
                           registry=r)
    self.hits = Counter(p + "ssd_cache_hits", "SSD speculation cache hits.", registry=r)
    self.running = Gauge(p + "num_requests_running", "Requests in the running batch.",
                         registry=r)
    self.waiting = Gauge(p + "num_requests_waiting", "Requests queued for a row.",
                         registry=r)
    self.preemptions = Gauge(p + "num_preemptions", "Sequences preempted (pages freed, "
                             "recomputed later) since the start.", registry=r)
    self.free_pages = Gauge(p + "kv_free_pages", "Free KV cache pages.", registry=r)
    self.total_pages = Gauge(p + "kv_total_pages", "KV cache pages.", registry=r)

  def observe_finished(self, req, out) -> None:
    self.requests_finished.labels(out.finish_reason or "length").inc()
    self.prompt_tokens.inc(len(out.prompt_token_ids))
    self.generation_tokens.inc(len(out.token_ids))
    seq = req.seq
    if seq is not None and seq.t_first_token is not None:
      self.ttft.observe(max(seq.t_first_token - req.t_arrival, 0.0))
      self.e2e.observe(max((seq.t_finish or time.perf_counter()) - req.t_arrival, 0.0))
      self.rounds.inc(seq.num_rounds)
      self.accepted.inc(seq.num_accepted)
      self.lookups.inc(seq.num_lookups)
      self.hits.inc(seq.num_hits)

  def render(self, engine) -> bytes:
    """The text format, with the gauges read from the engine now."""
    self.running.set(engine.num_running)
    self.waiting.set(engine.num_waiting)
    self.free_pages.set(engine.free_pages)
    self.preemptions.set(engine.llm.scheduler.num_preemptions)
    self.total_pages.set(engine.llm.blocks.num_pages)
    return generate_latest(self.registry)
