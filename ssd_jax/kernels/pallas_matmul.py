"""Pallas kernels for a decode step's weight products with their neighbours fused in.

At batch 1 (8 rows) XLA launches 12 kernels per Llama layer: 4 GEMMs, the 2 Pallas
attention kernels, and 6 small ones that read a few KB each — the two RMSNorms, the split-K
reductions with the residual adds, SiLU x up (bench/RESULTS.md, "A step's launches one by
one"). Each costs ~2 us whatever its bytes. `fused_matmul` folds them into the GEMM that
reads the weight, so a layer is 4 products + RoPE/KV write + attention = 6 launches:

  norm_gain=g        rms_norm(x, g) @ w: the row's sum of squares is accumulated in the
                     same loop over K that feeds the dot, the gain multiplies x's chunk,
                     and the row's scale rsqrt(mean(x^2) + eps) multiplies the result
                     (a per-row scale commutes with the product)
  gated=True         w is [K, 2, N] (gate, up): returns silu(x @ gate) * (x @ up), both
                     tiles read by the same program
  residual=r         returns r + x @ w (the residual add as the epilogue)

Program (j, s) owns columns [j * block_n, (j + 1) * block_n) and the s-th of `splits`
slices of K, streaming its weight tile `block_k` rows at a time (Triton pipelines the
loads `num_stages` deep). Split-K partials are added by the last program of each column
tile to finish (an arrival counter), in split order, inside the same kernel. Rows are padded to 16 in registers, Triton's
smallest dot tile, by repeating the last real row (`_row_ids`), as the attention kernel
does: no padded copy of x is made, and interpret mode (CPU, tests) runs the same code.

Contract: `reference.fused_matmul`. Takes M <= MAX_ROWS rows and K, N multiples of 16.

Opt-in (`LLM(matmul_impl="pallas")`), not the default: on one H200 the kernel without
splits halved the launches of an 8B layer stack (10 -> 5 per layer) but streamed the
weights slower than XLA's split-K GEMMs (8B stack 5.60 vs 3.73 ms, 1B 1.30 vs 0.75,
135M 0.70 vs 0.72; bench/RESULTS.md, "Fused weight products"). The split-K path has not
run on a GPU yet: `bash bench/gpu/fused_matmul.sh kernels` measures it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ssd_jax.kernels.pallas_attention import _compiler_params, _num_sms, _on_gpu

__all__ = ["fused_matmul", "default_plan", "supported", "MAX_ROWS"]

MAX_ROWS = 64
MAX_SPLITS = 16


def _tile_rows(m: int) -> int:
  return max(16, 1 << (m - 1).bit_length())


def supported(m: int, k: int, n: int) -> bool:
  """Shapes the kernel takes: few rows, K and N multiples of 16 (every real model's)."""
  return 1 <= m <= MAX_ROWS and k % 16 == 0 and n % 16 == 0


def default_plan(m: int, k: int, n: int, *, num_sms: int | None = None) -> dict:
  """Launch parameters: column tiles of 64 (narrower only where N needs it: a program
  reading 32-byte rows of the weight streams slowly), K read 128 rows a step, and K split
  until every SM has a program (one SM streams at ~1/132 of the read ceiling, so a
  product with fewer programs than SMs cannot read at full speed)."""
  del m  # the plan does not depend on the rows (<= MAX_ROWS) yet
  num_sms = num_sms or _num_sms()
  block_n = 64
  while n % block_n:
    block_n //= 2
  block_k = 128
  while k % block_k:
    block_k //= 2
  tiles, splits = n // block_n, 1
  for cand in range(2, MAX_SPLITS + 1):
    if tiles * splits >= num_sms:
      break
    if k % (cand * block_k) == 0:
      splits = cand
  return dict(block_n=block_n, block_k=block_k, splits=splits, num_warps=4, num_stages=4)


def _i32(i: int):
  """A static index as an array (the atomics' indexers take no Python ints)."""
  return jnp.asarray(i, jnp.int32)


def _squeezed():
  return pl.Squeezed() if hasattr(pl, "Squeezed") else None


def _row_ids(rows: int, m: int):
  """The tile's rows: 0..m-1, then the last real row repeated (the same row gives the
  same result, so the duplicates' stores write identical values; no load or store ever
  leaves the array, and no padded copy of x is made)."""
  return jnp.minimum(jnp.arange(rows, dtype=jnp.int32), m - 1)


def _kernel(*refs, m: int, rows: int, k: int, k_split: int, block_k: int, eps: float,
            norm: bool, gated: bool, residual: bool, splits: int, interpret: bool):
  """Program (j, s): columns tile j, the s-th of `splits` slices of K. With one split it
  finishes its tile itself. With several, each program publishes its float32 partial
  sums (and the norm's partial sum of squares) to a workspace and counts itself in on
  the tile's counter; the last to arrive adds all partials in split order (so the
  result does not depend on who came last) and finishes the tile: the split-K
  reduction and the epilogue need no kernel of their own."""
  refs = list(refs)
  x_ref = refs.pop(0)
  g_ref = refs.pop(0) if norm else None
  w_refs = [refs.pop(0)] + ([refs.pop(0)] if gated else [])
  r_ref = refs.pop(0) if residual else None
  if splits > 1:
    refs.pop(0)  # the counters' input: the same buffer as cnt_ref
    o_ref, ws_ref, ss_ref, cnt_ref = refs
  else:
    (o_ref,) = refs
  j, s = pl.program_id(0), pl.program_id(1)
  block_n = o_ref.shape[-1]
  wdt = w_refs[0].dtype
  # float32 operands in full precision (Triton would otherwise use TF32).
  precision = lax.Precision.HIGHEST if wdt == jnp.float32 else None
  dims = (((1,), (0,)), ((), ()))
  rid = _row_ids(rows, m)

  def body(i, carry):
    accs, ss = carry
    kw = pl.multiple_of(i * block_k, block_k)  # in this split's slice of the weight
    cols = pl.ds(pl.multiple_of(s * k_split + kw, block_k), block_k)
    x = x_ref[rid, cols].astype(jnp.float32)
    if norm:
      ss = ss + jnp.sum(x * x, axis=1)
      x = x * g_ref[cols].astype(jnp.float32)[None, :]
    x = x.astype(wdt)
    accs = tuple(acc + lax.dot_general(x, w_ref[pl.ds(kw, block_k), :], dims,
                                       precision=precision,
                                       preferred_element_type=jnp.float32)
                 for acc, w_ref in zip(accs, w_refs))
    return accs, ss

  zeros = jnp.zeros((rows, block_n), jnp.float32)
  accs, ss = lax.fori_loop(0, k_split // block_k, body,
                           ((zeros,) * len(w_refs), jnp.zeros((rows,), jnp.float32)))

  def finish(accs, ss):
    if norm:
      scale = lax.rsqrt(ss / k + eps)[:, None]
      accs = tuple(acc * scale for acc in accs)
    odt = o_ref.dtype
    # Each stage rounds to the output dtype where the unfused layer stores a tensor, so
    # the fused layer rounds as the plain one does.
    out = accs[0].astype(odt).astype(jnp.float32)
    if gated:
      up = accs[1].astype(odt).astype(jnp.float32)
      out = (out / (1.0 + jnp.exp(-out))).astype(odt).astype(jnp.float32) * up
    if residual:
      out = out + r_ref[rid, :].astype(jnp.float32)
    o_ref[rid, :] = out.astype(odt)

  if splits == 1:
    finish(accs, ss)
    return
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
  tile = (slice(None), pl.ds(j * block_n, block_n))
  # Atomic stores and loads: each thread's own writes are released before the counter
  # is, and the last program reads them back acquired (global memory, no stale copies).
  # Interpret mode runs programs one after another and has no atomic exchange.
  def publish(ref, idx, val):
    if interpret:
      ref[idx] = val
    else:
      plgpu.atomic_xchg(ref, idx, val)

  for a, acc in enumerate(accs):
    publish(ws_ref, (s, _i32(a)) + tile, acc)
  if norm:
    publish(ss_ref, (s, j, slice(None)), ss)
  if not interpret:
    plgpu.debug_barrier()  # every thread's partials written before the count
  arrived = plgpu.atomic_add(cnt_ref, (j,), jnp.asarray(1, jnp.int32))

  @pl.when(arrived == splits - 1)
  def _():
    totals, ss_total = [zeros] * len(accs), jnp.zeros((rows,), jnp.float32)
    for t in range(splits):
      totals = [tot + plgpu.atomic_add(ws_ref, (_i32(t), _i32(a)) + tile, zeros)
                for a, tot in enumerate(totals)]
      if norm:
        ss_total = ss_total + plgpu.atomic_add(ss_ref, (_i32(t), j, slice(None)),
                                               jnp.zeros((rows,), jnp.float32))
    finish(tuple(totals), ss_total)


@functools.partial(jax.jit, static_argnames=("gated", "eps", "out_dtype", "block_n",
                                             "block_k", "splits", "num_warps", "num_stages",
                                             "interpret"))
def _fused(x, w, g, r, *, gated, eps, out_dtype, block_n, block_k, splits, num_warps,
           num_stages, interpret):
  m, k = x.shape
  n = w.shape[-1]
  rows, tiles, k_split = _tile_rows(m), n // block_n, k // splits
  norm, residual = g is not None, r is not None
  whole = lambda shape: pl.BlockSpec(shape, lambda j, s: (0,) * len(shape))
  args, in_specs = [x], [whole((m, k))]
  if norm:
    args.append(g)
    in_specs.append(whole((k,)))
  if gated:
    args += [w, w]
    in_specs += [pl.BlockSpec((k_split, _squeezed(), block_n), lambda j, s: (s, 0, j)),
                 pl.BlockSpec((k_split, _squeezed(), block_n), lambda j, s: (s, 1, j))]
  else:
    args.append(w)
    in_specs.append(pl.BlockSpec((k_split, block_n), lambda j, s: (s, j)))
  if residual:
    args.append(r)
    in_specs.append(pl.BlockSpec((m, block_n), lambda j, s: (0, j)))
  out_specs = [pl.BlockSpec((m, block_n), lambda j, s: (0, j))]
  out_shape = [jax.ShapeDtypeStruct((m, n), out_dtype)]
  aliases = {}
  if splits > 1:
    # Workspace for the partials; the tiles' arrival counters start at zero every call.
    ws = (splits, 2 if gated else 1, rows, n)
    args.append(jnp.zeros((tiles,), jnp.int32))
    in_specs.append(whole((tiles,)))
    out_specs += [whole(ws), whole((splits, tiles, rows)), whole((tiles,))]
    out_shape += [jax.ShapeDtypeStruct(ws, jnp.float32),
                  jax.ShapeDtypeStruct((splits, tiles, rows), jnp.float32),
                  jax.ShapeDtypeStruct((tiles,), jnp.int32)]
    aliases = {len(args) - 1: 3}
  kwargs = {} if interpret else dict(compiler_params=_compiler_params(num_warps, num_stages))
  out = pl.pallas_call(
      functools.partial(_kernel, m=m, rows=rows, k=k, k_split=k_split, block_k=block_k,
                        eps=eps, norm=norm, gated=gated, residual=residual, splits=splits,
                        interpret=interpret),
      grid=(tiles, splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      interpret=interpret,
      name="fused_matmul",
      **kwargs,
  )(*args)
  return out[0]


def fused_matmul(x, w, *, norm_gain=None, eps: float = 1e-6, gated: bool = False,
                 residual=None, out_dtype=None, interpret=None, **plan):
  """x [M, K] @ w [K, N] (w [K, 2, N] with `gated`) -> [M, N], with the RMSNorm of x in
  front (`norm_gain` [K]), silu(gate) * up after (`gated`) and `residual` [M, N] added;
  float32 accumulation, out_dtype x's by default. `plan` overrides `default_plan`."""
  m, k = x.shape
  n = w.shape[-1]
  if w.shape[0] != k or w.ndim != (3 if gated else 2) or (gated and w.shape[1] != 2):
    raise ValueError(f"fused_matmul: x {x.shape} and w {w.shape} (gated={gated}) do not "
                     "contract")
  if not supported(m, k, n):
    raise ValueError(f"fused_matmul takes 1 <= M <= {MAX_ROWS} and K, N multiples of 16; "
                     f"got M={m}, K={k}, N={n}")
  if norm_gain is not None and norm_gain.shape != (k,):
    raise ValueError(f"fused_matmul: norm gain {norm_gain.shape} is not ({k},)")
  if residual is not None and residual.shape != (m, n):
    raise ValueError(f"fused_matmul: residual {residual.shape} is not ({m}, {n})")
  if interpret is None:
    interpret = not _on_gpu()
  cfg = {**default_plan(m, k, n), **plan}
  if k % (cfg["block_k"] * cfg["splits"]) or n % cfg["block_n"]:
    raise ValueError(f"fused_matmul plan {cfg} does not tile K={k}, N={n}")
  return _fused(x, w, norm_gain, residual, gated=gated, eps=float(eps),
                out_dtype=jnp.dtype(out_dtype or x.dtype), interpret=bool(interpret), **cfg)
