"""SSD cache logic: fan-out excludes d_{a+1} for a < K (not for a = K), keys, lookup."""

import jax.numpy as jnp
import numpy as np
import pytest

from ssd_jax.decoding import fanout as fo
from ssd_jax.decoding.verify import commit_tokens, greedy_verify


def test_branches_follow_the_fanout_list():
  a, rank = fo.FanoutPlan.branches((2, 0, 1, 3))
  assert a.tolist() == [0, 0, 2, 3, 3, 3]
  assert rank.tolist() == [0, 1, 0, 0, 1, 2]


def test_candidates_exclude_next_draft_token_except_at_k():
  k, v = 2, 6
  # Logits rank tokens 5 > 4 > 3 > ... at every position.
  logits = jnp.tile(jnp.arange(v, dtype=jnp.float32), (1, k + 1, 1))
  draft = jnp.array([[5, 4]])  # d1 = 5 (top at position 0), d2 = 4 (second at position 1)
  a, rank = fo.FanoutPlan.branches((2, 2, 2))
  cand = fo.recovery_candidates(logits, draft, jnp.asarray(a)[None], jnp.asarray(rank)[None], 2)
  cand = np.asarray(cand)[0].tolist()
  assert cand[0:2] == [4, 3]   # a=0: d1=5 excluded
  assert cand[2:4] == [5, 3]   # a=1: d2=4 excluded
  assert cand[4:6] == [5, 4]   # a=K: bonus token, nothing excluded


def test_lookup_hit_and_miss():
  branch_a = jnp.array([[0, 0, 1, 2], [0, 0, 1, 2]])
  branch_tok = jnp.array([[7, 8, 9, 7], [7, 8, 9, 7]])
  hit, idx = fo.lookup(branch_a, branch_tok, jnp.array([1, 0]), jnp.array([9, 3]))
  assert hit.tolist() == [True, False]
  assert int(idx[0]) == 2
  assert int(idx[1]) == 0  # miss: the top branch of the same acceptance length (fast)


def test_fanout_lists_are_validated():
  with pytest.raises(ValueError, match="needs K\\+1 = 4"):
    fo.parse_fanout("3,3", 3)
  with pytest.raises(ValueError, match="same total"):
    fo.FanoutPlan(2, (3, 3, 3), (1, 1, 1))
  with pytest.raises(ValueError, match="comma-separated"):
    fo.parse_fanout("a,b", 1)
  assert fo.parse_fanout("4, 2,1,1", 3) == (4, 2, 1, 1)


def test_greedy_verify_and_commit():
  target_argmax = jnp.array([[5, 6, 7, 8], [1, 2, 3, 4]])
  draft = jnp.array([[5, 6, 0], [1, 2, 3]])
  acc, rec = greedy_verify(target_argmax, draft)
  assert acc.tolist() == [2, 3] and rec.tolist() == [7, 4]
  out = commit_tokens(draft, acc, rec)
  assert out.tolist() == [[5, 6, 7, 0], [1, 2, 3, 4]]
