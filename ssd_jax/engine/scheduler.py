"""Between two rounds: who leaves, who grows, who is preempted, who joins.

Pages are given as a sequence needs them, not reserved for its whole max_new_tokens up
front, so a batch holds as many sequences as their actual lengths allow. A running
sequence always has pages for every position the device may write before the host hears
from it again: the host reads results `lag` rounds late, so that is the tokens it has
read plus (lag + 2) rounds' worth plus the method's slack (positions a round writes past
what it keeps). When the pool cannot give a running sequence those pages, the most
recently admitted one is preempted: its pages are freed and it waits at the head of the
queue, to be recomputed from its prompt and the tokens it had (temperature 0: the same
tokens as if never preempted). A request that could never fit in the whole pool is
refused when it is queued.
"""

from __future__ import annotations

import collections
from typing import Callable

import numpy as np

from ssd_jax.engine.batch import Batch, RowPlan
from ssd_jax.engine.pages import OutOfPagesError, PagePool
from ssd_jax.engine.runner import bucket
from ssd_jax.engine.sequence import Sequence, Status


class Scheduler:
  def __init__(self, pool: PagePool, max_batch_size: int, slack_tokens: int,
               round_tokens: int = 1, lag: int = 2):
    self.pool = pool
    self.max_batch_size = max_batch_size
    self.slack_tokens = slack_tokens   # positions written past the last kept token
    self.lookahead = (lag + 2) * round_tokens + slack_tokens
    self.waiting: collections.deque[Sequence] = collections.deque()
    self.running: list[Sequence] = []  # in admission order
    self.num_preemptions = 0

  # -- queue -------------------------------------------------------------------------------
  def reservation(self, seq: Sequence) -> int:
    """Tokens a sequence may occupy at most: prompt + max_new_tokens + slack."""
    return seq.prompt_len + seq.params.max_new_tokens + self.slack_tokens

  def add(self, seq: Sequence) -> None:
    need = self.pool.pages_for(self.reservation(seq))
    if need > self.pool.num_pages:
      raise OutOfPagesError(
          f"request {seq.seq_id} needs {need} KV pages ({self.reservation(seq)} tokens) but "
          f"the cache has {self.pool.num_pages}; raise num_pages or lower max_new_tokens")
    self.waiting.append(seq)

  def provision(self, seq: Sequence) -> int:
    """Tokens `seq` needs pages for now."""
    return min(self.reservation(seq), len(seq.prefill_ids) + self.lookahead)

  # -- between two rounds -----------------------------------------------------------------
  def plan(self, batch: Batch, drain_all: Callable[[], None]) -> RowPlan:
    """The next round's rows. drain_all() reads every result still in flight (so that a
    preempted sequence is recomputed from all the tokens it had); it is called only
    before a preemption."""
    self._release_finished()
    pages_changed = self._grow(drain_all)
    joins = self._admit(len(self.running))
    return self._layout(batch, joins, pages_changed)

  def _release_finished(self) -> None:
    keep = []
    for seq in self.running:
      if seq.is_finished:
        self.pool.free(seq.pages)
        seq.pages = []
      else:
        keep.append(seq)
    self.running = keep

  def _grow(self, drain_all) -> bool:
    """Pages for the next rounds of every running sequence, oldest first; preempts the
    newest while the pool is short. Returns whether any sequence got pages."""
    grew = False
    drained = False
    i = 0
    while i < len(self.running):
      seq = self.running[i]
      need = self.pool.pages_for(self.provision(seq)) - len(seq.pages)
      if need <= 0:
        i += 1
        continue
      if need <= self.pool.num_free:
        seq.pages += self.pool.extend(need)
        grew = True
        i += 1
        continue
      if not drained:  # results in flight may finish sequences (and must reach a victim)
        drain_all()
        drained = True
        self._release_finished()
        i = 0
        continue
      victim = self.running.pop()  # the newest; it may be `seq` itself
      self._preempt(victim)
    return grew

  def _preempt(self, seq: Sequence) -> None:
    self.pool.free(seq.pages)
    seq.pages = []
    seq.status = Status.WAITING
    seq.num_preemptions += 1
    self.num_preemptions += 1
    self.waiting.appendleft(seq)

  def _admit(self, running: int) -> list[Sequence]:
    joins: list[Sequence] = []
    while self.waiting and running + len(joins) < self.max_batch_size:
      seq = self.waiting[0]
      if seq.is_finished:  # aborted while it waited
        self.waiting.popleft()
        continue
      tokens = self.provision(seq)
      # One page of headroom per running sequence, so that admitting does not make the
      # next round preempt at once.
      headroom = running + len(joins)
      if not self.pool.can_allocate(seq.prefill_ids, tokens, headroom):
        break
      self.waiting.popleft()
      seq.pages, seq.num_cached_tokens = self.pool.allocate(seq.prefill_ids, tokens)
      seq.status = Status.RUNNING
      joins.append(seq)
    self.running += joins
    return joins

  def _layout(self, batch: Batch, joins: list[Sequence], pages_changed: bool) -> RowPlan:
    """Rows stay where they are while the batch keeps its size; it grows to the next power
    of two when the rows run out and shrinks when under half of them are used (then the
    rows are packed)."""
    live = {id(s) for s in self.running}
    kept = [(i, s) for i, s in enumerate(batch.rows) if s is not None and id(s) in live]
    n = len(kept) + len(joins)
    size = batch.size
    if n > size or n <= size // 2:
      size = bucket(n) if n else 0
    rows: list[Sequence | None] = [None] * size
    carry = np.full((size,), -1, np.int32)
    if size == batch.size:
      for i, s in kept:
        rows[i], carry[i] = s, i
    else:
      for j, (i, s) in enumerate(kept):
        rows[j], carry[j] = s, i
    free = [r for r in range(size) if rows[r] is None]
    placed = []
    for r, s in zip(free, joins):
      rows[r] = s
      placed.append((r, s))
    width = bucket(max((len(s.pages) for s in rows if s is not None), default=1))
    return RowPlan(old=batch if batch.size else None, new=Batch(rows=rows, width=width),
                   carry=carry, joins=placed,
                   pages_changed=pages_changed or width != batch.width)

  def abort_all(self) -> None:
    """Forget every queued and running sequence and free their pages (after an
    interruption)."""
    for seq in self.running:
      self.pool.free(seq.pages)
      seq.pages = []
    self.running = []
    self.waiting.clear()
