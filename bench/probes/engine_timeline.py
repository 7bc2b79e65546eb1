"""Where the engine's own decode loop leaves the GPU idle: AR through `LLM.generate` under
`jax.profiler` (CUPTI), random weights of real shapes.

kernel_timeline.py times one step program called back to back; this traces the engine's
loop itself (scheduler, page growth, lagged reads), so what it adds shows up. From the
trace it reports the device's idle time between kernels (every GPU stream lane merged),
the idle gaps above --min_gap_us with the host phase (engine/observe.py: update, round,
drain; marked here with TraceAnnotations) that was running when each began, and the
kernels of the programs that are not the decode round. XLA launches kernels one by one
under the profiler unless told otherwise, so run it with
XLA_FLAGS=--xla_enable_command_buffers_during_profiling=true (bench/gpu/engine_loop.sh
does) to see the graphs the engine really runs.

  XLA_FLAGS=--xla_enable_command_buffers_during_profiling=true PYTHONPATH=$PWD \\
      python bench/probes/engine_timeline.py --models llama-3.1-8b --output_dir /tmp/tl

GPU only: on another backend it says so in one line and exits. `--traces DIR` summarizes
again the traces a run saved in DIR (any backend).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import gzip
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.probes.kernel_timeline import device_lanes, kernel_class, read_perfetto
from ssd_jax.engine.observe import RoundObserver

FLAGS = flags.FLAGS

PHASE_PREFIX = "engine_"


class AnnotatingObserver(RoundObserver):
  """Marks each host phase of the loop in the profiler's trace (and times it)."""

  @contextlib.contextmanager
  def host(self, name: str):
    with jax.profiler.TraceAnnotation(PHASE_PREFIX + name), super().host(name):
      yield


def busy_intervals(events) -> list[tuple[float, float]]:
  """Kernel events (any lanes) merged into disjoint busy intervals (start, end), in us."""
  spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events)
  merged: list[list[float]] = []
  for s, e in spans:
    if merged and s <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], e)
    else:
      merged.append([s, e])
  return [(s, e) for s, e in merged]


def host_phases(trace: dict) -> list[tuple[float, float, str]]:
  """(start, end, phase) of the loop's annotated host phases, sorted by start."""
  out = []
  for ev in trace.get("traceEvents", []):
    name = str(ev.get("name", ""))
    if ev.get("ph") == "X" and name.startswith(PHASE_PREFIX):
      ts = float(ev["ts"])
      out.append((ts, ts + float(ev.get("dur", 0)), name[len(PHASE_PREFIX):]))
  return sorted(out)


def phase_at(phases, t: float) -> str:
  """The innermost annotated phase running at time t ("-" when none)."""
  starts = [p[0] for p in phases]
  i = bisect.bisect_right(starts, t)
  best = "-"
  for s, e, name in phases[max(0, i - 8):i]:  # phases do not nest deeper than a few
    if s <= t <= e:
      best = name
  return best


def module_lanes(trace: dict) -> dict:
  """{module name: [durations in us]} from xprof's derived "XLA Modules" lanes (one event
  per program execution on the device), when the trace has them."""
  names, threads = {}, {}
  for ev in trace.get("traceEvents", []):
    if ev.get("ph") == "M" and ev.get("name") == "process_name":
      names[ev["pid"]] = str(ev.get("args", {}).get("name", ""))
    if ev.get("ph") == "M" and ev.get("name") == "thread_name":
      threads[(ev["pid"], ev.get("tid"))] = str(ev.get("args", {}).get("name", ""))
  out = collections.defaultdict(list)
  for ev in trace.get("traceEvents", []):
    lane = threads.get((ev.get("pid"), ev.get("tid")), "")
    if (ev.get("ph") == "X" and "XLA Modules" in lane
        and "GPU" in names.get(ev.get("pid"), "").upper()):
      out[str(ev["name"])].append(float(ev.get("dur", 0)))
  return dict(out)


def launch_times(trace: dict) -> dict:
  """{correlation id: host time} of the host's launches (cuGraphLaunch, cuLaunchKernel,
  copies): CUPTI gives a kernel and the launch that issued it the same correlation id."""
  names = {ev["pid"]: str(ev.get("args", {}).get("name", ""))
           for ev in trace.get("traceEvents", [])
           if ev.get("ph") == "M" and ev.get("name") == "process_name"}
  out = {}
  for ev in trace.get("traceEvents", []):
    cid = ev.get("args", {}).get("correlation_id") if ev.get("ph") == "X" else None
    if cid is not None and "host" in names.get(ev.get("pid"), "").lower():
      out[str(cid)] = float(ev["ts"])
  return out


