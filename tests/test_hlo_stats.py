"""Kernel counting from optimized HLO text (bench/probes/ssd_timing.py's per-program report)."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from bench.probes.hlo_stats import compiled_stats, kernel_counts  # noqa: E402


def test_loops_are_expanded_and_conditionals_bounded():
  def f(x, w):
    def body(c, _):
      return jnp.tanh(c @ w) + 1, None
    y, _ = jax.lax.scan(body, x, None, length=5)
    y = jax.lax.cond(y.sum() > 0, lambda: y * 2, lambda: jnp.sin(jnp.tanh(y) @ w))
    return jnp.argmax(y @ w.T, -1)

  c = compiled_stats(jax.jit(f), jnp.ones((2, 8)), jnp.ones((8, 8)))
  assert c["while_trip_counts"] == [5] and c["conditionals"] == 1
  # 5 loop-body GEMMs + the final one, + the branch's GEMM on the costly side only
  assert c["gemms"] == 7
  assert c["kernels_min"] < c["kernels"]
  assert c["kernels"] == c["gemms"] + c["fusions"] + c["custom_calls"] + c["other"]


def test_hand_written_module():
  text = """HloModule m

%fused (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %e = f32[4]{0} exponential(%p)
}

%command_buffer (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %f1 = f32[4]{0} fusion(%a), kind=kLoop, calls=%fused
  ROOT %g = f32[4]{0} custom-call(%f1), custom_call_target="__cublas$gemm"
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %c = f32[4]{0} call(%x), to_apply=%command_buffer
  ROOT %t = f32[4]{0} custom-call(%c), custom_call_target="__gpu$xla.gpu.triton"
}
"""
  c = kernel_counts(text)
  assert (c["kernels"], c["gemms"], c["fusions"], c["custom_calls"], c["graphs"]) == \
      (3, 1, 1, 1, 1)


def test_kernel_timeline_summarizes_the_gpu_stream_lane():
  """Per-call span, busy time, gaps and classes from a hand-made Perfetto trace: two calls
  of three kernels on a GPU stream, plus a derived "XLA Ops" lane and a host lane that
  must not count."""
  from bench.probes.kernel_timeline import kernel_class, summarize
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}}]
  kernels = []
  for call, t0 in enumerate((0.0, 100.0)):
    for name, ts, dur in (("triton_gemm_dot_1", 0, 40), ("loop_add_fusion", 45, 5),
                          ("paged_attention_kernel", 55, 15)):
      kernels.append({"ph": "X", "pid": 1, "tid": 7, "name": name, "ts": t0 + ts, "dur": dur})
  noise = [{"ph": "X", "pid": 1, "tid": 8, "name": "dot.1", "ts": 0, "dur": 170},
           {"ph": "X", "pid": 2, "tid": 1, "name": "ExecuteOnHost", "ts": 0, "dur": 500}]
  row = summarize({"traceEvents": meta + kernels + noise}, calls=2)
  assert row["kernels_per_call"] == 3
  assert row["span_ms"] == 0.085       # (170 us - 0) / 2 calls
  assert row["busy_ms"] == 0.06        # (40 + 5 + 15) us per call
  assert row["gaps_ms"] == 0.025
  assert row["busy_ms_by_class"] == {"gemm": 0.04, "attention": 0.015, "fusion": 0.005}
  assert row["top_kernels"][0] == {"name": "triton_gemm_dot_1", "ms_per_call": 0.04,
                                   "per_call": 1.0, "us_each": 40.0}
  assert kernel_class("input_reduce_fusion_3") == "fusion"
  assert kernel_class("sm90_xmma_gemm_bf16") == "gemm"
  with pytest.raises(ValueError, match="no GPU stream lanes"):
    summarize({"traceEvents": meta[1:2]}, calls=1)


def test_engine_timeline_attributes_idle_gaps_to_host_phases():
  """bench/probes/engine_timeline.py over a hand-made trace: four rounds of two kernels on
  two stream lanes, host phases annotated; the first round (before round 1's dispatch) is
  left out, a 30 us gap during "drain" and a 70 us one during "update" are found."""
  from bench.probes.engine_timeline import busy_intervals, summarize_loop
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 9, "args": {"name": "Stream #9"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8,
           "args": {"name": "XLA Modules"}}]
  ev = lambda pid, tid, name, ts, dur: {"ph": "X", "pid": pid, "tid": tid, "name": name,
                                        "ts": ts, "dur": dur}
  kernels, host = [], []
  starts = (0.0, 100.0, 230.0, 400.0)  # round r's kernels: [t, t + 60] and [t + 50, t + 100]
  for r, t in enumerate(starts):
    kernels += [ev(1, 7, "gemm_fusion", t, 60), ev(1, 9, "paged_attention", t + 50, 50),
                ev(1, 8, "jit_step_fn", t, 100)]
    host.append(ev(2, 1, "engine_round", t - 40, 10))
  host += [ev(2, 1, "engine_drain", 195, 40), ev(2, 1, "engine_update", 320, 90)]
  assert busy_intervals([ev(1, 7, "a", 0, 10), ev(1, 9, "b", 5, 10), ev(1, 7, "c", 20, 1)]) \
      == [(0.0, 15.0), (20.0, 21.0)]
  row = summarize_loop({"traceEvents": meta + kernels + host}, steps_per_round=1,
                       min_gap_us=20, skip_rounds=1)
  assert row["steps"] == 3 and row["kernels_per_step"] == 2.0
  assert row["span_ms_per_step"] == round(400 / 3 / 1e3, 4)   # 100 .. 500 us
  assert row["idle_ms_per_step"] == round(100 / 3 / 1e3, 4)   # gaps of 30 and 70 us
  assert row["long_gaps_by_phase"] == {"drain": 1, "update": 1}
  assert row["longest_gaps"][0] == {"us": 70.0, "at_ms": 0.23, "host_phase": "update",
                                    "next_kernel": "gemm_fusion"}
  assert row["modules"] == {"jit_step_fn": {"count": 4, "median_ms": 0.1}}
  assert row["host_phase_count"] == {"round": 3, "drain": 1, "update": 1}
  assert row["busy_ms_per_step_by_class"] == {"gemm": 0.06, "attention": 0.05}
  assert row["top_kernels"][0] == {"name": "gemm_fusion", "ms_per_step": 0.06,
                                   "per_step": 1.0, "us_each": 60.0}


def test_engine_timeline_counts_a_kernel_in_the_round_that_launched_it():
  """A device that lags its host: round 0's kernel, launched before round 1's dispatch
  but run after it, is matched to its launch by CUPTI's correlation id and left out, and
  the device's time on it is not idle time of the rounds counted."""
  from bench.probes.engine_timeline import summarize_loop
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}}]
  ev = lambda pid, name, ts, dur, cid: {"ph": "X", "pid": pid, "tid": 1, "name": name,
                                        "ts": ts, "dur": dur,
                                        "args": {"correlation_id": str(cid)}}
  host, kernels = [], []
  for r in range(4):  # the host dispatches every 50 us, each round runs 100 us, from 80 us
    host += [ev(2, "engine_round", 50.0 * r, 10, -1 - r), ev(2, "cuGraphLaunch", 50.0 * r + 5,
                                                             1, r)]
    kernels.append(ev(1, "gemm_fusion", 100.0 * r + 80, 100, r))
  row = summarize_loop({"traceEvents": meta + host + kernels}, steps_per_round=1,
                       min_gap_us=20, skip_rounds=1)
  # rounds 1-3 only: round 0's kernel runs 80-180 us, after round 1's dispatch at 50 us
  assert row["steps"] == 3 and row["kernels_per_step"] == 1.0
  assert row["span_ms_per_step"] == 0.1 and row["idle_ms_per_step"] == 0.0


