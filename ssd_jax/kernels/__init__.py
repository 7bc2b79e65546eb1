"""A layer's kernels: attention over the paged KV cache, RoPE + the KV write, and the weight
products with their norm / activation / residual fused in; each one entry point over an
XLA reference and a Pallas kernel.

`impl=` picks the implementation: "xla" (reference, any backend), "pallas" (Pallas
kernels; on CPU they run in interpret mode), or "auto" (Pallas on GPU, XLA elsewhere).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

from ssd_jax.kernels.reference import (apply_rope, dense_attention, extend_attention,
                                       merge_attention, rms_norm, write_kv)
from ssd_jax.kernels import reference

__all__ = ["paged_attention", "rope_write_kv", "dense_attention",
           "extend_attention", "merge_attention", "write_kv", "apply_rope", "rms_norm",
           "fused_matmul", "fused_matmul_applies", "resolve_impl", "on_mesh"]

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


def resolve_impl(impl: str, what: str = "attention impl") -> str:
  if impl not in ("auto", "xla", "pallas"):
    raise ValueError(f"{what} {impl!r} is unknown; use auto, xla or pallas")
  if impl == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  return impl


def paged_attention(q, k_pages, v_pages, page_table, kv_limit, *, scale, impl="xla"):
  """See `reference.paged_attention` for the contract; returns (out, lse)."""
  impl = resolve_impl(impl)
  if impl == "xla":
    return reference.paged_attention(q, k_pages, v_pages, page_table, kv_limit, scale=scale)
  from ssd_jax.kernels import pallas_attention  # imported lazily: Pallas is heavy
  return pallas_attention.sharded_paged_attention(
      q, k_pages, v_pages, page_table, kv_limit, scale=scale, mesh=_MESH.get())


def rope_write_kv(qkv, positions, inv_freq, k_pages, v_pages, slot_mapping, *,
                  impl="xla"):
  """(rotated q, k_pages, v_pages) with the rotated k and v written: see
  `reference.rope_write_kv`."""
  if resolve_impl(impl) == "xla":
    return reference.rope_write_kv(qkv, positions, inv_freq, k_pages, v_pages,
                                   slot_mapping)
  from ssd_jax.kernels import pallas_layer  # pylint: disable=import-outside-toplevel
  return pallas_layer.sharded_rope_write_kv(qkv, positions, inv_freq, k_pages, v_pages,
                                            slot_mapping, mesh=_MESH.get())


def fused_matmul_applies(rows: int, impl: str) -> bool:
  """Whether `fused_matmul` runs the Pallas kernel for `rows` rows under `impl`: decode
  steps only (few rows; prefill keeps XLA's GEMMs) and only unsharded (a row-parallel
  product's partial sums must be all-reduced before the residual is added)."""
  if resolve_impl(impl, "matmul impl") != "pallas":
    return False
  from ssd_jax.kernels import pallas_matmul  # pylint: disable=import-outside-toplevel
  mesh = _MESH.get()
  return rows <= pallas_matmul.MAX_ROWS and (mesh is None or mesh.size == 1)


def fused_matmul(x, w, *, norm_gain=None, eps: float = 1e-6, gated: bool = False,
                 residual=None, impl="xla"):
  """x [M, K] @ w with the RMSNorm in front, silu(gate) * up, and the residual add: see
  `reference.fused_matmul`. The Pallas kernel where `fused_matmul_applies`."""
  if not fused_matmul_applies(x.shape[0], impl):
    return reference.fused_matmul(x, w, norm_gain=norm_gain, eps=eps, gated=gated,
                                  residual=residual)
  from ssd_jax.kernels import pallas_matmul  # pylint: disable=import-outside-toplevel
  return pallas_matmul.fused_matmul(x, w, norm_gain=norm_gain, eps=eps, gated=gated,
                                    residual=residual)
