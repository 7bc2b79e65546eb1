"""Attention over the paged KV cache: one entry point, an XLA reference and Pallas kernels.

`paged_attention(..., impl=)` picks the implementation: "xla" (reference, any backend),
"pallas" (Pallas kernels; on CPU they run in interpret mode), or "auto" (Pallas on GPU,
XLA elsewhere).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

from ssd_jax.kernels.reference import dense_attention, extend_attention, merge_attention
from ssd_jax.kernels import reference

__all__ = ["paged_attention", "dense_attention", "extend_attention", "merge_attention",
           "write_kv", "resolve_impl", "on_mesh"]

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
