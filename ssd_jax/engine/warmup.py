"""Every shape an engine compiles programs for, and a warm-up that compiles them all, so a
long-lived engine (a server) compiles nothing while it serves.

Programs are compiled per shape bucket: a batch of B rows (a power of two up to
bucket(max_batch_size)), a page-table width W (pages per row, a power of two), and whether
every row is greedy (argmax-only programs) or some sample. Besides each method's round
programs at (B, W, sampling), a batch update (engine/batch.py) runs the joiners' prefill
at (B_j, tokens, W) and first-token programs at (B_j, W), and moves rows between sizes:
carry programs for every pair (B_old, B_new) and placement programs for B_j <= B_new.
The warm-up drives the method's own update() and round() with plans that visit each of
these shapes once, using one-token dummy requests.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from ssd_jax.engine.batch import Batch, RowPlan
from ssd_jax.engine.observe import RoundObserver
from ssd_jax.engine.runner import bucket
from ssd_jax.engine.sampling import SamplingParams
from ssd_jax.engine.sequence import Sequence, Status


def _powers(lo: int, hi: int) -> list[int]:
  return [1 << e for e in range(lo.bit_length() - 1, hi.bit_length())]


def shape_buckets(llm) -> dict:
  """See LLM.shape_buckets."""
  sched, pool = llm.scheduler, llm.blocks
  slack = sched.slack_tokens
  batches = _powers(1, bucket(sched.max_batch_size))
  widest = min(pool.pages_for(llm.max_model_len + slack), pool.num_pages)
  widths = _powers(bucket(pool.pages_for(2 + slack)), bucket(widest))
  prefill = {}
  for w in widths:
    longest = max(1, min(w * pool.page_size - 1 - slack, llm.max_model_len - 1))
    prefill[w] = _powers(16, bucket(longest, 16))
  nb, nw = len(batches), len(widths)
  pairs = nb * nb                  # carry programs, (B_old, B_new)
  placed = nb * (nb + 1) // 2      # placement programs, (B_new, B_j <= B_new)
  models = 1 if llm.draft is None else 2
  prefills = models * nb * sum(len(t) for t in prefill.values())
  first = 2 * nb * nw              # first-token programs, (B_j, W, sampling)
  if llm.method == "ar":
    programs = 2 * nb * nw + first + pairs + placed
  elif llm.method == "sd":
    programs = 2 * 2 * nb * nw + first + pairs + placed
  else:  # verify per (B, W, sampling); lookup and build twice as many (their draft state
    # comes from an update's placement or from the last lookup: laid out apart); the
    # draft's first speculation per (B_j, W, sampling); carries of the target's rows, the
    # draft's state, the lookup's flags and q; one-hot q for greedy rows joined by sampled
    # ones; three placements
    programs = (10 * nb * nw + 2 * nb * nw + first + 4 * pairs + nb + 3 * placed)
  return {"batch": batches, "table_widths": widths, "prefill_tokens": prefill,
          "sampling": ["greedy", "sampled"], "programs": programs + prefills}


class _Dummies:
  """One-token requests with pages from the engine's pool, freed afterwards."""

  def __init__(self, llm):
    self.llm = llm
    self.seqs: list[Sequence] = []

  def make(self, n: int, greedy: bool, width: int) -> list[Sequence]:
    pool, sched = self.llm.blocks, self.llm.scheduler
    max_new = 2 if pool.pages_for(3 + sched.slack_tokens) <= width else 1
    out = []
    for _ in range(n):
      seq = Sequence(prompt_token_ids=[1], params=SamplingParams(
          max_new_tokens=max_new, ignore_eos=True, temperature=0.0 if greedy else 1.0,
          seed=0), t_arrival=time.perf_counter())
      seq.pages, seq.num_cached_tokens = pool.allocate(seq.prefill_ids,
                                                       sched.reservation(seq))
      seq.status = Status.RUNNING
      out.append(seq)
    self.seqs += out
    return out

  def free(self) -> None:
    for seq in self.seqs:
      self.llm.blocks.free(seq.pages)
      seq.pages = []
    self.seqs = []


def _first_plan(seqs: list[Sequence], size: int, width: int) -> RowPlan:
  rows = seqs + [None] * (size - len(seqs))
  return RowPlan(old=None, new=Batch(rows=rows, width=width),
                 carry=np.full((size,), -1, np.int32), joins=list(enumerate(seqs)))


def _rounds(method, state, batch: Batch, obs):
  """Two rounds: the second one's inputs come from a round's outputs, not an update's
  (outputs of different programs need not be laid out alike, and jit keys on that)."""
  for _ in range(2):
    state, _, count, _ = method.round(state, batch, obs)
  np.asarray(count)
  return state


def warm_all_buckets(llm, progress: bool) -> float:
  """See LLM.warmup(all_buckets=True)."""
  b = shape_buckets(llm)
  method = llm.decoding
  runners = (llm.target,) if llm.draft is None else (llm.target, llm.draft)
  steps = []
  for greedy in (True, False):
    steps += [("join", bn, bj, w, greedy) for w in b["table_widths"] for bn in b["batch"]
              for bj in b["batch"] if bj <= bn]
    steps += [("move", ba, bn, old_greedy, greedy) for ba in b["batch"]
              for bn in b["batch"] for old_greedy in (True, False)]
  steps += [("prefill", bj, w, t, None) for bj in b["batch"] for w in b["table_widths"]
            for t in b["prefill_tokens"][w]]
  t0 = time.perf_counter()
  c0 = method.num_compilations()
  obs = RoundObserver()
  w_min = b["table_widths"][0]
  if progress:
    sys.stderr.write(f"  warmup: {len(steps)} shape sets, at most {b['programs']} programs "
                     "to compile")
  for i, (kind, x, y, z, greedy) in enumerate(steps, 1):
    dummies = _Dummies(llm)
    try:
      if kind == "join":  # (B_new, B_j, W): a first batch; at B_j = 1 rounds too
        bn, bj, w = x, y, z
        plan = _first_plan(dummies.make(bj, greedy, w), bn, w)
        state, _ = method.update(None, plan, obs)
        if bj == 1:
          _rounds(method, state, plan.new, obs)
      elif kind == "move":  # (B_old -> B_new): every row carried or emptied, none joins
        ba, bn, old_greedy = x, y, z
        plan = _first_plan(dummies.make(1, old_greedy, w_min), ba, w_min)
        state, _ = method.update(None, plan, obs)
        state = _rounds(method, state, plan.new, obs)
        stay = dummies.make(1, greedy, w_min)
        rows = stay + [None] * (bn - 1)
        carry = np.full((bn,), -1, np.int32)
        plan = RowPlan(old=plan.new, new=Batch(rows=rows, width=w_min), carry=carry,
                       joins=[])
        method.update(state, plan, obs)
      else:
        for runner in runners:
          runner.warm_prefill(x, z, y)
      method.finish()
    finally:
      dummies.free()
    if progress:
      spent = time.perf_counter() - t0
      sys.stderr.write(f"\r  warmup: {i}/{len(steps)} shape sets, "
                       f"{method.num_compilations() - c0} programs, {spent:.1f} s, "
                       f"~{spent / i * (len(steps) - i):.0f} s left ")
      sys.stderr.flush()
  if progress:
    sys.stderr.write("\n")
  return time.perf_counter() - t0
