"""bench/probes/norm_fusion.py: every place it puts the RMSNorm computes the same layer."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from bench.probes import norm_fusion  # noqa: E402
from ssd_jax.checkpoint import REAL_SHAPES  # noqa: E402


@pytest.mark.parametrize("variant", ["gain_x", "gain_w", "folded"])
def test_variants_compute_the_models_layers(variant):
  cfg = REAL_SHAPES["smollm2-135m"]
  group = cfg.num_heads // cfg.num_kv_heads
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 1, cfg.hidden_size), jnp.float32)
  run = lambda v: norm_fusion.stack(  # noqa: E731
      x, norm_fusion.init_params(cfg, 2, jnp.float32, jax.random.PRNGKey(0),
                                 fold=v == "folded"),
      eps=cfg.rms_norm_eps, variant=v, group=group)
  np.testing.assert_allclose(np.asarray(run(variant)), np.asarray(run("hf")),
                             rtol=2e-5, atol=2e-5)


def test_unknown_variant_says_which_exist():
  cfg = REAL_SHAPES["smollm2-135m"]
  x = jnp.ones((1, 1, cfg.hidden_size))
  p = norm_fusion.init_params(cfg, 1, jnp.float32, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="gain_w"):
    norm_fusion.stack(x, p, eps=1e-5, variant="nope", group=3)


def test_measure_reports_launches_per_layer():
  out = norm_fusion.measure("smollm2-135m", ["hf", "folded"], rows=2, layers=2, iters=1,
                            log=lambda s: None)
  for v in ("hf", "folded"):
    assert out[v]["layers"] == 2 and out[v]["launches"] > 0
    assert out[v]["launches_per_layer"] == out[v]["launches"] / 2
    assert out[v]["kinds"].get("gemm", 0) >= 2 * 4  # qkv, o, gate_up, down per layer
