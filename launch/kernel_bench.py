"""Times the Pallas paged-attention kernel (decode, verify, SSD tree) against the copy
bandwidth of the device and against the XLA reference.

For each attention shape x context x batch x mode it builds a bf16 page pool holding
exactly the batch's context (pages shuffled in the pool), counts the bytes the kernel must
move (the visible KV pages of every sequence, read once for all query heads, plus Q, out
and lse), and times the kernel: one jitted function runs it `--inner` times back to back
(each call's output is the next call's query, so nothing can be hoisted or batched), the
median over `--repeats` runs, divided by `--inner`, is the time per call. GB/s is bytes
over that time; "of copy" is that over the measured device copy bandwidth (max of a
device-to-device array copy and an elementwise pass, bytes read + written).

  python launch/kernel_bench.py                         # the default table
  python launch/kernel_bench.py --shapes=70b --contexts=4096 --batches=8 --modes=decode
  python launch/kernel_bench.py --check                 # correctness vs the reference
  python launch/kernel_bench.py --sweep --shapes=8b --contexts=4096 --batches=1,8

Shapes are whole models on one device (8b: 32 q heads / 8 KV heads; 70b: 64 / 8; head_dim
128); under tensor parallelism of degree T each shard runs the same kernel with Hq/T and
Hkv/T heads, i.e. the same group size on fewer heads (the *_tp shapes below).
"""

from __future__ import annotations

import datetime
import functools
import json
import statistics
import sys
import time

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.kernels import pallas_attention, reference

SHAPES = {  # name: (q heads, kv heads, head_dim)
    "8b": (32, 8, 128),
    "70b": (64, 8, 128),
    "8b_tp4": (8, 2, 128),
    "70b_tp8": (8, 1, 128),
}
MODES = {"decode": 1, "verify": 8, "tree": 24}

FLAGS = flags.FLAGS
flags.DEFINE_list("contexts", ["1024", "4096", "16384"], "context lengths (tokens)")
flags.DEFINE_list("batches", ["1", "8", "32"], "batch sizes")
flags.DEFINE_list("shapes", ["8b", "70b"], f"attention shapes: {', '.join(SHAPES)}")
flags.DEFINE_list("modes", list(MODES), "decode (Q=1), verify (Q=8), tree (Q=24)")
flags.DEFINE_integer("page_size", 64, "tokens per KV page")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "KV / query dtype")
flags.DEFINE_string("output_json", None, "write the results here as JSON")
flags.DEFINE_integer("repeats", 7, "timed runs per case (median)")
flags.DEFINE_integer("inner", 0, "calls per timed run (0: enough for ~1 ms, at most 8)")
flags.DEFINE_bool("reference", True, "also time the XLA reference (where it fits)")
flags.DEFINE_float("ref_mem_gb", 36.0, "skip the reference when it would need more")
flags.DEFINE_bool("verify", False, "also report each row's error against the reference")
flags.DEFINE_bool("check", False, "run the correctness suite (compiled kernel vs reference)")
flags.DEFINE_bool("sweep", False, "time a grid of kernel configs instead of the table")
flags.DEFINE_integer("block_k", 0, "kernel: tokens per inner step (0: default)")
flags.DEFINE_integer("block_rows", 0, "kernel: most rows per tile (0: default)")
flags.DEFINE_integer("num_splits", 0, "kernel: KV splits (0: auto)")
flags.DEFINE_integer("num_warps", 0, "kernel: Triton warps (0: default)")
flags.DEFINE_integer("num_stages", 0, "kernel: Triton pipeline stages (0: default)")


def kernel_kwargs(**over):
  kw = dict(block_k=FLAGS.block_k, block_rows=FLAGS.block_rows, num_splits=FLAGS.num_splits,
            num_warps=FLAGS.num_warps, num_stages=FLAGS.num_stages)
  kw.update(over)
  return {k: v for k, v in kw.items() if v}


# ----------------------------------------------------------------------------- timing


