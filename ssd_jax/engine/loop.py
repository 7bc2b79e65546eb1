"""The host loop every decoding method shares: iteration-level scheduling of a running
batch, and results read with a lag.

A decoding method (AR, SD, SSD) implements `update(state, plan)`, which applies a
`RowPlan` (engine/batch.py) between two rounds (prefill the sequences that join, carry or
drop the others' rows; its state is a pytree with one row per batch row), and
`round(state, batch)`, which dispatches one round and returns the tokens it emitted.

Between two rounds the scheduler (engine/scheduler.py) lets finished sequences leave
(their pages freed at once), gives running ones the pages their next rounds may write,
preempts the newest when the pool runs dry, and admits waiting ones into free rows. The
loop never waits on the round it just dispatched: it reads the tokens of a round `lag`
rounds back, so the devices always have queued work. The copies of those tokens to the
host start as soon as a round is dispatched (`copy_to_host_async`), so the lagged read
finds them there. Each round's results name the sequences that held its rows when it was
dispatched, so rows may change hands while results are still in flight. Timing is the
optional observer's (engine/observe.py), not the methods'.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable

import jax
import numpy as np

from ssd_jax.engine.batch import Batch, RowPlan
from ssd_jax.engine.observe import RoundObserver
from ssd_jax.engine.runner import bucket
from ssd_jax.engine.sequence import Sequence


@dataclasses.dataclass
class Joiners:
  """Sequences joining a batch, as a batch of their own (engine/batch.py)."""
  batch: Batch
  join_at: np.ndarray      # int32 [B_j]: each one's row in the new batch (padding: beyond)
  prompt_len: np.ndarray   # int32 [B_j]: tokens prefilled (prompt, + output if recomputed)
  before: np.ndarray       # int32 [B_j]: tokens generated before (a recomputed sequence)

  def prefill(self, runner):
    """Prefill them on `runner` (from the thread that drives it); its logits [B_j, V]."""
    seqs = self.batch.active
    return runner.prefill([s.prefill_ids[s.num_cached_tokens:] for s in seqs],
                          [s.num_cached_tokens for s in seqs], self.batch.page_table(),
                          self.batch.size)


@dataclasses.dataclass
class RunStats:
  rounds: int = 0
  decode_s: float = 0.0    # from the first tokens on the host to the end
  prefill_s: float = 0.0   # from the start to the first tokens on the host
  preemptions: int = 0


class DecodingMethod:
  """Base class of AR, SD and SSD: subclasses implement update(), round() and
  num_compilations()."""

  lag = 2  # rounds the host reads behind the newest dispatched round
  round_tokens = 1  # most tokens a row emits per round
  slack_tokens = 0  # positions a round may write past the last token it emits

  def __init__(self, tokenizer_decode, eos_ids: tuple[int, ...]):
    self.decode_text = tokenizer_decode
    self.eos_ids = tuple(eos_ids)

  def update(self, state, plan: RowPlan, obs: RoundObserver):
    """Apply `plan` (state None: the first batch of a run); returns (state, first) where
    first is None or (rows, tokens [B_j, 1], count [B_j]): the joiners' first tokens,
    device arrays in the order of `rows`."""
    raise NotImplementedError

  def round(self, state, batch: Batch, obs: RoundObserver):
    """Dispatch one round; return (state, emitted [B, N], count [B], info dict of device
    arrays for metrics, e.g. accepted/hit)."""
    raise NotImplementedError

  def num_compilations(self) -> int:
    raise NotImplementedError

  @staticmethod
  def joiners(plan: RowPlan) -> "Joiners":
    """The joining sequences of `plan` as a batch of their own, padded to a power of two
    (their prefill and first-token programs run at that size)."""
    bj = bucket(len(plan.joins))
    seqs, join_at = plan.joined_rows(bj)
    sub = Batch(rows=seqs + [None] * (bj - len(seqs)), width=plan.new.width)
    prompt_len = np.zeros((bj,), np.int32)
    before = np.zeros((bj,), np.int32)
    prompt_len[:len(seqs)] = [len(s.prefill_ids) for s in seqs]
    before[:len(seqs)] = [len(s.output_token_ids) for s in seqs]
    return Joiners(batch=sub, join_at=join_at, prompt_len=prompt_len, before=before)

  def first_tokens(self, plan: RowPlan, target, first_program):
    """Prefill the joiners on `target` and sample their first tokens with first_program
    (a jitted engine.step.first_token_state); returns (joiners, their decode state [B_j],
    (sequences, first tokens, count) for the host loop)."""
    j = self.joiners(plan)
    logits = j.prefill(target)
    sub_consts = target.put(j.batch.constants(self.eos_ids))
    decode_j, tokens, count = first_program(logits, sub_consts,
                                            *target.put((j.prompt_len, j.before)),
                                            greedy=j.batch.all_greedy)
    return j, decode_j, (j.batch.active, tokens, count)

  def finish(self) -> None:
    """Called when a run's last round has been read or the batch emptied: wait for host
    work of the method still under way (SSD's draft thread)."""

  def in_flight(self):
    """Device arrays of work a round dispatched that its outputs do not cover (SSD's
    cache for the next lookup); profile mode waits for them too."""
    return ()

  # -- the host loop ---------------------------------------------------------------------
  def run(self, scheduler, progress: Callable[[int], None] | None = None,
          obs: RoundObserver | None = None,
          poll: Callable[[bool], bool] | None = None) -> RunStats:
    """Decode until every sequence queued in `scheduler` has finished.

    poll(idle): called before every round (idle=False) and when nothing is running or
    queued (idle=True), e.g. to queue newly arrived requests; with idle=True it may block
    until there is work, and returns False to end the run. Without it the run ends when
    the queue is empty."""
    obs = obs or RoundObserver()
    stats = RunStats()
    self._stats, self._progress, self._obs = stats, progress, obs
    self._emitted = 0
    self._t0 = time.perf_counter()
    self._t_first = None
    preemptions0 = scheduler.num_preemptions
    batch = Batch(rows=[], width=1)
    state = None
    pending: collections.deque = collections.deque()
    drain_all = lambda: self._drain_all(pending)
    while True:
      if poll is not None:
        poll(False)
      for s in batch.active:  # a client went away: stop waiting for its sequence
        if s.abort_requested and not s.is_finished:
          self._finish(s, "abort")
      plan = scheduler.plan(batch, drain_all)
      stats.preemptions = scheduler.num_preemptions - preemptions0
      if not plan.new.active:  # nothing running, nothing admitted
        drain_all()
        if state is not None:
          self.finish()
          state = None
        batch = plan.new
        if scheduler.waiting:  # every page is free: the scheduler admits into an empty batch
          raise RuntimeError("the scheduler admitted nothing into an empty batch")
        if poll is None or not poll(True):
          break
        continue
      if state is None or plan.rows_changed or plan.pages_changed:
        with obs.host("update"):
          state, first = self.update(state, plan, obs)
        if first is not None:
          rows, tokens, count = first
          for x in (tokens, count):
            x.copy_to_host_async()
          pending.append((rows, tokens, count, {}, True))
      batch = plan.new
      t_round = time.perf_counter()
      with obs.host("round"):
        state, emitted, count, info = self.round(state, batch, obs)
      stats.rounds += 1
      if obs.profile:
        jax.block_until_ready((state, emitted, count, info, self.in_flight()))
        obs.round_done(time.perf_counter() - t_round, info)
      # Start the device-to-host copies now; the lagged read below then finds the data
      # on the host instead of waiting for a transfer between two dispatches.
      for x in (emitted, count, *info.values()):
        x.copy_to_host_async()
      pending.append((list(batch.rows), emitted, count, info, False))
      while len(pending) > self.lag:
        with obs.host("drain"):
          self._drain(pending.popleft())
    drain_all()
    self.finish()
    t_end = time.perf_counter()
    t_first = self._t_first or t_end
    stats.prefill_s = t_first - self._t0
    stats.decode_s = t_end - t_first
    return stats

  def _drain_all(self, pending) -> None:
    while pending:
      self._drain(pending.popleft())

  def _drain(self, item) -> None:
    rows, emitted, count, info, is_first = item
    emitted, count = np.asarray(emitted), np.asarray(count)
    now = time.perf_counter()
    if self._t_first is None:
      self._t_first = now
    if is_first:
      for i, seq in enumerate(rows):
        if seq.t_first_token is None:  # (a recomputed sequence keeps its first)
          seq.t_first_token = now
        self._emit(seq, emitted[i, :count[i]])
      self._report()
      return
    info = {k: np.asarray(v) for k, v in info.items()}
    self._obs.round_read([s if s is not None and not s.is_finished else None for s in rows],
                         count, info)
    for i, seq in enumerate(rows):
      if seq is None or seq.is_finished:
        continue
      if count[i] == 0:  # the device stopped it in an earlier round: nothing more comes
        self._finish(seq, "length")
        continue
      seq.num_rounds += 1
      if "accepted" in info:
        seq.num_accepted += int(info["accepted"][i])
      if "hit" in info and info.get("looked_up", np.ones_like(info["hit"]))[i]:
        seq.num_lookups += 1
        seq.num_hits += int(info["hit"][i])
      self._emit(seq, emitted[i, :count[i]])
    self._report()

  def _report(self) -> None:
    if self._progress is not None:
      self._progress(self._emitted)

  def _emit(self, seq: Sequence, tokens) -> None:
    if seq.is_finished:
      return
    p = seq.params
    n0 = len(seq.output_token_ids)
    try:
      for tok in tokens:
        tok = int(tok)
        seq.output_token_ids.append(tok)
        if not p.ignore_eos and tok in self.eos_ids:
          self._finish(seq, "stop")
          return
        if p.stop and self._hit_stop_string(seq):
          self._finish(seq, "stop")
          return
        if len(seq.output_token_ids) >= p.max_new_tokens:
          self._finish(seq, "length")
          return
    finally:
      self._emitted += len(seq.output_token_ids) - n0
    if seq.on_tokens is not None:  # (a finish above has notified already)
      seq.on_tokens(seq)

  def _hit_stop_string(self, seq: Sequence) -> bool:
    tail = self.decode_text(seq.output_token_ids[-32:])
    return any(s in tail for s in seq.params.stop)

  def _finish(self, seq: Sequence, reason: str) -> None:
    seq.finish(reason)
    if seq.on_tokens is not None:
      seq.on_tokens(seq)
