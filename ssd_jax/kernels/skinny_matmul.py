"""A Pallas matmul for few rows: x [M, K] @ w, M <= 32, w read once at full bandwidth.

Why: a decode step multiplies a handful of activation rows by every weight matrix once,
so it is a chain of weight reads. At such M, XLA's GPU backend picks split-K GEMMs or
multiply + reduce fusions that read some weights well under the read ceiling (see
bench/RESULTS.md, "Fixed cost per program"). This kernel streams the weight through the
SMs in column tiles: program (j, s) owns columns [j*block_n, (j+1)*block_n) and the s-th
of `splits` equal slices of K, loops over its slice `block_k` rows at a time (Triton
software-pipelines the loads, `num_stages` deep) and accumulates on the tensor cores in
float32. With splits > 1 the partial sums [splits, M, N] are added by XLA afterwards.

`w` is [K, N] (a projection stored input-major) or, with `transpose_w`, [N, K] (a tied
embedding used as the output head). Rows are padded to 16, Triton's matmul minimum.

On GPU it lowers through Pallas' Triton backend; elsewhere it runs in interpret mode
(slow, for tests). The contract is `jnp.dot(x, w)` with float32 accumulation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

__all__ = ["skinny_matmul", "default_plan", "supported"]

MAX_ROWS = 32


def _num_sms() -> int:
  try:
    return int(getattr(jax.devices()[0], "core_count", 0)) or 132
  except Exception:  # pylint: disable=broad-except
    return 132


def _compiler_params(num_warps: int, num_stages: int):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
  cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


def supported(m: int, k: int, n: int) -> bool:
  """Shapes the kernel takes: few rows, K and N multiples of 64 (every real model's)."""
  return m <= MAX_ROWS and k % 64 == 0 and n % 64 == 0


def default_plan(m: int, k: int, n: int, *, num_sms: int | None = None,
                 block_n: int | None = None, block_k: int | None = None) -> dict:
  """Launch parameters, from sweeps at the 8B / 1B / 135M shapes on an H200 (M = 8 and
  32; bench/RESULTS.md, "Few-row weight products"): short K steps (64 rows of the weight
  a step), column tiles of 64 (128 for heads of >= 256 tiles per SM) and K split until
  every SM has a program (the best plans of the small matrices had 1-2 per SM; 4 ran
  slower). A tile size given is kept and the split fitted to it."""
  num_sms = num_sms or _num_sms()
  block_n = block_n or (128 if n >= 128 * 2 * num_sms and n % 128 == 0 else 64)
  block_k = block_k or 64
  splits = 1
  while (n // block_n) * splits < num_sms and k % (2 * splits * block_k) == 0:
    splits *= 2
  return dict(block_n=block_n, block_k=block_k, splits=splits, num_warps=4, num_stages=3)


# Weights of at most this many bytes go to the kernel under matmuls("pallas"): on an H200
# it read the 1B shape's q / kv / o weights (4-8 MB) in 7-10 us where XLA took 10-13 us,
# while XLA's GEMMs read the larger ones (the MLP, the heads, the 8B's projections) as
# fast or faster (bench/RESULTS.md, "Few-row weight products").
MAX_WEIGHT_BYTES = 8 << 20


def worth_it(m: int, k: int, n: int, itemsize: int) -> bool:
  """Whether the kernel beats XLA's GEMM for this product (measured, see above)."""
  return supported(m, k, n) and k * n * itemsize <= MAX_WEIGHT_BYTES


def _kernel(x_ref, w_ref, o_ref, *, block_k: int, steps: int, transpose_w: bool):
  rows = x_ref.shape[0]
  block_n = o_ref.shape[-1]
  dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))
  # float32 operands in full precision (Triton would otherwise use TF32).
  precision = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None

  def body(i, acc):
    k0 = pl.multiple_of(i * block_k, block_k)
    x = x_ref[:, pl.ds(k0, block_k)]
    w = w_ref[:, pl.ds(k0, block_k)] if transpose_w else w_ref[pl.ds(k0, block_k), :]
    return acc + lax.dot_general(x, w, dims, precision=precision,
                                 preferred_element_type=jnp.float32)

  acc = lax.fori_loop(0, steps, body, jnp.zeros((rows, block_n), jnp.float32))
  o_ref[0] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("transpose_w", "out_dtype", "block_n", "block_k",
                                             "splits", "num_warps", "num_stages", "interpret"))
def _skinny(x, w, *, transpose_w, out_dtype, block_n, block_k, splits, num_warps, num_stages,
            interpret):
  m, k = x.shape
  n = w.shape[0] if transpose_w else w.shape[1]
  rows = max(16, 1 << (m - 1).bit_length())
  xp = jnp.pad(x.astype(w.dtype), ((0, rows - m), (0, 0)))
  k_part = k // splits
  if transpose_w:
    w_spec = pl.BlockSpec((block_n, k_part), lambda j, s: (j, s))
  else:
    w_spec = pl.BlockSpec((k_part, block_n), lambda j, s: (s, j))
  part_dtype = out_dtype if splits == 1 else jnp.float32
  kwargs = {} if interpret else dict(
      compiler_params=_compiler_params(num_warps, num_stages))
  parts = pl.pallas_call(
      functools.partial(_kernel, block_k=block_k, steps=k_part // block_k,
                        transpose_w=transpose_w),
      grid=(n // block_n, splits),
      in_specs=[pl.BlockSpec((rows, k_part), lambda j, s: (0, s)), w_spec],
      out_specs=pl.BlockSpec((1, rows, block_n), lambda j, s: (s, 0, j)),
      out_shape=jax.ShapeDtypeStruct((splits, rows, n), part_dtype),
      interpret=interpret,
      **kwargs,
  )(xp, w)
  out = parts[0] if splits == 1 else parts.sum(axis=0)
  return out[:m].astype(out_dtype)


def skinny_matmul(x, w, *, transpose_w: bool = False, out_dtype=None, interpret=None, **plan):
  """x [M, K] @ w [K, N] (w [N, K] with transpose_w) -> [M, N] in out_dtype (x's dtype by
  default), float32 accumulation. `plan` overrides `default_plan`'s launch parameters."""
  m, k = x.shape
  n = w.shape[0] if transpose_w else w.shape[1]
  if (w.shape[1] if transpose_w else w.shape[0]) != k:
    raise ValueError(f"skinny_matmul: x {x.shape} and w {w.shape} do not contract")
  if not supported(m, k, n):
    raise ValueError(f"skinny_matmul takes M <= {MAX_ROWS} and K, N multiples of 64; "
                     f"got M={m}, K={k}, N={n}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  tiles = {name: plan[name] for name in ("block_n", "block_k") if name in plan}
  cfg = {**default_plan(m, k, n, **tiles), **plan}
  if k % (cfg["splits"] * cfg["block_k"]) or n % cfg["block_n"]:
    raise ValueError(f"skinny_matmul plan {cfg} does not tile K={k}, N={n}")
  return _skinny(x, w, transpose_w=transpose_w, out_dtype=jnp.dtype(out_dtype or x.dtype),
                 interpret=interpret, **cfg)