def _time(fn, args, repeats):
  out = fn(*args)
  jax.block_until_ready(out)
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append(time.perf_counter() - t0)
  return statistics.median(samples)


def copy_bandwidth(nbytes=None, repeats=20, warmup_s=1.0):
  """Bytes read + written per second by a large copy (the better of two ways to copy),
  after `warmup_s` of copying so that the GPU's clocks have ramped up (a cold start once
  read 19% low here)."""
  if nbytes is None:
    nbytes = (1 << 30) if jax.default_backend() != "cpu" else (64 << 20)
  n = nbytes // 4
  x = jnp.arange(n, dtype=jnp.float32)
  res = {}
  for name, f in (("copy", jax.jit(lambda a: jnp.copy(a))),
                  ("elementwise", jax.jit(lambda a: a * 1.0001 + 1.0))):
    jax.block_until_ready(f(x))
    t_end = time.perf_counter() + warmup_s / 2
    while time.perf_counter() < t_end:
      jax.block_until_ready(f(x))
    t = _time(f, (x,), repeats)
    res[name] = 2 * n * 4 / t
  res["best"] = max(res["copy"], res["elementwise"])
  del x
  return res


def inner_calls(nbytes):
  return FLAGS.inner or int(np.clip(round(1e-3 / (nbytes / 2.5e12)), 1, 8))


def looped(attn, inner):
  """jit(run `attn` `inner` times, feeding each output back in as the next query)."""
  def run(q, k, v, pt, lim):
    lse_sum = jnp.zeros((), jnp.float32)
    for _ in range(inner):
      q, lse = attn(q, k, v, pt, lim)
      lse_sum = lse_sum + lse[0, 0, 0]
    return q, lse_sum
  return jax.jit(run)


# ----------------------------------------------------------------------------- cases


