"""Optional instrumentation of the host loop, passed to `DecodingMethod.run_wave`.

The decoding methods keep no timing state: they report their host dispatches and, in
profile mode, the split of a round through the observer they are handed.

  profile=True     blocks at the end of every round to time it (work inside a round still
                   overlaps). Off by default: it stops the host from running ahead.
  trace_host=True  times each host-side dispatch of a round and adds no synchronisation:
                   a dispatch that takes as long as the device work before it is a host
                   stall (e.g. a `lax.cond` on GPU, whose predicate XLA copies to the host).

Phases may be recorded from several host threads (SSD's draft thread); list appends are
atomic in CPython, so no lock is needed.
"""

from __future__ import annotations

import collections
import contextlib
import time

import numpy as np


class RoundObserver:
  def __init__(self, profile: bool = False, trace_host: bool = False):
    self.profile = profile
    self.trace_host = trace_host
    self.round_times: list[tuple[float, bool | None]] = []  # (seconds, all looked-up hit)
    self.phase_times: dict[str, list[float]] = collections.defaultdict(list)

  @contextlib.contextmanager
  def host(self, name: str):
    """Times the enclosed host work as phase `host_<name>` when trace_host is on."""
    if not self.trace_host:
      yield
      return
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self.phase_times[f"host_{name}"].append(time.perf_counter() - t0)

  def round_read(self, rows: list, count: np.ndarray, info: dict) -> None:
    """Called once per round when the host reads its results (lagged), on the caller's
    thread: rows[i] is the Sequence in batch row i (None for an empty row), count[i] the
    tokens it emitted, info the round's per-row arrays as numpy (SD/SSD: "accepted";
    SSD: "hit", "looked_up"). The base observer ignores it; a subclass may record
    per-round traces (bench/)."""

  def phase(self, name: str, seconds: float) -> None:
    self.phase_times[name].append(seconds)

  def round_done(self, seconds: float, info: dict) -> None:
    """A profiled round: it counts as a hit when every sequence that looked up hit."""
    all_hit = None
    if "hit" in info:
      hit, asked = np.asarray(info["hit"]), np.asarray(info["looked_up"])
      all_hit = bool(np.all(hit[asked])) if asked.any() else None
    self.round_times.append((seconds, all_hit))

  def summary(self) -> dict:
    """Median round wall time (split by SSD cache hit / miss) and of every phase, in ms."""
    times = [t for t, _ in self.round_times]
    out = {"profiled_round_ms": 1e3 * float(np.median(times))} if times else {}
    hits = [t for t, h in self.round_times if h]
    misses = [t for t, h in self.round_times if h is False]
    if hits:
      out["hit_round_ms"] = 1e3 * float(np.median(hits))
    if misses:
      out["miss_round_ms"] = 1e3 * float(np.median(misses))
    for name, vals in self.phase_times.items():
      if vals:
        out[f"{name}_ms"] = 1e3 * float(np.median(vals))
    return out
