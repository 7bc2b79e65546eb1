"""Where a decoder layer's RMSNorms can go so that XLA launches fewer kernels (issue 13).

At batch 1 the 8B step launches, per layer, two norm kernels and two residual-add kernels
beside its four GEMMs (bench/gpu/decode_anatomy.sh): each reads a few KB and costs ~2 us.
RMSNorm is a per-row scale times a per-column gain, so the scale can move past a GEMM:

    rms_norm(x, g) @ W  ==  rsqrt(mean(x^2) + eps) * (x @ (g[:, None] * W))

which leaves in front of the GEMM only a row reduction (that XLA may fuse into the
residual add producing x) and applies the scale where an elementwise kernel runs anyway
(the split-K reduction of the q/k/v GEMM, SiLU x up). This probe builds a stack of layers
in plain jnp (attention replaced by an optimization barrier on the queries, standing for
the Pallas kernels, which are fusion boundaries too) in several variants, counts each
compiled program's launches per layer (hlo_stats.launches) and times it:

  hf          the model as it is: norm, then the GEMM
  gain_x      scale after the GEMM, the gain on the activation ((x * g) @ W)
  gain_w      scale after the GEMM, the gain on the weight inside the program
  folded      scale after the GEMM, the gain folded into the weight beforehand (what a
              loader that folds it would give)

    python bench/probes/norm_fusion.py --shapes llama-3.1-8b,llama-3.2-1b --output_json o.json

Random weights: timings and launch counts only (tests/test_norm_fusion.py checks that the
variants compute the same layer).
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.probes.hlo_stats import launches
from ssd_jax.checkpoint import REAL_SHAPES

VARIANTS = ("hf", "gain_x", "gain_w", "folded")


def _rms(x, eps):
  xf = x.astype(jnp.float32)
  return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def _normed_matmul(x, g, w, eps, variant):
  """rms_norm(x, g) @ w (w [e, ...]) as `variant` computes it; float32 out."""
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  if variant == "hf":
    xf = x.astype(jnp.float32)
    h = (xf * _rms(x, eps) * g.astype(jnp.float32)).astype(x.dtype)
    return jax.lax.dot_general(h, w, dims, preferred_element_type=jnp.float32)
  s = _rms(x, eps).reshape(x.shape[:-1] + (1,) * (w.ndim - 1))
  if variant == "gain_x":
    y = jax.lax.dot_general((x * g).astype(x.dtype), w, dims,
                            preferred_element_type=jnp.float32)
  elif variant == "gain_w":
    gw = (w * g.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
    y = jax.lax.dot_general(x, gw, dims, preferred_element_type=jnp.float32)
  elif variant == "folded":  # w already holds g * w
    y = jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)
  else:
    raise ValueError(f"variant {variant!r} is unknown; use one of {VARIANTS}")
  return s * y


def layer(x, p, *, eps, variant, group):
  """One Llama decoder layer without attention: x [B, S, e] -> x."""
  qkv = _normed_matmul(x, p["ln1"], p["qkv"], eps, variant).astype(x.dtype)  # [B,S,kv,g+2,d]
  q = jax.lax.optimization_barrier(qkv[..., :group, :])
  b, s = x.shape[:2]
  x = x + jnp.einsum("bsf,fe->bse", q.reshape(b, s, -1), p["o"]).astype(x.dtype)
  gu = _normed_matmul(x, p["ln2"], p["gate_up"], eps, variant)  # [B, S, 2, m]
  act = (jax.nn.silu(gu[..., 0, :]) * gu[..., 1, :]).astype(x.dtype)
  return x + jnp.einsum("bsm,me->bse", act, p["down"]).astype(x.dtype)


def stack(x, params, *, eps, variant, group):
  for p in params:
    x = layer(x, p, eps=eps, variant=variant, group=group)
  return x


def init_params(cfg, num_layers, dtype, key, fold=False):
  e, kv, d, m = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  g = cfg.num_heads // kv
  params = []
  for i in range(num_layers):
    ks = jax.random.split(jax.random.fold_in(key, i), 6)
    p = {"ln1": 1 + 0.1 * jax.random.normal(ks[0], (e,), dtype),
         "ln2": 1 + 0.1 * jax.random.normal(ks[1], (e,), dtype),
         "qkv": 0.02 * jax.random.normal(ks[2], (e, kv, g + 2, d), dtype),
         "o": 0.02 * jax.random.normal(ks[3], (cfg.num_heads * d, e), dtype),
         "gate_up": 0.02 * jax.random.normal(ks[4], (e, 2, m), dtype),
         "down": 0.02 * jax.random.normal(ks[5], (m, e), dtype)}
    if fold:
      p["qkv"] = (p["qkv"] * p["ln1"][:, None, None, None]).astype(dtype)
      p["gate_up"] = (p["gate_up"] * p["ln2"][:, None, None]).astype(dtype)
    params.append(p)
  return params


def measure(shape: str, variants, rows: int, layers: int | None, iters: int, log=print):
  cfg = REAL_SHAPES[shape]
  n = layers or cfg.num_layers
  group = cfg.num_heads // cfg.num_kv_heads
  x = jax.random.normal(jax.random.PRNGKey(1), (rows, 1, cfg.hidden_size), jnp.bfloat16)
  out = {}
  for variant in variants:
    params = init_params(cfg, n, jnp.bfloat16, jax.random.PRNGKey(0), fold=variant == "folded")
    fn = jax.jit(lambda x, p, v=variant: stack(x, p, eps=cfg.rms_norm_eps, variant=v,
                                                   group=group))
    compiled = fn.lower(x, params).compile()
    rows_l = launches(compiled.as_text())
    y = compiled(x, params)
    y.block_until_ready()
    times = []
    for _ in range(5):
      t0 = time.perf_counter()
      for _ in range(iters):
        y = compiled(x, params)
      y.block_until_ready()
      times.append((time.perf_counter() - t0) / iters * 1e3)
    kinds = {}
    for r in rows_l:
      kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    ms = statistics.median(times)
    weight_gb = sum(int(np.prod(a.shape)) * 2 for p in params for a in p.values()) / 1e9
    out[variant] = {"ms": ms, "ms_per_layer": ms / n, "launches": len(rows_l),
                    "launches_per_layer": len(rows_l) / n, "kinds": kinds,
                    "weight_gb": weight_gb, "layers": n, "rows": rows,
                    "first_layer": [f"{r['kind']} {r['name']} {r['ops'][:80]}"
                                    for r in rows_l[:14]]}
    log(f"{shape:14s} {variant:7s} {ms:8.3f} ms ({ms / n * 1e3:6.1f} us/layer)  "
        f"{len(rows_l) / n:5.2f} launches/layer  {kinds}")
    del params, compiled
  return out


def main(argv):
  del argv
  from absl import flags
  F = flags.FLAGS
  res = {"device": str(jax.devices()[0]), "jax": jax.__version__,
         "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
  for shape in F.shapes:
    res[shape] = measure(shape, F.variants, F.rows, F.layers, F.iters)
  if F.output_json:
    with open(F.output_json, "w") as fh:
      json.dump(res, fh, indent=1)


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_list("shapes", ["llama-3.1-8b", "llama-3.2-1b"], "REAL_SHAPES names.")
  flags.DEFINE_list("variants", list(VARIANTS), "Where the norm goes (module docstring).")
  flags.DEFINE_integer("rows", 8, "Rows per step (the engine pads batch 1 to 8).")
  flags.DEFINE_integer("layers", None, "Layers in the stack (default: the model's).")
  flags.DEFINE_integer("iters", 30, "Calls per timing.")
  flags.DEFINE_string("output_json", None, "Write the results here.")
  app.run(main)
