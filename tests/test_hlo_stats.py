"""Kernel counting from optimized HLO text (bench/probes/ssd_timing.py's per-program report)."""

import os
import sys

import jax
import jax.numpy as jnp

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
