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
  """Scatter new K/V [B, Q, Hkv, D] into the pools at flat slots; slot -1 writes nothing."""
  num_pages, page_size, hkv, d = k_pages.shape
  flat = slot_mapping.reshape(-1)
  # An out-of-range index with mode="drop" is how "write nothing" is expressed.
  flat = jnp.where(flat < 0, num_pages * page_size, flat)
  kf = k_pages.reshape(num_pages * page_size, hkv, d)
  vf = v_pages.reshape(num_pages * page_size, hkv, d)
  kf = kf.at[flat].set(k.reshape(-1, hkv, d).astype(kf.dtype), mode="drop")
  vf = vf.at[flat].set(v.reshape(-1, hkv, d).astype(vf.dtype), mode="drop")
  return kf.reshape(k_pages.shape), vf.reshape(v_pages.shape)


def paged_attention(q, k_pages, v_pages, page_table, kv_limit, *, scale, impl="xla"):
  """See `reference.paged_attention` for the contract; returns (out, lse)."""
  impl = resolve_impl(impl)
  if impl == "xla":
    return reference.paged_attention(q, k_pages, v_pages, page_table, kv_limit, scale=scale)
  from ssd_jax.kernels import pallas_attention  # imported lazily: Pallas is heavy
  return pallas_attention.sharded_paged_attention(
      q, k_pages, v_pages, page_table, kv_limit, scale=scale, mesh=_MESH.get())
