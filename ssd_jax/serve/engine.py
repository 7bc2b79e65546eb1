"""One thread owns the LLM and runs the requests of a queue, streaming their text.

Batching here is WAVE-LEVEL, not yet iteration-level (continuous) batching: the engine
thread takes up to `max_batch_size` waiting requests, runs them as one `LLM.generate`
call (the engine's static waves), and only when every one of them has finished does it
take the next ones. A request that arrives during a wave waits for that wave to end.
Joining and leaving the running batch between rounds is the next step (issue 15).

A cancelled request (its client went away) is dropped if it is still waiting; if it is
running, its sequence is marked for abort and the host loop finishes it (reason "abort")
at its next round, so the wave no longer waits for it. Its pages are freed when the wave
ends (the device keeps computing its row until then: static waves cannot shrink).

Events a request receives, in order, through its `sink` (called on the engine thread):
  ("text", str)              new text (engine/stream.py: never past a stop string/EOS)
  ("done", RequestOutput)    once, at the end (also after an abort)
  ("error", str)             instead of "done": the wave failed (one line)
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import Any, Callable

from ssd_jax.engine.sampling import SamplingParams
from ssd_jax.engine.sequence import Sequence
from ssd_jax.engine.stream import TextStream
from ssd_jax.serve.metrics import ServeMetrics

log = logging.getLogger("ssd_jax.serve")

_ids = itertools.count()


@dataclasses.dataclass
class Request:
  prompt_ids: list[int]
  params: SamplingParams
  sink: Callable[[tuple[str, Any]], None]
  request_id: int = dataclasses.field(default_factory=lambda: next(_ids))
  t_arrival: float = dataclasses.field(default_factory=time.perf_counter)
  t_first_text: float | None = None
  cancelled: bool = False
  seq: Sequence | None = None      # set by the engine thread once the request runs
  output: Any = None               # the RequestOutput, at the end

  def cancel(self) -> None:
    """Safe from any thread: the engine drops or aborts the request."""
    self.cancelled = True
    if self.seq is not None:
      self.seq.abort_requested = True


class QueueSink:
  """A sink for threads that block on their events (the chat; tests)."""

  def __init__(self):
    self.q: queue.Queue = queue.Queue()

  def __call__(self, event) -> None:
    self.q.put(event)

  def events(self, poll_s: float = 0.1):
    """Yields events until "done"/"error". Polls, so Ctrl-C reaches the main thread."""
    while True:
      try:
        ev = self.q.get(timeout=poll_s)
      except queue.Empty:
        continue
      yield ev
      if ev[0] in ("done", "error"):
        return


class Engine:
  """The engine thread and its queue. `submit()` from any thread; `close()` to stop."""

  def __init__(self, llm, metrics: ServeMetrics | None = None):
    self.llm = llm
    self.metrics = metrics or ServeMetrics()
    self.max_batch_size = llm.scheduler.max_batch_size
    self._waiting: collections.deque[Request] = collections.deque()
    self._running: list[Request] = []
    self._cv = threading.Condition()
    self._closing = False
    self._thread = threading.Thread(target=self._loop, name="ssd_jax-engine", daemon=True)
    self._thread.start()

  # -- any thread ---------------------------------------------------------------------
  def submit(self, prompt_ids: list[int], params: SamplingParams, sink=None) -> Request:
    """Queues a request whose prompt the caller has checked (serve/app.py). Returns it;
    its events go to `sink` (a QueueSink by default, as `request.sink`)."""
    req = Request(prompt_ids=list(prompt_ids), params=params, sink=sink or QueueSink())
    with self._cv:
      if self._closing:
        raise RuntimeError("the engine is shutting down")
      self._waiting.append(req)
      self.metrics.requests_received.inc()
      self._cv.notify()
    return req

  @property
  def num_waiting(self) -> int:
    return len(self._waiting)

  @property
  def num_running(self) -> int:
    return len(self._running)

  @property
  def free_pages(self) -> int:
    return self.llm.blocks.num_free

  def close(self, timeout: float | None = 30.0) -> None:
    """Stops taking requests; the wave under way finishes, waiting requests get an
    error."""
    with self._cv:
      self._closing = True
      self._cv.notify()
    self._thread.join(timeout)

  # -- the engine thread --------------------------------------------------------------
  def _loop(self) -> None:
    while True:
      with self._cv:
        while not self._waiting and not self._closing:
          self._cv.wait()
        if self._closing:
          left, self._waiting = list(self._waiting), collections.deque()
          break
        wave = []
        while self._waiting and len(wave) < self.max_batch_size:
          req = self._waiting.popleft()
          if req.cancelled:  # its client left while it waited: nothing to run
            self.metrics.requests_finished.labels("abort").inc()
            continue
          wave.append(req)
        self._running = wave
      if wave:
        self._run_wave(wave)
      with self._cv:
        self._running = []
    for req in left:
      _deliver(req, ("error", "the server is shutting down"))

  def _run_wave(self, wave: list[Request]) -> None:
    streams = [TextStream(self.llm._decode_text, r.params.stop) for r in wave]
    hooks = [self._hook(r, s) for r, s in zip(wave, streams)]
    try:
      outs = self.llm.generate([r.prompt_ids for r in wave], [r.params for r in wave],
                               on_tokens=hooks)
    except Exception as e:  # noqa: BLE001 - reported to every client of the wave
      log.exception("wave failed")
      msg = f"generation failed: {type(e).__name__}: {e}".splitlines()[0]
      for r in wave:
        self.metrics.requests_finished.labels("error").inc()
        _deliver(r, ("error", msg))
      return
    for r, out in zip(wave, outs):
      r.output = out
      self.metrics.observe_finished(r, out)
      _deliver(r, ("done", out))

  def _hook(self, req: Request, stream: TextStream):
    def on_tokens(seq: Sequence) -> None:
      if req.seq is None:
        req.seq = seq
        if req.cancelled:  # cancelled between leaving the queue and its first tokens
          seq.abort_requested = True
      if req.cancelled:
        return  # nobody listens any more: skip the decode
      delta = stream.update(seq.output_token_ids, seq.is_finished)
      if delta:
        if req.t_first_text is None:
          req.t_first_text = time.perf_counter()
        _deliver(req, ("text", delta))
    return on_tokens


def _deliver(req: Request, event) -> None:
  """A failing sink (a closed event loop) must not fail the wave of other requests."""
  try:
    req.sink(event)
  except Exception:  # noqa: BLE001
    log.warning("request %d: could not deliver %s", req.request_id, event[0], exc_info=True)