def summarize_loop(trace: dict, steps_per_round: int, min_gap_us: float,
                   skip_rounds: int = 2, top: int = 15) -> dict:
  """The kernels launched from the host's dispatch of round `skip_rounds` on (prefill and
  the first rounds left out; a kernel belongs to the round whose launch issued it, as
  the device may still be running earlier rounds then): the device's busy and idle time
  per decode step (rounds dispatched x steps per round; the last rounds of a run may emit
  nothing), its busy time by kernel class and the costliest kernels, the idle gaps of at
  least min_gap_us by the host phase running when each began, and the longest gaps with
  the kernel that ended them."""
  lanes = device_lanes(trace)
  if not lanes:
    raise ValueError("the trace has no GPU stream lanes (no GPU, or CUPTI not loaded)")
  phases = host_phases(trace)
  rounds = [p for p in phases if p[2] == "round"]
  if len(rounds) <= skip_rounds:
    raise ValueError(f"the trace has {len(rounds)} annotated rounds; need more than "
                     f"{skip_rounds}")
  t_from = rounds[skip_rounds][0]
  launched = launch_times(trace)
  issued = lambda e: launched.get(str(e.get("args", {}).get("correlation_id")), float(e["ts"]))
  every = [e for lane in lanes.values() for e in lane]
  # The window opens once the device has finished the rounds left out, so that their
  # kernels, still running after round `skip_rounds` was launched, count as no idle time.
  opens = max((float(e["ts"]) + float(e.get("dur", 0)) for e in every if issued(e) < t_from),
              default=float("-inf"))
  events = sorted((e for e in every if issued(e) >= t_from and float(e["ts"]) >= opens),
                  key=lambda e: float(e["ts"]))
  busy = busy_intervals(events)
  steps = (len(rounds) - skip_rounds) * steps_per_round  # decode steps the device ran
  span = busy[-1][1] - busy[0][0]
  busy_us = sum(e - s for s, e in busy)
  by_phase, count_phase = collections.Counter(), collections.Counter()
  long = []
  starts = [float(e["ts"]) for e in events]
  for (_, g0), (g1, _) in zip(busy, busy[1:]):
    if g1 - g0 < min_gap_us:
      continue
    ph = phase_at(phases, g0)
    by_phase[ph] += g1 - g0
    count_phase[ph] += 1
    nxt = events[min(bisect.bisect_left(starts, g1), len(events) - 1)]["name"]
    long.append({"us": round(g1 - g0, 1), "at_ms": round((g0 - busy[0][0]) / 1e3, 3),
                 "host_phase": ph, "next_kernel": str(nxt)[:80]})
  per_step = lambda us: round(us / max(steps, 1) / 1e3, 4)
  by_class, count_class = collections.Counter(), collections.Counter()
  by_name, count_name = collections.Counter(), collections.Counter()
  for e in events:
    by_class[kernel_class(e["name"])] += float(e.get("dur", 0))
    count_class[kernel_class(e["name"])] += 1
    by_name[e["name"]] += float(e.get("dur", 0))
    count_name[e["name"]] += 1
  phase_ms = collections.defaultdict(list)
  for s, e, name in phases:
    if s >= t_from:
      phase_ms[name].append((e - s) / 1e3)
  return {
      "steps": steps, "kernels_per_step": round(len(events) / max(steps, 1), 1),
      "span_ms_per_step": per_step(span), "busy_ms_per_step": per_step(busy_us),
      "idle_ms_per_step": per_step(span - busy_us),
      "busy_ms_per_step_by_class": {c: per_step(v) for c, v in by_class.most_common()},
      "kernels_per_step_by_class": {c: round(n / max(steps, 1), 1)
                                    for c, n in count_class.most_common()},
      "top_kernels": [{"name": n[:100], "ms_per_step": per_step(v),
                       "per_step": round(count_name[n] / max(steps, 1), 2),
                       "us_each": round(v / count_name[n], 2)}
                      for n, v in by_name.most_common(top)],
      "long_gaps": len(long), "long_gap_ms_per_step": per_step(sum(g["us"] for g in long)),
      "long_gap_ms_per_step_by_phase": {p: per_step(v) for p, v in by_phase.most_common()},
      "long_gaps_by_phase": dict(count_phase),
      "host_phase_ms_median": {p: round(float(np.median(v)), 4) for p, v in phase_ms.items()},
      "host_phase_count": {p: len(v) for p, v in phase_ms.items()},
      "modules": {n: {"count": len(v), "median_ms": round(float(np.median(v)) / 1e3, 4)}
                  for n, v in module_lanes(trace).items()},
      "longest_gaps": sorted(long, key=lambda g: -g["us"])[:top],
  }


