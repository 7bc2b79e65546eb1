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

Host order of one round (`round`), and why:

  1. lookup of the previous round's outcome (its cache and outcome were dispatched then),
     and the answer's copy to the target's mesh;
  2. verify of that answer on the target's mesh;
  3. cache build for that same speculation on the draft's mesh;
  4. the copy of the verification outcome to the draft's mesh (lookup of the next round).

The lookup opens the round rather than closing the previous one because with the `jit`
fallback it contains a `lax.cond` (draft now, only if some sequence missed), and on GPU
XLA evaluates a conditional by copying its predicate to the host: the host thread waits
there until the draft has finished building the cache and the outcome has arrived. Placed
first, that wait comes after the host has done everything else it has to (the lagged read
of earlier tokens, the bookkeeping between rounds), so when the wait ends the only host
work before the next verification starts is the answer's copy and its dispatch. Closing
the round, the same wait put the lagged read and the loop's bookkeeping between the
answer and its verification. XLA can evaluate conditionals on the device when they are
captured in a CUDA graph (LLM(command_buffers="max"), runner.COMMAND_BUFFER_MODES), but on
jax 0.11.2 the lookup's conditional was not captured even so (bench/RESULTS.md, fourth
two-GPU call: the host still waits ~7 ms per hit round).

The verification is dispatched before the cache build: the target's verification is the
critical path SSD is built around, and the build, a loop of K draft steps, takes the
host longer to dispatch. The last outcome of a wave is never looked up: no round follows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ssd_jax.engine.decoder import DecodeState, Wave
from ssd_jax.engine.runner import ModelRunner, slot_mapping
from ssd_jax.models.transformer import AttentionInputs, init_tree_scratch
from ssd_jax.sharding.rules import TREE_SCRATCH_AXES, sharding_for
from ssd_jax.spec import fanout as fo
from ssd_jax.spec.draft import draft_decode, draw
from ssd_jax.spec.sd import SpeculativeDecoder, verify_speculation

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
  key: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpeculationCache:
  branch_a: jax.Array    # [B, M] acceptance length each branch prepared for
  branch_tok: jax.Array  # [B, M] its recovery token
  tokens: jax.Array      # [B, M, K] drafted continuation
  q: jax.Array | None    # [B, M, K, V] the distributions they were drawn from (sampling)


