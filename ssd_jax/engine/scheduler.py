"""Admission: which waiting sequences decode together, and their KV pages.

A wave is admitted only when every member's whole reservation (prompt + max_new_tokens +
speculation slack) fits, so a running wave never runs out of pages and nothing needs
preempting; a request that could never fit is refused with a clear error.
"""

from __future__ import annotations

import collections

import numpy as np

from ssd_jax.engine.pages import PagePool, OutOfPagesError
from ssd_jax.engine.loop import Wave
from ssd_jax.engine.runner import bucket
from ssd_jax.engine.sequence import Sequence, Status


class Scheduler:
  def __init__(self, blocks: PagePool, max_batch_size: int, slack_tokens: int):
    self.blocks = blocks
    self.max_batch_size = max_batch_size
    self.slack_tokens = slack_tokens  # positions written past the last kept token (K+1)
    self.waiting: collections.deque[Sequence] = collections.deque()

  def reservation(self, seq: Sequence) -> int:
    return seq.prompt_len + seq.params.max_new_tokens + self.slack_tokens

  def add(self, seq: Sequence) -> None:
    need = self.blocks.pages_for(self.reservation(seq))
    if need > self.blocks.num_pages:
      raise OutOfPagesError(
          f"request {seq.seq_id} needs {need} KV pages ({self.reservation(seq)} tokens) but "
          f"the cache has {self.blocks.num_pages}; raise num_pages or lower max_new_tokens")
    self.waiting.append(seq)

  def next_wave(self) -> Wave | None:
    seqs: list[Sequence] = []
    while self.waiting and len(seqs) < self.max_batch_size:
      seq = self.waiting[0]
      if not self.blocks.can_allocate(seq.prompt_token_ids, self.reservation(seq)):
        break
      self.waiting.popleft()
      seq.pages, seq.num_cached_tokens = self.blocks.allocate(seq.prompt_token_ids,
                                                              self.reservation(seq))
      seq.status = Status.RUNNING
      seqs.append(seq)
    if not seqs:
      return None
    batch = bucket(len(seqs))
    width = bucket(max(len(s.pages) for s in seqs))
    table = np.zeros((batch, width), np.int32)
    for i, s in enumerate(seqs):
      table[i, :len(s.pages)] = s.pages
    return Wave(seqs=seqs, batch=batch, page_table=table)

  def finish_wave(self, wave: Wave) -> None:
    for seq in wave.seqs:
      self.blocks.free(seq.pages)
      seq.pages = []
