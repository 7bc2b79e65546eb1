"""Times the Pallas paged-attention kernel (decode, verify, SSD tree) against the copy
bandwidth of the device and against the XLA reference.

For each attention shape x context x batch x mode it builds a bf16 page pool holding
exactly the batch's context (pages shuffled in the pool), counts the bytes the kernel must
move (the visible KV pages of every sequence, read once for all query heads, plus Q, out
and lse), and times the kernel: one jitted function runs it `--inner` times back to back
(each call's output is the next call's query, so nothing can be hoisted or batched), the
median over `--repeats` runs, divided by `--inner`, is the time per call. Consecutive calls
read different copies of the pool (`--rotate_mb`), so a pool smaller than the L2 cache is
read from memory, as it is in a model. GB/s is bytes over that time; "copy%" is that over
the measured device copy bandwidth (bench/roofline.py: the better of an array copy and an
elementwise pass, bytes read + written; the read ceiling is recorded beside it). "read"
is XLA's time to merely read the same pools (a reduction per call, timed the same way)
over the kernel's: the floor that fixed per-launch costs put under a call of this size. TF/s counts the useful matmul work (QK and
PV over the visible positions only), to tell rows limited by arithmetic (big trees) from
rows limited by bytes or by latency.

  (from the repository root, with PYTHONPATH=$PWD)
  python bench/probes/kernel_bench.py                   # the default table
  python bench/probes/kernel_bench.py --shapes=70b --contexts=4096 --batches=8 --modes=decode
  python bench/probes/kernel_bench.py --rows="70b:tree:32:4096 70b:decode,verify:1,8:16384"
  python bench/probes/kernel_bench.py --check --check_set=quick  # vs the reference
  python bench/probes/kernel_bench.py --sweep --shapes=8b --contexts=4096 --batches=1,8
  python bench/probes/kernel_bench.py --rows=none \
      --sweep_plan="8b:decode:8:4096@splits;70b:tree:8:4096@tiles"

Row specs are `shape:mode:batch:context`, each field a comma list (their product is
taken); several specs are separated by spaces or `;`. Configs are comma lists of
key=value (keys: k=block_k, w=num_warps, st=num_stages, sp=num_splits, r=block_rows,
merge=pallas|xla, and n=calls per timed run, which spreads the benchmark's own dispatch of
each timed run over more calls), several separated by `/`, or a preset name: default,
splits, tiles, all.
`--time_budget_s` stops starting new rows, configs and check cases once spent, so one
call stays within a device's time limit; every result is written to --output_json as it
comes.

Shapes are whole models on one device (8b: 32 q heads / 8 KV heads; 70b: 64 / 8; head_dim
128); under tensor parallelism of degree T each shard runs the same kernel with Hq/T and
Hkv/T heads, i.e. the same group size on fewer heads (the *_tp shapes below). `tiny` is for
trying the script on a CPU (interpret mode).
"""

from __future__ import annotations

import datetime
import functools
import json
import statistics
import sys
import time
import zlib

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

from bench import roofline
from bench.probes.kernel_check import check, plan_str, with_merge
from ssd_jax.kernels import pallas_attention, reference

