"""Round timings of AR, SD and SSD at real model sizes (random weights), on GPUs.

Answers the SSD question directly: with the target on its devices and the draft on
others, is an SSD round on a cache hit as fast as the target's verification alone (the
drafting fully hidden)? Random weights cannot produce real acceptances, so the timing
runs use two controlled regimes, stated in the output:

  * predictable: the final RMSNorm weights of target and draft are zeroed, so every logit
    is 0 and both models always pick token 0: every draft token is accepted and every
    SSD lookup hits. All layers still run at full size (the weights are inputs).
  * unpredictable: only the target's norm is zeroed; the random draft then misses.

It also reports, per run, the kernels of every program the decoder runs (counted in the
optimized HLO, bench/probes/hlo_stats.py), the host time of each dispatch of a round
(`host_*_ms`: the host is blocked or busy there; no synchronisation is added to measure
it), and with `--runs ...,steps` the single-step programs alone (bench/probes/
step_programs.py: draft step at batch 1 and at tree width (K+1)*F, glue, 8B verify, AR
step) under each XLA command-buffer mode of `--step_command_buffers`. `--command_buffers` applies one mode to
every engine program (e.g. "max": loops and the SSD lookup's conditional in CUDA graphs).

  PYTHONPATH=$PWD python bench/probes/ssd_timing.py --target llama-3.1-8b \
      --draft llama-3.2-1b --draft_devices 1
"""

from __future__ import annotations

import gc
import json
import time

from absl import app, flags

from bench.plot import plot_runs
from bench.probes import step_programs
from bench.probes.hlo_stats import kernel_counts
from bench.probes.step_programs import define_pair_flags

define_pair_flags()
flags.DEFINE_integer("target_layers", 0, "Override the target's layer count (0: real).")
flags.DEFINE_integer("draft_layers", 0, "Override the draft's layer count (0: real).")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens.")
flags.DEFINE_integer("new_tokens", 128, "Generated tokens per sequence.")
flags.DEFINE_list("runs", "ar,sd,ssd_hit,ssd_miss_jit,ssd_miss_fast",
                  "What to time, in order: ar, sd, ssd_hit, ssd_miss_jit, ssd_miss_fast, "
                  "steps (the single-step programs alone); each NAME may take options "
                  "NAME:max (command-buffer mode), NAME:k4 (K), e.g. ssd_hit:max:k4.")
flags.DEFINE_string("command_buffers", None, "XLA command-buffer mode of every engine "
                    "program: default (XLA's), off, max (loops and conditionals too).")
flags.DEFINE_list("step_command_buffers", "default,off,max",
                  "Command-buffer modes the 'steps' run compiles each program with.")
flags.DEFINE_integer("step_iters", 40, "Calls per step-program timing.")
flags.DEFINE_bool("kernels", True, "Count the kernels of every engine program of a run.")
flags.DEFINE_bool("trace_host", True, "Time each host dispatch of a round (no syncs).")
flags.DEFINE_string("tag", "", "A label copied into the JSON (e.g. the variant run).")
flags.DEFINE_string("output_json", None, "Write the results here (after every run).")
flags.DEFINE_string("compilation_cache", "/tmp/ssd_jax_xla_cache", "Persistent XLA cache: "
                    "runs that share programs (same shapes) compile them once.")
flags.DEFINE_string("plot", None, "Write a PNG of decode tokens/s per run here.")
flags.DEFINE_string("from_json", None, "Only plot an earlier --output_json (no GPU work).")
flags.DEFINE_string("peer_json", None, "bench/peer_transformers.py JSON to plot beside.")
FLAGS = flags.FLAGS


