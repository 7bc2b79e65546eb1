"""The draft's side of speculation: its sampling distribution and K-step drafting.

Pure functions over a `ModelRunner`'s forward; used by SD (every round), and by SSD for the
first speculation and the `jit` fallback after a cache miss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssd_jax.engine.runner import paged_step
from ssd_jax.engine.sampling import fold_rows, sample_from


def draft_probs(logits, temperature, sampler_x=None, top_f=0, max_f: int = 0):
  """The distribution q the draft samples from: [B, ..., V] float32.

  temperature [B] (0 = greedy: one-hot argmax). With `sampler_x` (Saguaro's cache-aware
  sampling) the draft's own top-`top_f` tokens are down-weighted by that factor: after a
  rejection the residual max(0, p - q) then concentrates on exactly the tokens the SSD
  cache prepared as recovery candidates. Verification uses this q, so outputs stay exact.
  `top_f` may be traced (it varies by drafting step); `max_f` is its static upper bound.
  """
  logits = logits.astype(jnp.float32)
  t = temperature.reshape(temperature.shape + (1,) * (logits.ndim - temperature.ndim))
  q = jax.nn.softmax(logits / jnp.where(t > 0, t, 1.0), axis=-1)
  if sampler_x is not None and max_f > 0:
    top_vals = jax.lax.top_k(logits, max_f)[0]
    kth = jnp.take(top_vals, jnp.clip(top_f - 1, 0, max_f - 1), axis=-1)[..., None]
    down = (logits >= kth) & (top_f > 0)
    q = jnp.where(down, q * sampler_x, q)
    q = q / jnp.sum(q, axis=-1, keepdims=True)
  onehot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return jnp.where(t > 0, q, onehot)


def draw(logits, temperature, keys, want_q: bool, sampler_x=None, top_f=0, max_f: int = 0):
  """Draw draft tokens (row b with keys[b]); returns (tokens, q or None). Greedy rows take
  the argmax."""
  greedy_tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if not want_q:
    return greedy_tok, None
  q = draft_probs(logits, temperature, sampler_x, top_f, max_f)
  t = temperature.reshape(temperature.shape + (1,) * (logits.ndim - 1 - temperature.ndim))
  return jnp.where(t > 0, sample_from(q, keys), greedy_tok), q


def draft_decode(runner, params, kv, tokens0, pos0, live, page_table, *, k: int, temperature,
                 keys, want_q: bool, sampler_x=None, top_fs=None, steps=None):
  """Draft K tokens autoregressively, writing the draft's KV.

  tokens0/pos0: [B, Q0] the first step's inputs (Q0 = 1 normally; SD passes the previous
  token too so that its KV is (re)written); the first draft token follows tokens0[:, -1].
  live [B]: sequences still decoding (others write nothing).
  keys [B]: each row's key for this drafting (step j draws with it folded with j).
  top_fs: per-step top-F for cache-aware sampling (length k), or None.
  steps: a traced count (0 or k) of steps to run, as one loop whose trip count only the
  device knows (SSD's jit fallback: k after a miss, 0 after a hit); needs Q0 = 1. Steps
  not run leave zeros.
  Returns (tokens [B, K], q [B, K, V] or None, kv).
  """
  ps = runner.page_size
  fs = [int(f) for f in top_fs] if top_fs is not None else [0] * k
  max_f = max(fs)
  top_fs = jnp.asarray(fs, jnp.int32)

  def step(kv, tok, pos, j, top_f):
    attn = paged_step(page_table, pos, live[:, None], ps)
    # Only the last query's logits are drawn from: with Q0 > 1 (SD's first step) the head,
    # a draft step's largest GEMM, runs for that row alone.
    last = (jnp.full((tok.shape[0],), tok.shape[1] - 1, jnp.int32) if tok.shape[1] > 1
            else None)
    logits, kv, _ = runner.forward(params, kv, tok, pos, attn, logits_at=last)
    logits = logits if last is not None else logits[:, -1]
    nxt, q = draw(logits, temperature, fold_rows(keys, j), want_q, sampler_x, top_f, max_f)
    return kv, nxt, q

  if steps is not None:
    return _draft_loop(step, kv, tokens0, pos0, top_fs, steps, k, want_q,
                       runner.cfg.vocab_size)
  kv, first, q0 = step(kv, tokens0, pos0, 0, top_fs[0])
  if k == 1:
    return first[:, None], (q0[:, None] if want_q else None), kv

  # The remaining K-1 steps share one compiled body (a lax loop, not K dispatches).
  def body(carry, xs):
    kv, tok, pos = carry
    j, top_f_j = xs
    kv, nxt, q = step(kv, tok[:, None], pos, j, top_f_j)
    return (kv, nxt, pos + 1), (nxt, q)

  (kv, _, _), (rest, rest_q) = jax.lax.scan(body, (kv, first, pos0[:, -1:] + 1),
                                            (jnp.arange(1, k, dtype=jnp.int32), top_fs[1:]))
  tokens = jnp.concatenate([first[:, None], jnp.moveaxis(rest, 0, 1)], axis=1)
  q = jnp.concatenate([q0[:, None], jnp.moveaxis(rest_q, 0, 1)], axis=1) if want_q else None
  return tokens, q, kv


def _draft_loop(step, kv, tokens0, pos0, top_fs, steps, k: int, want_q: bool,
                vocab: int):
  """draft_decode's steps as one `lax.while_loop` of `steps` (traced) trips."""
  b = tokens0.shape[0]
  tokens = jnp.zeros((b, k), jnp.int32)
  qs = jnp.zeros((b, k, vocab), jnp.float32) if want_q else None

  def body(carry):
    i, kv, tok, pos, tokens, qs = carry
    kv, nxt, q = step(kv, tok, pos, i, top_fs[i])
    tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, i))
    if want_q:
      qs = jax.lax.dynamic_update_slice(qs, q[:, None], (0, i, 0))
    return i + 1, kv, nxt[:, None], pos + 1, tokens, qs

  _, kv, _, _, tokens, qs = jax.lax.while_loop(
      lambda c: c[0] < steps, body, (jnp.int32(0), kv, tokens0, pos0, tokens, qs))
  return tokens, qs, kv
