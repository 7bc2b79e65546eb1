"""What SD and SSD share: the target's half of a round (verify a speculation) and the start
of a wave (both models prefill the prompt; the target samples the first token)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.engine.loop import DecodeState, DecodingMethod, Wave, WaveConstants, apply_stops
from ssd_jax.engine.loop import first_token_state
from ssd_jax.engine.runner import ModelRunner, paged_step
from ssd_jax.engine.sampling import target_probs
from ssd_jax.decoding.verify import commit_tokens, greedy_verify, rejection_verify


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
  attn = paged_step(consts.page_table, positions, live[:, None], target.page_size)
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpeculativeWave:
  """What SD's and SSD's rounds read for one wave: the target's decode state and constants
  (target mesh), the page table, draft temperatures and draft PRNG key (draft mesh);
  `greedy` (every request at temperature 0) selects the programs without distributions."""
  decode: DecodeState
  consts: WaveConstants
  draft_page_table: jax.Array
  draft_temp: jax.Array
  draft_key: jax.Array
  greedy: bool = dataclasses.field(metadata=dict(static=True))


def draft_temperatures(wave: Wave, override: float | None) -> np.ndarray:
  t = np.zeros((wave.batch,), np.float32)
  for i, s in enumerate(wave.seqs):
    t[i] = s.params.temperature if override is None or s.params.greedy else override
  return t


class SpeculativeMethod(DecodingMethod):
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
    """Prefill both models; returns (the fields of SpeculativeWave, first tokens, count),
    the first tokens on the target's mesh."""
    seqs = wave.seqs
    rows = [s.prompt_token_ids[s.num_cached_tokens:] for s in seqs]
    starts = [s.num_cached_tokens for s in seqs]
    logits = self.target.prefill(rows, starts, wave.page_table, wave.batch)
    self.draft.prefill(rows, starts, wave.page_table, wave.batch)
    greedy = wave.all_greedy
    consts = self.target.put(wave.constants(self.eos_ids))
    prompt_len = np.zeros((wave.batch,), np.int32)
    prompt_len[:len(seqs)] = [s.prompt_len for s in seqs]
    key = jax.random.key(seqs[0].params.seed)
    decode, first, count = self._first(logits, consts, *self.target.put((prompt_len, key)),
                                       greedy=greedy)
    fields = dict(decode=decode, consts=consts,
                  draft_page_table=self.draft.put(wave.page_table),
                  draft_temp=self.draft.put(draft_temperatures(wave, self.draft_temperature)),
                  draft_key=self.draft.put(jax.random.key(seqs[0].params.seed + 1)),
                  greedy=greedy)
    return fields, first, count
