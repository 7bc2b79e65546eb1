"""Verification of a speculation: how many draft tokens the target accepts, and what follows.

Pure array functions, shared by SD and SSD. A speculation is `[r, d1..dK]`; the target has
scored it, giving its next-token distributions p_0..p_K (p_i follows d_i, p_0 follows r).
The outcome is (a, r'): a draft tokens accepted and the recovery/bonus token r'.
"""

from __future__ import annotations

import jax.numpy as jnp

from ssd_jax.engine.sampling import sample_from, uniform_rows


def greedy_verify(target_argmax, draft_tokens):
  """Temperature 0: accept the longest prefix where d_i == argmax p_{i-1}.

  target_argmax: int32 [B, K+1]; draft_tokens: int32 [B, K].
  Returns (accepted [B], recovery [B]) with recovery = argmax p_a.
  """
  match = draft_tokens == target_argmax[:, :-1]
  accepted = jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=1), axis=1)
  recovery = jnp.take_along_axis(target_argmax, accepted[:, None], axis=1)[:, 0]
  return accepted.astype(jnp.int32), recovery.astype(jnp.int32)


def rejection_verify(p, q, draft_tokens, keys_accept, keys_residual):
  """Temperature > 0: standard speculative rejection sampling (exact in distribution).

  p: float32 [B, K+1, V] target distributions; q: float32 [B, K, V] the distributions
  the draft actually sampled d_1..d_K from; draft_tokens: int32 [B, K].
  Accept d_i with probability min(1, p(d_i) / q(d_i)); at the first rejection a, draw
  r' from norm(max(0, p_a - q_a)); if all K are accepted, draw the bonus from p_K.
  keys_accept, keys_residual: per-row PRNG keys [B] of the uniforms and of r'.
  """
  b, k = draft_tokens.shape
  p_d = jnp.take_along_axis(p[:, :k], draft_tokens[..., None], axis=-1)[..., 0]
  q_d = jnp.take_along_axis(q, draft_tokens[..., None], axis=-1)[..., 0]
  u = uniform_rows(keys_accept, k)
  # u < p/q  <=>  u * q < p (no division; q(d) > 0 because the draft sampled d).
  ok = u * q_d < p_d
  accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
  p_a = jnp.take_along_axis(p, accepted[:, None, None], axis=1)[:, 0]
  q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # q_K := 0 (bonus: p_K)
  q_a = jnp.take_along_axis(q_pad, accepted[:, None, None], axis=1)[:, 0]
  residual = jnp.maximum(p_a - q_a, 0.0)
  mass = jnp.sum(residual, axis=-1, keepdims=True)
  # mass == 0 happens only when p_a == q_a, where rejection has probability 0; fall back
  # to p_a so the draw stays well defined.
  residual = jnp.where(mass > 0, residual / jnp.maximum(mass, 1e-30), p_a)
  recovery = sample_from(residual, keys_residual)
  return accepted, recovery


def commit_tokens(draft_tokens, accepted, recovery):
  """The tokens a round adds to the output: d_1..d_a then r' ([B, K+1], valid a+1)."""
  b, k = draft_tokens.shape
  idx = jnp.arange(k + 1)[None, :]
  padded = jnp.concatenate([draft_tokens, jnp.zeros((b, 1), draft_tokens.dtype)], axis=1)
  return jnp.where(idx < accepted[:, None], padded,
                   jnp.where(idx == accepted[:, None], recovery[:, None], 0))
