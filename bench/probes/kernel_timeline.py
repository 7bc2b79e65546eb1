"""Where a step program's device time goes: its kernels on the GPU timeline, by class.

Each program of bench/probes/step_programs.py (the engine's own step, compiled alone) runs
`calls` times back to back under `jax.profiler.trace` (CUPTI); the Perfetto trace it writes
is read back here. Per call it reports the span on the compute stream (first kernel start
to last kernel end), the busy time (kernels summed), the gaps (span - busy; below zero
when consecutive kernels overlap, as XLA's GPU kernels may), and the busy
time split by kernel class (GEMM, attention, other fusions, copies), with the slowest
kernels by name. A span close to the program's host-timed ms says the device, not the
host, sets the pace; busy close to span says the kernels leave no gaps.

  PYTHONPATH=$PWD python bench/probes/kernel_timeline.py --target llama-3.1-8b \\
      --draft llama-3.2-1b --draft_devices 0 --output_json /tmp/timeline.json

GPU only: on another backend it says so in one line and exits.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import shutil
import tempfile

import jax

# Kernel name -> class. XLA names its kernels after the fusion (triton_gemm_*, gemm_fusion*,
# loop_*_fusion, input_reduce_fusion, ...); cuBLAS / CUTLASS kernels carry their library's
# names; Pallas kernels carry the kernel function's name.
_CLASSES = (
    ("gemm", re.compile(r"gemm|matmul|cutlass|xmma|cublas|gemv|dot", re.I)),
    ("attention", re.compile(r"attention|attn|paged|decode_kernel|pallas", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy", re.I)),
    ("fusion", re.compile(r"fusion|reduce|loop_|input_|scatter|concatenate|transpose", re.I)),
)


def kernel_class(name: str) -> str:
  for cls, pattern in _CLASSES:
    if pattern.search(name):
      return cls
  return "other"


def device_lanes(trace: dict) -> dict:
  """{(pid, tid): [events]} of the trace's GPU stream lanes (complete events only)."""
  names, threads = {}, {}
  for ev in trace.get("traceEvents", []):
    if ev.get("ph") == "M" and ev.get("name") == "process_name":
      names[ev["pid"]] = str(ev.get("args", {}).get("name", ""))
    if ev.get("ph") == "M" and ev.get("name") == "thread_name":
      threads[(ev["pid"], ev.get("tid"))] = str(ev.get("args", {}).get("name", ""))
  gpu = {pid for pid, n in names.items() if re.search(r"GPU|gpu|device:", n)}
  lanes = collections.defaultdict(list)
  for ev in trace.get("traceEvents", []):
    if ev.get("ph") != "X" or ev.get("pid") not in gpu:
      continue
    lane = threads.get((ev["pid"], ev.get("tid")), "")
    # xprof adds derived lanes ("XLA Modules", "XLA Ops", "Steps") over the same time
    # as the stream lanes; only the streams hold the kernels themselves.
    if re.search(r"XLA Modules|XLA Ops|Steps|TraceMe", lane):
      continue
    lanes[(ev["pid"], ev.get("tid"))].append(ev)
  return dict(lanes)


def summarize(trace: dict, calls: int, top: int = 12) -> dict:
  """Per-call span, busy time, gaps and busy time by class, from the busiest GPU lane."""
  lanes = device_lanes(trace)
  if not lanes:
    raise ValueError("the trace has no GPU stream lanes (no GPU, or CUPTI not loaded)")
  events = sorted(max(lanes.values(), key=len), key=lambda e: float(e["ts"]))
  start = float(events[0]["ts"])
  end = max(float(e["ts"]) + float(e.get("dur", 0)) for e in events)
  busy = sum(float(e.get("dur", 0)) for e in events)
  by_class, by_name = collections.Counter(), collections.Counter()
  count_class, count_name = collections.Counter(), collections.Counter()
  for e in events:
    cls = kernel_class(e["name"])
    by_class[cls] += float(e.get("dur", 0))
    count_class[cls] += 1
    by_name[e["name"]] += float(e.get("dur", 0))
    count_name[e["name"]] += 1
  per = lambda us: round(us / calls / 1e3, 4)  # microseconds in the trace -> ms per call
  return {
      "calls": calls,
      "kernels_per_call": round(len(events) / calls, 1),
      "span_ms": per(end - start), "busy_ms": per(busy), "gaps_ms": per(end - start - busy),
      "busy_ms_by_class": {c: per(v) for c, v in by_class.most_common()},
      "kernels_per_call_by_class": {c: round(n / calls, 1) for c, n in count_class.items()},
      "top_kernels": [{"name": n[:120], "ms_per_call": per(v),
                       "per_call": round(count_name[n] / calls, 1),
                       "us_each": round(v / count_name[n], 2)}
                      for n, v in by_name.most_common(top)],
  }


def read_perfetto(log_dir: str) -> dict:
  paths = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir}")
  with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
    return json.load(f)


def trace_program(compiled, params, carry, inputs, calls: int):
  """Runs `calls` back-to-back calls under the profiler; returns (carry, trace dict)."""
  for _ in range(3):  # warm: allocations and graph capture out of the trace
    carry = compiled(params, carry, *inputs)
  jax.block_until_ready(carry)
  log_dir = tempfile.mkdtemp(prefix="ssd_jax_timeline_")
  with jax.profiler.trace(log_dir, create_perfetto_trace=True):
    for _ in range(calls):
      carry = compiled(params, carry, *inputs)
    jax.block_until_ready(carry)
  try:
    return carry, read_perfetto(log_dir)
  finally:
    shutil.rmtree(log_dir, ignore_errors=True)


def main(argv):
  del argv
  from absl import flags
  from bench.probes.step_programs import programs_from_flags
  F = flags.FLAGS
  if jax.default_backend() != "gpu":
    raise SystemExit(f"kernel_timeline: needs a GPU (the backend is {jax.default_backend()}): "
                     "CUPTI traces GPU kernels only")
  progs = programs_from_flags()
  results = {}
  for name, (runner, step, carry, inputs) in progs.items():
    compiled = jax.jit(step, donate_argnums=(1,)).lower(runner.params, carry, *inputs).compile()
    carry, trace = trace_program(compiled, runner.params, carry, inputs, F.calls)
    row = summarize(trace, F.calls)
    results[name] = row
    classes = "  ".join(f"{c} {v:.3f}" for c, v in row["busy_ms_by_class"].items())
    print(f"{name:18s} span {row['span_ms']:.3f} ms  busy {row['busy_ms']:.3f}  gaps "
          f"{row['gaps_ms']:.3f}  kernels {row['kernels_per_call']}  | {classes}", flush=True)
    for k in row["top_kernels"][:6]:
      print(f"    {k['ms_per_call']:.3f} ms  {k['per_call']:5.1f} x {k['us_each']:7.2f} us  "
            f"{k['name'][:70]}")
    del carry
  if F.output_json:
    with open(F.output_json, "w") as fh:
      json.dump(results, fh, indent=1)


if __name__ == "__main__":
  from absl import app, flags
  from bench.probes.step_programs import PROGRAMS, define_pair_flags
  define_pair_flags()
  flags.DEFINE_integer("context", 192, "Tokens already in the cache.")
  flags.DEFINE_list("programs", list(PROGRAMS), "Which programs.")
  flags.DEFINE_integer("calls", 10, "Calls traced per program.")
  flags.DEFINE_string("output_json", None, "Write the results here.")
  app.run(main)
