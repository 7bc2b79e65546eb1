"""Pallas paged attention: one kernel for decode, verification, prefill chunks and SSD trees.

Contract: exactly `reference.paged_attention` (same arguments, shapes and outputs). Query
(b, i) attends to the logical KV positions [0, kv_limit[b, i]) of sequence b; position p
lives in page page_table[b, p // page_size], slot p % page_size, of a pool laid out
[num_pages, page_size, Hkv, D].

How the work is cut:

* Rows. For one sequence and one KV head, the `group = Hq // Hkv` query heads of that KV
  head times the Q queries form the rows of one tile (row r = query r // group, head
  r % group), so every KV page is read once for the whole group and all queries of the
  step. The kernel gathers its rows straight from q [B, Q, Hq, D] and stores its results
  straight into the [B, Q, Hq, D] / [B, Q, Hq] outputs: no transposes or padding copies
  around it. Tiles have a power-of-two number of rows >= 16 (Triton's matmul minimum);
  missing rows repeat the last real row. More rows than `block_rows` (long prefill chunks,
  big trees) are cut into several row tiles.
* Columns. A program walks the pages of its sequence with a `fori_loop` whose trip count
  comes from the largest kv_limit of its tile: short sequences stop early, whatever the
  page table's width. Each step reads `block_k` tokens (several pages gathered by id, one
  page, or part of one), and the per-row limit is applied in registers, only in the steps
  that some row cannot fully see; no [queries x context] mask exists in memory. Softmax
  is online, in float32.
* Splits. With few (sequence, head, row-tile) programs, e.g. decode at small batch, the
  GPU would idle, so the page range of each program is also cut into `num_splits` parts
  (cut at run time from the actual length, so every split gets an equal share of the
  pages really visible) whose partial results are merged afterwards with their
  log-sum-exp (flash decoding). The merge is a second, tiny Pallas kernel (one launch,
  where XLA needed several fusions: at batch 1 a call is bound by launches, not bytes).
  Without splits (big grids, or page tables of <= `SPLIT_MIN_TOKENS` tokens, e.g. the
  draft model's short contexts) the attention kernel writes the final outputs itself and
  is the only kernel of the call.

Positions that a row may not see never reach the result: their scores are replaced before
the softmax and their V rows are zeroed before the second matmul, so garbage or NaN in
unused slots and pages cannot leak (0 * NaN would).

On GPU the kernel lowers through Pallas' Triton backend; elsewhere it runs in interpret
mode (slow, for tests).
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from ssd_jax.kernels.reference import NEG_INF
from ssd_jax.sharding import rules

__all__ = ["paged_attention", "sharded_paged_attention", "default_config"]


def _next_pow2(n: int) -> int:
  return 1 << max(0, (int(n) - 1).bit_length())


def _is_pow2(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


def _on_gpu() -> bool:
  try:
    return jax.default_backend() == "gpu"
  except RuntimeError:
    return False


def _num_sms() -> int:
  try:
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0)) or 132
  except Exception:  # pylint: disable=broad-except
    return 132


def _compiler_params(num_warps: int, num_stages: int):
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=import-outside-toplevel
  cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  return cls(num_warps=num_warps, num_stages=num_stages)


def default_config(*, rows: int, page_size: int, head_dim: int, dtype) -> dict:
  """Launch parameters for a tile of `rows` rows (already a power of two >= 16).

  Measured on an H100 (bench/KERNELS.md): 64-token steps beat 128 and 256 for decode, and
  tiles of up to 64 rows run best with 4 warps and 3 stages (run 3: 70b verify B=8 ctx 4k
  0.083-0.096 ms with 4 warps vs 0.119 with 8). 128-row tiles keep 8 warps.
  """
  itemsize = jnp.dtype(dtype).itemsize
  block_k = 64 if itemsize <= 2 or head_dim <= 64 else 32
  num_warps = 4 if rows <= 64 else 8
  stage_bytes = 2 * block_k * head_dim * itemsize  # one K and one V block
  num_stages = 3 if 3 * stage_bytes <= 160 * 1024 else 2
  return dict(block_k=block_k, num_warps=num_warps, num_stages=num_stages)


# Most rows (query heads of a KV group x queries) per tile by default. 64-row tiles made
# 70b tree at batch 8 faster (0.200 -> 0.16 ms) but the 8b tree at batch 1, the shape of
# a draft's SSD tree step, slower (0.036 -> 0.054 ms: each tile reads the KV again) and
# 70b tree at batch 32 too (0.60 -> 0.64 ms), H100 runs 3 and 4; 128 is kept.
DEFAULT_BLOCK_ROWS = 128
# Cap on the KV splits of one program: the merge reads every split's partial result, and
# the split count is fixed at trace time from the page table's width, which can be far
# larger than the lengths actually present.
MAX_SPLITS = 32
PROGRAMS_PER_SM = 2
# Page tables covering at most this many tokens are never split: the few serial steps a
# program then walks cost less than the merge kernel's launch. The width, not the lengths,
# decides (it is static). Run 3 measured splitting still paying at 512 tokens (draft
# shape, batch 1: 0.017 ms with 4 splits vs 0.026-0.031 ms with none), hence this low.
SPLIT_MIN_TOKENS = 256
# Each split walks at least this many inner steps (of the page table's width).
MIN_BLOCKS_PER_SPLIT = 2


def choose_splits(programs: int, max_splits: int, slots: int) -> int:
  """KV splits per program so that `programs * splits` fills `slots` concurrent programs
  in whole waves (a few waves' worth of programs need no splitting)."""
  if programs >= 4 * slots or max_splits <= 1:
    return 1
  for splits in range(1, max_splits + 1):
    total = programs * splits
    waves = -(-total // slots)
    if total >= slots and total / (waves * slots) >= 0.85:
      return splits
  return max_splits


def auto_splits(*, programs: int, capacity_tokens: int, block_k: int,
                slots: int | None = None) -> int:
  """The split count `paged_attention` picks on GPU when num_splits is None."""
  if capacity_tokens <= SPLIT_MIN_TOKENS:
    return 1
  n_blocks = -(-capacity_tokens // block_k)
  slots = slots or PROGRAMS_PER_SM * _num_sms()
  return choose_splits(programs, min(MAX_SPLITS, n_blocks // MIN_BLOCKS_PER_SPLIT), slots)


def merge_rows(batch: int, rows: int, *, target_programs: int = 0, cap: int = 16) -> int:
  """Rows per program of the merge kernel: a power of two dividing `rows` (the kernel
  reads whole blocks, unmasked), at most `cap`, and small enough that batch * rows / R
  reaches `target_programs` where possible (the merge is latency-bound: each program's
  loads of all splits are issued together, so more programs finish sooner)."""
  r = min(rows & -rows, cap)
  while r > 1 and batch * rows // r < target_programs:
    r //= 2
  return r


def launch_plan(q_shape, kv_shape, page_table_width: int, dtype, *, interpret: bool = False,
                block_rows: int | None = None, block_k: int | None = None,
                num_splits: int | None = None, num_warps: int | None = None,
                num_stages: int | None = None) -> dict:
  """How `paged_attention` cuts a call: tile rows, row tiles, block_k, warps, stages,
  splits and the merge kernel's rows per program (the benchmark records it per row)."""
  b, nq, hq, d = q_shape
  _, page_size, hkv, _ = kv_shape
  group = hq // hkv
  rows = nq * group
  block_rows = max(16, _next_pow2(block_rows or DEFAULT_BLOCK_ROWS))
  tile = max(16, min(_next_pow2(rows), block_rows))
  n_tiles = -(-rows // tile)
  cfg = default_config(rows=tile, page_size=page_size, head_dim=d, dtype=dtype)
  if block_k is None:
    block_k = cfg["block_k"] if _is_pow2(page_size) else page_size
  if not ((block_k % page_size == 0 and _is_pow2(block_k // page_size))
          or (page_size % block_k == 0 and _is_pow2(page_size // block_k))):
    raise ValueError(f"block_k={block_k} must be page_size={page_size} times or divided by "
                     "a power of two")
  capacity = page_table_width * page_size
  n_blocks_max = max(1, -(-capacity // block_k))
  if num_splits is None:
    num_splits = 1 if interpret else auto_splits(
        programs=b * hkv * n_tiles, capacity_tokens=capacity, block_k=block_k)
  num_splits = max(1, min(int(num_splits), n_blocks_max))
  plan = dict(tile=tile, n_tiles=n_tiles, block_k=block_k,
              num_warps=num_warps or cfg["num_warps"],
              num_stages=num_stages or cfg["num_stages"], num_splits=num_splits)
  if num_splits > 1:
    r = merge_rows(b, nq * hq, target_programs=0 if interpret else 2 * _num_sms())
    # The merge's unrolled loads are all live at once: about R*D*S values, kept to <= 128
    # per thread; otherwise up to 4 warps, one per 256 elements of the row block.
    warps = max(1, min(4, r * d // 256), -(-r * d * num_splits // (32 * 128)))
    plan.update(merge_rows=r, merge_warps=min(8, _next_pow2(warps)))
  return plan


_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


def _kernel(q_ref, lim_ref, pt_ref, k_ref, v_ref, o_ref, lse_ref, *, page_size: int,
            block_k: int, group: int, tile: int, rows: int, num_heads: int,
            num_splits: int, scale: float, precision):
  """One (sequence, kv head, row tile, split) program.

  q_ref [Q*Hq, D]: the sequence's queries, row qi*Hq + head (the caller's layout);
  lim_ref [Q] int32; pt_ref [P] page ids; k_ref/v_ref [num_pages, page_size, D] (this KV
  head's slice of the pool); o_ref [Q*Hq, D] and lse_ref [Q*Hq]: this split's result
  (normalised by its own softmax sum), in the caller's layout.

  Tile row r is query (t*tile + r) // group, head h*group + (t*tile + r) % group; rows
  past the last real one repeat it (same query, same limit, hence the same result, so
  their duplicate stores write identical values). The inner loop walks blocks of
  `block_k` tokens: several whole pages gathered by id when block_k > page_size, one page,
  or a slice of one page when block_k < page_size.
  """
  num_pages, _, head_dim = k_ref.shape
  max_pages = pt_ref.shape[0]
  pages_per_block = max(1, block_k // page_size)
  blocks_per_page = max(1, page_size // block_k)
  h = pl.program_id(1)
  row = pl.program_id(2) * tile + jnp.arange(tile, dtype=jnp.int32)
  row = jnp.minimum(row, rows - 1)
  qi = lax.div(row, group)
  flat = qi * num_heads + h * group + lax.rem(row, group)  # [tile] rows of q / out
  q = q_ref[flat]
  # Positions past the page table's capacity do not exist (as in the reference).
  lim = jnp.clip(lim_ref[qi], 0, max_pages * page_size)
  max_lim = jnp.max(lim)
  min_lim = jnp.min(lim)
  n_blocks = lax.div(max_lim + (block_k - 1), block_k)
  # Blocks [0, n_full) are visible to every row of the tile: no masking needed there.
  n_full = lax.div(min_lim, block_k)
  if num_splits > 1:
    per_split = lax.div(n_blocks + (num_splits - 1), num_splits)
    start = pl.program_id(3) * per_split
    end = jnp.minimum(n_blocks, start + per_split)
  else:
    start, end = 0, n_blocks
  mid = jnp.maximum(jnp.minimum(n_full, end), start)

  lim_col = lim[:, None]
  col = jnp.arange(block_k, dtype=jnp.int32)[None, :]
  col_v = jnp.arange(block_k, dtype=jnp.int32)[:, None]
  qk_scale = scale * _LOG2E  # scores in log2 units: exp2 instead of exp

  def load_block(j):
    if pages_per_block > 1:
      idx = jnp.minimum(j * pages_per_block + jnp.arange(pages_per_block, dtype=jnp.int32),
                        max_pages - 1)
      pages = jnp.clip(pt_ref[idx], 0, num_pages - 1)
      return (k_ref[pages].reshape(block_k, head_dim),
              v_ref[pages].reshape(block_k, head_dim))
    if blocks_per_page == 1:
      page = jnp.clip(pt_ref[j], 0, num_pages - 1)
      return k_ref[page], v_ref[page]
    page = jnp.clip(pt_ref[lax.div(j, blocks_per_page)], 0, num_pages - 1)
    offset = lax.rem(j, blocks_per_page) * block_k
    return k_ref[page, pl.ds(offset, block_k)], v_ref[page, pl.ds(offset, block_k)]

  def make_body(masked: bool):
    def body(j, carry):
      acc, m_prev, l_prev = carry
      k, v = load_block(j)
      s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                          preferred_element_type=jnp.float32) * qk_scale
      if masked:
        pos0 = j * block_k
        visible = (col + pos0) < lim_col  # [R, block_k], in registers only
        s = jnp.where(visible, s, NEG_INF)
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
      alpha = jnp.exp2(m_prev - m_new)
      p = jnp.exp2(s - m_new[:, None])
      if masked:
        p = jnp.where(visible, p, 0.0)  # rows that see nothing keep l = 0
        # Zero V rows past the last visible position (unwritten slots, padding pages):
        # p is 0 there, but 0 * NaN would not be.
        v = jnp.where((col_v + pos0) < max_lim, v, jnp.zeros_like(v))
      l_new = alpha * l_prev + jnp.sum(p, axis=1)
      pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)
      return acc * alpha[:, None] + pv, m_new, l_new
    return body

  carry = (jnp.zeros((tile, head_dim), jnp.float32),
           jnp.full((tile,), NEG_INF, jnp.float32),
           jnp.zeros((tile,), jnp.float32))
  carry = lax.fori_loop(start, mid, make_body(False), carry)
  acc, m, l = lax.fori_loop(mid, end, make_body(True), carry)
  seen = l > 0.0
  l_safe = jnp.where(seen, l, 1.0)
  out = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0)
  o_ref[flat] = out.astype(o_ref.dtype)
  lse_ref[flat] = jnp.where(seen, (m + jnp.log2(l_safe)) * _LN2, NEG_INF)


def _merge_kernel(o_ref, lse_ref, out_ref, lse_out_ref, *, num_splits: int):
  """Merges the splits of R rows: o_ref [S, R, D] and lse_ref [S, R] float32 (each split
  normalised by its own softmax sum) -> out_ref [R, D] (caller's dtype), lse_out_ref [R].

  The loop over splits is unrolled at trace time (S <= MAX_SPLITS, any S, not only powers
  of two), so all of a program's loads are independent and in flight together.
  """
  lses = [lse_ref[s] for s in range(num_splits)]
  m = functools.reduce(jnp.maximum, lses)
  acc = denom = None
  for s in range(num_splits):
    # A split that saw nothing has lse = NEG_INF and o = 0: weight 0 (also when every
    # split is empty and m = NEG_INF, where exp(lse - m) would be 1).
    w = jnp.where(lses[s] > NEG_INF * 0.5, jnp.exp(lses[s] - m), 0.0)
    term = o_ref[s] * w[:, None]
    acc = term if acc is None else acc + term
    denom = w if denom is None else denom + w
  seen = denom > 0.0
  denom_safe = jnp.where(seen, denom, 1.0)
  out_ref[...] = (acc / denom_safe[:, None]).astype(out_ref.dtype)
  lse_out_ref[...] = jnp.where(seen, m + jnp.log(denom_safe), NEG_INF)


def _merge_splits_xla(o, lse):
  """The same merge in plain XLA (merge="xla"; several fusions, kept to compare with):
  o [S, ..., D] float32 (normalised per split), lse [S, ...] -> merged (o, lse)."""
  m = jnp.max(lse, axis=0)
  w = jnp.exp(lse - m[None])  # splits that saw nothing have lse = NEG_INF -> w = 0
  w = jnp.where(lse > NEG_INF * 0.5, w, 0.0)
  denom = jnp.sum(w, axis=0)
  seen = denom > 0
  denom_safe = jnp.where(seen, denom, 1.0)
  out = jnp.sum(o * w[..., None], axis=0) / denom_safe[..., None]
  lse_out = jnp.where(seen, m + jnp.log(denom_safe), NEG_INF)
  return out, lse_out


def paged_attention(q, k_pages, v_pages, page_table, kv_limit, *, scale, interpret=None,
                    block_rows: int | None = None, block_k: int | None = None,
                    num_splits: int | None = None, num_warps: int | None = None,
                    num_stages: int | None = None, merge: str = "pallas"):
  """Pallas version of `reference.paged_attention` (see it for the contract).

  Tuning arguments (None picks defaults): block_rows, the most rows (query heads of a
  group x queries) per tile; block_k, tokens per inner-loop step (the page size times or
  divided by a power of two); num_splits, how many parts each program's page range is cut
  into (None: enough to fill the GPU, 1 for short page tables); num_warps / num_stages for
  Triton; merge, how splits are merged ("pallas": one small kernel; "xla": XLA ops).

  Any Q, group size and page-table width work; on GPU, head_dim and page_size must be
  powers of two (other shapes fall back to the XLA reference).
  """
  b, nq, hq, d = q.shape
  num_pages, page_size, hkv, d_k = k_pages.shape
  if d_k != d or v_pages.shape != k_pages.shape:
    raise ValueError(f"q {q.shape}, k_pages {k_pages.shape} and v_pages {v_pages.shape} "
                     "disagree on head_dim or pool shape")
  if hq % hkv:
    raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
  if page_table.ndim != 2 or page_table.shape[0] != b or kv_limit.shape != (b, nq):
    raise ValueError(f"page_table {page_table.shape} / kv_limit {kv_limit.shape} do not "
                     f"match q {q.shape}")
  if merge not in ("pallas", "xla"):
    raise ValueError(f"merge={merge!r}: use 'pallas' or 'xla'")
  if interpret is None:
    interpret = not _on_gpu()
  if not interpret and not (_is_pow2(d) and _is_pow2(page_size)):
    # Triton needs power-of-two tiles; such shapes are rare (none of Llama-3 / Qwen3).
    from ssd_jax.kernels import reference  # pylint: disable=import-outside-toplevel
    return reference.paged_attention(q, k_pages, v_pages, page_table, kv_limit, scale=scale)
  plan = launch_plan(q.shape, k_pages.shape, page_table.shape[1], q.dtype,
                     interpret=interpret, block_rows=block_rows, block_k=block_k,
                     num_splits=num_splits, num_warps=num_warps, num_stages=num_stages)
  plan = tuple(sorted(plan.items()))
  if kv_limit.dtype != jnp.int32:
    kv_limit = kv_limit.astype(jnp.int32)
  if page_table.dtype != jnp.int32:
    page_table = page_table.astype(jnp.int32)
  return _paged_attention_jit(q, k_pages, v_pages, page_table, kv_limit, scale=float(scale),
                              interpret=bool(interpret), plan=plan, merge=merge)


# One jitted core: a model calls the kernel once per layer with the same shapes, and
# identical jitted calls are lowered (and, on GPU, compiled by Triton) once per program.
@functools.partial(jax.jit, static_argnames=("scale", "interpret", "plan", "merge"))
def _paged_attention_jit(q, k_pages, v_pages, page_table, kv_limit, *, scale, interpret,
                         plan, merge):
  plan = dict(plan)
  b, nq, hq, d = q.shape
  num_pages, page_size, hkv, _ = k_pages.shape
  group = hq // hkv
  max_pages = page_table.shape[1]
  rows = nq * group
  tile, n_tiles, block_k = plan["tile"], plan["n_tiles"], plan["block_k"]
  num_splits = plan["num_splits"]
  flat_rows = nq * hq

  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  kernel = functools.partial(
      _kernel, page_size=page_size, block_k=block_k, group=group, tile=tile, rows=rows,
      num_heads=hq, num_splits=num_splits, scale=scale, precision=precision)
  kwargs = {}
  if not interpret:
    kwargs["compiler_params"] = _compiler_params(plan["num_warps"], plan["num_stages"])
  in_specs = [
      pl.BlockSpec((None, flat_rows, d), lambda i, h, t, s: (i, 0, 0)),
      pl.BlockSpec((None, nq), lambda i, h, t, s: (i, 0)),
      pl.BlockSpec((None, max_pages), lambda i, h, t, s: (i, 0)),
      pl.BlockSpec((num_pages, page_size, None, d), lambda i, h, t, s: (0, 0, h, 0)),
      pl.BlockSpec((num_pages, page_size, None, d), lambda i, h, t, s: (0, 0, h, 0)),
  ]
  if num_splits == 1:
    # The final outputs, written in place: nothing runs after the kernel.
    out_specs = [pl.BlockSpec((None, flat_rows, d), lambda i, h, t, s: (i, 0, 0)),
                 pl.BlockSpec((None, flat_rows), lambda i, h, t, s: (i, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, flat_rows, d), q.dtype),
                 jax.ShapeDtypeStruct((b, flat_rows), jnp.float32)]
  else:
    # Per-split partial results in float32, merged below.
    out_specs = [pl.BlockSpec((None, None, flat_rows, d), lambda i, h, t, s: (s, i, 0, 0)),
                 pl.BlockSpec((None, None, flat_rows), lambda i, h, t, s: (s, i, 0))]
    out_shape = [jax.ShapeDtypeStruct((num_splits, b, flat_rows, d), jnp.float32),
                 jax.ShapeDtypeStruct((num_splits, b, flat_rows), jnp.float32)]
  o, lse = pl.pallas_call(
      kernel,
      grid=(b, hkv, n_tiles, num_splits),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      interpret=interpret,
      name=f"paged_attention_r{tile}_k{block_k}_s{num_splits}",
      **kwargs,
  )(q.reshape(b, flat_rows, d), kv_limit, page_table, k_pages, v_pages)
  if num_splits > 1 and merge == "xla":
    o, lse = _merge_splits_xla(o, lse)
    o = o.astype(q.dtype)
  elif num_splits > 1:
    r = plan["merge_rows"]
    mkwargs = {}
    if not interpret:
      mkwargs["compiler_params"] = _compiler_params(plan["merge_warps"], 1)
    o, lse = pl.pallas_call(
        functools.partial(_merge_kernel, num_splits=num_splits),
        grid=(b, flat_rows // r),
        in_specs=[pl.BlockSpec((num_splits, None, r, d), lambda i, j: (0, i, j, 0)),
                  pl.BlockSpec((num_splits, None, r), lambda i, j: (0, i, j))],
        out_specs=[pl.BlockSpec((None, r, d), lambda i, j: (i, j, 0)),
                   pl.BlockSpec((None, r), lambda i, j: (i, j))],
        out_shape=[jax.ShapeDtypeStruct((b, flat_rows, d), q.dtype),
                   jax.ShapeDtypeStruct((b, flat_rows), jnp.float32)],
        interpret=interpret,
        name=f"paged_attention_merge_s{num_splits}_r{r}",
        **mkwargs,
    )(o, lse)
  return o.reshape(b, nq, hq, d), lse.reshape(b, nq, hq)


def _shard_map(f, mesh, in_specs, out_specs):
  sm = getattr(jax, "shard_map", None)
  if sm is None:
    from jax.experimental.shard_map import shard_map as sm  # pylint: disable=g-import-not-at-top
  params = inspect.signature(sm).parameters
  kwargs = dict(mesh=mesh, in_specs=in_specs, out_specs=out_specs)
  if "check_vma" in params:
    kwargs["check_vma"] = False
  elif "check_rep" in params:
    kwargs["check_rep"] = False
  return sm(f, **kwargs)


def sharded_paged_attention(q, k_pages, v_pages, page_table, kv_limit, *, scale, mesh,
                            **kernel_kwargs):
  """`paged_attention` over a ("dp", "tp") mesh: heads split over "tp".

  Each TP shard attends with its own query heads over its own KV heads (the pool is
  sharded on its head axis), so no communication is needed. The batch is also split over
  "dp" when the mesh has one of size > 1 that divides it; otherwise it is replicated.
  """
  if mesh is None or mesh.size == 1:
    return paged_attention(q, k_pages, v_pages, page_table, kv_limit, scale=scale,
                           **kernel_kwargs)
  tp = mesh.shape.get(rules.TP, 1)
  hq, hkv = q.shape[2], k_pages.shape[2]
  if hq % tp or hkv % tp:
    raise ValueError(f"{hq} query heads / {hkv} KV heads do not split over tp={tp}")
  dp = mesh.shape.get(rules.DP, 1)
  batch = "batch" if dp > 1 and q.shape[0] % dp == 0 else None
  spec = lambda *axes: rules.spec_for(axes)
  fn = functools.partial(paged_attention, scale=scale, **kernel_kwargs)
  return _shard_map(
      fn, mesh,
      in_specs=(spec(batch, None, "heads", None), spec(*rules.KV_PAGES_AXES),
                spec(*rules.KV_PAGES_AXES), spec(batch, None), spec(batch, None)),
      out_specs=(spec(batch, None, "heads", None), spec(batch, None, "heads")),
  )(q, k_pages, v_pages, page_table, kv_limit)