def trace_point(name: str) -> tuple[dict, dict]:
  """Builds the engine for one model, warms it, traces one generate; (summary, trace)."""
  from ssd_jax import LLM, SamplingParams
  from ssd_jax.checkpoint import REAL_SHAPES, random_model
  cfg = REAL_SHAPES[name]
  model = random_model(cfg, dtype=jnp.bfloat16)
  llm = LLM(model, method="ar", max_batch_size=FLAGS.batch, page_size=FLAGS.page_size,
            max_model_len=FLAGS.prompt_len + FLAGS.new_tokens + 64,
            attention_impl=FLAGS.attention)
  rng = np.random.default_rng(0)
  prompts = [list(map(int, rng.integers(1, cfg.vocab_size, FLAGS.prompt_len)))
             for _ in range(FLAGS.batch)]
  params = SamplingParams(max_new_tokens=FLAGS.new_tokens, ignore_eos=True)
  for _ in range(2):  # compile, then once more warm (allocations, graphs recorded)
    llm.reset_prefix_cache()
    llm.generate(prompts, params)
  compiled = llm.decoding.num_compilations()
  llm.reset_prefix_cache()
  log_dir = tempfile.mkdtemp(prefix="ssd_jax_engine_tl_")
  obs = AnnotatingObserver(trace_host=True)
  try:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      llm.generate(prompts, params, observer=obs)
    trace = read_perfetto(log_dir)
  finally:
    shutil.rmtree(log_dir, ignore_errors=True)
  m = llm.last_metrics
  row = summarize_loop(trace, llm.decoding.steps, FLAGS.min_gap_us)
  row.update(model=name, batch=FLAGS.batch,
             wall_ms_per_step=round(1e3 * FLAGS.batch / m["decode_tokens_per_s"], 4),
             compilations_after_warmup=llm.decoding.num_compilations() - compiled,
             ar_steps=llm.decoding.steps)
  return row, trace


def report(row: dict) -> None:
  print(f"{row['model']:14s} wall {row['wall_ms_per_step']:.3f} ms/token  span "
        f"{row['span_ms_per_step']:.3f}  busy {row['busy_ms_per_step']:.3f}  idle "
        f"{row['idle_ms_per_step']:.3f} ({row['long_gaps']} gaps >= {FLAGS.min_gap_us:g} us:"
        f" {row['long_gap_ms_per_step']:.3f} ms/step; by phase "
        f"{row['long_gap_ms_per_step_by_phase']})  host phases "
        f"{row['host_phase_ms_median']}  compilations {row['compilations_after_warmup']}",
        flush=True)
  print(f"    busy ms/step by class {row['busy_ms_per_step_by_class']}  kernels/step "
        f"{row['kernels_per_step_by_class']}")
  for k in row["top_kernels"][:8]:
    print(f"    {k['ms_per_step']:.4f} ms/step  {k['per_step']:6.2f} x {k['us_each']:8.2f} us"
          f"  {k['name']}")
  for g in row["longest_gaps"][:6]:
    print(f"    {g['us']:8.1f} us at {g['at_ms']:8.3f} ms  during {g['host_phase']:7s} "
          f"before {g['next_kernel']}")


def resummarize(trace_dir: str) -> list[dict]:
  """The summaries of a finished run again, from the traces it saved (no GPU needed):
  steps per round, wall time and compilations are taken from its engine_timeline.json."""
  with open(os.path.join(trace_dir, "engine_timeline.json")) as f:
    old = json.load(f)
  rows = []
  for prev in old:
    path = os.path.join(trace_dir, f"trace_{prev['model']}.json.gz")
    if not os.path.isfile(path):
      raise SystemExit(f"engine_timeline: {path} is missing (the run saved no trace for "
                       f"{prev['model']})")
    with gzip.open(path, "rt") as f:
      trace = json.load(f)
    row = summarize_loop(trace, prev["ar_steps"], FLAGS.min_gap_us)
    row.update({k: prev[k] for k in ("model", "batch", "wall_ms_per_step",
                                     "compilations_after_warmup", "ar_steps")})
    rows.append(row)
    report(row)
  return rows


def main(argv):
  del argv
  out = FLAGS.output_dir
  if out:
    os.makedirs(out, exist_ok=True)
  if FLAGS.traces:
    rows = resummarize(FLAGS.traces)
    if out:
      with open(os.path.join(out, "engine_timeline.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return
  if jax.default_backend() != "gpu":
    raise SystemExit(f"engine_timeline: needs a GPU (the backend is {jax.default_backend()}):"
                     " CUPTI traces GPU kernels only")
  rows = []
  for name in FLAGS.models:
    row, trace = trace_point(name)
    rows.append(row)
    report(row)
    if out:
      with gzip.open(os.path.join(out, f"trace_{name}.json.gz"), "wt") as f:
        json.dump(trace, f)
      with open(os.path.join(out, "engine_timeline.json"), "w") as f:
        json.dump(rows, f, indent=1)
    del trace


def define_flags() -> None:
  """Its flags, defined only when run as a script: the tests import this module beside
  other probes whose flags share names (page_size)."""
  flags.DEFINE_list("models", ["llama-3.1-8b", "llama-3.2-1b", "smollm2-135m"],
                    "REAL_SHAPES names.")
  flags.DEFINE_integer("batch", 1, "Sequences.")
  flags.DEFINE_integer("prompt_len", 128, "Prompt tokens.")
  flags.DEFINE_integer("new_tokens", 64, "Generated tokens per sequence (traced run).")
  flags.DEFINE_integer("page_size", 64, "KV page size.")
  flags.DEFINE_string("attention", "auto", "auto | xla | pallas.")
  flags.DEFINE_float("min_gap_us", 20.0, "Idle gaps at least this long are listed.")
  flags.DEFINE_string("output_dir", None, "Summaries (JSON) and the raw traces go here.")
  flags.DEFINE_string("traces", None, "Summarize again the traces a run saved in this "
                      "directory (with its engine_timeline.json) instead of tracing: no GPU.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
