"""Few-row matmuls at the shapes of a decode step: XLA's pick against the Pallas skinny
kernel (ssd_jax/kernels/skinny_matmul.py), in TB/s of weight read and as a share of the
read ceiling measured in the same process.

Each point multiplies M rows by every copy of one weight shape (copies rotate so that
their sum exceeds the 50 MB L2: every call reads from HBM), all in one jitted program
returning every product (no extra kernels), timed as calls queued back to back. Each
Pallas configuration is checked against a float32 XLA product first (bf16 tolerance).

  PYTHONPATH=$PWD python bench/probes/skinny_gemm.py --models llama-3.1-8b,llama-3.2-1b \
      --rows 8,32 --sweep_rows 8 --output_json out.json
"""

from __future__ import annotations

import itertools
import json
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

flags.DEFINE_list("models", ["llama-3.1-8b", "llama-3.2-1b", "smollm2-135m"],
                  "REAL_SHAPES names.")
flags.DEFINE_list("rows", ["8", "32"], "Activation rows M.")
flags.DEFINE_list("sweep_rows", [], "Rows M at which to also time a grid of launch plans.")
flags.DEFINE_list("sweep_models", [], "Models to sweep (empty: all of --models).")
flags.DEFINE_float("read_gb", 8.6, "Size of the array the read ceiling reduces (GB).")
flags.DEFINE_float("min_gb", 0.4, "Weight bytes per timed call (copies rotate).")
flags.DEFINE_float("time_budget_s", 480.0, "Stop sweeping after this many seconds.")
flags.DEFINE_string("output_json", None, "Write the results here.")
FLAGS = flags.FLAGS


def weight_shapes(cfg):
  """(name, K, N, transposed) of each matrix a decode step reads, as the model stores it."""
  e, h, kv, d, m, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                       cfg.intermediate_size, cfg.vocab_size)
  head = ("head_tied", e, v, True) if cfg.tie_word_embeddings else ("head", e, v, False)
  return [("q", e, h * d, False), ("kv", e, 2 * kv * d, False), ("o", h * d, e, False),
          ("gate_up", e, 2 * m, False), ("down", m, e, False), head]


def _time_per_call(f, args, reps=10, calls=10, warmup_s=0.3):
  """Median seconds per call of calls queued back to back, after `warmup_s` of calls
  (the GPU's clocks drop while a point compiles; a cold burst reads low)."""
  jax.block_until_ready(f(*args))
  t_end = time.perf_counter() + warmup_s
  while time.perf_counter() < t_end:
    jax.block_until_ready(f(*args))
  samples = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(calls):
      y = f(*args)
    jax.block_until_ready(y)
    samples.append((time.perf_counter() - t0) / calls)
  return statistics.median(samples)


def _plans(m, k, n, num_sms):
  seen = []
  for bn, bk, stages in itertools.product((32, 64, 128), (64, 128, 256), (3, 4)):
    if n % bn or k % bk:
      continue
    for target in (1, 2, 4):
      s = 1
      while (n // bn) * s < target * num_sms and k % (2 * s * bk) == 0:
        s *= 2
      plan = dict(block_n=bn, block_k=bk, splits=s, num_warps=4, num_stages=stages)
      if plan not in seen:
        seen.append(plan)
  return seen


def main(_):
  from bench.roofline import measure_read_bandwidth
  from ssd_jax.checkpoint import REAL_SHAPES
  from ssd_jax.kernels import skinny_matmul as sk

  read = measure_read_bandwidth(nbytes=int(FLAGS.read_gb * 1e9))
  ceiling = read["bandwidth_Bps"]
  print(f"read ceiling {ceiling / 1e12:.2f} TB/s", flush=True)
  num_sms = sk._num_sms()  # pylint: disable=protected-access
  t_start = time.perf_counter()
  results = {"read_ceiling": read, "points": []}
  key = jax.random.key(0)
  for model in FLAGS.models:
    cfg = REAL_SHAPES[model]
    for name, k, n, transposed in weight_shapes(cfg):
      wshape = (n, k) if transposed else (k, n)
      nbytes = k * n * 2
      copies = max(2, int(FLAGS.min_gb * 1e9 // nbytes) + 1)
      ws = [jax.random.normal(jax.random.fold_in(key, i), wshape, jnp.bfloat16)
            for i in range(copies)]
      for m in (int(r) for r in FLAGS.rows):
        x = jax.random.normal(jax.random.fold_in(key, 999), (m, k), jnp.bfloat16)
        ref = jnp.dot(x.astype(jnp.float32), (ws[0].T if transposed else ws[0]).astype(jnp.float32))

        def xla(x, ws, transposed=transposed):
          return tuple(jnp.dot(x, w.T if transposed else w) for w in ws)

        point = {"model": model, "matrix": name, "K": k, "N": n, "M": m, "bytes": nbytes,
                 "copies": copies}
        t = _time_per_call(jax.jit(xla), (x, ws)) / copies
        point["xla"] = {"us": t * 1e6, "TBps": nbytes / t / 1e12, "of_ceiling": nbytes / t / ceiling}
        if m > 1:
          t1 = _time_per_call(jax.jit(xla), (x[:1], ws)) / copies
          point["xla_m1"] = {"us": t1 * 1e6, "TBps": nbytes / t1 / 1e12}
        plans = [sk.default_plan(m, k, n)]
        if str(m) in FLAGS.sweep_rows and (not FLAGS.sweep_models or model in FLAGS.sweep_models):
          plans += [p for p in _plans(m, k, n, num_sms) if p != plans[0]]
        point["pallas"] = []
        for plan in plans:
          if time.perf_counter() - t_start > FLAGS.time_budget_s and plan is not plans[0]:
            point["sweep_cut"] = True
            break
          f = jax.jit(lambda x, ws, plan=plan, transposed=transposed: tuple(
              sk.skinny_matmul(x, w, transpose_w=transposed, **plan) for w in ws))
          try:
            out = f(x, ws)[0].astype(jnp.float32)
            err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
            if not err < 2e-2:
              raise AssertionError(f"relative error {err}")
            t = _time_per_call(f, (x, ws)) / copies
          except Exception as e:  # pylint: disable=broad-except
            point["pallas"].append({"plan": plan, "error": str(e).splitlines()[0][:200]})
            continue
          point["pallas"].append({"plan": plan, "us": t * 1e6, "TBps": nbytes / t / 1e12,
                                  "of_ceiling": nbytes / t / ceiling, "rel_err": err})
        ok = [p for p in point["pallas"] if "us" in p]
        best = min(ok, key=lambda p: p["us"]) if ok else None
        point["best"] = best
        d = point["pallas"][0]
        print(f"{model:14s} {name:9s} K={k:6d} N={n:6d} M={m:2d}  xla {point['xla']['TBps']:.2f} TB/s"
              f" ({point['xla']['us']:.1f} us)"
              + (f"  m1 {point['xla_m1']['TBps']:.2f}" if "xla_m1" in point else "")
              + (f"  pallas default {d['TBps']:.2f}" if "TBps" in d else f"  default ERR {d.get('error')}")
              + (f"  best {best['TBps']:.2f} ({best['us']:.1f} us) {best['plan']}" if best else ""),
              flush=True)
        results["points"].append(point)
      del ws
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as fh:
      json.dump(results, fh, indent=1)


if __name__ == "__main__":
  app.run(main)