def test_graph_updates_reads_xla_command_buffer_log():
  """bench/probes/graph_updates.py counts executions and re-recordings in XLA's log
  (lines as jax 0.11.2's XLA writes them)."""
  from bench.probes import graph_updates
  log = [
      "I1203 command_buffer_thunk.cc:371] [0] Execute command buffer; num_executions=1",
      "I1203 command_buffer_thunk.cc:336] [0] Create/Update command buffer by recoding "
      "command buffer cmd sequence after 1 executions since last update; num_commands=33; "
      "updated_allocs=9; is_first_record=false; needs_update=true",
      "I1203 command_buffer_thunk.cc:362] [0] Updated command buffer in 175 μs; "
      "num_commands=33",
      "I1203 command_buffer_thunk.cc:371] [0] Execute command buffer; num_executions=1",
      "an unrelated line",
  ]
  res = graph_updates.summarise(log)
  assert res["executions"] == 2 and res["updates"] == 1
  assert res["by_size"] == [{"num_commands": 33, "updates": 1, "updated_allocs_median": 9,
                             "update_us_median": 175, "update_us_total": 175}]


def test_step_programs_build_the_engines_ar_round():
  """step_programs.py's `target_ar_round` is the engine's AR round program: compiled alone
  with its carry donated, one call writes one token per row and advances the state."""
  sys.path.insert(0, os.path.dirname(__file__))
  from engine_models import tiny_target
  from bench.probes import step_programs
  from ssd_jax.engine.runner import ModelRunner
  from ssd_jax.sharding import MeshSpec, make_meshes
  mesh, _ = make_meshes(MeshSpec.parse("1x1"), 0)
  runner = ModelRunner(tiny_target(seed=0), mesh, num_pages=16, page_size=16, name="t")
  build = lambda: step_programs.build_programs(
      runner, None, batch=2, k=3, f=2, context=20, names=("target_ar_step", "target_ar_round"))
  _, step, carry, inputs = build()["target_ar_round"]
  kv, state = jax.jit(step, donate_argnums=(1,))(runner.params, carry, *inputs)
  assert state.pos.tolist() == [21, 21] and state.generated.tolist() == [1, 1]
  assert not bool(state.done.any())
  res = step_programs.measure(build(), iters=2, latency_iters=1, log=lambda *_: None)
  assert all("ms" in res[n]["default"] for n in ("target_ar_step", "target_ar_round"))


def test_launches_lists_each_kernel_in_program_order():
  from bench.probes.hlo_stats import launches

  def f(x, w):
    def body(c, _):
      return jnp.tanh(c @ w), None
    y, _ = jax.lax.scan(body, x, None, length=3)
    return jnp.sum(y * y, axis=-1)

  text = jax.jit(f).lower(jnp.ones((2, 8)), jnp.ones((8, 8))).compile().as_text()
  rows = launches(text)
  assert rows and all({"name", "kind", "shape", "ops"} <= set(r) for r in rows)
  # the loop body appears once, so its GEMM does: launches() is one pass of the program
  assert sum(r["kind"] == "gemm" for r in rows) == 1
  assert len(rows) <= kernel_counts(text)["kernels"]
  with pytest.raises(ValueError, match="ENTRY"):
    launches("HloModule m\n")
