"""The layer's kernels in plain XLA: the reference every Pallas kernel is tested against.

Paged attention, RoPE + the KV write, and a weight product with its neighbours fused in.

One function covers prefill, decode, verification and SSD tree decode because every query
carries its own visibility limit: query (b, i) attends to the logical KV positions
[0, kv_limit[b, i]) of sequence b. Causal masking among the new tokens of a step is just
kv_limit = position + 1 (their KV is written to the pages before attention runs); a tree
branch that hangs off glue position a gets kv_limit = n + a + 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully masked rows give exp(-inf)=0 instead of NaN


def paged_attention(q, k_pages, v_pages, page_table, kv_limit, *, scale):
  """Attention of new queries over a paged KV cache.

  Args:
    q: [B, Q, Hq, D] queries.
    k_pages, v_pages: [num_pages, page_size, Hkv, D], one layer's page pool.
    page_table: int32 [B, P]; logical position p of sequence b lives in page
      page_table[b, p // page_size] at slot p % page_size.
    kv_limit: int32 [B, Q]; query (b, i) sees positions [0, kv_limit[b, i]).
    scale: softmax scale (usually head_dim ** -0.5).

  Returns:
    out: [B, Q, Hq, D] in q.dtype (zeros where kv_limit == 0),
    lse: float32 [B, Q, Hq], the log-sum-exp of the scores (NEG_INF where nothing is
      visible), so that a caller can merge it with attention over other keys.
  """
  b, nq, hq, d = q.shape
  _, page_size, hkv, _ = k_pages.shape
  group = hq // hkv
  # Gather only the pages this batch references: [B, P*page_size, Hkv, D].
  k = k_pages[page_table].reshape(b, -1, hkv, d)
  v = v_pages[page_table].reshape(b, -1, hkv, d)
  qg = q.reshape(b, nq, hkv, group, d).astype(jnp.float32)
  s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32)) * scale
  kv_pos = jnp.arange(k.shape[1], dtype=jnp.int32)
  visible = kv_pos[None, None, :] < kv_limit[:, :, None]  # [B, Q, T]
  s = jnp.where(visible[:, None, None], s, NEG_INF)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(visible[:, None, None], jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", p / jnp.maximum(l, 1e-30), v.astype(jnp.float32))
  lse = jnp.where(l[..., 0] > 0, m[..., 0] + jnp.log(jnp.maximum(l[..., 0], 1e-30)), NEG_INF)
  lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, nq, hq)
  return out.reshape(b, nq, hq, d).astype(q.dtype), lse


def dense_attention(q, k, v, kv_len, *, scale):
  """Attention of each query over its own small private KV (SSD tree scratch).

  Args:
    q: [B, M, Hq, D], one query per branch.
    k, v: [B, M, S, Hkv, D], the branch's own earlier tree tokens.
    kv_len: int (traced or static), how many of the S slots are valid.

  Returns (out [B, M, Hq, D] in q.dtype, lse float32 [B, M, Hq]).
  """
  b, m_, hq, d = q.shape
  s_len, hkv = k.shape[2], k.shape[3]
  group = hq // hkv
  qg = q.reshape(b, m_, hkv, group, d).astype(jnp.float32)
  s = jnp.einsum("bmhgd,bmshd->bmhgs", qg, k.astype(jnp.float32)) * scale
  visible = jnp.arange(s_len) < kv_len
  s = jnp.where(visible, s, NEG_INF)
  mx = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.where(visible, jnp.exp(s - mx), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bmhgs,bmshd->bmhgd", p / jnp.maximum(l, 1e-30), v.astype(jnp.float32))
  lse = jnp.where(l[..., 0] > 0, mx[..., 0] + jnp.log(jnp.maximum(l[..., 0], 1e-30)), NEG_INF)
  return out.reshape(b, m_, hq, d).astype(q.dtype), lse.reshape(b, m_, hq)


def merge_attention(out_a, lse_a, out_b, lse_b):
  """Combine two attentions over disjoint key sets into attention over their union."""
  m = jnp.maximum(lse_a, lse_b)
  wa = jnp.exp(lse_a - m)
  wb = jnp.exp(lse_b - m)
  denom = jnp.maximum(wa + wb, 1e-30)
  out = (out_a.astype(jnp.float32) * (wa / denom)[..., None]
         + out_b.astype(jnp.float32) * (wb / denom)[..., None])
  return out.astype(out_a.dtype)


def extend_attention(out, lse, q, scratch_kv, kv_len, *, scale):
  """Attention over other keys (out, lse, e.g. the paged context) extended by each query's
  own small private KV: equal to merge_attention(out, lse, *dense_attention(...)).

  Args:
    out: [B, M, Hq, D], lse: float32 [B, M, Hq], attention of q over the other keys
      (lse = NEG_INF where it saw nothing).
    q: [B, M, Hq, D], one query per branch.
    scratch_kv: [B, M, S, 2, Hkv, D], the branch's own K (index 0) and V (index 1).
    kv_len: how many of the S slots are valid (traced or static, >= 1).

  Returns out [B, M, Hq, D] in out.dtype.

  Written as products and reductions rather than einsums: S and D are tiny (S <= K slots,
  one query per branch), so the dots would be separate small GEMM launches, while as
  elementwise work plus reductions XLA fuses the scores, the softmax and the merge with
  the paged result into a few kernels (this runs once per layer and tree step).
  """
  b, m_, hq, d = q.shape
  s_len, hkv = scratch_kv.shape[2], scratch_kv.shape[4]
  group = hq // hkv
  f32 = jnp.float32
  qg = q.reshape(b, m_, 1, hkv, group, d).astype(f32)
  k = scratch_kv[:, :, :, 0, :, None, :].astype(f32)          # [B, M, S, Hkv, 1, D]
  v = scratch_kv[:, :, :, 1, :, None, :].astype(f32)
  s = jnp.sum(qg * k, axis=-1) * scale                        # [B, M, S, Hkv, G]
  visible = (jnp.arange(s_len) < kv_len)[None, None, :, None, None]
  s = jnp.where(visible, s, NEG_INF)
  lse_o = lse.reshape(b, m_, hkv, group).astype(f32)
  mx = jnp.maximum(jnp.max(s, axis=2), lse_o)                 # [B, M, Hkv, G]
  p = jnp.where(visible, jnp.exp(s - mx[:, :, None]), 0.0)
  w = jnp.exp(lse_o - mx)  # the other keys' share (0 where they saw nothing)
  denom = jnp.maximum(w + jnp.sum(p, axis=2), 1e-30)
  acc = (w[..., None] * out.reshape(b, m_, hkv, group, d).astype(f32)
         + jnp.sum(p[..., None] * v, axis=2))
  return (acc / denom[..., None]).reshape(b, m_, hq, d).astype(out.dtype)


def rms_norm(x, weight, *, eps: float):
  """RMSNorm over the last axis, computed in float32, returned in x's dtype."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (xf * weight.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x, positions, inv_freq):
  """Rotate x [B, Q, H, D] by its positions [B, Q] (HF's half-split convention)."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  half = x.shape[-1] // 2
  x1 = x[..., :half].astype(jnp.float32)
  x2 = x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def write_kv(k_pages, v_pages, k, v, slot_mapping):
  """Scatter new K/V [B, Q, Hkv, D] into the pools at flat slots; slot -1 writes nothing.

  The pools are indexed as they are, by (page, offset) pairs, never reshaped to one flat
  [num_pages * page_size] axis: with one row to write (a batch-1 decode step) XLA turns
  the scatter of a reshaped pool into a dynamic-update-slice that its CPU backend then
  duplicates (one for the attention that reads the pool, one for the returned pool),
  copying every layer's whole pool several times per step. Written this way the update
  stays in place on every backend, whatever the pool's size.
  """
  num_pages, page_size, hkv, d = k_pages.shape
  flat = slot_mapping.reshape(-1)
  # An out-of-range page with mode="drop" is how "write nothing" is expressed.
  page = jnp.where(flat < 0, num_pages, flat // page_size)
  offset = jnp.where(flat < 0, 0, flat % page_size)
  k_pages = k_pages.at[page, offset].set(k.reshape(-1, hkv, d).astype(k_pages.dtype),
                                         mode="drop")
  v_pages = v_pages.at[page, offset].set(v.reshape(-1, hkv, d).astype(v_pages.dtype),
                                         mode="drop")
  return k_pages, v_pages


def rope_write_kv(qkv, positions, inv_freq, k_pages, v_pages, slot_mapping):
  """RoPE on q and k at positions [B, Q], and the rotated k and v written into the pools at
  slot_mapping [B, Q] (-1 writes nothing). qkv [B, Q, Hkv, G + 2, D] holds, per KV head,
  its G query heads, then its k, then its v (the fused projection's layout). Returns
  (rotated q [B, Q, Hkv * G, D], k_pages, v_pages)."""
  b, nq, hkv, g2, d = qkv.shape
  g = g2 - 2
  k_pages, v_pages = write_kv(k_pages, v_pages, apply_rope(qkv[:, :, :, g], positions,
                                                           inv_freq),
                              qkv[:, :, :, g + 1], slot_mapping)
  q = qkv[:, :, :, :g].reshape(b, nq, hkv * g, d)
  return apply_rope(q, positions, inv_freq), k_pages, v_pages


def fused_matmul(x, w, *, norm_gain=None, eps: float = 1e-6, gated: bool = False,
                 residual=None, out_dtype=None):
  """x [M, K] @ w [K, N] -> [M, N] with the layer's neighbours of the product folded in:

  norm_gain [K]: x goes through RMSNorm first, computed as rsqrt(mean(x^2) + eps) times
    ((x * gain) @ w) (the per-row scale commutes with the product, so a kernel can apply
    it after the K loop); `rms_norm` then the product gives the same in exact arithmetic.
  gated: w is [K, 2, N] (gate, up) and the result is silu(x @ gate) * (x @ up).
  residual [M, N]: added to the result.

  Accumulates in float32 and rounds to out_dtype (x's by default) where the unfused layer
  stores a tensor: the product, the activation, the sum.
  """
  odt = jnp.dtype(out_dtype or x.dtype)
  xf = x.astype(jnp.float32)
  if norm_gain is not None:
    scale = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    xf = xf * norm_gain.astype(jnp.float32)
  precision = jax.lax.Precision.HIGHEST if w.dtype == jnp.float32 else None
  y = jax.lax.dot_general(xf.astype(w.dtype), w, (((1,), (0,)), ((), ())),
                          precision=precision, preferred_element_type=jnp.float32)
  if norm_gain is not None:
    y = y * scale.reshape((-1,) + (1,) * (y.ndim - 1))
  rounded = lambda a: a.astype(odt).astype(jnp.float32)
  if gated:
    gate, up = rounded(y[:, 0]), rounded(y[:, 1])
    out = rounded(gate / (1.0 + jnp.exp(-gate))) * up
  else:
    out = rounded(y)
  if residual is not None:
    out = out + residual.astype(jnp.float32)
  return out.astype(odt)
