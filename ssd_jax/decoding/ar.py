"""Autoregressive decoding with the target alone: one jitted program per `steps` tokens.

A round runs `steps` decode steps in one program (a lax loop): stops are applied on
device after every step, so a sequence that stops mid-round emits only its tokens up to
the stop, and each round costs one dispatch instead of `steps`. At batch 1 a small model's
step is dominated by the host's dispatch of its ~550 kernels (bench/RESULTS.md), which a
multi-step round pays once per round.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ssd_jax.engine.batch import Batch, RowPlan
from ssd_jax.engine.loop import DecodingMethod
from ssd_jax.engine.observe import RoundObserver
from ssd_jax.engine.runner import ModelRunner, paged_step
from ssd_jax.engine.step import (BatchConstants, DecodeState, apply_stops, carry_rows,
                                 first_token_state, next_tokens, place_rows, retire_decode)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ARWave:
  """What an AR batch's steps read: the decode state (donated to each round, which returns
  the next) and the batch's constants; `greedy` (every request at temperature 0) selects
  the argmax-only program."""
  decode: DecodeState
  consts: BatchConstants
  greedy: bool = dataclasses.field(metadata=dict(static=True))


class ARMethod(DecodingMethod):
  def __init__(self, target: ModelRunner, tokenizer_decode, eos_ids, steps: int = 1):
    super().__init__(tokenizer_decode, eos_ids)
    if steps < 1:
      raise ValueError(f"AR steps per round must be >= 1, got {steps}")
    self.target = target
    self.steps = steps
    self.round_tokens = steps
    self._first = target.jit(first_token_state, static_argnames=("greedy",))
    self._carry = target.jit(functools.partial(carry_rows, dead=retire_decode))
    self._place = target.jit(place_rows)
    # The decode state is donated with the KV pool, so the round's new state lives where
    # the old one did. XLA updates a program's CUDA graph on the host before a launch when
    # buffers its commands use have moved; a new state each round was 8 of the 10 that
    # moved per step (bench/RESULTS.md, issue 13: the 1B step's update 160 -> 30 us).
    self._step = target.jit(self.step_fn, donate_argnums=(1, 2), static_argnames=("greedy",))

  def num_compilations(self) -> int:
    return self.target.num_compilations()

  def update(self, state: ARWave | None, plan: RowPlan, obs: RoundObserver):
    consts = self.target.put(plan.new.constants(self.eos_ids))
    greedy = plan.new.all_greedy
    decode, first = None if state is None else state.decode, None
    if plan.joins:
      j, joined, first = self.first_tokens(plan, self.target, self._first)
      carry, join_at = self.target.put((plan.carry, j.join_at))
      # (the first batch of a run has no old rows: every row joins or stays empty)
      decode = self._carry(decode if decode is not None else joined, carry)
      decode = self._place(decode, joined, join_at)
    elif plan.rows_changed:
      decode = self._carry(decode, self.target.put(plan.carry))
    return ARWave(decode=decode, consts=consts, greedy=greedy), first

  def round(self, state: ARWave, batch: Batch, obs: RoundObserver):
    decode, emitted, count = self.target.run(self._step, state.decode, state.consts,
                                             greedy=state.greedy)
    return dataclasses.replace(state, decode=decode), emitted, count, {}

  def step_fn(self, params, kv, state: DecodeState, consts: BatchConstants, greedy: bool):
    """One round's program, unjitted (the engine jits it; bench/probes/step_programs.py
    compiles it alone)."""
    if self.steps == 1:
      return self._one_step(params, kv, state, consts, greedy)

    def body(carry, _):
      kv, state = carry
      kv, state, nxt, count = self._one_step(params, kv, state, consts, greedy)
      return (kv, state), (nxt[:, 0], count)

    (kv, state), (tokens, counts) = jax.lax.scan(body, (kv, state), None, length=self.steps)
    # A sequence emits one token per step until it stops, then none: its tokens are the
    # first sum(counts) of the round's.
    return kv, state, jnp.moveaxis(tokens, 0, 1), jnp.sum(counts, axis=0).astype(jnp.int32)

  def _one_step(self, params, kv, state: DecodeState, consts: BatchConstants, greedy: bool):
    tokens, positions = state.token[:, None], state.pos[:, None]
    attn = paged_step(consts.page_table, positions, ~state.done[:, None],
                      self.target.page_size)
    logits, kv, _ = self.target.forward(params, kv, tokens, positions, attn)
    nxt = next_tokens(logits[:, 0], consts, state.pos + 1, greedy)
    count, done, generated = apply_stops(nxt[:, None], jnp.ones_like(nxt), state.done,
                                         state.generated, consts)
    advance = count > 0
    new = DecodeState(token=jnp.where(advance, nxt, state.token),
                      pos=jnp.where(advance, state.pos + 1, state.pos),
                      done=done, generated=generated)
    return kv, new, nxt[:, None], count
