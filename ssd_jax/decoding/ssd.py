"""Speculative speculative decoding (SSD) with Saguaro's optimisations.

While the target verifies speculation s = [r, d1..dK] on its mesh, the draft, on its own
mesh, prepares the next speculation for every likely outcome of that verification:

  1. glue decode: one draft forward over [r, d1..dK] (writes the draft's KV, gives q_0..q_K),
  2. fan-out:     recovery candidates per acceptance length (spec/fanout.py),
  3. tree decode: K steps for all M branches at once; branch (a, r') sees the committed
                  context, glue positions 0..a and its own scratch KV, at logical positions.

When the outcome (a, r') arrives (device to device), `lookup` answers from the cache on a
hit, or by the fallback on a miss: `jit` drafts K tokens now, `fast` answers at once with
the top branch of the same a (free, usually rejected). The answer moves back to the
target's mesh device to device. The host dispatches both sides asynchronously and only
reads finished tokens with a lag, so nothing on the critical path waits on it.

Each mesh has its own host thread, as each side of SSD has its own process in the paper's
engine. At batch 1 dispatching a program costs the host about 2.5 us per kernel (hundreds
of kernels per step; measured on an H200 with bench/probes/ssd_timing.py), so one thread
dispatching verify, lookup and build in turn made the host, not either GPU, the slowest
part of a round for small models. The caller's thread runs the target's side:

  1. wait for the speculation the draft thread has dispatched (device arrays, not values);
  2. verify it on the target's mesh (the critical path SSD is built around);
  3. copy the outcome to the draft's mesh and hand it to the draft thread.

The draft thread (`_draft_side`), one job per round, in order:

  1. lookup of the previous verification's outcome in the cache built for it, and the
     answer's copy to the target's mesh (this unblocks the caller's step 1);
  2. build the cache for that answer, while the target verifies it.

No dispatch of a round may wait for the device. With the `jit` fallback the lookup drafts K
tokens only if some sequence missed, and XLA:GPU decides data-dependent control flow on the
host (it copies the predicate back and blocks the dispatching thread until the device gets
there, i.e. until the verification is done) unless the control flow is inside a CUDA graph.
So the fallback is one `lax.while_loop` of 0 or K trips, and the lookup is compiled with
runner.COMMAND_BUFFER_MODES["max"] (loops in graphs) unless the user turned graphs off.
Measured on jax 0.11.2 (bench/probes/dispatch_probe.py and ssd_timing.py, bench/RESULTS.md):
a `lax.cond` around a loop is never put in a graph, one around straight-line code is with
those options, but its unrolled K steps made the lookup program 6x larger to dispatch;
the loop form was the fastest hit round for the 8B and the 135M pairs alike.

The last outcome of a wave is looked up and built for too (the host learns a sequence
stopped only rounds later); `finish` waits for that before the next wave touches the
draft's pages.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.engine.batch import Batch, RowPlan
from ssd_jax.engine.observe import RoundObserver
from ssd_jax.engine.runner import COMMAND_BUFFER_MODES, ModelRunner, paged_step
from ssd_jax.engine.sampling import TAG_DRAFT, TAG_TREE, fold_rows, keys_at
from ssd_jax.engine.step import carry_rows, place_rows
from ssd_jax.models.transformer import AttentionInputs, init_tree_scratch
from ssd_jax.sharding.rules import TREE_SCRATCH_AXES, sharding_for
from ssd_jax.decoding import fanout as fo
from ssd_jax.decoding.draft import draft_decode, draw
from ssd_jax.decoding.speculative import (SpeculativeMethod, SpeculativeWave, draft_temperatures,
                                          verify_speculation)

FALLBACKS = ("jit", "fast")


@dataclasses.dataclass(frozen=True)
class SSDOptions:
  k: int
  plan: fo.FanoutPlan
  fallback: str = "jit"
  sampler_x: float | None = None
  draft_temperature: float | None = None

  @classmethod
  def build(cls, *, k=7, f=3, fanout_hit=None, fanout_miss=None, fallback="jit",
            sampler_x=None, draft_temperature=None) -> "SSDOptions":
    if fallback not in FALLBACKS:
      raise ValueError(f"fallback {fallback!r} is unknown; use jit or fast")
    if f < 1 and fanout_hit is None:
      raise ValueError(f"f (fan-out per acceptance length) must be >= 1, got {f}")
    if sampler_x is not None and not 0.0 < sampler_x <= 1.0:
      raise ValueError(f"sampler_x must be in (0, 1] (the factor applied to the draft's "
                       f"top-F tokens), got {sampler_x}")
    hit = fo.parse_fanout(fanout_hit, k, "fanout_hit") if fanout_hit is not None \
        else (f,) * (k + 1)
    miss = fo.parse_fanout(fanout_miss, k, "fanout_miss") if fanout_miss is not None else hit
    return cls(k=k, plan=fo.FanoutPlan(k, hit, miss), fallback=fallback,
               sampler_x=sampler_x, draft_temperature=draft_temperature)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DraftState:
  """The draft's view of the speculation the target is verifying right now."""
  token: jax.Array      # r [B]
  pos: jax.Array        # position of r [B]
  live: jax.Array       # [B]
  spec: jax.Array       # d1..dK [B, K]
  last_hit: jax.Array   # [B] selects the fan-out list for the next cache