class _Recorder:
  """Stands in for a decoder's jitted program during warm-up and keeps the abstract
  arguments (shapes, dtypes, shardings) of its first call, so that the program can be
  lowered again afterwards and its optimized HLO inspected."""

  def __init__(self, fn):
    self.fn, self.call = fn, None

  def __call__(self, *args, **kwargs):
    if self.call is None:
      import jax
      abstract = lambda x: (jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                            if isinstance(x, jax.Array) else x)
      self.call = (jax.tree.map(abstract, args), kwargs)
    return self.fn(*args, **kwargs)

  def stats(self) -> dict:
    if self.call is None:
      return {"error": "not called"}
    t0 = time.perf_counter()
    args, kwargs = self.call
    out = kernel_counts(self.fn.lower(*args, **kwargs).compile().as_text())
    out["compile_s"] = round(time.perf_counter() - t0, 2)
    return out


PROGRAM_ATTRS = ("_step", "_propose", "_verify", "_first_spec", "_build", "_lookup")


def _build(name, role, seed, layers=0):
  """A random-weight model of a real shape on its mesh (target mesh or draft mesh)."""
  import dataclasses
  import jax.numpy as jnp
  from ssd_jax.checkpoint import REAL_SHAPES, random_model
  from ssd_jax.kernels import resolve_impl
  from ssd_jax.sharding import MeshSpec, make_meshes
  cfg = REAL_SHAPES[name]
  if layers:
    cfg = dataclasses.replace(cfg, num_layers=layers)
  tmesh, dmesh = make_meshes(MeshSpec.parse(FLAGS.mesh), FLAGS.draft_devices)
  mesh = tmesh if role == "target" else (dmesh or tmesh)
  return random_model(cfg, dtype=jnp.dtype(FLAGS.dtype), mesh=mesh, seed=seed,
                      attention_impl=resolve_impl(FLAGS.attention))


def _steps(target, draft, k, results):
  """The single-step programs alone (bench/probes/step_programs.py), per command-buffer
  mode."""
  try:
    from ssd_jax.engine.runner import ModelRunner
    from ssd_jax.sharding import MeshSpec, make_meshes
    tmesh, dmesh = make_meshes(MeshSpec.parse(FLAGS.mesh), FLAGS.draft_devices)
    context = FLAGS.prompt_len + FLAGS.new_tokens // 2
    pages = step_programs._pages(FLAGS.batch, context + (k + 1) * FLAGS.f + k + 2,
                                 64)[1] + 1
    runners = [ModelRunner(mdl, mesh, num_pages=pages, page_size=64, name=role)
               for mdl, mesh, role in ((target, tmesh, "target"),
                                       (draft, dmesh or tmesh, "draft"))]
    print(f"single-step programs (batch {FLAGS.batch}, context {context}, K={k}, tree "
          f"width {(k + 1) * FLAGS.f}):", flush=True)
    progs = step_programs.build_programs(*runners, batch=FLAGS.batch, k=k, f=FLAGS.f,
                                         context=context)
    del runners
    log = lambda t: print(t, flush=True)
    results["steps"] = step_programs.measure(progs, tuple(FLAGS.step_command_buffers),
                                             FLAGS.step_iters, log=log)
    del progs
  except Exception as e:  # noqa: BLE001 - a benchmark reports and goes on
    print(f"!!! steps failed: {type(e).__name__}: {e}", flush=True)
    results["steps"] = {"error": f"{type(e).__name__}: {e}"}


def _zero_norm(model):
  model.norm.weight[...] = model.norm.weight[...] * 0


