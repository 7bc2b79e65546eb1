"""What SD and SSD share: the target's half of a round (verify a speculation) and the
target's half of a batch update (joiners prefill; the target samples their first token)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.engine.batch import Batch, RowPlan
from ssd_jax.engine.loop import DecodingMethod
from ssd_jax.engine.runner import ModelRunner, paged_step
from ssd_jax.engine.sampling import TAG_ACCEPT, TAG_RESIDUAL, keys_at, target_probs
from ssd_jax.engine.step import (BatchConstants, DecodeState, apply_stops, carry_rows,
                                 first_token_state, place_rows, retire_decode)
from ssd_jax.decoding.verify import commit_tokens, greedy_verify, rejection_verify


@dataclasses.dataclass(frozen=True)
class SpecOptions:
  k: int = 7
  draft_temperature: float | None = None  # None: each request's own temperature


def verify_speculation(target: ModelRunner, params, kv, state: DecodeState, draft_tokens, q,
                       consts: BatchConstants, greedy: bool):
  """Score [r, d1..dK] with the target and accept/reject (the target's half of a round).

  Returns (kv, new state, emitted [B, K+1], count [B], accepted [B], recovery [B]).
  """
  k = draft_tokens.shape[1]
  live = ~state.done
  tokens = jnp.concatenate([state.token[:, None], draft_tokens], axis=1)
  positions = state.pos[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None, :]
  attn = paged_step(consts.page_table, positions, live[:, None], target.page_size)
  logits, kv, _ = target.forward(params, kv, tokens, positions, attn)
  if greedy:
    accepted, recovery = greedy_verify(jnp.argmax(logits, axis=-1).astype(jnp.int32),
                                       draft_tokens)
  else:
    seed = consts.sampling.seed
    accepted, recovery = rejection_verify(target_probs(logits, consts.sampling), q,
                                          draft_tokens, keys_at(seed, TAG_ACCEPT, state.pos),
                                          keys_at(seed, TAG_RESIDUAL, state.pos))
  emitted = commit_tokens(draft_tokens, accepted, recovery)
  count, done, generated = apply_stops(emitted, accepted + 1, state.done, state.generated,
                                       consts)
  new = DecodeState(token=jnp.where(live, recovery, state.token),
                    pos=jnp.where(live, state.pos + accepted + 1, state.pos),
                    done=done, generated=generated)
  return kv, new, emitted, count, jnp.where(live, accepted, 0), recovery


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpeculativeWave:
  """What SD's and SSD's rounds read for one batch: the target's decode state and
  constants (target mesh), the page table, draft temperatures and seeds (draft mesh);
  `greedy` (every request at temperature 0) selects the programs without distributions."""
  decode: DecodeState
  consts: BatchConstants
  draft_page_table: jax.Array
  draft_temp: jax.Array
  draft_seed: jax.Array
  greedy: bool = dataclasses.field(metadata=dict(static=True))


def draft_temperatures(batch: Batch, override: float | None) -> np.ndarray:
  t = np.zeros((batch.size,), np.float32)
  for i, s in enumerate(batch.rows):
    if s is not None:
      t[i] = s.params.temperature if override is None or s.params.greedy else override
  return t


class SpeculativeMethod(DecodingMethod):
  """What SD and SSD share: a target and a draft runner, and the target's half of a batch
  update (the joiners' prefill and first tokens, their rows merged into the batch)."""

  def __init__(self, target: ModelRunner, draft: ModelRunner, k: int, draft_temperature,
               tokenizer_decode, eos_ids):
    super().__init__(tokenizer_decode, eos_ids)
    self.target, self.draft = target, draft
    self.round_tokens = k + 1
    self.slack_tokens = k + 1
    self.draft_temperature = draft_temperature
    self._first = target.jit(first_token_state, static_argnames=("greedy",))
    self._carry = target.jit(functools.partial(carry_rows, dead=retire_rows))
    self._place = target.jit(place_rows)

  def num_compilations(self) -> int:
    return self.target.num_compilations() + self.draft.num_compilations()

  def _update_target(self, state: SpeculativeWave | None, plan: RowPlan, extra_joined=None):
    """The target's side of an update: returns (the fields of SpeculativeWave, first
    tokens or None, joiners or None, the assembled (decode state, *extras), the joiners'
    decode state or None).

    extra_joined(j) gives the joiners' extras (host arrays [B_j]) and `_rows_of(state)`
    the old ones."""
    new = plan.new
    host_consts = new.constants(self.eos_ids)
    consts = self.target.put(host_consts)
    first = j = decode_j = None
    old = None if state is None else self._rows_of(state)
    merged = old
    if plan.joins:
      j, decode_j, first = self.first_tokens(plan, self.target, self._first)
      joined = (decode_j,) + tuple(self.target.put(extra_joined(j)) if extra_joined else ())
      carry, join_at = self.target.put((plan.carry, j.join_at))
      merged = self._carry(old if old is not None else joined, carry)
      merged = self._place(merged, joined, join_at)
    elif plan.rows_changed:
      merged = self._carry(old, self.target.put(plan.carry))
    seeds = np.asarray([s.seed if s is not None else 0 for s in new.rows], np.uint32)
    fields = dict(decode=merged[0], consts=consts,
                  draft_page_table=self.draft.put(host_consts.page_table),
                  draft_temp=self.draft.put(draft_temperatures(new, self.draft_temperature)),
                  draft_seed=self.draft.put(seeds), greedy=new.all_greedy)
    return fields, first, j, merged, decode_j

  def _rows_of(self, state) -> tuple:
    """The per-row device state the target side carries across updates."""
    return (state.decode,)


def retire_rows(rows: tuple, empty) -> tuple:
  """carry_rows' `dead` for (decode, *extras): empty rows are done."""
  return (retire_decode(rows[0], empty),) + tuple(rows[1:])
