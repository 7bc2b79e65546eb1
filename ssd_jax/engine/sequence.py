"""A request as the engine tracks it: tokens in, tokens out, pages held, timings."""

from __future__ import annotations

import dataclasses
import enum
import itertools
import secrets
import time
from typing import Callable

from ssd_jax.engine.sampling import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
  WAITING = "waiting"
  RUNNING = "running"
  FINISHED = "finished"


@dataclasses.dataclass
class Sequence:
  prompt_token_ids: list[int]
  params: SamplingParams
  prompt: str | None = None
  seq_id: int = dataclasses.field(default_factory=lambda: next(_ids))
  status: Status = Status.WAITING
  output_token_ids: list[int] = dataclasses.field(default_factory=list)
  pages: list[int] = dataclasses.field(default_factory=list)
  num_cached_tokens: int = 0      # prompt tokens whose KV came from the prefix cache
  finish_reason: str | None = None
  # The PRNG seed of every draw this sequence makes (engine/sampling.py): the request's,
  # or a fresh one when it gave none.
  seed: int | None = None
  num_preemptions: int = 0
  # Timings (host clock, seconds) and per-request speculation counters.
  t_arrival: float = 0.0
  t_first_token: float | None = None
  t_finish: float | None = None
  num_rounds: int = 0
  num_accepted: int = 0           # draft tokens accepted, summed over rounds
  num_lookups: int = 0            # SSD cache lookups
  num_hits: int = 0
  # Streaming and cancellation (serve/): on_tokens(seq) runs on the engine's thread after
  # each batch of new tokens and once at finish; it must be quick (it delays the next
  # round). abort_requested=True makes the host loop finish the sequence (reason
  # "abort") at its next round, so the wave stops waiting for it.
  on_tokens: Callable[["Sequence"], None] | None = dataclasses.field(default=None,
                                                                     repr=False)
  abort_requested: bool = False

  def __post_init__(self):
    if self.seed is None:
      self.seed = self.params.seed if self.params.seed is not None else secrets.randbits(32)

  @property
  def prompt_len(self) -> int:
    return len(self.prompt_token_ids)

  @property
  def prefill_ids(self) -> list[int]:
    """What a prefill of this sequence computes: its prompt, and after a preemption the
    tokens it had generated too (they are recomputed, not regenerated)."""
    return self.prompt_token_ids + self.output_token_ids

  def finish(self, reason: str) -> None:
    self.status = Status.FINISHED
    self.finish_reason = reason
    self.t_finish = time.perf_counter()

  @property
  def is_finished(self) -> bool:
    return self.status is Status.FINISHED
