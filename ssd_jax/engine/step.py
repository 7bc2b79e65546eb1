"""What every decoding method's device programs share: the per-row decode state, the
batch's constants, stop rules applied on device, the first token after a prefill, and the
row surgery that lets sequences join and leave a running batch between rounds.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ssd_jax.engine.sampling import TAG_TOKEN, SamplingArrays, keys_at, sample_tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  """Per-row progress, on device. `token` is the newest token: it is part of the output
  but its KV is not yet written; it sits at position `pos`. A row with `done` writes and
  emits nothing (a finished sequence, or an empty row)."""
  token: jax.Array       # int32 [B]
  pos: jax.Array         # int32 [B]
  done: jax.Array        # bool [B]
  generated: jax.Array   # int32 [B] tokens emitted so far


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BatchConstants:
  """Per-row arrays the host builds (engine/batch.py) and replaces whenever the batch's
  rows or pages change; no program writes them."""
  page_table: jax.Array   # int32 [B, P]
  max_new: jax.Array      # int32 [B]
  eos_ids: jax.Array      # int32 [E] (-1 padded)
  ignore_eos: jax.Array   # bool [B]
  sampling: SamplingArrays


def apply_stops(emitted, count, state_done, generated, consts: BatchConstants):
  """Cut each sequence's emitted tokens at EOS and at max_new_tokens (on device).

  emitted: int32 [B, N] with count [B] valid. Returns (count, done, generated).
  """
  n = emitted.shape[1]
  idx = jnp.arange(n)[None, :]
  valid = idx < count[:, None]
  is_eos = jnp.any(emitted[..., None] == consts.eos_ids[None, None, :], axis=-1)
  is_eos = is_eos & valid & ~consts.ignore_eos[:, None]
  hit_eos = jnp.any(is_eos, axis=1)
  count = jnp.where(hit_eos, jnp.argmax(is_eos, axis=1) + 1, count)
  count = jnp.minimum(count, consts.max_new - generated)
  count = jnp.where(state_done, 0, count).astype(jnp.int32)
  generated = generated + count
  done = state_done | hit_eos | (generated >= consts.max_new)
  return count, done, generated


def next_tokens(logits, consts: BatchConstants, position, greedy: bool):
  """The target's token for `position` [B] from its logits [B, V]: sampled with the
  row's key for that position; an all-greedy batch skips the sort (argmax)."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  keys = keys_at(consts.sampling.seed, TAG_TOKEN, position)
  return sample_tokens(logits, consts.sampling, keys)


def first_token_state(logits, consts: BatchConstants, prompt_len, generated_before,
                      greedy: bool = False):
  """Each joining row's first token from its prefill logits, and its decode state.

  prompt_len [B]: tokens prefilled (a recomputed sequence's prompt includes what it had
  generated before its preemption: `generated_before` [B] of them, so that max_new_tokens
  still counts its whole output)."""
  token = next_tokens(logits, consts, prompt_len, greedy)
  done0 = jnp.zeros(token.shape, bool)
  count, done, generated = apply_stops(token[:, None], jnp.ones_like(token), done0,
                                       generated_before, consts)
  state = DecodeState(token=token, pos=prompt_len, done=done, generated=generated)
  return state, token[:, None], count


def carry_rows(old, carry, dead=None):
  """The next batch's rows of a per-row state (a pytree of [B_old, ...] leaves): new row
  r continues old row carry[r] ([B_new]), or is empty where carry[r] is -1; dead(state,
  empty [B_new]) marks empty rows (e.g. done=True). Joiners are placed after."""
  new = jax.tree.map(lambda x: jnp.take(x, jnp.maximum(carry, 0), axis=0), old)
  return dead(new, carry < 0) if dead is not None else new


def place_rows(new, joined, join_at):
  """Row i of `joined` ([B_j, ...] leaves) into row join_at[i] of `new` ([B_new, ...]);
  join_at[i] >= B_new (padding) places nothing."""
  return jax.tree.map(lambda n, j: n.at[join_at].set(j, mode="drop"), new, joined)


def retire_decode(state: DecodeState, empty) -> DecodeState:
  return dataclasses.replace(state, done=state.done | empty)