def main(argv):
  del argv
  if FLAGS.from_json:
    with open(FLAGS.from_json) as f:
      results = json.load(f)
    peer = json.load(open(FLAGS.peer_json)) if FLAGS.peer_json else None
    plot_runs(results, FLAGS.plot or FLAGS.from_json.replace(".json", ".png"), peer)
    return
  import jax
  import numpy as np
  from ssd_jax import LLM, SamplingParams
  if FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  t_start = time.perf_counter()
  target = _build(FLAGS.target, "target", 0, FLAGS.target_layers)
  draft = _build(FLAGS.draft, "draft", 1, FLAGS.draft_layers)
  tcfg, dcfg = target.cfg, draft.cfg
  _zero_norm(target)
  print(f"devices: {jax.devices()}  jax {jax.__version__}  command buffers "
        f"{FLAGS.command_buffers or 'default'}", flush=True)
  print(f"target {FLAGS.target} ({tcfg.num_layers} layers, {tcfg.num_params / 1e9:.2f}B "
        f"params), draft {FLAGS.draft} ({dcfg.num_params / 1e9:.2f}B), built in "
        f"{time.perf_counter() - t_start:.1f}s", flush=True)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, tcfg.vocab_size, FLAGS.prompt_len).tolist()
             for _ in range(FLAGS.batch)]
  params = SamplingParams(max_new_tokens=FLAGS.new_tokens, ignore_eos=True)
  common = dict(mesh=FLAGS.mesh, max_batch_size=FLAGS.batch, dtype=FLAGS.dtype,
                max_model_len=FLAGS.prompt_len + FLAGS.new_tokens + 64,
                attention_impl=FLAGS.attention, command_buffers=FLAGS.command_buffers)
  results = {"target": FLAGS.target, "draft": FLAGS.draft, "k": FLAGS.k, "f": FLAGS.f,
             "batch": FLAGS.batch, "prompt_len": FLAGS.prompt_len,
             "new_tokens": FLAGS.new_tokens, "jax": jax.__version__, "tag": FLAGS.tag,
             "command_buffers": FLAGS.command_buffers or "default",
             "devices": [str(d) for d in jax.devices()], "runs": {},
             "note": "random weights: 'hit' runs zero both final norms (always accept/hit); "
                     "'miss' runs zero only the target's (the draft misses)"}
  ar_tokens = None

  def save():
    results["total_s"] = time.perf_counter() - t_start
    if FLAGS.output_json:
      with open(FLAGS.output_json, "w") as f:
        json.dump(results, f, indent=1)

  def timed(name, make):
    """Build, warm up, time (and time again in profile mode); a failure is reported and
    the next run goes on."""
    try:
      m = _timed(name, make())
    except Exception as e:  # noqa: BLE001 - a benchmark reports and continues
      print(f"!!! {name} failed: {type(e).__name__}: {e}", flush=True)
      results["runs"][name] = {"error": f"{type(e).__name__}: {e}"}
      m = None
    save()
    return m

  def _timed(name, llm, profile_too=True):
    nonlocal ar_tokens
    recorders = {}
    if FLAGS.kernels:
      for attr in PROGRAM_ATTRS:
        if hasattr(llm.decoding, attr):
          recorders[attr.lstrip("_")] = _Recorder(getattr(llm.decoding, attr))
          setattr(llm.decoding, attr, recorders[attr.lstrip("_")])
    t0 = time.perf_counter()
    llm.generate(prompts, params)          # warm-up: compiles every program
    warm = time.perf_counter() - t0
    for attr in PROGRAM_ATTRS:  # the timed runs call the programs directly
      if attr.lstrip("_") in recorders:
        setattr(llm.decoding, attr, recorders[attr.lstrip("_")].fn)
    llm.reset_prefix_cache()  # a cached prefix would change the prefill shape bucket
    llm.trace_host = FLAGS.trace_host
    outs = llm.generate(prompts, params)
    m = dict(llm.last_metrics)
    toks = [o.token_ids for o in outs]
    if name == "ar":
      ar_tokens = toks
    elif ar_tokens is not None and toks != ar_tokens:
      print(f"!!! {name}: output differs from AR", flush=True)
      m["mismatch_vs_ar"] = True
    m["warmup_s"] = warm
    if profile_too and llm.method != "ar":
      llm.reset_prefix_cache()
      llm.profile = True
      llm.generate(prompts, params)
      m.update({f"profile_{k}": v for k, v in llm.last_metrics.items() if k.endswith("_ms")})
      llm.profile = False
    programs = {}
    for prog, rec in recorders.items():
      try:
        programs[prog] = rec.stats()
      except Exception as e:  # noqa: BLE001 - counting is a report, not the benchmark
        programs[prog] = {"error": f"{type(e).__name__}: {e}"[:300]}
    if programs:
      m["programs"] = programs
    results["runs"][name] = m
    line = (f"{name:14s} {m['decode_tokens_per_s']:8.1f} tok/s  round {m['round_ms']:7.3f} ms"
            f"  rounds {m['num_rounds']:4d}  compiles-after-warmup {m['compilations']}")
    if m.get("mean_accepted") is not None:
      line += f"  accepted {m['mean_accepted']:.2f}"
    if m.get("cache_hit_rate") is not None:
      line += f"  hits {m['cache_hit_rate']:.2f}"
    extra = {k: round(v, 3) for k, v in m.items()
             if k.startswith("profile_") and not k.startswith("profile_host_")}
    print(line, extra, flush=True)
    host = {k: round(v, 3) for k, v in m.items() if k.startswith("host_")}
    if host:
      print(f"  host per round (median ms): {host}", flush=True)
    for prog, c in programs.items():
      if "error" in c:
        print(f"  program {prog:11s} (not counted: {c['error']})", flush=True)
        continue
      print(f"  program {prog:11s} kernels {c['kernels']:6d} (min {c['kernels_min']:6d}; "
            f"gemms {c['gemms']:5d}, custom calls {c['custom_calls']:4d}, graphs "
            f"{c['graphs']:3d}, loops {c['while_trip_counts']}, conds "
            f"{c['conditionals']})", flush=True)
    return m

  draft_devices = FLAGS.draft_devices
  # Each run is NAME[:OPTION...]: an option is a command-buffer mode ("max", "off",
  # "default") or "k<N>" (draft tokens per round); e.g. "ssd_hit:max", "sd:k4". All runs
  # share one process: the models are built (and many programs compiled) once.
  for spec in FLAGS.runs:
    name, *options = spec.split(":")
    k, cb = FLAGS.k, FLAGS.command_buffers
    for opt in options:
      if opt.startswith("k") and opt[1:].isdigit():
        k = int(opt[1:])
      else:
        cb = opt
    kw = dict(common, command_buffers=cb)
    if name == "ar":
      timed(spec, lambda: LLM(target, method="ar", **kw))
    elif name == "sd":
      _zero_norm(draft)  # predictable: every draft token accepted
      timed(spec, lambda: LLM(target, draft, method="sd", k=k, draft_devices=draft_devices,
                              **kw))
    elif name == "ssd_hit":
      _zero_norm(draft)
      timed(spec, lambda: LLM(target, draft, method="ssd", k=k, f=FLAGS.f, fallback="jit",
                              draft_devices=draft_devices, **kw))
    elif name in ("ssd_miss_jit", "ssd_miss_fast"):
      fb = name.rsplit("_", 1)[1]
      fresh_draft = _build(FLAGS.draft, "draft", 2, FLAGS.draft_layers)  # mispredicts
      timed(spec, lambda: LLM(target, fresh_draft, method="ssd", k=k, f=FLAGS.f,
                              fallback=fb, draft_devices=draft_devices, **kw))
      del fresh_draft
    elif name == "steps":
      _steps(target, draft, k, results)
      save()
    else:
      print(f"!!! unknown run {spec!r}", flush=True)
    gc.collect()  # the finished run's engine (KV pools, programs) before the next one
  runs = results["runs"]
  for spec in list(runs):  # SSD hit round against SD's verification, same options
    name, _, opts = spec.partition(":")
    sd_run = runs.get("sd" + (":" + opts if opts else ""), {})
    if name != "ssd_hit" or "error" in runs[spec]:
      continue
    verify = sd_run.get("profile_verify_ms")
    hit = runs[spec].get("profile_hit_round_ms")
    if verify and hit:
      results.setdefault("ssd_hit_round_over_verify", {})[spec] = hit / verify
      print(f"{spec}: SSD hit round {hit:.3f} ms vs verify alone {verify:.3f} ms: "
            f"{hit / verify:.3f}x (unprofiled SSD round {runs[spec]['round_ms']:.3f} ms)",
            flush=True)
  save()
  if FLAGS.plot:
    plot_runs(results, FLAGS.plot)


if __name__ == "__main__":
  app.run(main)