class SSDDecoder(SpeculativeDecoder):
  def __init__(self, target: ModelRunner, draft: ModelRunner, opts: SSDOptions,
               tokenizer_decode, eos_ids):
    super().__init__(target, draft, opts.draft_temperature, tokenizer_decode, eos_ids)
    self.opts = opts
    self.branch_a, self.branch_rank = draft.put(opts.plan.branch_arrays())
    self._first_spec = draft.jit(self._first_spec_fn, donate_argnums=(1,),
                                 static_argnames=("want_q",))
    self._verify = target.jit(self._verify_fn, donate_argnums=(1,),
                              static_argnames=("greedy",))
    self._build = draft.jit(self._build_cache_fn, donate_argnums=(1,),
                            static_argnames=("want_q",))
    self._lookup = draft.jit(self._lookup_fn, donate_argnums=(1,),
                             static_argnames=("want_q",))

  # -- host side --------------------------------------------------------------------------
  def start(self, wave: Wave):
    state, first, count = self._start_wave(wave)
    self.want_q = not self.greedy
    # The first speculation has no cache to come from: draft it directly (a "miss").
    token, pos, done = self.draft.put((state.token, state.pos, state.done))
    self.draft.kv, self.dstate, q = self._first_spec(
        self.draft.params, self.draft.kv, token, pos, ~done, self.draft_page_table,
        self.draft_temp, self.draft_key, want_q=self.want_q)
    self.spec_t = self.target.put((self.dstate.spec, q))
    self._pending = None  # (cache, outcome on the draft's mesh, live) awaiting a lookup
    return state, first, count

  def in_flight(self):
    return self._pending or ()

  def round(self, state: DecodeState):
    # The order of the dispatches is explained in the module docstring.
    info = {}
    if self._pending is not None:
      # 1. The draft answers the outcome of the previous verification (from the cache, or
      # the fallback); may wait on the host for that outcome (jit fallback on GPU).
      cache, outcome, looked_up = self._pending
      with self.host("lookup"):
        self.draft.kv, self.dstate, spec_q, hit = self._lookup(
            self.draft.params, self.draft.kv, self.dstate, cache, outcome,
            self.draft_page_table, self.draft_temp, want_q=self.want_q)
      with self.host("put_spec"):
        self.spec_t = self.target.put(spec_q)
      info.update(hit=hit, looked_up=looked_up)
    self._pending = None
    # 2. Target: verify the speculation (the critical path) ...
    spec, q = self.spec_t
    with self.host("verify"):
      self.target.kv, state, emitted, count, accepted, outcome = self._verify(
          self.target.params, self.target.kv, state, spec, q, self.consts,
          greedy=not self.want_q)
    # 3. ... while the draft, on its own devices, prepares for every likely outcome.
    with self.host("build"):
      self.draft.kv, cache = self._build(self.draft.params, self.draft.kv, self.dstate,
                                         self.draft_page_table, self.draft_temp,
                                         self.branch_a, self.branch_rank,
                                         want_q=self.want_q)
    # 4. The outcome goes to the draft's mesh now (one small device-to-device copy that
    # waits on the device for the verification); the next round looks it up.
    with self.host("put_outcome"):
      outcome = self.draft.put(outcome)
    self._pending = (cache, outcome, self.dstate.live)
    info["accepted"] = accepted
    return state, emitted, count, info

  # -- device programs --------------------------------------------------------------------
  def _verify_fn(self, params, kv, state, spec, q, consts, greedy):
    kv, new, emitted, count, accepted, _ = verify_speculation(
        self.target, params, kv, state, spec, q, consts, greedy)
    # The outcome the draft needs, packed into one [4, B] array: one transfer, not four.
    outcome = jnp.stack([accepted, new.token, new.pos, new.done.astype(jnp.int32)])
    return kv, new, emitted, count, accepted, outcome

  def _draft_now(self, params, kv, token, pos, live, page_table, temp, key, want_q):
    """K draft tokens after `token` at `pos` (the first speculation and the jit fallback).
    The round after it follows a miss, so cache-aware sampling uses the after-miss list."""
    return draft_decode(self.draft, params, kv, token[:, None], pos[:, None], live,
                        page_table, k=self.opts.k, temperature=temp, key=key, want_q=want_q,
                        sampler_x=self.opts.sampler_x,
                        top_fs=self.opts.plan.after_miss[:self.opts.k])

  def _first_spec_fn(self, params, kv, token, pos, live, page_table, temp, key, want_q):
    key, sub = jax.random.split(key)
    spec, q, kv = self._draft_now(params, kv, token, pos, live, page_table, temp, sub, want_q)
    state = DraftState(token=token, pos=pos, live=live, spec=spec,
                       last_hit=jnp.zeros_like(live), key=key)
    return kv, state, q

  def _build_cache_fn(self, params, kv, ds: DraftState, page_table, temp, branch_a_lists,
                      branch_rank_lists, want_q):
    k, ps = self.opts.k, self.draft.page_size
    b = ds.token.shape[0]
    live = ds.live
    # 1. Glue decode over [r, d1..dK]: writes the draft KV that every branch builds on.
    glue = jnp.concatenate([ds.token[:, None], ds.spec], axis=1)
    positions = ds.pos[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None, :]
    attn = AttentionInputs(page_table=page_table,
                           slot_mapping=slot_mapping(page_table, positions, live[:, None], ps),
                           kv_limit=jnp.where(live[:, None], positions + 1, 0))
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
    keys = jax.random.split(jax.random.fold_in(ds.key, 1), k)

    def step(carry, xs):
      tok, scratch = carry
      j, key_j, top_f = xs
      logits, _, scratch = self.draft.forward(params, kv, tok, base + j, tree_attn,
                                              scratch=scratch)
      nxt, q = draw(logits, temp_b, key_j, want_q, self.opts.sampler_x, top_f, max_f)
      return (nxt, scratch), (nxt, q)

    _, (tokens, qs) = jax.lax.scan(step, (cand, scratch),
                                   (jnp.arange(k, dtype=jnp.int32), keys, top_fs))
    cache = SpeculationCache(branch_a=branch_a, branch_tok=cand,
                             tokens=jnp.moveaxis(tokens, 0, 2),
                             q=jnp.moveaxis(qs, 0, 2) if want_q else None)
    return kv, cache

  def _lookup_fn(self, params, kv, ds: DraftState, cache: SpeculationCache, outcome,
                 page_table, temp, want_q):
    accepted, recovery, pos = outcome[0], outcome[1], outcome[2]
    live = outcome[3] == 0
    hit, index = fo.lookup(cache.branch_a, cache.branch_tok, accepted, recovery)
    hit = hit & ds.live
    pick = lambda x: jnp.take_along_axis(
        x, index.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]
    spec = pick(cache.tokens)
    q = pick(cache.q) if want_q else None
    sub, key = jax.random.fold_in(ds.key, 2), jax.random.fold_in(ds.key, 3)
    miss = live & ~hit
    if self.opts.fallback == "jit":
      def draft_misses(_):
        fb_spec, fb_q, kv2 = self._draft_now(params, kv, recovery, pos, miss, page_table,
                                             temp, sub, want_q)
        return kv2, jnp.where(miss[:, None], fb_spec, spec), (
            jnp.where(miss[:, None, None], fb_q, q) if want_q else None)

      kv, spec, q = jax.lax.cond(jnp.any(miss), draft_misses, lambda _: (kv, spec, q), None)
    # `fast`: a miss keeps the top branch of the same acceptance length (free to produce;
    # any proposal is exact because verification uses the q it was drawn from).
    new = DraftState(token=recovery, pos=pos, live=live, spec=spec,
                     last_hit=hit | ~ds.live, key=key)
    return kv, new, (spec, q), hit
