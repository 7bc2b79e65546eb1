"""The Pallas skinny matmul (interpret mode off GPU) against jnp.dot, and `kernels.project`
choosing it only where it applies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssd_jax import kernels
from ssd_jax.kernels import skinny_matmul as sk

CASES = [  # m, k, n, transpose_w, plan overrides
    (1, 256, 384, False, {}),
    (8, 512, 256, True, dict(splits=2, block_k=128, block_n=64)),
    (24, 384, 128, False, dict(block_k=128, block_n=32)),
    (5, 1024, 256, False, dict(splits=4, block_k=128)),
    (32, 192, 64, True, dict(block_k=64)),
]


@pytest.mark.parametrize("m,k,n,transpose_w,plan", CASES)
def test_matches_dot(m, k, n, transpose_w, plan):
  kx, kw = jax.random.split(jax.random.key(m * k + n))
  x = jax.random.normal(kx, (m, k), jnp.float32)
  w = jax.random.normal(kw, (n, k) if transpose_w else (k, n), jnp.float32)
  ref = np.asarray(x, np.float64) @ np.asarray(w.T if transpose_w else w, np.float64)
  out = sk.skinny_matmul(x, w, transpose_w=transpose_w, **plan)
  assert out.shape == (m, n) and out.dtype == jnp.float32
  assert np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref) < 1e-5


def test_bfloat16_output_and_float32_accumulation():
  x = jax.random.normal(jax.random.key(0), (8, 1024), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (1024, 128), jnp.bfloat16)
  ref = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
  for out_dtype in (None, jnp.float32):
    out = sk.skinny_matmul(x, w, out_dtype=out_dtype, splits=4, block_k=128)
    assert out.dtype == (out_dtype or jnp.bfloat16)
    err = jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)
    assert err < 1e-2


def test_default_plan_fills_the_gpu_and_tiles_the_shape():
  for m, k, n in [(8, 4096, 4096), (8, 4096, 28672), (8, 14336, 4096), (32, 2048, 1024),
                  (8, 576, 384)]:
    p = sk.default_plan(m, k, n, num_sms=132)
    assert n % p["block_n"] == 0 and k % (p["splits"] * p["block_k"]) == 0
    assert (n // p["block_n"]) * p["splits"] >= 132 or k % (2 * p["splits"] * p["block_k"])


def test_only_small_weights_are_worth_the_kernel():
  assert sk.worth_it(8, 2048, 2048, 2) and sk.worth_it(32, 2048, 1024, 2)  # 1B q, kv
  assert not sk.worth_it(8, 2048, 16384, 2)  # 1B gate_up: XLA reads it faster
  assert not sk.worth_it(8, 4096, 4096, 2)  # the 8B's projections
  assert not sk.worth_it(64, 2048, 2048, 2)  # too many rows


def test_bad_shapes_are_refused():
  x = jnp.ones((40, 128))
  with pytest.raises(ValueError, match="M <= 32"):
    sk.skinny_matmul(x, jnp.ones((128, 128)))
  with pytest.raises(ValueError, match="do not contract"):
    sk.skinny_matmul(x[:8], jnp.ones((256, 128)))
  with pytest.raises(ValueError, match="does not tile"):
    sk.skinny_matmul(x[:8], jnp.ones((128, 128)), block_k=256)


def _pallas_calls(fn, *args) -> int:
  """Calls of the kernel's jitted wrapper (a jaxpr prints a shared sub-jaxpr once)."""
  return str(jax.make_jaxpr(fn)(*args)).count("name=_skinny")


def test_project_takes_the_kernel_only_for_few_rows_of_16_bit_weights():
  w = jnp.ones((128, 4, 32), jnp.bfloat16)
  # A new function each time: traces are cached per function, and the choice is made
  # when tracing (as the runner's programs are traced once each).
  proj = lambda: lambda x, w: kernels.project("bse,ehd->bshd", x, w)
  few, many = jnp.ones((1, 8, 128), jnp.bfloat16), jnp.ones((2, 32, 128), jnp.bfloat16)
  with kernels.matmuls("pallas"):
    assert _pallas_calls(proj(), few, w) == 1
    assert _pallas_calls(proj(), many, w) == 0  # 64 rows: XLA's GEMM
    assert _pallas_calls(proj(), few.astype(jnp.float32), w.astype(jnp.float32)) == 0
  assert _pallas_calls(proj(), few, w) == 0  # XLA unless the runner asks
  with kernels.matmuls("pallas"):
    got = proj()(few, w)
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(jnp.einsum("bse,ehd->bshd", few, w), np.float32))


def test_model_step_runs_every_weight_product_on_the_kernel():
  """A bfloat16 decode step of a tiny model under matmuls("pallas"): five products per
  layer (q, kv, o, gate_up, down) and the tied head, and the logits of XLA's path."""
  import dataclasses
  from flax import nnx
  from ssd_jax.checkpoint import REAL_SHAPES
  from ssd_jax.models.transformer import AttentionInputs, Transformer, init_kv_cache

  cfg = dataclasses.replace(REAL_SHAPES["smollm2-135m"], num_layers=2, hidden_size=128,
                            intermediate_size=256, num_heads=4, num_kv_heads=2, head_dim=32,
                            vocab_size=512)
  model = Transformer(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  kv = init_kv_cache(cfg, 4, 16, jnp.bfloat16)
  attn = AttentionInputs(page_table=jnp.array([[1, 2]], jnp.int32),
                         slot_mapping=jnp.array([[16 + 3]], jnp.int32),
                         kv_limit=jnp.array([[20]], jnp.int32))
  tokens, positions = jnp.array([[7]], jnp.int32), jnp.array([[19]], jnp.int32)

  def step(state, kv):
    return nnx.merge(graphdef, state)(tokens, positions, kv, attn)[0]

  with kernels.matmuls("pallas"):
    assert _pallas_calls(step, state, kv) == 5 * cfg.num_layers + 1
    got = step(state, kv)
  want = step(state, kv)
  assert got.dtype == want.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-2, atol=2e-2)


def test_unknown_matmul_impl_is_refused():
  with pytest.raises(ValueError, match="matmul impl 'cublas' is unknown"):
    kernels.resolve_matmul_impl("cublas")
