"""The Pallas RoPE + KV-write kernel (kernels/pallas_layer.py) against the XLA reference
(on CPU it runs in interpret mode; on a GPU the same tests exercise the Triton kernel)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssd_jax import kernels
from ssd_jax.kernels import pallas_layer, reference
from ssd_jax.models.rope import rope_frequencies

from helpers import kernel_jit as jit

TOL = {"float32": 1e-5, "bfloat16": 1e-2}


def rope_inputs(seed, *, batch, nq, hq, hkv, d, page_size, num_pages, dtype):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
  qkv = f(batch, nq, hkv, hq // hkv + 2, d)  # per KV head: its query heads, K, V
  kp, vp = f(num_pages, page_size, hkv, d), f(num_pages, page_size, hkv, d)
  positions = jnp.asarray(rng.integers(0, 5000, (batch, nq)), jnp.int32)
  # Distinct slots in shuffled pages; some tokens write nothing (-1, padding).
  slots = rng.permutation(num_pages * page_size)[:batch * nq].reshape(batch, nq)
  slots[rng.random((batch, nq)) < 0.3] = -1
  return qkv, positions, kp, vp, jnp.asarray(slots, jnp.int32)


@pytest.mark.parametrize("case", [
    dict(batch=2, nq=3, hq=8, hkv=2, d=64, page_size=16, num_pages=5, dtype="float32"),
    dict(batch=1, nq=1, hq=9, hkv=3, d=64, page_size=64, num_pages=3, dtype="bfloat16"),
    dict(batch=3, nq=4, hq=4, hkv=4, d=128, page_size=8, num_pages=7, dtype="bfloat16"),
], ids=["f32-gqa4", "bf16-smollm-heads", "bf16-mha-d128"])
def test_rope_write_kv_matches_reference(case):
  dtype = case["dtype"]
  qkv, pos, kp, vp, slots = rope_inputs(1, **case)
  inv_freq = rope_frequencies(case["d"], 500000.0, {
      "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192})
  run = lambda f: jit(lambda *a: f(*a[:2], inv_freq, *a[2:]))(qkv, pos, kp, vp, slots)
  qo, kpo, vpo = run(pallas_layer.rope_write_kv)
  ref_q, ref_kp, ref_vp = run(reference.rope_write_kv)
  tol = TOL[dtype]
  for got, want in ((qo, ref_q), (kpo, ref_kp), (vpo, ref_vp)):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)
  # Slots nobody wrote keep their old contents exactly (the pools are updated in place).
  written = np.zeros(kp.shape[:2], bool).reshape(-1)
  written[np.asarray(slots)[np.asarray(slots) >= 0]] = True
  written = written.reshape(kp.shape[:2])
  np.testing.assert_array_equal(np.asarray(kpo)[~written], np.asarray(kp)[~written])
  np.testing.assert_array_equal(np.asarray(vpo)[~written], np.asarray(vp)[~written])
  # V is copied, not rotated: bitwise what was given.
  s = np.asarray(slots)
  b, i = np.nonzero(s >= 0)
  np.testing.assert_array_equal(
      np.asarray(vpo).reshape(-1, *vp.shape[2:])[s[b, i]], np.asarray(qkv)[b, i, :, -1])


def test_dispatch_picks_the_reference_for_xla():
  qkv, pos, kp, vp, slots = rope_inputs(2, batch=1, nq=2, hq=4, hkv=2, d=16,
                                        page_size=4, num_pages=2, dtype="float32")
  inv_freq = rope_frequencies(16, 10000.0, None)
  got = kernels.rope_write_kv(qkv, pos, inv_freq, kp, vp, slots, impl="xla")
  want = reference.rope_write_kv(qkv, pos, inv_freq, kp, vp, slots)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rope_write_kv_rejects_mismatched_shapes():
  qkv, pos, kp, vp, slots = rope_inputs(2, batch=1, nq=2, hq=4, hkv=2, d=16,
                                        page_size=4, num_pages=2, dtype="float32")
  with pytest.raises(ValueError, match="disagree"):
    pallas_layer.rope_write_kv(qkv[:, :, :1], pos, rope_frequencies(16, 1e4, None), kp,
                               vp, slots)


@pytest.mark.parametrize("mesh_shape", [(1, 4), (2, 2)], ids=["tp4", "dp2xtp2"])
def test_sharded_rope_write_kv(mesh_shape):
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 devices")
  dp, tp = mesh_shape
  mesh = Mesh(np.array(jax.devices()[:dp * tp]).reshape(dp, tp), ("dp", "tp"))
  qkv, pos, kp, vp, slots = rope_inputs(3, batch=2, nq=2, hq=8, hkv=4, d=32,
                                        page_size=8, num_pages=4, dtype="float32")
  inv_freq = rope_frequencies(32, 10000.0, None)
  heads = NamedSharding(mesh, P(None, None, "tp", None))
  kps, vps = (jax.device_put(a, heads) for a in (kp, vp))
  qkvs = jax.device_put(qkv, NamedSharding(mesh, P(None, None, "tp", None, None)))
  got = jit(lambda *a: pallas_layer.sharded_rope_write_kv(*a[:2], inv_freq, *a[2:],
                                                          mesh=mesh))(
      qkvs, pos, kps, vps, slots)
  want = reference.rope_write_kv(qkv, pos, inv_freq, kp, vp, slots)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
