"""A decoder stack's weight products as XLA fuses them against `kernels.fused_matmul`
(norm in the product's loop, SiLU x up and the residual adds in its epilogue), issue 13.

The stack is norm_fusion.py's: every layer of a real shape without attention (an
optimization barrier on the queries stands for the Pallas attention kernels, a fusion
boundary in both variants). For each shape it counts the compiled program's launches per
layer (hlo_stats.launches), times it, and checks that both variants compute the same
stack (relative error of the output). `--plans` times the kernel under other launch
parameters too (each applied to every product it tiles; the default plan elsewhere):

    python bench/probes/fused_layers.py --shapes llama-3.1-8b,llama-3.2-1b \
        --plans "bn=32,bk=128,st=4;bn=64,bk=64,st=3" --output_json o.json

Random weights: timings and launch counts only (tests/test_fused_matmul.py checks the
kernel against its reference).
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.probes.hlo_stats import launches
from bench.probes.norm_fusion import init_params, stack
from ssd_jax.checkpoint import REAL_SHAPES
from ssd_jax.kernels import pallas_matmul

_PLAN_KEYS = {"bn": "block_n", "bk": "block_k", "sp": "splits", "w": "num_warps",
              "st": "num_stages"}


def parse_plan(text: str) -> dict:
  """'bn=32,bk=128,st=4' -> {"block_n": 32, "block_k": 128, "num_stages": 4}."""
  plan = {}
  for item in filter(None, text.split(",")):
    key, _, val = item.partition("=")
    if key not in _PLAN_KEYS or not val.isdigit():
      raise ValueError(f"plan item {item!r} is not one of {', '.join(_PLAN_KEYS)}=<int>")
    plan[_PLAN_KEYS[key]] = int(val)
  return plan


def _fitted(plan: dict, k: int, n: int) -> dict:
  """The plan's items that tile this product (K, N); the rest stay at the default."""
  out = dict(plan)
  default = pallas_matmul.default_plan(8, k, n)
  if n % out.get("block_n", 16):
    out.pop("block_n")
  if k % (out.get("block_k", default["block_k"]) * out.get("splits", default["splits"])):
    out.pop("block_k", None)
    out.pop("splits", None)
  return out


def fused_stack(x, params, *, eps, group, plan):
  """norm_fusion.stack's layers with every product through `fused_matmul`."""
  b, s, e = x.shape
  x2 = x.reshape(b * s, e)
  mm = lambda a, w, **kw: pallas_matmul.fused_matmul(a, w, **kw,
                                                     **_fitted(plan, w.shape[0], w.shape[-1]))
  for p in params:
    qkv = p["qkv"]
    y = mm(x2, qkv.reshape(e, -1), norm_gain=p["ln1"], eps=eps).reshape((b * s,) + qkv.shape[1:])
    q = jax.lax.optimization_barrier(y[:, :, :group])
    x2 = mm(q.reshape(b * s, -1), p["o"], residual=x2)
    act = mm(x2, p["gate_up"], norm_gain=p["ln2"], eps=eps, gated=True)
    x2 = mm(act, p["down"], residual=x2)
  return x2.reshape(b, s, e)


def _time(compiled, args, iters):
  y = compiled(*args)
  y.block_until_ready()
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(iters):
      y = compiled(*args)
    y.block_until_ready()
    times.append((time.perf_counter() - t0) / iters * 1e3)
  return statistics.median(times), y


def measure(shape: str, plans: dict, rows: int, layers: int | None, iters: int, log=print):
  cfg = REAL_SHAPES[shape]
  n = layers or cfg.num_layers
  group, eps = cfg.num_heads // cfg.num_kv_heads, cfg.rms_norm_eps
  x = jax.random.normal(jax.random.PRNGKey(1), (rows, 1, cfg.hidden_size), jnp.bfloat16)
  params = init_params(cfg, n, jnp.bfloat16, jax.random.PRNGKey(0))
  variants = {"xla": lambda x, p: stack(x, p, eps=eps, variant="hf", group=group)}
  for name, plan in plans.items():
    variants[f"fused:{name}"] = (
        lambda x, p, plan=plan: fused_stack(x, p, eps=eps, group=group, plan=plan))
  out, ref = {}, None
  for name, fn in variants.items():
    try:
      compiled = jax.jit(fn).lower(x, params).compile()
    except Exception as e:  # pylint: disable=broad-except
      out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
      log(f"{shape:14s} {name:28s} failed: {out[name]['error']}")
      continue
    rows_l = launches(compiled.as_text())
    ms, y = _time(compiled, (x, params), iters)
    y = np.asarray(y, np.float32)
    ref = y if ref is None else ref
    err = float(np.max(np.abs(y - ref)) / max(np.max(np.abs(ref)), 1e-30))
    kinds = {}
    for r in rows_l:
      kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    out[name] = {"ms": ms, "ms_per_layer": ms / n, "launches_per_layer": len(rows_l) / n,
                 "kinds": kinds, "rel_err_vs_xla": err, "layers": n, "rows": rows,
                 "first_layer": [f"{r['kind']} {r['name']} {r['ops'][:80]}"
                                 for r in rows_l[:8]]}
    log(f"{shape:14s} {name:28s} {ms:8.3f} ms ({ms / n * 1e3:6.1f} us/layer)  "
        f"{len(rows_l) / n:5.2f} launches/layer  rel err {err:.1e}  {kinds}")
    del compiled
  return out


def main(argv):
  del argv
  from absl import flags
  F = flags.FLAGS
  plans = {"default": {}}
  for text in filter(None, F.plans.split(";")):
    plans[text] = parse_plan(text)
  res = {"device": str(jax.devices()[0]), "jax": jax.__version__,
         "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": F.rows}
  for shape in F.shapes:
    res[shape] = measure(shape, plans, F.rows, F.layers, F.iters)
    if F.output_json:  # after every shape: a timeout keeps what was measured
      with open(F.output_json, "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_list("shapes", ["llama-3.1-8b", "llama-3.2-1b", "smollm2-135m"],
                    "REAL_SHAPES names.")
  flags.DEFINE_string("plans", "", "Extra launch plans, ';'-separated, each 'bn=<block_n>,"
                      "bk=<block_k>,sp=<splits>,w=<warps>,st=<stages>' (any subset).")
  flags.DEFINE_integer("rows", 8, "Rows (tokens) per step: the engine pads batch 1 to 8.")
  flags.DEFINE_integer("layers", None, "Layers (default: the shape's own).")
  flags.DEFINE_integer("iters", 20, "Calls per timing.")
  flags.DEFINE_string("output_json", None, "Write the results here.")
  app.run(main)
