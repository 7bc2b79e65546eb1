"""Pallas kernel for the small ops between a layer's Q/KV projection and its attention:
RoPE on q and k and the writes of k and v into the page pools, one launch where XLA
needs three (a concatenate fusion for the rotations and a scatter for each pool).

At batch 1 an 8B decode step's GEMMs read weights at ~0.9 of the read ceiling, and most of
the rest of the step is small fusions of ~2 us each, eight per layer (bench/RESULTS.md,
"Where a step's device time goes"): what they cost is their launches, not their bytes.

Contract: `reference.rope_write_kv`. On GPU it lowers through Pallas' Triton backend;
elsewhere it runs in interpret mode (slow, for tests). Triton needs power-of-two vectors:
head_dim must be one (other shapes fall back to the reference).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ssd_jax.kernels import reference
from ssd_jax.kernels.pallas_attention import _compiler_params, _is_pow2, _on_gpu, _shard_map
from ssd_jax.sharding import rules

__all__ = ["rope_write_kv", "sharded_rope_write_kv"]


def _rope_write_kernel(pos_ref, slot_ref, freq_ref, qkv_ref, kp_in, vp_in, qo_ref, kp_ref,
                       vp_ref, *, group: int, page_size: int):
  """Program (token i, head h): h < Hq rotates query head h into qo_ref; h >= Hq rotates
  KV head h - Hq and, unless the token's slot is -1, writes its K and V into the pools.

  pos_ref/slot_ref [N] int32, freq_ref [D/2] float32, qkv_ref [N, Hkv, G + 2, D] (per KV
  head its G query heads, then K, then V: the fused projection's output as it is);
  kp_ref / vp_ref are the pools [num_pages, page_size, Hkv, D], aliased to kp_in / vp_in
  (only the written slots change). Halves are loaded and stored apart (HF's half-split
  rotation), so no vector is ever sliced or concatenated in registers.
  """
  del kp_in, vp_in  # the same buffers as kp_ref / vp_ref
  i, h = pl.program_id(0), pl.program_id(1)
  num_heads = qkv_ref.shape[1] * group
  half = freq_ref.shape[0]
  lo, hi = pl.ds(0, half), pl.ds(half, half)
  angles = pos_ref[i].astype(jnp.float32) * freq_ref[...]
  cos, sin = jnp.cos(angles), jnp.sin(angles)

  def rotate(x1, x2):
    x1, x2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin

  @pl.when(h < num_heads)
  def _():
    j, qi = lax.div(h, group), lax.rem(h, group)
    r1, r2 = rotate(qkv_ref[i, j, qi, lo], qkv_ref[i, j, qi, hi])
    qo_ref[i, h, lo] = r1.astype(qo_ref.dtype)
    qo_ref[i, h, hi] = r2.astype(qo_ref.dtype)

  slot = slot_ref[i]

  @pl.when((h >= num_heads) & (slot >= 0))
  def _():
    j = h - num_heads
    page, offset = lax.div(slot, page_size), lax.rem(slot, page_size)
    r1, r2 = rotate(qkv_ref[i, j, group, lo], qkv_ref[i, j, group, hi])
    kp_ref[page, offset, j, lo] = r1.astype(kp_ref.dtype)
    kp_ref[page, offset, j, hi] = r2.astype(kp_ref.dtype)
    vp_ref[page, offset, j, lo] = qkv_ref[i, j, group + 1, lo].astype(vp_ref.dtype)
    vp_ref[page, offset, j, hi] = qkv_ref[i, j, group + 1, hi].astype(vp_ref.dtype)


def rope_write_kv(qkv, positions, inv_freq, k_pages, v_pages, slot_mapping, *,
                  interpret=None):
  """Pallas version of `reference.rope_write_kv`: returns (rotated q, k_pages, v_pages)
  with the rotated k and v written at their slots (-1: nothing). Donate the pools."""
  b, nq, hkv, g2, d = qkv.shape
  num_pages, page_size, hkv_p, d_p = k_pages.shape
  if g2 < 3 or (hkv_p, d_p) != (hkv, d) or v_pages.shape != k_pages.shape or \
      positions.shape != (b, nq) or slot_mapping.shape != (b, nq):
    raise ValueError(f"qkv {qkv.shape}, positions {positions.shape}, slot_mapping "
                     f"{slot_mapping.shape} and pools {k_pages.shape} / {v_pages.shape} "
                     "disagree")
  if interpret is None:
    interpret = not _on_gpu()
  if not interpret and not _is_pow2(d):
    return reference.rope_write_kv(qkv, positions, inv_freq, k_pages, v_pages, slot_mapping)
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  return _rope_write_jit(qkv, positions.astype(jnp.int32), inv_freq, k_pages, v_pages,
                         slot_mapping.astype(jnp.int32), interpret=bool(interpret))


@functools.partial(jax.jit, static_argnames=("interpret",))
def _rope_write_jit(qkv, positions, inv_freq, k_pages, v_pages, slot_mapping, *,
                    interpret):
  b, nq, hkv, g2, d = qkv.shape
  group, page_size = g2 - 2, k_pages.shape[1]
  hq, n = hkv * group, b * nq
  kwargs = {}
  if not interpret:
    kwargs["compiler_params"] = _compiler_params(1, 1)
  whole = lambda shape: pl.BlockSpec(shape, lambda i, h: (0,) * len(shape))
  pool = whole(k_pages.shape)
  qo, kp, vp = pl.pallas_call(
      functools.partial(_rope_write_kernel, group=group, page_size=page_size),
      grid=(n, hq + hkv),
      in_specs=[whole((n,)), whole((n,)), whole(inv_freq.shape), whole((n, hkv, g2, d)),
                pool, pool],
      out_specs=[whole((n, hq, d)), pool, pool],
      out_shape=[jax.ShapeDtypeStruct((n, hq, d), qkv.dtype),
                 jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                 jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)],
      input_output_aliases={4: 1, 5: 2},
      interpret=interpret,
      name="rope_write_kv",
      **kwargs,
  )(positions.reshape(n), slot_mapping.reshape(n), inv_freq, qkv.reshape(n, hkv, g2, d),
    k_pages, v_pages)
  return qo.reshape(b, nq, hq, d), kp, vp


def sharded_rope_write_kv(qkv, positions, inv_freq, k_pages, v_pages, slot_mapping, *,
                          mesh):
  """`rope_write_kv` on a ("dp", "tp") mesh: KV heads (with their query heads) split over
  "tp" (the pools are sharded on their head axis), so every shard rotates and writes its
  own. The batch is never split here: the pools are replicated over "dp", and every
  replica must receive every row's writes."""
  if mesh is None or mesh.size == 1:
    return rope_write_kv(qkv, positions, inv_freq, k_pages, v_pages, slot_mapping)
  tp = mesh.shape.get(rules.TP, 1)
  if qkv.shape[2] % tp:
    raise ValueError(f"{qkv.shape[2]} KV heads do not split over tp={tp}")
  fused = rules.spec_for((None, None, "kv_heads", "stack", None))
  heads = rules.spec_for((None, None, "heads", None))
  rows = rules.spec_for((None, None))
  pools = rules.spec_for(rules.KV_PAGES_AXES)
  fn = lambda qkv, p, kp, vp, s: rope_write_kv(qkv, p, inv_freq, kp, vp, s)
  return _shard_map(fn, mesh, in_specs=(fused, rows, pools, pools, rows),
                    out_specs=(heads, pools, pools))(qkv, positions, k_pages, v_pages,
                                                     slot_mapping)
