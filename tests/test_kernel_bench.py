"""The kernel benchmark's timing harness (bench/probes/kernel_bench.py): what each timed
program reads, so that its numbers mean what bench/KERNELS.md says they mean."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from absl.testing import flagsaver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from bench.probes import kernel_bench  # noqa: E402

FLAGS = flags.FLAGS


@pytest.fixture(autouse=True, scope="module")
def parsed_flags():
  if not FLAGS.is_parsed():
    FLAGS(["kernel_bench_test"])


def _ops(compiled_text, op):
  return sum(line.count(f" {op}(") for line in compiled_text.splitlines())


def test_pool_copies_cover_rotate_mb_but_not_more_than_the_calls():
  with flagsaver.flagsaver(rotate_mb=256):
    assert kernel_bench.pool_copies(17e6, inner=32) == 16  # 16 x 17 MB >= 256 MB
    assert kernel_bench.pool_copies(17e6, inner=5) == 5
    assert kernel_bench.pool_copies(2e9, inner=8) == 1
  with flagsaver.flagsaver(rotate_mb=0):
    assert kernel_bench.pool_copies(17e6, inner=32) == 1


def test_read_floor_reads_every_pool_once_per_call():
  """Each call reduces its pool's K and V; no reduction is shared between two calls that
  read the same copy (XLA could otherwise share the V sums, halving the floor)."""
  inner = 6
  kvs = [(jnp.full((8, 4), i, jnp.bfloat16), jnp.full((8, 4), -i, jnp.bfloat16))
         for i in range(2)]
  f = kernel_bench.read_loop(inner)
  text = f.lower(kvs).compile().as_text()
  assert _ops(text, "reduce") == 2 * inner
  # Sum over calls of (sum(k + total) + sum(v + total)): the value checks the chaining.
  total = 0.0
  for i in range(inner):
    k, v = kvs[i % 2]
    total = float(jnp.sum(k.astype(jnp.float32) + total) + jnp.sum(v.astype(jnp.float32)
                                                                    + total))
  assert float(f(kvs)) == pytest.approx(total)


def test_looped_calls_read_the_pools_in_turn_and_nothing_else():
  seen = []

  def attn(q, k, v, pt, lim):
    del pt, lim
    seen.append(None)
    return q + k[0, 0], v[0]

  inner = 5
  kvs = [(jnp.full((2, 3), float(i)), jnp.full((2, 3), float(i))) for i in range(3)]
  q = jnp.zeros((3,))
  out, lse = kernel_bench.looped(attn, inner)(q, kvs, jnp.zeros(()), jnp.zeros(()))
  # Call i adds pool (i % 3)'s value: 0 + 1 + 2 + 0 + 1.
  assert jnp.allclose(out, 4.0)
  assert lse.shape == (3,)
  jaxpr = jax.make_jaxpr(kernel_bench.looped(attn, inner))(q, kvs, jnp.zeros(()),
                                                           jnp.zeros(()))
  # One jitted call per kernel call: no other ops between them in the timed program.
  outer = jaxpr.jaxpr.eqns[0].params["jaxpr"].jaxpr
  names = [e.primitive.name for e in outer.eqns]
  assert len(names) == inner and set(names) <= {"jit", "pjit"}, names  # name by version