def make_pool(key, shape, batch, ctx, page_size, dtype):
  """K/V pools holding `batch` sequences of `ctx` tokens, pages shuffled; page table."""
  _, hkv, d = SHAPES[shape]
  pages_per_seq = -(-ctx // page_size)
  num_pages = batch * pages_per_seq + 1
  kk, kv, kp = jax.random.split(key, 3)
  k = jax.random.normal(kk, (num_pages, page_size, hkv, d), dtype)
  v = jax.random.normal(kv, (num_pages, page_size, hkv, d), dtype)
  perm = jax.random.permutation(kp, num_pages)[:batch * pages_per_seq]
  return k, v, perm.reshape(batch, pages_per_seq).astype(jnp.int32)


def make_queries(key, shape, batch, ctx, nq, dtype):
  """Queries and limits: decode sees ctx; verify is the causal K+1 window ending at ctx;
  tree branches hang off the last 8 positions."""
  hq, _, d = SHAPES[shape]
  q = jax.random.normal(key, (batch, nq, hq, d), dtype)
  i = jnp.arange(nq, dtype=jnp.int32)
  if nq == 1:
    lim = jnp.full((nq,), ctx, jnp.int32)
  elif nq <= 16:
    lim = ctx - nq + 1 + i
  else:
    lim = ctx - i % 8
  return q, jnp.broadcast_to(lim, (batch, nq))


def make_case(key, shape, batch, ctx, nq, page_size, dtype):
  k1, k2 = jax.random.split(key)
  k, v, pt = make_pool(k1, shape, batch, ctx, page_size, dtype)
  q, lim = make_queries(k2, shape, batch, ctx, nq, dtype)
  return q, k, v, pt, lim


def bytes_moved(shape, batch, ctx, nq, page_size, itemsize):
  hq, hkv, d = SHAPES[shape]
  visible = -(-ctx // page_size) * page_size  # whole pages are read
  kv = 2 * batch * visible * hkv * d * itemsize
  qo = 2 * batch * nq * hq * d * itemsize + batch * nq * hq * 4
  return kv + qo


def ref_bytes_needed(shape, batch, ctx, nq, itemsize):
  hq, hkv, d = SHAPES[shape]
  gathered = 2 * batch * ctx * hkv * d * (itemsize + 4)
  scores = 3 * batch * hq * nq * ctx * 4
  return gathered + scores


# ----------------------------------------------------------------------------- table


def _save(out):
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(out, f, indent=1)


def bench_table(bw, rows):
  dtype = jnp.dtype(FLAGS.dtype)
  ps = FLAGS.page_size
  key = jax.random.PRNGKey(0)
  kern = functools.partial(pallas_attention.paged_attention, **kernel_kwargs())
  for shape in FLAGS.shapes:
    hq, hkv, d = SHAPES[shape]
    scale = d ** -0.5
    for ctx in map(int, FLAGS.contexts):
      for batch in map(int, FLAGS.batches):
        key, k1, k2 = jax.random.split(key, 3)
        k, v, pt = make_pool(k1, shape, batch, ctx, ps, dtype)
        for mode in FLAGS.modes:
          nq = MODES[mode]
          q, lim = make_queries(k2, shape, batch, ctx, nq, dtype)
          nbytes = bytes_moved(shape, batch, ctx, nq, ps, dtype.itemsize)
          inner = inner_calls(nbytes)
          row = dict(shape=shape, mode=mode, q=nq, batch=batch, context=ctx, page_size=ps,
                     dtype=dtype.name, bytes=nbytes, inner=inner)
          try:
            t0 = time.perf_counter()
            f = looped(lambda *a: kern(*a, scale=scale), inner)
            jax.block_until_ready(f(q, k, v, pt, lim))
            row["compile_s"] = time.perf_counter() - t0
            t = _time(f, (q, k, v, pt, lim), FLAGS.repeats) / inner
            row.update(ms=t * 1e3, gbps=nbytes / t / 1e9, frac=nbytes / t / bw)
          except Exception as e:  # pylint: disable=broad-except
            row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
          need = ref_bytes_needed(shape, batch, ctx, nq, dtype.itemsize)
          if FLAGS.reference and need <= FLAGS.ref_mem_gb * 1e9:
            try:
              fr = looped(lambda *a: reference.paged_attention(*a, scale=scale), 1)
              tr = _time(fr, (q, k, v, pt, lim), max(3, FLAGS.repeats // 2))
              row.update(ref_ms=tr * 1e3)
              if "ms" in row and FLAGS.verify:
                o, lse = jax.jit(functools.partial(kern, scale=scale))(q, k, v, pt, lim)
                ro, rlse = fr(q, k, v, pt, lim)
                row["rel_err"] = float(jnp.linalg.norm((o - ro).astype(jnp.float32))
                                       / jnp.linalg.norm(ro.astype(jnp.float32)))
            except Exception as e:  # pylint: disable=broad-except
              row.update(ref_error=f"{type(e).__name__}: {str(e)[:200]}")
          rows.append(row)
          print(fmt_row(row), flush=True)
          _save(_OUT)
        del k, v
  return rows


HEADER = (f"{'shape':8} {'mode':6} {'Q':>3} {'B':>3} {'ctx':>6} {'MB':>8} {'ms':>8} "
          f"{'GB/s':>7} {'copy%':>6} {'xla ms':>8} {'speedup':>7} {'rel err':>8}")


def fmt_row(r):
  if "error" in r:
    return (f"{r['shape']:8} {r['mode']:6} {r['q']:>3} {r['batch']:>3} {r['context']:>6} "
            f"ERROR {r['error']}")
  ref = f"{r['ref_ms']:8.3f}" if "ref_ms" in r else f"{'skip':>8}"
  sp = f"{r['ref_ms'] / r['ms']:7.1f}" if "ref_ms" in r else f"{'':>7}"
  err = f"{r['rel_err']:8.1e}" if "rel_err" in r else f"{'':>8}"
  return (f"{r['shape']:8} {r['mode']:6} {r['q']:>3} {r['batch']:>3} {r['context']:>6} "
          f"{r['bytes'] / 1e6:8.1f} {r['ms']:8.4f} {r['gbps']:7.0f} {100 * r['frac']:5.1f}% "
          f"{ref} {sp} {err}  (x{r['inner']}, compile {r.get('compile_s', 0):.1f}s)")


# ----------------------------------------------------------------------------- sweep


def sweep(bw, results):
  dtype = jnp.dtype(FLAGS.dtype)
  ps = FLAGS.page_size
  configs = [dict(block_k=bk, num_warps=nw, num_stages=ns)
             for bk, nw, ns in ((32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3),
                                (128, 4, 3), (128, 8, 2))]
  configs += [dict(num_splits=s) for s in (1, 2, 4, 8, 16, 32, 64)]
  configs += [dict(block_rows=r) for r in (32, 64)]
  key = jax.random.PRNGKey(1)
  for shape in FLAGS.shapes:
    d = SHAPES[shape][2]
    for ctx in map(int, FLAGS.contexts):
      for batch in map(int, FLAGS.batches):
        for mode in FLAGS.modes:
          nq = MODES[mode]
          key, sub = jax.random.split(key)
          args = make_case(sub, shape, batch, ctx, nq, ps, dtype)
          nbytes = bytes_moved(shape, batch, ctx, nq, ps, dtype.itemsize)
          inner = inner_calls(nbytes)
          for cfg in configs:
            kern = functools.partial(pallas_attention.paged_attention, scale=d ** -0.5,
                                     **kernel_kwargs(**cfg))
            try:
              t = _time(looped(kern, inner), args, FLAGS.repeats) / inner
              res = dict(ms=t * 1e3, frac=nbytes / t / bw)
            except Exception as e:  # pylint: disable=broad-except
              res = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
            results.append(dict(shape=shape, mode=mode, batch=batch, context=ctx,
                                config=cfg, **res))
            msg = (f"{res['ms']:.4f} ms {100 * res['frac']:5.1f}%" if "ms" in res
                   else res["error"])
            print(f"sweep {shape} {mode} B={batch} ctx={ctx} {cfg}: {msg}", flush=True)
            _save(_OUT)
  return results


# ----------------------------------------------------------------------------- check


def check():
  """Compiled kernel vs reference: every mode, dtypes, head dims, page sizes, GQA groups,
  ragged limits, shuffled pages, poisoned unused pages and slots, kv_limit == 0 rows."""
  rng = np.random.default_rng(0)
  cases = []
  shapes = ((1, 8, 8, 64, 16), (1, 32, 8, 128, 64), (1, 64, 8, 128, 256), (8, 32, 8, 128, 16),
            (8, 16, 2, 64, 64), (24, 32, 8, 128, 64), (24, 8, 8, 64, 16),
            (24, 64, 8, 128, 32), (200, 8, 2, 128, 64))
  for i, shp in enumerate(shapes):
    cases.append(("bfloat16", *shp, (None, 3)[i % 2]))
    cases.append(("float32", *shp, (3, None)[i % 2]))
  cases.append(("bfloat16", 1, 32, 8, 128, 16, None, 64))  # gathered multi-page blocks
  cases.append(("bfloat16", 24, 32, 8, 128, 16, 2, 128))
  cases.append(("bfloat16", 1, 32, 8, 128, 256, 2, 64))  # blocks of a quarter page
  cases.append(("float32", 8, 16, 2, 64, 64, None, 32))
  failures = 0
  for c in cases:
    dtype, nq, hq, hkv, d, ps, splits = c[:7]
    bk = c[7] if len(c) > 7 else None
    b, pages_per_seq = 3, max(2, 700 // ps + 1)
    dt = jnp.dtype(dtype)
    num_pages = b * pages_per_seq + 5
    q = rng.standard_normal((b, nq, hq, d)).astype(np.float32)
    k = rng.standard_normal((num_pages, ps, hkv, d)).astype(np.float32)
    v = rng.standard_normal((num_pages, ps, hkv, d)).astype(np.float32)
    pt = rng.permutation(num_pages)[:b * pages_per_seq].reshape(b, pages_per_seq)
    cap = pages_per_seq * ps
    base = np.array([cap, rng.integers(1, cap), 0])
    if nq == 1:
      lim = base[:, None]
    else:
      lim = np.maximum(0, base[:, None] - rng.integers(0, nq, (b, nq)))
      lim[2] = 0
    clean_k, clean_v = k.copy(), v.copy()
    used = np.zeros((num_pages, ps), bool)
    for i in range(b):
      n = int(lim[i].max())
      for p in range(pages_per_seq):
        lo = p * ps
        used[pt[i, p], :max(0, min(ps, n - lo))] = True
    k[~used] = np.nan
    v[~used] = np.nan
    clean_k[~used] = 0.0
    clean_v[~used] = 0.0
    args = [jnp.asarray(x, dt) for x in (q, k, v)] + [jnp.asarray(pt, jnp.int32),
                                                       jnp.asarray(lim, jnp.int32)]
    ref_args = [jnp.asarray(x, dt) for x in (q, clean_k, clean_v)] + args[3:]
    scale = d ** -0.5
    tag = f"{dtype} Q={nq} Hq={hq} Hkv={hkv} D={d} ps={ps} splits={splits} block_k={bk}"
    try:
      o, lse = jax.jit(functools.partial(pallas_attention.paged_attention, scale=scale,
                                         num_splits=splits, block_k=bk))(*args)
      with jax.default_matmul_precision("highest"):  # no TF32 in the float32 reference
        ro, rlse = jax.jit(functools.partial(reference.paged_attention, scale=scale))(
            *ref_args)
      o, ro = np.asarray(o, np.float32), np.asarray(ro, np.float32)
      err = np.linalg.norm(o - ro) / np.linalg.norm(ro)
      lse_ok = np.allclose(np.asarray(lse), np.asarray(rlse), rtol=1e-4, atol=1e-3)
      tol = 1e-5 if dtype == "float32" else 2e-2
      ok = err < tol and lse_ok and np.isfinite(o).all()
      print(f"check {'OK  ' if ok else 'FAIL'} {tag}: rel err {err:.2e} lse ok {lse_ok}",
            flush=True)
    except Exception as e:  # pylint: disable=broad-except
      ok = False
      print(f"check FAIL {tag}: {type(e).__name__}: {str(e)[:1500]}", flush=True)
    failures += not ok
  print(f"check: {len(cases) - failures}/{len(cases)} passed", flush=True)
  return failures


_OUT = {}


def main(argv):
  del argv
  dev = jax.devices()[0]
  info = dict(device=str(dev), device_kind=dev.device_kind, jax=jax.__version__,
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              argv=sys.argv, page_size=FLAGS.page_size, dtype=FLAGS.dtype,
              kernel=kernel_kwargs())
  print(json.dumps(info), flush=True)
  _OUT["info"] = info
  if FLAGS.check:
    _OUT["check_failures"] = check()
    _save(_OUT)
  bw = copy_bandwidth()
  _OUT["copy_bandwidth"] = bw
  print(f"copy bandwidth: {bw['best'] / 1e9:.0f} GB/s (copy {bw['copy'] / 1e9:.0f}, "
        f"elementwise {bw['elementwise'] / 1e9:.0f})", flush=True)
  if FLAGS.sweep:
    _OUT["sweep"] = []
    sweep(bw["best"], _OUT["sweep"])
  else:
    print(HEADER, flush=True)
    _OUT["rows"] = []
    bench_table(bw["best"], _OUT["rows"])
  # Measured again at the end, warm: fractions above used the first measurement.
  _OUT["copy_bandwidth_end"] = copy_bandwidth()
  print(f"copy bandwidth at the end: {_OUT['copy_bandwidth_end']['best'] / 1e9:.0f} GB/s",
        flush=True)
  _save(_OUT)


if __name__ == "__main__":
  app.run(main)