def _retire_draft(ds: DraftState, empty) -> DraftState:
  return dataclasses.replace(ds, live=ds.live & ~empty)


def _retire_info(info: tuple, empty) -> tuple:
  hit, looked_up = info
  return hit & ~empty, looked_up & ~empty


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpeculationCache:
  branch_a: jax.Array    # [B, M] acceptance length each branch prepared for
  branch_tok: jax.Array  # [B, M] its recovery token
  tokens: jax.Array      # [B, M, K] drafted continuation
  q: jax.Array | None    # [B, M, K, V] the distributions they were drawn from (sampling)


class SSDMethod(SpeculativeMethod):
  def __init__(self, target: ModelRunner, draft: ModelRunner, opts: SSDOptions,
               tokenizer_decode, eos_ids):
    super().__init__(target, draft, opts.k, opts.draft_temperature, tokenizer_decode, eos_ids)
    self.opts = opts
    self.branch_a, self.branch_rank = draft.put(opts.plan.branch_arrays())
    # Row surgery of an update: the target's decode state and the speculation's q on the
    # target's mesh, the draft's state and the lookup's flags on the draft's.
    self._carry_q = target.jit(carry_rows)
    self._one_hot_q = target.jit(lambda spec: jax.nn.one_hot(spec, draft.cfg.vocab_size,
                                                             dtype=jnp.float32))
    self._carry_draft = draft.jit(functools.partial(carry_rows, dead=_retire_draft))
    self._carry_info = draft.jit(functools.partial(carry_rows, dead=_retire_info))
    self._place_draft = draft.jit(place_rows)
    self._first_spec = draft.jit(self._first_spec_fn, donate_argnums=(1,),
                                 static_argnames=("want_q",))
    # The decode state is donated with the KV pool (see ARMethod).
    self._verify = target.jit(self._verify_fn, donate_argnums=(1, 2),
                              static_argnames=("greedy",))
    self._build = draft.jit(self._build_cache_fn, donate_argnums=(1,),
                            static_argnames=("want_q",))
    # Loops in CUDA graphs (module docstring), unless the user turned graphs off.
    graphs_off = draft.compiler_options == COMMAND_BUFFER_MODES["off"]
    self.lookup_compiler_options = (draft.compiler_options if graphs_off
                                    else COMMAND_BUFFER_MODES["max"])
    self._lookup = draft.jit(self._lookup_fn, donate_argnums=(1,),
                             static_argnames=("want_q",),
                             compiler_options=self.lookup_compiler_options)
    # The draft's dispatches run on a host thread of their own (module docstring).
    self._draft_thread = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="ssd-draft")
    self._job = None
    self._draft_error = None

  # -- host side --------------------------------------------------------------------------
  # The batch's arrays are the SpeculativeWave the caller threads through `round`. The
  # draft's pipeline (its DraftState, the cache the next lookup answers from, the future of
  # the next speculation and the job computing it) belongs to the draft thread and lives
  # here, between one round's job and the next.
  def update(self, state: SpeculativeWave | None, plan: RowPlan, obs: RoundObserver):
    """The target's side here (the joiners' prefill and first tokens); the draft's side
    is a job of the draft thread (`_patch`), after the one in flight."""
    if state is None:
      self.finish()  # the draft thread may still be dispatching the last run's final job
      self._draft_error = None
    fields, first, j, _, d = self._update_target(state, plan)
    new = SpeculativeWave(**fields)
    # What the joiners' first speculation drafts from, on the draft's mesh.
    joined = None if j is None else self.draft.put((d.token, d.pos, d.done))
    carry = (self.draft.put(plan.carry), self.target.put(plan.carry))
    old_spec = self._spec if state is not None else None
    self._spec = concurrent.futures.Future()
    self._job = self._draft_thread.submit(self._patch, new, plan.new, carry, j, joined,
                                          old_spec, self._spec, obs)
    return new, first

  def _patch(self, state: SpeculativeWave, batch: Batch, carry, j, joined, old_spec,
             spec_out: concurrent.futures.Future, obs: RoundObserver):
    """On the draft thread: prefill the joiners and draft their first speculation (a
    "miss"), merge rows into the draft's state and the next speculation, and rebuild the
    cache for the batch as it now is."""
    want_q = not state.greedy
    carry_d, carry_t = carry
    try:
      if self._draft_error is not None:  # an earlier job failed: this one cannot run
        raise self._draft_error
      ds_j = q_j = None
      if j is not None:
        j.prefill(self.draft)
        token, pos, done = joined
        sub = j.batch
        seeds = np.asarray([s.seed if s is not None else 0 for s in sub.rows], np.uint32)
        ds_j, q_j = self.draft.run(
            self._first_spec, token, pos, ~done, self.draft.put(sub.page_table()),
            self.draft.put(draft_temperatures(sub, self.draft_temperature)),
            self.draft.put(seeds), want_q=want_q)
        at_d, at_t = self.draft.put(j.join_at), self.target.put(j.join_at)
        none = jnp.zeros((sub.size,), bool)
        info_j = self.draft.put((none, none))
      if old_spec is None:  # the first batch of a run: every row joins or is empty
        ds_old, q_old, info_old = ds_j, (self.target.put(q_j) if want_q else None), info_j
      else:
        (_, q_old), info = old_spec.result()
        ds_old = self.dstate
        info_old = (info["hit"], info["looked_up"]) if info else None
        if want_q and q_old is None:  # greedy rows until now: their q is one-hot
          q_old = self._one_hot_q(self.target.put(ds_old.spec))
        q_old = q_old if want_q else None
      if info_old is None:  # (the speculation came from `_first_spec`: nothing looked up)
        info_old = self.draft.put((jnp.zeros((ds_old.token.shape[0],), bool),) * 2)
      ds = self._carry_draft(ds_old, carry_d)
      info = self._carry_info(info_old, carry_d)
      q = self._carry_q(q_old, carry_t) if want_q else None
      if j is not None:
        ds, info = self._place_draft((ds, info), (ds_j, info_j), at_d)
        q = self._place(q, self.target.put(q_j), at_t) if want_q else None
      self.dstate = ds
      spec_out.set_result(((self.target.put(self.dstate.spec), q),
                           {"hit": info[0], "looked_up": info[1]}))
      self._build_cache(state, obs)
    except BaseException as e:
      self._fail(e, spec_out)
      raise

  def finish(self):
    """Wait until the draft thread has dispatched its last job (and raise its error)."""
    job, self._job = self._job, None
    if job is not None:
      job.result()

  def in_flight(self):
    if self._job is not None:
      self._job.result()
    return (self._cache, self.dstate)

  def round(self, state: SpeculativeWave, batch: Batch, obs: RoundObserver):
    # The two threads' order is explained in the module docstring.
    try:
      (spec, q), info = self._spec.result()
    except BaseException:
      concurrent.futures.wait([self._job])
      self._job = None  # its error is raised here, once
      raise
    info = dict(info)
    with obs.host("verify"):
      decode, emitted, count, accepted, outcome = self.target.run(
          self._verify, state.decode, spec, q, state.consts, greedy=state.greedy)
    # One small device-to-device copy that waits on the device for the verification.
    with obs.host("put_outcome"):
      outcome = self.draft.put(outcome)
    self._spec = concurrent.futures.Future()
    self._job = self._draft_thread.submit(self._draft_side, state, outcome, self._spec, obs)
    info["accepted"] = accepted
    return dataclasses.replace(state, decode=decode), emitted, count, info

  def _draft_side(self, state: SpeculativeWave, outcome,
                  spec_out: concurrent.futures.Future, obs: RoundObserver):
    """The draft's job for one round, on the draft thread: answer `outcome` into
    `spec_out`, then build the cache for that answer while the target verifies it."""
    want_q = not state.greedy
    try:
      if self._draft_error is not None:  # an earlier job failed: this one cannot run
        raise self._draft_error
      cache, looked_up = self._cache
      with obs.host("lookup"):
        self.dstate, spec_q, hit = self.draft.run(
            self._lookup, self.dstate, cache, outcome, state.draft_page_table,
            state.draft_temp, state.draft_seed, want_q=want_q)
      with obs.host("put_spec"):
        spec_out.set_result((self.target.put(spec_q), {"hit": hit, "looked_up": looked_up}))
      self._build_cache(state, obs)
    except BaseException as e:
      self._fail(e, spec_out)
      raise

  def _build_cache(self, state: SpeculativeWave, obs: RoundObserver) -> None:
    """The cache the next lookup answers from, for the speculation in self.dstate."""
    with obs.host("build"):
      cache = self.draft.run(self._build, self.dstate, state.draft_page_table,
                             state.draft_temp, state.draft_seed, self.branch_a,
                             self.branch_rank, want_q=not state.greedy)
    self._cache = (cache, self.dstate.live)

  def _fail(self, e: BaseException, spec_out: concurrent.futures.Future) -> None:
    """A draft job failed: later jobs raise it too, and the caller's wait ends with it."""
    self._draft_error = e
    if not spec_out.done():
      spec_out.set_exception(e)

  # -- device programs --------------------------------------------------------------------
  def _verify_fn(self, params, kv, state, spec, q, consts, greedy):
    kv, new, emitted, count, accepted, _ = verify_speculation(
        self.target, params, kv, state, spec, q, consts, greedy)
    # The outcome the draft needs, packed into one [4, B] array: one transfer, not four.
    outcome = jnp.stack([accepted, new.token, new.pos, new.done.astype(jnp.int32)])
    return kv, new, emitted, count, accepted, outcome

  def _draft_now(self, params, kv, token, pos, live, page_table, temp, seed, want_q,
                 steps=None):
    """K draft tokens after `token` at `pos` (the first speculation and the jit fallback).
    The round after it follows a miss, so cache-aware sampling uses the after-miss list."""
    return draft_decode(self.draft, params, kv, token[:, None], pos[:, None], live,
                        page_table, k=self.opts.k, temperature=temp,
                        keys=keys_at(seed, TAG_DRAFT, pos), want_q=want_q,
                        sampler_x=self.opts.sampler_x,
                        top_fs=self.opts.plan.after_miss[:self.opts.k], steps=steps)

  def _first_spec_fn(self, params, kv, token, pos, live, page_table, temp, seed, want_q):
    spec, q, kv = self._draft_now(params, kv, token, pos, live, page_table, temp, seed,
                                  want_q)
    state = DraftState(token=token, pos=pos, live=live, spec=spec,
                       last_hit=jnp.zeros_like(live))
    return kv, state, q

  def _build_cache_fn(self, params, kv, ds: DraftState, page_table, temp, seed,
                      branch_a_lists, branch_rank_lists, want_q):
    k, ps = self.opts.k, self.draft.page_size
    b = ds.token.shape[0]
    live = ds.live
    # 1. Glue decode over [r, d1..dK]: writes the draft KV that every branch builds on.
    glue = jnp.concatenate([ds.token[:, None], ds.spec], axis=1)
    positions = ds.pos[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None, :]
    attn = paged_step(page_table, positions, live[:, None], ps)
    glue_logits, kv, _ = self.draft.forward(params, kv, glue, positions, attn)
    # 2. Fan-out: per sequence, the list after a hit or after a miss.
    which = jnp.where(ds.last_hit, 0, 1)
    branch_a = branch_a_lists[which]          # [B, M]
    branch_rank = branch_rank_lists[which]
    cand = fo.recovery_candidates(glue_logits, ds.spec, branch_a, branch_rank,
                                  self.opts.plan.max_f)
    # 3. Tree decode: K steps, all M branches of all sequences together. Branch (a, r')
    # sits at logical positions n+a+1+j and sees paged positions < n+a+1 (context, r,
    # d1..da) plus its own scratch KV; nothing is written to the pages.
    m = branch_a.shape[1]
    base = ds.pos[:, None] + branch_a + 1
    tree_attn = AttentionInputs(page_table=page_table, slot_mapping=None,
                                kv_limit=jnp.where(live[:, None], base, 0))
    scratch = init_tree_scratch(self.draft.cfg, b, m, k, self.draft.kv_dtype)
    scratch_sharding = sharding_for(self.draft.mesh, TREE_SCRATCH_AXES)
    scratch.kv = [jax.lax.with_sharding_constraint(x, scratch_sharding) for x in scratch.kv]
    top_fs = jnp.asarray(self.opts.plan.after_hit[:k], jnp.int32)
    max_f = self.opts.plan.max_f if self.opts.sampler_x is not None else 0
    temp_b = jnp.broadcast_to(temp[:, None], (b, m))
    keys = keys_at(seed, TAG_TREE, ds.pos)

    def step(carry, xs):
      tok, scratch = carry
      j, top_f = xs
      logits, _, scratch = self.draft.forward(params, kv, tok, base + j, tree_attn,
                                              scratch=scratch)
      nxt, q = draw(logits, temp_b, fold_rows(keys, j), want_q, self.opts.sampler_x, top_f,
                    max_f)
      return (nxt, scratch), (nxt, q)

    _, (tokens, qs) = jax.lax.scan(step, (cand, scratch),
                                   (jnp.arange(k, dtype=jnp.int32), top_fs))
    cache = SpeculationCache(branch_a=branch_a, branch_tok=cand,
                             tokens=jnp.moveaxis(tokens, 0, 2),
                             q=jnp.moveaxis(qs, 0, 2) if want_q else None)
    return kv, cache

  def _lookup_fn(self, params, kv, ds: DraftState, cache: SpeculationCache, outcome,
                 page_table, temp, seed, want_q):
    accepted, recovery, pos = outcome[0], outcome[1], outcome[2]
    live = outcome[3] == 0
    hit, index = fo.lookup(cache.branch_a, cache.branch_tok, accepted, recovery)
    hit = hit & ds.live
    pick = lambda x: jnp.take_along_axis(
        x, index.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]
    spec = pick(cache.tokens)
    q = pick(cache.q) if want_q else None
    miss = live & ~hit
    if self.opts.fallback == "jit":
      # K draft steps after a miss, none after a hit: one loop whose trip count only the
      # device knows (module docstring).
      fb_spec, fb_q, kv = self._draft_now(params, kv, recovery, pos, miss, page_table, temp,
                                          seed, want_q,
                                          steps=jnp.where(jnp.any(miss), self.opts.k, 0))
      spec = jnp.where(miss[:, None], fb_spec, spec)
      q = jnp.where(miss[:, None, None], fb_q, q) if want_q else None
    # `fast`: a miss keeps the top branch of the same acceptance length (free to produce;
    # any proposal is exact because verification uses the q it was drawn from).
    new = DraftState(token=recovery, pos=pos, live=live, spec=spec,
                     last_hit=hit | ~ds.live)
    return kv, new, (spec, q), hit