SHAPES = {  # name: (q heads, kv heads, head_dim)
    "8b": (32, 8, 128),
    "1b": (32, 8, 64),  # Llama-3.2-1B, the SSD draft of the 8B/70B pairs
    "70b": (64, 8, 128),
    "8b_tp4": (8, 2, 128),
    "70b_tp8": (8, 1, 128),
    "draft": (9, 3, 64),  # SmolLM2-135M, the default SSD draft
    "tiny": (4, 2, 64),
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
flags.DEFINE_integer("inner", 0, "calls per timed run (0: enough for ~1 ms, at most 32)")
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
flags.DEFINE_enum("merge", "pallas", ["pallas", "xla"], "kernel: how KV splits are merged")
flags.DEFINE_integer("rotate_mb", 256, "each timed run cycles through copies of the page "
                     "pool totalling at least this many MB (as many as it has calls), so "
                     "that a pool smaller than the L2 cache is still read from memory, as "
                     "in a model where every layer's weights pass through L2 between two "
                     "calls of one layer's attention; 0: one pool")
flags.DEFINE_bool("read_floor", True, "also time XLA reading the same pools (a reduction "
                  "of K and V per call, timed like the kernel): the fastest a plain XLA "
                  "kernel reads these bytes, fixed costs included")
flags.DEFINE_integer("race_repeats", 20, "--check: calls of each split case on the same "
                     "inputs, every output bitwise equal to the first (a race would move it)")
flags.DEFINE_string("rows", None, "table rows as shape:mode:batch:context specs (fields are "
                    "comma lists; specs separated by spaces or ;); 'none' skips the table; "
                    "default: the product of --shapes, --contexts, --batches, --modes")
flags.DEFINE_string("configs", "all", "--sweep configs: a preset (default, splits, tiles, "
                    "all) or configs like 'sp=8,w=4/k=128'")
flags.DEFINE_string("sweep_plan", None, "sweeps after the table: 'ROWS@CONFIGS' items "
                    "separated by ; or spaces, e.g. '8b:decode:8:4096@splits'")
flags.DEFINE_float("time_budget_s", 0, "stop starting new work after this many seconds "
                   "(0: no limit)")
flags.DEFINE_enum("check_set", "full", ["full", "quick"], "--check cases: all, or one of "
                  "each kernel path (splits merged in Pallas and XLA, no split, short table)")


KEY_ALIASES = {"k": "block_k", "w": "num_warps", "st": "num_stages", "sp": "num_splits",
               "r": "block_rows", "merge": "merge", "n": "inner", "block_k": "block_k",
               "num_warps": "num_warps", "num_stages": "num_stages",
               "num_splits": "num_splits", "block_rows": "block_rows"}


def _cfgs(text):
  return [parse_config(c) for c in text.split("/")]


PRESETS = {
    "default": lambda: [{}],
    # Split counts around the automatic choice (8b decode B=8 ctx 4k picks 8 or 9), the
    # merge done by XLA instead of the merge kernel, and no split at all.
    "splits": lambda: _cfgs("/merge=xla/sp=1/sp=2/sp=4/sp=6/sp=8/sp=9/sp=12/sp=16/sp=24/"
                            "sp=32"),
    # Tiles for big row counts (70b verify: 64 rows, 8 warps by default; 70b tree: 192 rows
    # as two 128-row tiles): one warpgroup (4 warps) per 64 rows, pipeline depth, wider or
    # narrower K blocks, 3 tiles of 64 rows, one tile of 256 rows.
    "tiles": lambda: _cfgs("/w=4/st=2/st=4/k=32/k=128,st=2/k=128,w=4,st=2/r=64/r=64,w=4/"
                           "r=256,k=32/r=256,k=32,st=2"),
    # A generic grid over block_k, warps, stages, splits and tile rows.
    "all": lambda: _cfgs("k=32,w=4,st=3/k=64,w=4,st=2/k=64,w=4,st=3/k=64,w=4,st=4/"
                         "k=64,w=8,st=3/k=128,w=4,st=3/k=128,w=8,st=2/sp=1/sp=2/sp=4/sp=8/"
                         "sp=16/sp=32/sp=64/r=32/r=64"),
}


def parse_config(text: str) -> dict:
  """'sp=8,w=4' -> {'num_splits': 8, 'num_warps': 4}; '' -> {} (the defaults)."""
  cfg = {}
  for item in filter(None, (t.strip() for t in text.split(","))):
    key, sep, value = item.partition("=")
    if not sep or key.strip() not in KEY_ALIASES:
      raise ValueError(f"config item {item!r}: use key=value with key in "
                       f"{sorted(KEY_ALIASES)}")
    key = KEY_ALIASES[key.strip()]
    cfg[key] = value.strip() if key == "merge" else int(value)
  return cfg


def parse_configs(text: str) -> list[dict]:
  text = text.strip()
  return PRESETS[text]() if text in PRESETS else _cfgs(text)


def _split_specs(text: str) -> list[str]:
  return [t for t in text.replace(";", " ").split() if t]


def parse_rows(text: str) -> list[tuple[str, str, int, int]]:
  """'8b,70b:decode:1,8:4096' -> [(shape, mode, batch, context), ...] in table order
  (shape, context, batch, mode); 'none' -> []."""
  if text.strip().lower() == "none":
    return []
  rows = []
  for spec in _split_specs(text):
    fields = spec.split(":")
    if len(fields) != 4:
      raise ValueError(f"row spec {spec!r}: use shape:mode:batch:context")
    shapes, modes, batches, ctxs = (f.split(",") for f in fields)
    for name in shapes:
      if name not in SHAPES:
        raise ValueError(f"shape {name!r}: use one of {', '.join(SHAPES)}")
    for m in modes:
      if m not in MODES:
        raise ValueError(f"mode {m!r}: use one of {', '.join(MODES)}")
    for shape in shapes:
      for ctx in map(int, ctxs):
        for batch in map(int, batches):
          rows += [(shape, mode, batch, ctx) for mode in modes]
  return rows


def parse_plan(text: str) -> list[tuple[tuple[str, str, int, int], list[dict]]]:
  """'ROWS@CONFIGS ...' -> [(row, configs), ...]."""
  plan = []
  for item in _split_specs(text):
    rows, sep, cfgs = item.partition("@")
    configs = parse_configs(cfgs) if sep else [{}]
    plan += [(row, configs) for row in parse_rows(rows)]
  return plan


def _unique(rows):
  return list(dict.fromkeys(rows))


def default_rows():
  return parse_rows(":".join(",".join(x) for x in (FLAGS.shapes, FLAGS.modes,
                                                   FLAGS.batches, FLAGS.contexts)))


def kernel_kwargs(**over):
  kw = dict(block_k=FLAGS.block_k, block_rows=FLAGS.block_rows, num_splits=FLAGS.num_splits,
            num_warps=FLAGS.num_warps, num_stages=FLAGS.num_stages)
  kw.update(over)
  kw = {k: v for k, v in kw.items() if v and k not in ("merge", "inner")}
  merge = over.get("merge", FLAGS.merge)
  if merge != "pallas":
    kw["merge"] = merge
  return kw


_T0 = time.perf_counter()


def elapsed() -> float:
  return time.perf_counter() - _T0


def out_of_time() -> bool:
  return bool(FLAGS.time_budget_s) and elapsed() > FLAGS.time_budget_s


def plan_of(shape, batch, ctx, nq, ps, dtype, kw):
  """The kernel's launch plan for this row (what the defaults chose), for the record."""
  hq, hkv, d = SHAPES[shape]
  pages = -(-ctx // ps)
  plan_kw = {k: v for k, v in kw.items() if k != "merge"}
  try:
    plan = pallas_attention.launch_plan(
        (batch, nq, hq, d), (batch * pages + 1, ps, hkv, d), pages, dtype,
        interpret=jax.default_backend() != "gpu", **plan_kw)
  except Exception as e:  # pylint: disable=broad-except
    return {"error": str(e)[:200]}
  return with_merge(plan, kw.get("merge"))


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


def inner_calls(nbytes):
  """Calls per timed run: enough for ~1 ms, so that the benchmark's own dispatch of each
  run is spread thin (at batch 1, 8 calls per run still left half the time to it)."""
  return FLAGS.inner or int(np.clip(round(1e-3 / (nbytes / 2.5e12)), 1, 32))


def read_loop(inner):
  """jit(reduce K and V of pool i, `inner` times, each read waiting for the last): XLA's
  reduction kernels reading the pool's bytes once per call, the floor that a kernel of
  this size meets."""
  def run(kvs):
    total = jnp.zeros((), jnp.float32)
    for i in range(inner):
      k, v = kvs[i % len(kvs)]
      # `+ total` on both chains the calls: no two reductions can merge into one launch,
      # and none can be shared between two calls that read the same copy of the pool.
      total = (jnp.sum(k.astype(jnp.float32) + total)
               + jnp.sum(v.astype(jnp.float32) + total))
    return total
  return jax.jit(run)


def pool_copies(pool_bytes, inner):
  """How many copies of the pool one timed run cycles through (see --rotate_mb)."""
  if not FLAGS.rotate_mb:
    return 1
  return int(np.clip(-(-FLAGS.rotate_mb * 1e6 // pool_bytes), 1, inner))


def looped(attn, inner):
  """jit(run `attn` `inner` times, feeding each output back in as the next query; call i
  reads the i-th of the given K/V pools, cyclically).

  `attn` is jitted on its own, so the `inner` identical calls are lowered (and compiled by
  Triton) once, as a model's layers are.
  """
  attn = jax.jit(attn)

  def run(q, kvs, pt, lim):
    # Nothing else runs between the calls: anything here (summing each call's lse, say)
    # would be one more small kernel per call, timed as the kernel's.
    for i in range(inner):
      k, v = kvs[i % len(kvs)]
      q, lse = attn(q, k, v, pt, lim)
    return q, lse
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


def limits(ctx, nq):
  """Decode sees ctx; verify is the causal K+1 window ending at ctx; tree branches hang off
  the last 8 positions."""
  i = np.arange(nq, dtype=np.int32)
  if nq == 1:
    return np.full((nq,), ctx, np.int32)
  if nq <= 16:
    return ctx - nq + 1 + i
  return ctx - i % 8


def make_queries(key, shape, batch, ctx, nq, dtype):
  hq, _, d = SHAPES[shape]
  q = jax.random.normal(key, (batch, nq, hq, d), dtype)
  lim = jnp.asarray(limits(ctx, nq))
  return q, jnp.broadcast_to(lim, (batch, nq))


def bytes_moved(shape, batch, ctx, nq, page_size, itemsize):
  hq, hkv, d = SHAPES[shape]
  visible = -(-ctx // page_size) * page_size  # whole pages are read
  kv = 2 * batch * visible * hkv * d * itemsize
  qo = 2 * batch * nq * hq * d * itemsize + batch * nq * hq * 4
  return kv + qo


def useful_flops(shape, batch, ctx, nq):
  """QK^T and PV over the positions each query may see (2 flops per multiply-add)."""
  hq, _, d = SHAPES[shape]
  return 4 * batch * hq * d * int(limits(ctx, nq).sum())


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


class Pools:
  """Keeps the last page pool: consecutive rows of one shape, context and batch share it."""

  def __init__(self):
    self.key, self.arrays = None, None

  def get(self, shape, batch, ctx, dtype):
    key = (shape, batch, ctx, FLAGS.page_size, dtype.name)
    if key != self.key:
      self.arrays = None  # free the previous pool first
      seed = jax.random.PRNGKey(zlib.crc32(repr(key[:3]).encode()))
      self.arrays = make_pool(seed, shape, batch, ctx, FLAGS.page_size, dtype), seed
      self.key = key
    return self.arrays


def measure(bw, pools, shape, mode, batch, ctx, kw, *, with_ref, inner=None):
  """Times one row with kernel arguments `kw`; returns the result dict."""
  dtype = jnp.dtype(FLAGS.dtype)
  ps = FLAGS.page_size
  hq, hkv, d = SHAPES[shape]
  scale = d ** -0.5
  nq = MODES[mode]
  (k, v, pt), seed = pools.get(shape, batch, ctx, dtype)
  q, lim = make_queries(jax.random.fold_in(seed, nq), shape, batch, ctx, nq, dtype)
  nbytes = bytes_moved(shape, batch, ctx, nq, ps, dtype.itemsize)
  flops = useful_flops(shape, batch, ctx, nq)
  inner = inner or inner_calls(nbytes)
  copies = pool_copies(k.nbytes + v.nbytes, inner)
  row = dict(shape=shape, mode=mode, q=nq, batch=batch, context=ctx, page_size=ps,
             dtype=dtype.name, bytes=nbytes, flops=flops, inner=inner, pool_copies=copies,
             kernel=kw, plan=plan_of(shape, batch, ctx, nq, ps, dtype, kw))
  kern = functools.partial(pallas_attention.paged_attention, scale=scale, **kw)
  kvs = [(k, v)] + [(jnp.array(k, copy=True), jnp.array(v, copy=True))
                    for _ in range(copies - 1)]
  try:
    t0 = time.perf_counter()
    f = looped(kern, inner)
    jax.block_until_ready(f(q, kvs, pt, lim))
    row["compile_s"] = time.perf_counter() - t0
    t = _time(f, (q, kvs, pt, lim), FLAGS.repeats) / inner
    row.update(ms=t * 1e3, gbps=nbytes / t / 1e9, frac=nbytes / t / bw,
               tflops=flops / t / 1e12)
    if FLAGS.read_floor:
      fr = read_loop(inner)
      jax.block_until_ready(fr(kvs))
      tr = _time(fr, (kvs,), FLAGS.repeats) / inner
      # vs_read: the XLA read's time over the kernel's (1.0: as fast as merely reading
      # the pool; the pool holds one spare page, so slightly over the KV the kernel reads).
      row.update(read_ms=tr * 1e3, read_frac=(k.nbytes + v.nbytes) / tr / bw, vs_read=tr / t)
  except Exception as e:  # pylint: disable=broad-except
    row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
  need = ref_bytes_needed(shape, batch, ctx, nq, dtype.itemsize)
  if with_ref and FLAGS.reference and need <= FLAGS.ref_mem_gb * 1e9:
    try:
      fr = looped(lambda *a: reference.paged_attention(*a, scale=scale), 1)
      tr = _time(fr, (q, [(k, v)], pt, lim), max(3, FLAGS.repeats // 2))
      row.update(ref_ms=tr * 1e3)
      if "ms" in row and FLAGS.verify:
        o, _ = jax.jit(kern)(q, k, v, pt, lim)
        ro, _ = jax.jit(functools.partial(reference.paged_attention, scale=scale))(
            q, k, v, pt, lim)
        row["rel_err"] = float(jnp.linalg.norm((o - ro).astype(jnp.float32))
                               / jnp.linalg.norm(ro.astype(jnp.float32)))
    except Exception as e:  # pylint: disable=broad-except
      row.update(ref_error=f"{type(e).__name__}: {str(e)[:200]}")
  return row


def progress(i, n):
  return f"[{i}/{n} {elapsed():5.0f}s]"


def bench_table(bw, rows, specs):
  pools = Pools()
  kw = kernel_kwargs()
  for i, (shape, mode, batch, ctx) in enumerate(specs, 1):
    if out_of_time():
      _OUT.setdefault("skipped_rows", []).append(f"{shape}:{mode}:{batch}:{ctx}")
      print(f"{progress(i, len(specs))} skip {shape} {mode} B={batch} ctx={ctx}: time "
            "budget spent", flush=True)
      continue
    row = measure(bw, pools, shape, mode, batch, ctx, kw, with_ref=True)
    rows.append(row)
    print(f"{progress(i, len(specs))} {fmt_row(row)}", flush=True)
    _save(_OUT)
  return rows


HEADER = (f"{'':13} {'shape':7} {'mode':6} {'Q':>3} {'B':>3} {'ctx':>6} {'MB':>7} "
          f"{'ms':>8} {'GB/s':>6} {'copy%':>6} {'read':>6} {'TF/s':>6} {'xla ms':>7} "
          f"{'vs xla':>6} {'rel err':>8}  plan")


def fmt_row(r):
  head = f"{r['shape']:7} {r['mode']:6} {r['q']:>3} {r['batch']:>3} {r['context']:>6}"
  if "error" in r:
    return f"{head} ERROR {r['error']}"
  ref = f"{r['ref_ms']:7.3f}" if "ref_ms" in r else f"{'skip':>7}"
  sp = f"{r['ref_ms'] / r['ms']:6.1f}" if "ref_ms" in r else f"{'':>6}"
  err = f"{r['rel_err']:8.1e}" if "rel_err" in r else f"{'':>8}"
  read = f"{r['vs_read']:6.2f}" if "vs_read" in r else f"{'':>6}"
  return (f"{head} {r['bytes'] / 1e6:7.1f} {r['ms']:8.4f} {r['gbps']:6.0f} "
          f"{100 * r['frac']:5.1f}% {read} {r['tflops']:6.1f} {ref} {sp} {err}  "
          f"{plan_str(r['plan'])} (x{r['inner']}, compile {r.get('compile_s', 0):.1f}s)")


# ----------------------------------------------------------------------------- sweep


def sweep(bw, results, plan):
  """plan: [(row, configs)]; each config's result is one entry of `results`."""
  pools = Pools()
  n = sum(len(cfgs) for _, cfgs in plan)
  i = 0
  for (shape, mode, batch, ctx), configs in plan:
    for cfg in configs:
      i += 1
      tag = f"{shape} {mode} B={batch} ctx={ctx} {cfg or 'defaults'}"
      if out_of_time():
        _OUT.setdefault("skipped_sweeps", []).append(tag)
        print(f"{progress(i, n)} sweep skip {tag}: time budget spent", flush=True)
        continue
      row = measure(bw, pools, shape, mode, batch, ctx, kernel_kwargs(**cfg),
                    with_ref=False, inner=cfg.get("inner"))
      row["config"] = cfg
      results.append(row)
      read = f" (XLA read {row['read_ms']:.4f} ms)" if "read_ms" in row else ""
      msg = (f"{row['ms']:.4f} ms {100 * row['frac']:5.1f}%{read} {row['tflops']:5.1f} TF/s  "
             f"{plan_str(row['plan'])} (x{row['inner']}, compile {row['compile_s']:.1f}s)"
             if "ms" in row else row["error"])
      print(f"{progress(i, n)} sweep {tag}: {msg}", flush=True)
      _save(_OUT)
  return results


_OUT = {}


def ceilings(suffix: str) -> float:
  """Measures the copy bandwidth (bytes read + written: the copy% column's denominator)
  and the read ceiling (a reduction, the roofline's figure) into _OUT; returns the copy
  bandwidth."""
  copy = roofline.measure_copy_bandwidth(reps=20)
  read = roofline.measure_read_bandwidth(reps=20)
  _OUT["copy_bandwidth" + suffix], _OUT["read_bandwidth" + suffix] = copy, read
  print(f"copy bandwidth{' at the end' if suffix else ''}: "
        f"{copy['bandwidth_Bps'] / 1e9:.0f} GB/s (copy {copy['copy_Bps'] / 1e9:.0f}, "
        f"elementwise {copy['elementwise_Bps'] / 1e9:.0f}); read ceiling "
        f"{read['bandwidth_Bps'] / 1e9:.0f} GB/s", flush=True)
  return copy["bandwidth_Bps"]


def main(argv):
  del argv
  table_rows = _unique(default_rows() if FLAGS.rows is None else parse_rows(FLAGS.rows))
  plan = parse_plan(FLAGS.sweep_plan) if FLAGS.sweep_plan else []
  if FLAGS.sweep:  # the classic sweep: the table's rows x --configs, instead of the table
    plan = [(row, parse_configs(FLAGS.configs)) for row in table_rows] + plan
    table_rows = []
  dev = jax.devices()[0]
  info = dict(device=str(dev), device_kind=dev.device_kind, jax=jax.__version__,
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              argv=sys.argv, page_size=FLAGS.page_size, dtype=FLAGS.dtype,
              kernel=kernel_kwargs(), time_budget_s=FLAGS.time_budget_s,
              split_min_tokens=pallas_attention.SPLIT_MIN_TOKENS)
  print(json.dumps(info), flush=True)
  print(f"{len(table_rows)} table rows, {sum(len(c) for _, c in plan)} sweep configs",
        flush=True)
  _OUT["info"] = info
  if FLAGS.check:
    _OUT["check_failures"] = check(FLAGS.check_set, FLAGS.race_repeats, _OUT, out_of_time,
                                   progress)
    _save(_OUT)
  if not table_rows and not plan:
    if _OUT.get("check_failures"):
      sys.exit(f"check: {_OUT['check_failures']} case(s) failed")
    return
  bw = ceilings("")
  if table_rows:
    print(HEADER, flush=True)
    _OUT["rows"] = []
    bench_table(bw, _OUT["rows"], table_rows)
  if plan:
    _OUT["sweep"] = []
    sweep(bw, _OUT["sweep"], plan)
  # Measured again at the end, warm: fractions above used the first measurement.
  ceilings("_end")
  print(f"{elapsed():.0f}s in all", flush=True)
  _save(_OUT)
  if _OUT.get("check_failures"):
    sys.exit(f"check: {_OUT['check_failures']} case(s) failed")


if __name__ == "__main__":
  app.run(main)
