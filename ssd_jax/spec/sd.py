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

from ssd_jax.engine.ar import first_token_state
from ssd_jax.engine.decoder import DecodeState, Decoder, Wave, WaveConstants, apply_stops
from ssd_jax.engine.runner import ModelRunner, slot_mapping
from ssd_jax.engine.sampling import target_probs
from ssd_jax.models.transformer import AttentionInputs
from ssd_jax.spec.draft import draft_decode
from ssd_jax.spec.verify import commit_tokens, greedy_verify, rejection_verify


@dataclasses.dataclass(frozen=True)
class SpecOptions:
  k: int = 7
  draft_temperature: float | None = None  # None: each request's own temperature


def verify_speculation(target: ModelRunner, params, kv, state: DecodeState, draft_tokens, q,
                       consts: WaveConstants, greedy: bool):
  """Score [r, d1..dK] with the target and accept/reject (the target's half of a round).

  Returns (kv, new state, emitted [B, K+1], count [B], accepted [B], recovery [B]).
  """
  k = draft_tokens.shape[1]
  live = ~state.done
  tokens = jnp.concatenate([state.token[:, None], draft_tokens], axis=1)
  positions = state.pos[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None, :]
  attn = AttentionInputs(
      page_table=consts.page_table,
      slot_mapping=slot_mapping(consts.page_table, positions, live[:, None], target.page_size),
      kv_limit=jnp.where(live[:, None], positions + 1, 0))
  logits, kv, _ = target.forward(params, kv, tokens, positions, attn)
  key, sub = jax.random.split(state.key)
  if greedy:
    accepted, recovery = greedy_verify(jnp.argmax(logits, axis=-1).astype(jnp.int32),
                                       draft_tokens)
  else:
    accepted, recovery = rejection_verify(target_probs(logits, consts.sampling), q,
                                          draft_tokens, sub)
  emitted = commit_tokens(draft_tokens, accepted, recovery)
  count, done, generated = apply_stops(emitted, accepted + 1, state.done, state.generated,
                                       consts)
  new = DecodeState(token=jnp.where(live, recovery, state.token),
                    pos=jnp.where(live, state.pos + accepted + 1, state.pos),
                    done=done, generated=generated, key=key)
  return kv, new, emitted, count, jnp.where(live, accepted, 0), recovery


def draft_temperatures(wave: Wave, override: float | None) -> np.ndarray:
  t = np.zeros((wave.batch,), np.float32)
  for i, s in enumerate(wave.seqs):
    t[i] = s.params.temperature if override is None or s.params.greedy else override
  return t


class SpeculativeDecoder(Decoder):
  """What SD and SSD share: a target and a draft runner, and the start of a wave (both
  models prefill the prompt; the target samples the first token)."""

  def __init__(self, target: ModelRunner, draft: ModelRunner, draft_temperature,
               tokenizer_decode, eos_ids):
    super().__init__(tokenizer_decode, eos_ids)
    self.target, self.draft = target, draft
    self.draft_temperature = draft_temperature
    self._first = target.jit(first_token_state, static_argnames=("greedy",))

  def num_compilations(self) -> int:
    return self.target.num_compilations() + self.draft.num_compilations()

  def _start_wave(self, wave: Wave):
    """Prefill both models; returns (state, first tokens, count) on the target's mesh."""
    seqs = wave.seqs
    rows = [s.prompt_token_ids[s.num_cached_tokens:] for s in seqs]
    starts = [s.num_cached_tokens for s in seqs]
    logits = self.target.prefill(rows, starts, wave.page_table, wave.batch)
    self.draft.prefill(rows, starts, wave.page_table, wave.batch)
    self.greedy = wave.all_greedy
    self.consts = self.target.put(wave.constants(self.eos_ids))
    self.draft_page_table = self.draft.put(wave.page_table)
    self.draft_temp = self.draft.put(draft_temperatures(wave, self.draft_temperature))
    self.draft_key = self.draft.put(jax.random.key(seqs[0].params.seed + 1))
    prompt_len = np.zeros((wave.batch,), np.int32)
    prompt_len[:len(seqs)] = [s.prompt_len for s in seqs]
    key = jax.random.key(seqs[0].params.seed)
    return self._first(logits, self.consts, *self.target.put((prompt_len, key)),
                       greedy=self.greedy)


class SDDecoder(SpeculativeDecoder):
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
