"""Synchronous speculative decoding (SD): draft K tokens, then verify them in one pass.

Each round is two jitted programs: `propose` on the draft's mesh (K draft steps in one lax
loop) and `verify` on the target's mesh. Their inputs move between meshes with
`jax.device_put` (device to device), and the host only reads results with a lag.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.decoding.draft import draft_decode
from ssd_jax.decoding.speculative import (SpecOptions, SpeculativeMethod, SpeculativeWave,
                                          verify_speculation)
from ssd_jax.engine.batch import Batch, RowPlan
from ssd_jax.engine.observe import RoundObserver
from ssd_jax.engine.runner import ModelRunner
from ssd_jax.engine.sampling import TAG_DRAFT, keys_at


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SDWave(SpeculativeWave):
  """SpeculativeWave plus the token before `decode.token` (target mesh): SD's drafting
  rewrites its draft KV, since the draft never saw the previous round's recovery token."""
  prev: jax.Array = None


class SDMethod(SpeculativeMethod):
  def __init__(self, target: ModelRunner, draft: ModelRunner, opts: SpecOptions,
               tokenizer_decode, eos_ids):
    super().__init__(target, draft, opts.k, opts.draft_temperature, tokenizer_decode, eos_ids)
    self.opts = opts
    self._propose = draft.jit(self._propose_fn, donate_argnums=(1,),
                              static_argnames=("want_q",))
    # The decode state and `prev` are donated with the KV pool (see ARMethod: fewer moved
    # buffers for XLA's CUDA-graph update before each launch).
    self._verify = target.jit(self._verify_fn, donate_argnums=(1, 2, 3),
                              static_argnames=("greedy",))

  def update(self, state: SDWave | None, plan: RowPlan, obs: RoundObserver):
    def last_prefilled(j):  # a joiner's `prev`: the token before its first one
      last = np.zeros((j.batch.size,), np.int32)
      last[:len(j.batch.active)] = [s.prefill_ids[-1] for s in j.batch.active]
      return (last,)
    fields, first, j, rows, _ = self._update_target(state, plan, last_prefilled)
    if j is not None:  # the draft's prefill, from this thread too (SD has no other)
      j.prefill(self.draft)
    return SDWave(**fields, prev=rows[1]), first

  def _rows_of(self, state: SDWave) -> tuple:
    return (state.decode, state.prev)

  def round(self, state: SDWave, batch: Batch, obs: RoundObserver):
    t0 = time.perf_counter()
    d = state.decode
    token, prev, pos, done = self.draft.put((d.token, state.prev, d.pos, d.done))
    drafted, q = self.draft.run(
        self._propose, token, prev, pos, done, state.draft_page_table, state.draft_temp,
        state.draft_seed, want_q=not state.greedy)
    if obs.profile:  # split the round: drafting, then transfer + verification
      jax.block_until_ready(drafted)
      t1 = time.perf_counter()
    drafted_t, q_t = self.target.put((drafted, q))
    decode, prev, emitted, count, accepted = self.target.run(
        self._verify, d, state.prev, drafted_t, q_t, state.consts, greedy=state.greedy)
    if obs.profile:
      jax.block_until_ready(decode)
      obs.phase("propose", t1 - t0)
      obs.phase("verify", time.perf_counter() - t1)
    state = dataclasses.replace(state, decode=decode, prev=prev)
    return state, emitted, count, {"accepted": accepted}

  def _propose_fn(self, params, kv, token, prev, pos, done, page_table, temperature, seed,
                  want_q):
    tokens0 = jnp.stack([prev, token], axis=1)
    pos0 = jnp.stack([pos - 1, pos], axis=1)
    drafted, q, kv = draft_decode(self.draft, params, kv, tokens0, pos0, ~done, page_table,
                                  k=self.opts.k, temperature=temperature,
                                  keys=keys_at(seed, TAG_DRAFT, pos), want_q=want_q)
    return kv, drafted, q

  def _verify_fn(self, params, kv, state, prev, drafted, q, consts, greedy):
    kv, new, emitted, count, accepted, _ = verify_speculation(
        self.target, params, kv, state, drafted, q, consts, greedy)
    # The token before the new recovery token: d_a, or r itself when nothing was accepted.
    before = jnp.concatenate([state.token[:, None], drafted], axis=1)
    prev = jnp.where(state.done, prev,
                     jnp.take_along_axis(before, accepted[:, None], axis=1)[:, 0])
    return kv, new, prev, emitted, count, accepted
