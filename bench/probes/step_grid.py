r"""Single-step program times over a grid of batch sizes, written as the speed-up model's
step-times JSON (bench/speedup_model.py `load_shapes`).

Why a second tool next to step_programs.py: that one times one batch size per process and
has no way to time a tensor-parallel shard on one GPU. This one loads each model once, times
every (program, batch, query tokens) the model needs, and writes after every batch, so a
`timeout` still leaves the batches done. Programs are step_programs.build_programs' (the
engine's forward over the paged KV cache, default command buffers).

Shapes: any REAL_SHAPES name; NAME-lN, NAME cut to its first N layers (smollm2-135m-l6 is
the bundled draft's shape); or NAME-tpN, one GPU's shard of NAME tensor-parallel over N
GPUs: 1/N of the attention heads, KV heads, MLP width and output vocabulary, every layer
(what one GPU of the engine's TP mesh computes). The shard's all-reduces (2 per layer) are
not in the times: `allreduces` in the JSON tells the model to add its bound for them.

  PYTHONPATH=$PWD python bench/probes/step_grid.py --target llama-3.1-8b \
      --draft llama-3.2-1b --batches 1,2,4,8,16,32 --output_json /tmp/steps_8b_1b.json
  PYTHONPATH=$PWD python bench/probes/step_grid.py --target llama-3.1-70b-tp4 --draft none
  PYTHONPATH=$PWD python bench/probes/step_grid.py --target smollm2-135m \
      --draft smollm2-135m-l6 --batches 1,16 --k 7 --f 3   # the real pair's shapes
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time


def shard_config(name: str):
  """REAL_SHAPES[name]; for NAME-lN its first N layers; for NAME-tpN the per-GPU shard's
  config and N."""
  from ssd_jax.checkpoint import REAL_SHAPES
  base, _, layers = name.rpartition("-l")
  if base in REAL_SHAPES and layers.isdigit():
    return dataclasses.replace(REAL_SHAPES[base], num_layers=int(layers)), 1
  if "-tp" in name:
    base, n = name.rsplit("-tp", 1)
    n = int(n)
    cfg = REAL_SHAPES[base]
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // n,
                               num_kv_heads=max(cfg.num_kv_heads // n, 1),
                               intermediate_size=cfg.intermediate_size // n,
                               vocab_size=-(-cfg.vocab_size // n)), n
  return REAL_SHAPES[name], 1


def read_params(cfg) -> float:
  """Parameters a step multiplies by (every weight; the input embedding is only gathered,
  unless tied, when the output projection reads it anyway)."""
  hd = cfg.head_dim
  attn = cfg.hidden_size * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  mlp = 3 * cfg.hidden_size * cfg.intermediate_size
  return cfg.num_layers * (attn + mlp) + cfg.vocab_size * cfg.hidden_size


def main(argv) -> int:
  del argv
  from absl import flags
  import jax.numpy as jnp
  from bench.probes.step_programs import _pages, build_programs, measure
  from ssd_jax.checkpoint import random_model
  from ssd_jax.engine.runner import ModelRunner
  from ssd_jax.kernels import resolve_impl
  from ssd_jax.sharding import MeshSpec, make_meshes
  F = flags.FLAGS
  batches = [int(b) for b in F.batches]
  ks = [int(k) for k in F.k]
  fs = [int(f) for f in F.f]
  out = {"_about": "ms per call, queued back to back (step_programs.measure), default "
                   "command buffers, random weights, context %d; argv %s" % (F.context, sys.argv),
         "models": {}}
  tmesh, _ = make_meshes(MeshSpec.parse("1x1"), 0)
  impl = resolve_impl(F.attention)
  roles = ([("target", F.target)] if F.target != "none" else []) + \
      ([("draft", F.draft)] if F.draft != "none" else [])
  for role, name in roles:
    cfg, tp = shard_config(name)
    t0 = time.perf_counter()
    model = random_model(cfg, dtype=jnp.dtype(F.dtype), mesh=tmesh, seed=0,
                         attention_impl=impl)
    m = max(ks) + 1
    pages = _pages(max(batches), F.context + m * max(fs) + max(ks) + 2, 64)[1] + 1
    runner = ModelRunner(model, tmesh, num_pages=pages, page_size=64, name=name)
    print(f"[step_grid] {name}: built in {time.perf_counter() - t0:.1f}s", flush=True)
    p = read_params(cfg)
    entry = out["models"][name] = {
        "params": p, "bytes": 2.0 * p, "layers": cfg.num_layers, "hidden": cfg.hidden_size,
        "allreduces": 2 * cfg.num_layers if tp > 1 else 0,
        "measured_has_allreduce": tp == 1, "anchors": {}, "measured": {}}
    for b in batches:
      if role == "target":
        todo = [(k, 1, ("target_ar_step", "target_verify") if k == ks[0] else
                 ("target_verify",)) for k in ks]
      else:
        todo = [(k, f, (("draft_step", "draft_glue") if f == fs[0] else ()) +
                 ("draft_tree_step",)) for k in ks for f in fs]
      for k, f, names in todo:
        progs = build_programs(runner if role == "target" else None,
                               runner if role == "draft" else None, batch=b, k=k, f=f,
                               context=F.context, names=names)
        res = measure(progs, ("default",), F.iters, latency_iters=3,
                      log=lambda s: print(f"[step_grid] {name} b={b} k={k} f={f}{s}",
                                          flush=True))
        for prog, modes in res.items():
          row = modes["default"]
          if "ms" not in row:
            continue
          q = {"target_ar_step": 1, "draft_step": 1, "target_verify": k + 1,
               "draft_glue": k + 1, "draft_tree_step": (k + 1) * f}[prog]
          entry["measured"][f"{prog}|{b}|{q}"] = row["ms"]
          if b == 1 and prog not in entry["anchors"]:
            entry["anchors"][prog] = {"q": q, "ms": row["ms"]}
        del progs
      if F.output_json:  # after every batch: a timeout keeps what is done
        with open(F.output_json, "w") as fh:
          json.dump(out, fh, indent=1)
    del runner, model
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  from absl import app, flags
  flags.DEFINE_string("target", "llama-3.1-8b", "REAL_SHAPES name or NAME-tpN (a shard), "
                      "or none.")
  flags.DEFINE_string("draft", "llama-3.2-1b", "REAL_SHAPES name of the draft, or none.")
  flags.DEFINE_list("batches", ["1", "2", "4", "8", "16", "32"], "Batch sizes.")
  flags.DEFINE_list("k", ["7", "3"], "K values (verify and glue take K+1 tokens).")
  flags.DEFINE_list("f", ["3", "1"], "Uniform fan-outs (tree steps of (K+1)*F branches).")
  flags.DEFINE_integer("context", 192, "Tokens already in the cache.")
  flags.DEFINE_integer("iters", 10, "Calls per timing.")
  flags.DEFINE_string("dtype", "bfloat16", "Weights and compute dtype.")
  flags.DEFINE_string("attention", "auto", "auto | xla | pallas.")
  flags.DEFINE_string("output_json", None, "Write the step-times JSON here.")
  app.run(lambda argv: sys.exit(main(argv)))
