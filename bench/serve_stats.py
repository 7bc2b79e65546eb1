"""The serving benchmark's arithmetic, apart from any network code so that it can be checked
against hand-computed values: per-request timings -> one run's metrics, Poisson arrival
times, and the server's Prometheus counters -> acceptance and cache hit rate.

Definitions follow `vllm bench serve` / sglang `bench_serving`:
  TTFT   send -> first chunk carrying text (empty chunks, e.g. chat's role chunk, skipped)
  TPOT   per request with > 1 output token: (E2E - TTFT) / (output tokens - 1)
  ITL    every gap between consecutive text chunks, pooled over all requests. A chunk can
         carry several tokens (SD/SSD accept several per round), so ITL is per chunk, not
         per token; `tokens_per_chunk` says how many a chunk held on average
  E2E    send -> the end of the response
  request / output throughput: completed requests / output tokens of completed requests
         over the run's duration (first send -> last response's end)
Every latency is reported in ms as mean, median, std and p99 (numpy's linear
interpolation, as both tools). An empty set gives None, never NaN (JSON has no NaN).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np


@dataclasses.dataclass
class RequestResult:
  """One request, timed on the client (time.perf_counter seconds)."""
  ok: bool
  prompt_len: int
  t_send: float
  t_end: float
  chunk_times: list = dataclasses.field(default_factory=list)  # arrivals of text chunks
  output_tokens: int = 0           # the server's usage.completion_tokens
  finish_reason: str | None = None
  error: str | None = None
  t_scheduled: float | None = None  # the Poisson arrival (before any concurrency wait)

  @property
  def ttft(self) -> float | None:
    return self.chunk_times[0] - self.t_send if self.chunk_times else None

  @property
  def e2e(self) -> float:
    return self.t_end - self.t_send

  @property
  def tpot(self) -> float | None:
    if self.ttft is None or self.output_tokens < 2:
      return None
    return (self.e2e - self.ttft) / (self.output_tokens - 1)

  @property
  def itls(self) -> list:
    c = self.chunk_times
    return [b - a for a, b in zip(c, c[1:])]


def distribution_ms(values_s) -> dict:
  """mean / median / std / p99 in milliseconds of values in seconds; Nones if empty."""
  v = np.asarray([x for x in values_s if x is not None], dtype=np.float64) * 1e3
  if v.size == 0:
    return {"mean": None, "median": None, "std": None, "p99": None, "n": 0}
  return {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()),
          "p99": float(np.percentile(v, 99)), "n": int(v.size)}


def summarize(results: list, duration_s: float) -> dict:
  """One run's metrics from its requests (ok or not) and its wall time."""
  done = [r for r in results if r.ok]
  out_tokens = sum(r.output_tokens for r in done)
  in_tokens = sum(r.prompt_len for r in done)
  chunks = sum(len(r.chunk_times) for r in done)
  per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: None)
  return {
      "completed": len(done), "failed": len(results) - len(done),
      "duration_s": duration_s,
      "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
      "request_throughput": per_s(len(done)),
      "output_throughput": per_s(out_tokens),
      "total_token_throughput": per_s(in_tokens + out_tokens),
      "ttft_ms": distribution_ms(r.ttft for r in done),
      "tpot_ms": distribution_ms(r.tpot for r in done),
      "itl_ms": distribution_ms(x for r in done for x in r.itls),
      "e2el_ms": distribution_ms(r.e2e for r in done),
      "tokens_per_chunk": out_tokens / chunks if chunks else None,
      "errors": sorted({r.error for r in results if not r.ok and r.error})[:5],
  }


def arrival_offsets(n: int, rate: float, seed: int) -> list:
  """Send times (s after the start) of n requests: a Poisson process of `rate` requests/s
  (exponential gaps; the first request at 0), or all at once for rate inf."""
  if n <= 0:
    return []
  if math.isinf(rate):
    return [0.0] * n
  if rate <= 0:
    raise ValueError(f"request rate must be > 0 or inf, got {rate}")
  gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n - 1)
  return [0.0] + [float(x) for x in np.cumsum(gaps)]


# -- the server's counters -----------------------------------------------------------------
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
COUNTERS = ("decode_rounds", "accepted_draft_tokens", "ssd_cache_lookups", "ssd_cache_hits",
            "generation_tokens", "prompt_tokens", "requests_received")


def parse_prometheus(text: str, prefix: str = "ssd_jax_") -> dict:
  """{counter name without prefix and `_total`: value summed over its label sets} for the
  counters of COUNTERS found in a Prometheus text exposition."""
  out: dict = {}
  for line in text.splitlines():
    if not line or line.startswith("#"):
      continue
    m = _SAMPLE.match(line)
    if not m or not m.group(1).startswith(prefix):
      continue
    name = m.group(1)[len(prefix):]
    if name.endswith("_total"):
      name = name[:-len("_total")]
    if name not in COUNTERS:
      continue
    try:
      out[name] = out.get(name, 0.0) + float(m.group(3))
    except ValueError:
      continue
  return out


def server_deltas(before: dict | None, after: dict | None,
                  speculative: bool = True) -> dict | None:
  """What the server counted during a run: counter deltas, SD/SSD mean accepted draft
  tokens per round (accepted / rounds, as the harness's `mean_accepted`; None for a server
  known not to speculate, as the harness's AR rows) and the SSD cache hit rate (hits /
  lookups). None where the counters were not scraped; a ratio is None when its
  denominator did not move (SD and AR look nothing up)."""
  if before is None or after is None:
    return None
  d = {k: after[k] - before.get(k, 0.0) for k in after}
  ratio = lambda a, b: d[a] / d[b] if d.get(b) else None  # noqa: E731
  return {"deltas": d,
          "mean_accepted": ratio("accepted_draft_tokens", "decode_rounds") if speculative
          else None,
          "cache_hit_rate": ratio("ssd_cache_hits", "ssd_cache_lookups")}
