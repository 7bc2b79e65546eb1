"""The model's kernels: attention over the paged KV cache and the weight products.

`paged_attention(..., impl=)` picks the implementation: "xla" (reference, any backend),
"pallas" (Pallas kernels; on CPU they run in interpret mode), or "auto" (Pallas on GPU,
XLA elsewhere).

`project(spec, x, w)` is the model's every weight product: `jnp.einsum(spec, x, w)`, or,
inside `matmuls("pallas")` and for few rows of bfloat16, the Pallas skinny kernel
(skinny_matmul.py). The runner that traces a model picks the implementation, as it
declares the mesh: the model itself names neither.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp

from ssd_jax.kernels.reference import dense_attention, extend_attention, merge_attention
from ssd_jax.kernels import reference

__all__ = ["paged_attention", "dense_attention", "extend_attention", "merge_attention",
           "write_kv", "resolve_impl", "on_mesh", "project", "matmuls", "resolve_matmul_impl"]

# The mesh the model is being traced for. Models know nothing of meshes; the runner that
# places a model declares it here, and kernels that must shard_map over heads read it.
_MESH = contextvars.ContextVar("ssd_jax_attention_mesh", default=None)


@contextlib.contextmanager
def on_mesh(mesh):
  token = _MESH.set(mesh)
  try:
    yield
  finally:
    _MESH.reset(token)


# How `project` multiplies, while a runner traces its model ("xla" or "pallas").
_MATMUL = contextvars.ContextVar("ssd_jax_matmul_impl", default="xla")


@contextlib.contextmanager
def matmuls(impl: str):
  token = _MATMUL.set(impl)
  try:
    yield
  finally:
    _MATMUL.reset(token)


def resolve_matmul_impl(impl: str) -> str:
  if impl not in ("auto", "xla", "pallas"):
    raise ValueError(f"matmul impl {impl!r} is unknown; use auto, xla or pallas")
  if impl == "auto":
    return "xla"
  return impl


def project(spec: str, x, w, *, transpose_w: bool = False, preferred_element_type=None):
  """`jnp.einsum(spec, x, w)` for a spec that contracts x's last axis with w's first axis
  (its last with `transpose_w`), leaving the rest of w's axes in order.

  Under `matmuls("pallas")`, products of at most `skinny_matmul.MAX_ROWS` rows with a
  16-bit weight of at most `skinny_matmul.MAX_WEIGHT_BYTES` on one device run the Pallas
  skinny kernel (where it measured faster than XLA's GEMMs); float32 (the exactness
  tests' precision), larger and sharded weights take XLA's path.
  """
  if _MATMUL.get() == "pallas" and w.dtype in (jnp.bfloat16, jnp.float16):
    mesh = _MESH.get()
    k = x.shape[-1]
    m = math.prod(x.shape[:-1])
    w_out = w.shape[:-1] if transpose_w else w.shape[1:]
    n = math.prod(w_out)
    from ssd_jax.kernels import skinny_matmul  # imported lazily: Pallas is heavy
    if (mesh is None or mesh.size == 1) and skinny_matmul.worth_it(m, k, n, w.dtype.itemsize):
      w2 = w.reshape(n, k) if transpose_w else w.reshape(k, n)
      y = skinny_matmul.skinny_matmul(x.reshape(m, k), w2, transpose_w=transpose_w,
                                      out_dtype=preferred_element_type or x.dtype)
      return y.reshape(*x.shape[:-1], *w_out)
  return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)


def resolve_impl(impl: str) -> str:
  if impl not in ("auto", "xla", "pallas"):
    raise ValueError(f"attention impl {impl!r} is unknown; use auto, xla or pallas")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return impl


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


def paged_attention(q, k_pages, v_pages, page_table, kv_limit, *, scale, impl="xla"):
  """See `reference.paged_attention` for the contract; returns (out, lse)."""
  impl = resolve_impl(impl)
  if impl == "xla":
    return reference.paged_attention(q, k_pages, v_pages, page_table, kv_limit, scale=scale)
  from ssd_jax.kernels import pallas_attention  # imported lazily: Pallas is heavy
  return pallas_attention.sharded_paged_attention(
      q, k_pages, v_pages, page_table, kv_limit, scale=scale, mesh=_MESH.get())
