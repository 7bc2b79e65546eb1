"""Synchronous speculative decoding (SD): draft K tokens, then verify them in one pass.

Each round is two jitted programs: `propose` on the draft's mesh (K draft steps in one lax
loop) and `verify` on the target's mesh. Their inputs move between meshes with
`jax.device_put` (device to device), and the host only reads results with a lag.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.decoding.draft import draft_decode
from ssd_jax.decoding.speculative import SpecOptions, SpeculativeMethod, verify_speculation
from ssd_jax.engine.loop import DecodeState, Wave
from ssd_jax.engine.runner import ModelRunner


class SDMethod(SpeculativeMethod):
  def __init__(self, target: ModelRunner, draft: ModelRunner, opts: SpecOptions,
               tokenizer_decode, eos_ids):
    super().__init__(target, draft, opts.draft_temperature, tokenizer_decode, eos_ids)
    self.opts = opts
    self._propose = draft.jit(self._propose_fn, donate_argnums=(1,),
                              static_argnames=("want_q",))
    self._verify = target.jit(self._verify_fn, donate_argnums=(1,),
                              static_argnames=("greedy",))

  def start(self, wave: Wave):
    first = self._start_wave(wave)
    last = np.zeros((wave.batch,), np.int32)
    last[:len(wave.seqs)] = [s.prompt_token_ids[-1] for s in wave.seqs]
    self.prev = self.target.put(last)  # the token before `state.token`: its KV is rewritten
    return first

  def round(self, state: DecodeState):
    t0 = time.perf_counter()
    token, prev, pos, done = self.draft.put((state.token, self.prev, state.pos, state.done))
    self.draft.kv, drafted, q, self.draft_key = self._propose(
        self.draft.params, self.draft.kv, token, prev, pos, done, self.draft_page_table,
        self.draft_temp, self.draft_key, want_q=not self.greedy)
    if self.profile:  # split the round: drafting, then transfer + verification
      jax.block_until_ready(drafted)
      t1 = time.perf_counter()
    drafted_t, q_t = self.target.put((drafted, q))
    self.target.kv, state, self.prev, emitted, count, accepted = self._verify(
        self.target.params, self.target.kv, state, self.prev, drafted_t, q_t, self.consts,
        greedy=self.greedy)
    if self.profile:
      jax.block_until_ready(state)
      self.phase_times["propose"].append(t1 - t0)
      self.phase_times["verify"].append(time.perf_counter() - t1)
    return state, emitted, count, {"accepted": accepted}

  def _propose_fn(self, params, kv, token, prev, pos, done, page_table, temperature, key,
                  want_q):
    key, sub = jax.random.split(key)
    tokens0 = jnp.stack([prev, token], axis=1)
    pos0 = jnp.stack([pos - 1, pos], axis=1)
    drafted, q, kv = draft_decode(self.draft, params, kv, tokens0, pos0, ~done, page_table,
                                  k=self.opts.k, temperature=temperature, key=sub,
                                  want_q=want_q)
    return kv, drafted, q, key

  def _verify_fn(self, params, kv, state, prev, drafted, q, consts, greedy):
    kv, new, emitted, count, accepted, _ = verify_speculation(
        self.target, params, kv, state, drafted, q, consts, greedy)
    # The token before the new recovery token: d_a, or r itself when nothing was accepted.
    before = jnp.concatenate([state.token[:, None], drafted], axis=1)
    prev = jnp.where(state.done, prev,
                     jnp.take_along_axis(before, accepted[:, None], axis=1)[:, 0])
    return kv, new, prev, emitted, count, accepted
