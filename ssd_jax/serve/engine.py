"""One thread owns the LLM and runs the requests of a queue, streaming their text.

Batching is iteration-level (continuous): the engine thread runs the LLM's host loop
(engine/loop.py) for as long as the server lives; between two rounds the requests that
arrived join the running batch (prefill, then decode with the others) and finished ones
leave it, their pages freed at once. When nothing is running the thread sleeps until a
request arrives.

A cancelled request (its client went away) is dropped if it is still waiting; if it is
running, its sequence is marked for abort, and before the next round the loop finishes
it (reason "abort") and frees its pages.

Events a request receives, in order, through its `sink` (called on the engine thread):
  ("text", str)              new text (engine/stream.py: never past a stop string/EOS)
  ("done", RequestOutput)    once, at the end (also after an abort)
  ("error", str)             instead of "done": the request failed (one line)
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
  t_last_token: float | None = None
  num_tokens: int = 0
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
    self._incoming: collections.deque[Request] = collections.deque()
    self._active: dict[int, Request] = {}  # seq_id -> request, admitted to the scheduler
    self._cv = threading.Condition()
    self._closing = False
    self._thread = threading.Thread(target=self._main, name="ssd_jax-engine", daemon=True)
    self._thread.start()

  # -- any thread ---------------------------------------------------------------------
  def submit(self, prompt_ids: list[int], params: SamplingParams, sink=None) -> Request:
    """Queues a request whose prompt the caller has checked (serve/app.py). Returns it;
    its events go to `sink` (a QueueSink by default, as `request.sink`)."""
    req = Request(prompt_ids=list(prompt_ids), params=params, sink=sink or QueueSink())
    with self._cv:
      if self._closing:
        raise RuntimeError("the engine is shutting down")
      self._incoming.append(req)
      self.metrics.requests_received.inc()
      self._cv.notify()
    return req

  @property
  def num_waiting(self) -> int:
    return len(self._incoming) + len(self.llm.scheduler.waiting)

  @property
  def num_running(self) -> int:
    return len(self.llm.scheduler.running)

  @property
  def free_pages(self) -> int:
    return self.llm.blocks.num_free

  def close(self, timeout: float | None = 30.0) -> None:
    """Stops taking requests: waiting ones get an error, running ones finish."""
    with self._cv:
      self._closing = True
      self._cv.notify()
    self._thread.join(timeout)

  # -- the engine thread --------------------------------------------------------------
  def _main(self) -> None:
    while True:
      try:
        self.llm.serve(self._poll)
        break
      except Exception as e:  # noqa: BLE001 - reported to every request it touched
        log.exception("the engine loop failed")
        self._fail_all(f"generation failed: {type(e).__name__}: {e}".splitlines()[0])
    with self._cv:
      left, self._incoming = list(self._incoming), collections.deque()
    for req in left:
      _deliver(req, ("error", "the server is shutting down"))

  def _poll(self, idle: bool) -> bool:
    """The loop's hook between rounds (engine/loop.py): admit what arrived; with idle,
    sleep until something does. Returns False to end the loop (closing, nothing left)."""
    with self._cv:
      while idle and not self._incoming and not self._closing:
        self._cv.wait()
      new, self._incoming = list(self._incoming), collections.deque()
      closing = self._closing
    for req in new:
      if closing:
        _deliver(req, ("error", "the server is shutting down"))
      else:
        self._admit(req)
    if closing:  # stop admitting: what still waits for a row gets an error
      for seq in list(self.llm.scheduler.waiting):
        req = self._active.pop(seq.seq_id, None)
        if req is not None:
          seq.finish("abort")
          self.metrics.requests_finished.labels("error").inc()
          _deliver(req, ("error", "the server is shutting down"))
      self.llm.scheduler.waiting.clear()
    return not (closing and idle)

  def _admit(self, req: Request) -> None:
    if req.cancelled:  # its client left while it waited: nothing to run
      self.metrics.requests_finished.labels("abort").inc()
      return
    try:
      seq = self.llm.make_sequence(req.prompt_ids, req.params, t_arrival=req.t_arrival)
      seq.on_tokens = self._hook(req, TextStream(self.llm._decode_text, req.params.stop))
      req.seq = seq
      if req.cancelled:
        seq.abort_requested = True
      self.llm.scheduler.add(seq)
    except Exception as e:  # noqa: BLE001 - a request the engine cannot take
      self.metrics.requests_finished.labels("error").inc()
      _deliver(req, ("error", str(e).splitlines()[0]))
      return
    self._active[seq.seq_id] = req

  def _fail_all(self, msg: str) -> None:
    for req in list(self._active.values()):
      self.metrics.requests_finished.labels("error").inc()
      _deliver(req, ("error", msg))
    self._active.clear()
    self.llm.recover()

  def _hook(self, req: Request, stream: TextStream):
    def on_tokens(seq: Sequence) -> None:
      now = time.perf_counter()
      if not req.cancelled:
        n = len(seq.output_token_ids) - req.num_tokens
        if n > 0 and req.t_last_token is not None:  # tokens that came together share it
          for _ in range(n):
            self.metrics.itl.observe((now - req.t_last_token) / n)
        if n > 0:
          req.num_tokens, req.t_last_token = len(seq.output_token_ids), now
        delta = stream.update(seq.output_token_ids, seq.is_finished)
        if delta:
          if req.t_first_text is None:
            req.t_first_text = now
          _deliver(req, ("text", delta))
      if seq.is_finished:
        self._active.pop(seq.seq_id, None)
        out = self.llm._output(seq)
        req.output = out
        self.metrics.observe_finished(req, out)
        _deliver(req, ("done", out))
    return on_tokens
def _deliver(req: Request, event) -> None:
  """A failing sink (a closed event loop) must not fail the other requests."""
  try:
    req.sink(event)
  except Exception:  # noqa: BLE001
    log.warning("request %d: could not deliver %s", req.request_id, event[0], exc_info=True)
