"""The fused weight-product kernel (kernels/pallas_matmul.py) against its XLA reference, the
reference against the unfused layer, and the model with it (on CPU the kernel runs in
interpret mode; on a GPU the same tests exercise the Triton kernel)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssd_jax import kernels
from ssd_jax.kernels import pallas_matmul, reference

from helpers import kernel_jit as jit

TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def inputs(seed, m, k, n, dtype, gated=False):
  rng = np.random.default_rng(seed)
  f = lambda *s, scale=1.0: jnp.asarray(scale * rng.standard_normal(s), dtype)
  w = f(k, 2, n, scale=k ** -0.5) if gated else f(k, n, scale=k ** -0.5)
  return f(m, k), w, jnp.asarray(1 + 0.2 * rng.standard_normal(k), dtype), f(m, n)


MODES = {"plain": {}, "norm": {"norm": True}, "gated": {"norm": True, "gated": True},
         "residual": {"residual": True}}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("m,k,n,dtype,plan", [
    (1, 64, 48, "float32", dict(block_n=16, block_k=32, splits=1)),
    (8, 128, 64, "bfloat16", dict(block_n=32, block_k=64, splits=1)),
    (24, 96, 32, "float32", dict(block_n=32, block_k=32, splits=1)),
    (3, 128, 64, "float32", dict(block_n=32, block_k=32, splits=4)),
    (8, 192, 32, "bfloat16", dict(block_n=16, block_k=32, splits=3)),
], ids=["m1-f32", "m8-bf16", "m24-f32", "m3-f32-split4", "m8-bf16-split3"])
def test_kernel_matches_reference(mode, m, k, n, dtype, plan):
  opt = MODES[mode]
  x, w, g, r = inputs(1, m, k, n, dtype, gated=opt.get("gated", False))
  kw = dict(norm_gain=g if opt.get("norm") else None, eps=1e-5,
            gated=opt.get("gated", False), residual=r if opt.get("residual") else None)
  got = jit(lambda *a: pallas_matmul.fused_matmul(*a, **kw, **plan))(x, w)
  want = jit(lambda *a: reference.fused_matmul(*a, **kw))(x, w)
  assert got.shape == want.shape == (m, n) and got.dtype == want.dtype == jnp.dtype(dtype)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=TOL[dtype], atol=TOL[dtype])


def test_reference_is_the_unfused_layer():
  """In float32 the fused contract is the layer's plain ops: norm then product, silu(gate)
  * up, the residual added."""
  x, w, g, r = inputs(2, 5, 64, 32, "float32")
  _, wgu, _, _ = inputs(3, 5, 64, 32, "float32", gated=True)
  normed = kernels.rms_norm(x, g, eps=1e-5)
  hi = jax.lax.Precision.HIGHEST
  cases = [
      (reference.fused_matmul(x, w, norm_gain=g, eps=1e-5), jnp.dot(normed, w, precision=hi)),
      (reference.fused_matmul(x, w, residual=r), r + jnp.dot(x, w, precision=hi)),
      (reference.fused_matmul(x, wgu, norm_gain=g, eps=1e-5, gated=True),
       jax.nn.silu(jnp.dot(normed, wgu[:, 0], precision=hi))
       * jnp.dot(normed, wgu[:, 1], precision=hi)),
  ]
  for got, want in cases:
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_default_plan_tiles_real_shapes():
  for k, n in ((4096, 6144), (14336, 4096), (2048, 3072), (8192, 2048), (576, 960),
               (1536, 576)):
    plan = pallas_matmul.default_plan(8, k, n, num_sms=132)
    assert k % (plan["block_k"] * plan["splits"]) == 0 and n % plan["block_n"] == 0
    assert 16 <= plan["block_n"] <= 64 and 1 <= plan["splits"] <= pallas_matmul.MAX_SPLITS
    # Every SM gets a program, unless no larger split tiles K.
    if (n // plan["block_n"]) * plan["splits"] < 132:
      assert not any(k % (s * plan["block_k"]) == 0
                     for s in range(plan["splits"] + 1, pallas_matmul.MAX_SPLITS + 1))


def test_bad_shapes_fail_with_a_clear_error():
  x, w, g, r = inputs(4, 8, 64, 32, "float32")
  with pytest.raises(ValueError, match="do not contract"):
    pallas_matmul.fused_matmul(x, w.T)
  with pytest.raises(ValueError, match="M <= 64"):
    pallas_matmul.fused_matmul(jnp.zeros((65, 64)), w)
  with pytest.raises(ValueError, match="multiples of 16"):
    pallas_matmul.fused_matmul(jnp.zeros((8, 40)), jnp.zeros((40, 32)))
  with pytest.raises(ValueError, match="norm gain"):
    pallas_matmul.fused_matmul(x, w, norm_gain=g[:10])
  with pytest.raises(ValueError, match="residual"):
    pallas_matmul.fused_matmul(x, w, residual=r[:3])
  with pytest.raises(ValueError, match="does not tile"):
    pallas_matmul.fused_matmul(x, w, block_n=64)
  with pytest.raises(ValueError, match="does not tile"):
    pallas_matmul.fused_matmul(x, w, block_k=32, splits=3)


def test_applies_to_decode_steps_only():
  assert kernels.fused_matmul_applies(8, "pallas")
  assert not kernels.fused_matmul_applies(65, "pallas")  # prefill keeps XLA's GEMMs
  assert not kernels.fused_matmul_applies(8, "xla")
  with pytest.raises(ValueError, match="matmul impl 'cuda' is unknown"):
    kernels.resolve_impl("cuda", "matmul impl")


def test_model_with_fused_products_matches_xla():
  """One decode step of a tiny Llama (GQA, untied head) and a Qwen3 (q/k norms) with
  `matmul_impl="pallas"` gives XLA's logits (float32), for the prefill (8 rows, also
  through the kernel) and the decode steps."""
  from engine_models import tiny_target
  from helpers import run_paged
  for kw in (dict(), dict(model_type="qwen3")):
    model = tiny_target(seed=3, **kw)
    want = run_paged(model, model.cfg, [[3, 17, 42, 8], [5, 6]], 2)
    model.set_matmul_impl("pallas")
    got = run_paged(model, model.cfg, [[3, 17, 42, 8], [5, 6]], 2)
    np.testing.assert_allclose(got["decode"], want["decode"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["prefill"], want["prefill"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="matmul impl"):
      model.set_matmul_impl("triton")


def test_llm_rejects_an_unknown_matmul_impl():
  from engine_models import tiny_target
  from ssd_jax.llm import LLM
  with pytest.raises(ValueError, match="matmul_impl 'cublas' is unknown"):
    LLM(tiny_target(), method="ar", matmul_impl="cublas")


def test_probe_plans_parse_and_fit():
  from bench.probes import fused_layers
  assert fused_layers.parse_plan("bn=32,sp=4,st=3") == dict(block_n=32, splits=4,
                                                            num_stages=3)
  with pytest.raises(ValueError, match="plan item 'bq=3'"):
    fused_layers.parse_plan("bq=3")
  # A plan that does not tile a product leaves it at the default plan.
  assert fused_layers._fitted(dict(block_n=64, splits=7), 576, 960) == dict(block_n=64)
