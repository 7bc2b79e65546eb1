"""SSD's speculation cache: which verification outcomes to prepare for, and lookup.

An outcome is (a, r'): a draft tokens accepted, then recovery token r'. The fan-out list
f_0..f_K says how many recovery candidates to prepare after each acceptance length; the
candidates for length a are the draft's top-f_a tokens at glue position a, excluding
d_{a+1} when a < K (had the target produced d_{a+1} there, it would have been accepted).
Saguaro uses one list after a cache hit and another after a miss; both must have the same
number of branches M so that one compiled program serves both (chosen per sequence).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def parse_fanout(value, k: int, name: str = "fan-out") -> tuple[int, ...]:
  """A fan-out list from "3,3,2,..." or a sequence; one entry per a = 0..K."""
  if isinstance(value, str):
    try:
      value = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
      raise ValueError(f"{name} {value!r} must be comma-separated integers") from None
  value = tuple(int(v) for v in value)
  if len(value) != k + 1:
    raise ValueError(f"{name} has {len(value)} entries but needs K+1 = {k + 1} "
                     "(one per acceptance length 0..K)")
  if any(v < 0 for v in value) or sum(value) == 0:
    raise ValueError(f"{name} {list(value)} must be >= 0 with at least one branch")
  return value


@dataclasses.dataclass(frozen=True)
class FanoutPlan:
  k: int
  after_hit: tuple[int, ...]
  after_miss: tuple[int, ...]

  def __post_init__(self):
    if sum(self.after_hit) != sum(self.after_miss):
      raise ValueError(
          f"fan-out after a hit {list(self.after_hit)} has {sum(self.after_hit)} branches but "
          f"after a miss {list(self.after_miss)} has {sum(self.after_miss)}; they must have "
          "the same total so one compiled tree decode serves both")

  @property
  def num_branches(self) -> int:
    return sum(self.after_hit)

  @property
  def max_f(self) -> int:
    return max(max(self.after_hit), max(self.after_miss))

  @staticmethod
  def branches(fanout: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(acceptance length, candidate rank) of each branch, ordered by a then rank."""
    a = [i for i, f in enumerate(fanout) for _ in range(f)]
    rank = [r for f in fanout for r in range(f)]
    return np.asarray(a, np.int32), np.asarray(rank, np.int32)

  def branch_arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """[2, M] arrays: row 0 after a hit, row 1 after a miss."""
    ah, rh = self.branches(self.after_hit)
    am, rm = self.branches(self.after_miss)
    return np.stack([ah, am]), np.stack([rh, rm])


def recovery_candidates(glue_logits, draft_tokens, branch_a, branch_rank, max_f: int):
  """The recovery token each branch prepares for.

  glue_logits: [B, K+1, V] draft logits after r, d1..dK; draft_tokens: [B, K];
  branch_a, branch_rank: int32 [B, M]. Returns int32 [B, M].
  """
  b, _, v = glue_logits.shape
  # Exclude d_{a+1} at positions a < K; position K (bonus) excludes nothing.
  excluded = jax.nn.one_hot(draft_tokens, v, dtype=bool)                      # [B, K, V]
  excluded = jnp.concatenate([excluded, jnp.zeros((b, 1, v), bool)], axis=1)  # [B, K+1, V]
  masked = jnp.where(excluded, -jnp.inf, glue_logits.astype(jnp.float32))
  top = jax.lax.top_k(masked, max_f)[1]                                       # [B, K+1, F]
  per_branch = jnp.take_along_axis(top, branch_a[:, :, None], axis=1)         # [B, M, F]
  return jnp.take_along_axis(per_branch, branch_rank[:, :, None], axis=2)[:, :, 0].astype(
      jnp.int32)


def lookup(branch_a, branch_tok, accepted, recovery):
  """Find the branch prepared for the real outcome (a, r').

  Returns (hit [B] bool, index [B] of the matching branch, or of the top branch with the
  same a when there is none: the `fast` fallback's free guess).
  """
  same_a = branch_a == accepted[:, None]
  match = same_a & (branch_tok == recovery[:, None])
  hit = jnp.any(match, axis=1)
  index = jnp.where(hit, jnp.argmax(match, axis=1), jnp.argmax(same_a, axis=1))
  return hit, index.astype(jnp.int32)
