"""The running batch as the host sees it: which sequence sits in which row, its pages, and
how the next round's rows come from the last round's.

Sequences join and leave between rounds (iteration-level scheduling). The device state of
a batch has `size` rows (a power of two: one compiled program per bucket); a row holds a
sequence or nothing. A `RowPlan` says how the rows change: each new row continues an old
row (`carry`), takes a joining sequence (`joins`), or is empty.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ssd_jax.engine.sampling import SamplingArrays
from ssd_jax.engine.sequence import Sequence
from ssd_jax.engine.step import BatchConstants


@dataclasses.dataclass
class Batch:
  rows: list[Sequence | None]   # one per row; len(rows) == size
  width: int                    # page-table width (pages per row), a power of two

  @property
  def size(self) -> int:
    return len(self.rows)

  @property
  def active(self) -> list[Sequence]:
    return [s for s in self.rows if s is not None]

  @property
  def all_greedy(self) -> bool:
    return all(s.params.greedy for s in self.active)

  def page_table(self) -> np.ndarray:
    table = np.zeros((self.size, self.width), np.int32)
    for i, s in enumerate(self.rows):
      if s is not None:
        table[i, :len(s.pages)] = s.pages
    return table

  def constants(self, eos_ids: tuple[int, ...]) -> BatchConstants:
    """The batch's constants (host arrays); empty rows stop at once and write nothing."""
    eos = np.full((max(len(eos_ids), 1),), -1, np.int32)
    eos[:len(eos_ids)] = eos_ids
    params = [s.params if s is not None else None for s in self.rows]
    return BatchConstants(
        page_table=self.page_table(),
        max_new=np.asarray([p.max_new_tokens if p else 1 for p in params], np.int32),
        eos_ids=eos,
        ignore_eos=np.asarray([p.ignore_eos if p else True for p in params]),
        sampling=SamplingArrays.from_params(
            params, self.size, [s.seed if s is not None else 0 for s in self.rows]))


@dataclasses.dataclass
class RowPlan:
  """How `new` comes from `old` (None: the first batch of a run)."""
  old: Batch | None
  new: Batch
  carry: np.ndarray                     # int32 [new.size]: old row, or -1
  joins: list[tuple[int, Sequence]]     # (new row, sequence) prefilled this time
  pages_changed: bool = False           # a carried row's pages grew (or the width changed)

  @property
  def rows_changed(self) -> bool:
    if self.old is None or self.joins or self.old.size != self.new.size:
      return True
    return bool(np.any(self.carry != np.arange(self.new.size)))

  def joined_rows(self, size: int) -> tuple[list[Sequence], np.ndarray]:
    """The joiners in prefill order, and where each goes ([size]; padding -> new.size)."""
    seqs = [s for _, s in self.joins]
    at = np.full((size,), self.new.size, np.int32)
    at[:len(self.joins)] = [r for r, _ in self.joins]
    return seqs, at
