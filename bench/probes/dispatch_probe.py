"""How XLA:GPU dispatches a program from the host: launch cost, and where the host waits.

A decode step at batch 1 is hundreds of small kernels, and SSD's round is paced by when
the host can dispatch the next program. This probe answers, for the XLA build installed,
the questions the SSD loop depends on, with small programs:

  chain          ~200 small kernels in a straight line;
  cond           the same plus a `lax.cond` whose predicate the program computes;
  scan           a 7-step `lax.scan` (a while loop) of small kernels;
  pallas         the chain with a Pallas kernel between its halves;
  cond_*         a `lax.cond` around a scan, a Pallas kernel, an in-place update of a
                 donated buffer (like a KV cache), or all three;
  scan_all       a scan with all three in its body;
  engine_cond_*  SSD's jit fallback written as a conditional (decoding/draft.draft_decode,
                 a scan of K=7 steps) under a `lax.cond`, on a 4-layer Llama-3.2-1B-width
                 model, Pallas or XLA attention; engine_plain_* the same without the cond.

For each program it prints three host-clock figures (milliseconds, medians):

  host       how long the dispatch call takes to return, the device queue busy;
  device     per call, 50 calls queued and one wait;
  blocked    how long the dispatch returns after a ~20 ms program it depends on: ~20
             means the host thread waited for the device (a conditional or a loop
             evaluated on the host), ~host means it queued and went on.

Each XLA command-buffer setting runs in its own process (XLA_FLAGS is read once per
process); `--modes` picks them. A mode named `*_opts` passes the flags per program
(`jax.jit(compiler_options=...)`, what runner.COMMAND_BUFFER_MODES does) instead of
through XLA_FLAGS, to show whether both routes reach the compiler.

  PYTHONPATH=$PWD python bench/probes/dispatch_probe.py --output_json /tmp/probe.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

from ssd_jax.engine.runner import COMMAND_BUFFER_MODES


def _xla_flags(options: dict) -> str:
  return " ".join(f"--{k}={v}" for k, v in options.items())


MODES = {  # mode -> XLA_FLAGS (None: the "max" options per program instead)
    "default": "",
    "off": _xla_flags(COMMAND_BUFFER_MODES["off"]),
    "max": _xla_flags(COMMAND_BUFFER_MODES["max"]),
    "max_opts": None,
}

flags.DEFINE_list("modes", list(MODES), f"command-buffer settings to probe: {list(MODES)}")
flags.DEFINE_string("output_json", None, "write the results here")
flags.DEFINE_string("child_mode", None, "internal: run one mode in this process")
FLAGS = flags.FLAGS


def _compiler_options(mode):
  return COMMAND_BUFFER_MODES["max"] if mode == "max_opts" else None


def _child(mode: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import pallas as pl

  opts = _compiler_options(mode)
  jit = lambda f: jax.jit(f, compiler_options=opts) if opts else jax.jit(f)
  rng = np.random.default_rng(0)
  d = 256
  ws = jnp.asarray(rng.standard_normal((100, d, d)) / np.sqrt(d), jnp.float32)
  x0 = jnp.asarray(rng.standard_normal((8, d)), jnp.float32)
  n = 8192 if jax.default_backend() == "gpu" else 512  # ~20 ms on an H100
  big = jnp.asarray(rng.standard_normal((n, n)), jnp.bfloat16)

  def chain(x, w, lo, hi):
    for i in range(lo, hi):  # unrolled: one GEMM and one fusion per step
      x = jnp.tanh(x @ w[i]) + x
    return x

  def add_one_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1.0

  def pallas_add(x):
    return pl.pallas_call(add_one_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          interpret=jax.default_backend() != "gpu")(x)

  progs = {
      "chain": lambda x, w: chain(x, w, 0, 100),
      "cond": lambda x, w: jax.lax.cond(chain(x, w, 0, 50).sum() > 0,
                                        lambda y: chain(y, w, 50, 100), lambda y: -y,
                                        chain(x, w, 0, 50)),
      "scan": lambda x, w: jax.lax.scan(lambda c, wi: (jnp.tanh(chain(c, w, 0, 12) @ wi), None),
                                        x, w[:7])[0],
      "pallas": lambda x, w: chain(pallas_add(chain(x, w, 0, 50)), w, 50, 100),
  }

  state0 = jnp.zeros((1 << 14, d), jnp.float32)  # a KV-like buffer, updated in place

  def write(s, y):
    return s.at[jnp.abs(y[:, 0]).astype(jnp.int32) % s.shape[0]].set(y)

  # Programs that thread a donated state buffer, like the KV cache of a draft step.
  state_progs = {
      "cond_scan": lambda x, w, s: (jax.lax.cond(
          x.sum() > 0, lambda y: jax.lax.scan(
              lambda c, wi: (jnp.tanh(chain(c, w, 0, 12) @ wi), None), y, w[:7])[0],
          lambda y: -y, x), s),
      "cond_pallas": lambda x, w, s: (jax.lax.cond(
          x.sum() > 0, lambda y: chain(pallas_add(chain(y, w, 0, 20)), w, 20, 40),
          lambda y: -y, x), s),
      "cond_state": lambda x, w, s: jax.lax.cond(
          x.sum() > 0, lambda y, s: (chain(y, w, 0, 20), write(s, y)),
          lambda y, s: (-y, s), x, s),
      "scan_all": lambda x, w, s: jax.lax.scan(
          lambda c, wi: ((pallas_add(jnp.tanh(chain(c[0], w, 0, 6) @ wi)),
                          write(c[1], c[0])), None), (x, s), w[:7])[0],
      "cond_scan_all": lambda x, w, s: jax.lax.cond(
          x.sum() > 0, lambda y, s: jax.lax.scan(
              lambda c, wi: ((pallas_add(jnp.tanh(chain(c[0], w, 0, 6) @ wi)),
                              write(c[1], c[0])), None), (y, s), w[:7])[0],
          lambda y, s: (-y, s), x, s),
  }

  @jit
  def slow(b, x):  # ~20 ms of GEMMs on an H100, then an [8, d] result that depends on it
    y = b
    for _ in range(16):
      y = (y @ b) * (1.0 / n)
    return x + y[:8, :d].astype(jnp.float32) * 0.0

  slow(big, x0).block_until_ready()
  out = {"mode": mode, "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "jax": jax.__version__, "device": str(jax.devices()[0])}
  t = time.perf_counter()
  for _ in range(5):
    slow(big, x0).block_until_ready()
  out["slow_ms"] = (time.perf_counter() - t) / 5 * 1e3
  timing = lambda step, **kw: _time_dispatch(step, lambda: slow(big, x0), x0, **kw)
  for name, fn in progs.items():
    f = jit(fn)
    out[name] = timing(lambda y: f(y, ws))
  for name, fn in state_progs.items():
    f = jax.jit(fn, donate_argnums=(2,), **({"compiler_options": opts} if opts else {}))
    cell = [x0, jnp.zeros_like(state0)]  # the latest (y, state): the state is carried

    def step(y):
      cell[:] = f(y, ws, cell[1])
      return cell
    out[name] = timing(step)
  out.update(_engine_lookup(jax, jnp, np, opts, slow, big, x0))
  return out


def _time_dispatch(step, slow_input, x0, *, chain=True, host_calls=10, device_calls=50):
  """host / device / blocked (module docstring) of `step(y) -> outputs`; with `chain` the
  outputs' first element is the next call's y, otherwise every call takes the same y."""
  import jax
  import numpy as np

  def call(y):
    out = step(y)
    return (out[0] if isinstance(out, list) else out) if chain else y, out

  jax.block_until_ready(call(x0)[1])
  hosts, blocked = [], []
  for _ in range(5):  # host: dispatch with the queue busy
    y = slow_input()
    for _ in range(host_calls):
      t = time.perf_counter()
      y, out = call(y)
      hosts.append(time.perf_counter() - t)
    jax.block_until_ready(out)
  t = time.perf_counter()
  y = x0
  for _ in range(device_calls):
    y, out = call(y)
  jax.block_until_ready(out)
  device = (time.perf_counter() - t) / device_calls
  for _ in range(5):
    y = slow_input()
    t = time.perf_counter()
    _, out = call(y)
    blocked.append(time.perf_counter() - t)
    jax.block_until_ready(out)
  return {"host_ms": float(np.median(hosts)) * 1e3, "device_ms": device * 1e3,
          "blocked_ms": float(np.median(blocked)) * 1e3}


def _engine_lookup(jax, jnp, np, opts, slow, big, x0) -> dict:
  """SSD's jit fallback written as a conditional (decoding/draft.draft_decode, K=7, under a
  `lax.cond`), on a 4-layer model of Llama-3.2-1B's width; the predicate depends on the
  slow program and is false (a hit), and the same drafting without the conditional."""
  import dataclasses
  from ssd_jax.checkpoint import REAL_SHAPES, random_model
  from ssd_jax.engine.runner import ModelRunner
  from ssd_jax.kernels import resolve_impl
  from ssd_jax.sharding import MeshSpec, make_meshes
  from ssd_jax.decoding.draft import draft_decode

  cfg = dataclasses.replace(REAL_SHAPES["llama-3.2-1b"], num_layers=4)
  mesh, _ = make_meshes(MeshSpec.parse("1x1"), 0)
  out = {}
  impls = ("pallas", "xla") if jax.default_backend() == "gpu" else ("xla",)
  for impl in impls:
    model = random_model(cfg, dtype=jnp.bfloat16, mesh=mesh, seed=0,
                         attention_impl=resolve_impl(impl))
    runner = ModelRunner(model, mesh, num_pages=8, page_size=64, name="draft")
    table = runner.put(np.arange(1, 5, dtype=np.int32)[None])
    tok, pos = runner.put(np.ones((1,), np.int32)), runner.put(np.full((1,), 10, np.int32))

    def drafted(params, kv, dep):
      toks, _, kv = draft_decode(runner, params, kv, tok[:, None] + dep, pos[:, None],
                                 jnp.ones((1,), bool), table, k=7,
                                 temperature=jnp.zeros((1,)),
                                 keys=jax.random.key(0)[None],
                                 want_q=False)
      return kv, toks

    def cond_prog(params, kv, y):
      miss = jnp.any(y < -1e30)  # false, and known only once y is computed
      return jax.lax.cond(miss, lambda kv: drafted(params, kv, 0),
                          lambda kv: (kv, jnp.zeros((1, 7), jnp.int32)), kv)

    def plain_prog(params, kv, y):
      return drafted(params, kv, (y[0, 0] > 1e30).astype(jnp.int32))

    for name, fn in ((f"engine_cond_{impl}", cond_prog), (f"engine_plain_{impl}", plain_prog)):
      f = runner.jit(fn, donate_argnums=(1,), **({"compiler_options": opts} if opts else {}))
      cell = [jax.tree.map(jnp.zeros_like, runner.kv)]  # the KV pool, carried

      def step(y):
        cell[0], _ = f(runner.params, cell[0], y)
        return cell
      out[name] = _time_dispatch(step, lambda: slow(big, x0), x0, chain=False,
                                 host_calls=5, device_calls=20)
  return out


def main(_):
  if FLAGS.child_mode:
    print("RESULT " + json.dumps(_child(FLAGS.child_mode)), flush=True)
    return
  results = []
  for mode in FLAGS.modes:
    if mode not in MODES:
      raise app.UsageError(f"--modes: {mode!r} is unknown; use some of {list(MODES)}")
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + (MODES[mode] or "")).strip()
    proc = subprocess.run([sys.executable, __file__, f"--child_mode={mode}"], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      print(f"mode {mode}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}")
      continue
    r = json.loads(lines[-1][len("RESULT "):])
    results.append(r)
    print(f"mode {mode:9s} slow program {r['slow_ms']:.1f} ms  ({r['device']}, jax {r['jax']})")
    for name, p in r.items():
      if not isinstance(p, dict):
        continue
      print(f"  {name:20s} host {p['host_ms']:7.3f}  device {p['device_ms']:7.3f}  "
            f"blocked {p['blocked_ms']:7.3f} ms")
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
