"""Pallas paged attention against the XLA reference (on CPU the kernel runs in interpret
mode; on a GPU the same tests exercise the compiled Triton kernel).

Every case draws fresh random inputs from its own seed: ragged lengths across the batch,
pages shuffled in the pool, a sequence with nothing visible (kv_limit == 0), and every
slot that no query may see poisoned with NaN or huge values in the kernel's pool (zeros in
the reference's), so that a leak shows up as a NaN or a large error.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssd_jax.kernels import pallas_attention, reference

from helpers import kernel_jit as jit

NEG_INF = reference.NEG_INF
TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def ref_attention(*args, scale):
  """The XLA reference in full float32 (on GPU, default precision would use TF32)."""
  with jax.default_matmul_precision("highest"):
    return jit(functools.partial(reference.paged_attention, scale=scale))(*args)


def make_inputs(seed, *, batch, nq, hq, hkv, d, page_size, pages_per_seq, mode, dtype,
                poison="nan", lim=None):
  """Returns (kernel args, reference args, kv_limit as numpy)."""
  rng = np.random.default_rng(seed)
  cap = pages_per_seq * page_size
  num_pages = batch * pages_per_seq + 3  # a few pages nobody uses
  q = rng.standard_normal((batch, nq, hq, d)).astype(np.float32)
  k = rng.standard_normal((num_pages, page_size, hkv, d)).astype(np.float32)
  v = rng.standard_normal((num_pages, page_size, hkv, d)).astype(np.float32)
  page_table = rng.permutation(num_pages)[:batch * pages_per_seq]
  page_table = page_table.reshape(batch, pages_per_seq).astype(np.int32)
  # Ragged lengths: a full sequence, random ones, and the last one empty.
  lengths = rng.integers(1, cap + 1, batch)
  lengths[0] = cap
  lengths[-1] = 0
  lim_override = lim
  if mode == "decode":
    lim = lengths[:, None] + np.zeros((1, nq), np.int64)
  elif mode == "causal":  # verify / prefill chunk: the last nq tokens, causally
    lim = lengths[:, None] - nq + 1 + np.arange(nq)[None, :]
  elif mode == "tree":  # each branch hangs off its own glue position
    lim = lengths[:, None] - rng.integers(0, 2 * page_size, (batch, nq))
  else:
    raise ValueError(mode)
  lim = np.clip(lim, 0, cap).astype(np.int32)
  lim[-1] = 0
  if lim_override is not None:
    lim = np.asarray(lim_override, np.int32)
  # Poison every slot that no query may see (unused pages, slots past each sequence's
  # last visible position, including page-table entries beyond its length).
  visible = np.zeros((num_pages, page_size), bool)
  for b in range(batch):
    n = min(int(lim[b].max()), cap)
    for p in range(pages_per_seq):
      visible[page_table[b, p], :max(0, min(page_size, n - p * page_size))] = True
  bad = {"nan": np.nan, "huge": 1e30}[poison]
  seen = visible[..., None, None]
  k_ref, v_ref = np.where(seen, k, 0.0), np.where(seen, v, 0.0)
  k_bad, v_bad = np.where(seen, k, bad), np.where(seen, v, -bad)
  dt = jnp.dtype(dtype)
  qj = jnp.asarray(q, dt)
  pt, limj = jnp.asarray(page_table), jnp.asarray(lim)
  args = (qj, jnp.asarray(k_bad, dt), jnp.asarray(v_bad, dt), pt, limj)
  ref_args = (qj, jnp.asarray(k_ref, dt), jnp.asarray(v_ref, dt), pt, limj)
  return args, ref_args, lim


def assert_matches(out, lse, ref_out, ref_lse, lim, dtype):
  out = np.asarray(out, np.float32)
  ref_out = np.asarray(ref_out, np.float32)
  lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
  assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
  assert lse.dtype == np.float32
  assert np.isfinite(out).all(), "NaN/inf leaked into the output"
  err = np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out)
  assert err < TOL[dtype], f"relative error {err:.3e} >= {TOL[dtype]}"
  empty = lim == 0
  assert np.all(out[empty] == 0.0)
  assert np.all(lse[empty] == NEG_INF)
  np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=1e-5, atol=2e-4)


# (mode, Q, Hq, Hkv, head_dim, page_size, pages per sequence, dtype, kernel overrides)
CASES = [
    ("decode", 1, 4, 4, 64, 16, 5, "float32", {}),                          # group 1
    ("decode", 1, 16, 4, 128, 64, 3, "bfloat16", {}),                       # group 4
    ("decode", 1, 16, 2, 64, 16, 9, "float32", dict(num_splits=3)),        # group 8, split
    ("causal", 8, 8, 2, 64, 16, 6, "float32", {}),                          # verify K+1=8
    ("causal", 8, 16, 2, 128, 64, 3, "bfloat16", dict(num_splits=2)),
    ("tree", 24, 2, 2, 128, 16, 5, "float32", {}),                          # SSD tree M=24
    ("tree", 24, 8, 2, 64, 64, 3, "bfloat16", dict(block_k=16)),  # 2 row tiles, 1/4 pages
    ("tree", 24, 16, 2, 64, 16, 6, "float32", dict(block_k=32, num_splits=2)),  # 2 pages/step
    ("causal", 40, 4, 2, 64, 16, 6, "float32", dict(block_rows=32)),       # prefill chunk
    # Split merge kernel: 5 splits (not a power of two) over 9 rows per query (the draft's
    # 9 q / 3 KV heads: one row per merge program), and the XLA merge kept to compare with.
    ("decode", 1, 9, 3, 64, 16, 7, "bfloat16", dict(num_splits=5)),
    ("causal", 4, 8, 2, 64, 16, 6, "float32", dict(num_splits=3, merge="xla")),
]


def _case_id(c):
  tag = "".join(f"-{k}{v}" for k, v in c[8].items())
  return f"{c[0]}-q{c[1]}-h{c[2]}-g{c[2] // c[3]}-d{c[4]}-p{c[5]}-{c[7]}{tag}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case):
  mode, nq, hq, hkv, d, ps, pps, dtype, kw = case
  seed = zlib.crc32(repr(case).encode())
  poison = "nan" if seed % 2 else "huge"
  args, ref_args, lim = make_inputs(seed, batch=3, nq=nq, hq=hq, hkv=hkv, d=d, page_size=ps,
                                    pages_per_seq=pps, mode=mode, dtype=dtype, poison=poison)
  scale = d ** -0.5
  out, lse = jit(functools.partial(pallas_attention.paged_attention, scale=scale,
                                   **kw))(*args)
  ref_out, ref_lse = ref_attention(*ref_args, scale=scale)
  assert out.dtype == args[0].dtype
  assert_matches(out, lse, ref_out, ref_lse, lim, dtype)


def test_split_policy():
  """Splits only where the grid is small and the page table long; the merge kernel's row
  blocks are powers of two dividing the rows."""
  plan = functools.partial(pallas_attention.launch_plan, dtype=jnp.bfloat16)
  # Batch-1 decode over 4k tokens (8b: 8 KV heads): split to fill the GPU.
  p = plan((1, 1, 32, 128), (1000, 64, 8, 128), 64)
  assert p["num_splits"] > 1 and 32 % p["merge_rows"] == 0
  # A page table of <= SPLIT_MIN_TOKENS tokens (the draft's short contexts): no split,
  # whatever the batch.
  short = pallas_attention.SPLIT_MIN_TOKENS // 64
  for b in (1, 4):
    p = plan((b, 1, 9, 64), (1000, 64, 3, 64), short)
    assert p["num_splits"] == 1 and "merge_rows" not in p
  # A grid of many waves: no split.
  p = plan((256, 24, 64, 128), (10000, 64, 8, 128), 64)
  assert p["num_splits"] == 1
  # Interpret mode (CPU) never splits unless asked to.
  assert plan((1, 1, 32, 128), (1000, 64, 8, 128), 64, interpret=True)["num_splits"] == 1
  assert plan((1, 1, 32, 128), (1000, 64, 8, 128), 64, num_splits=3)["num_splits"] == 3
  for rows in (1, 9, 24, 32, 768):
    r = pallas_attention.merge_rows(2, rows, target_programs=264)
    assert rows % r == 0 and r & (r - 1) == 0


def test_limit_beyond_capacity_and_padding_pages():
  """kv_limit past the page table's capacity sees the whole table; page-table entries past
  a sequence's length (here -1) are never visited."""
  lim = np.array([[100, 48, 47], [20, 0, 5]], np.int32)
  args, ref_args, lim = make_inputs(7, batch=2, nq=3, hq=4, hkv=2, d=64, page_size=16,
                                    pages_per_seq=3, mode="causal", dtype="float32", lim=lim)
  q, k, v, pt, lm = args
  pt = np.asarray(pt).copy()
  pt[1, 2] = -1  # sequence 1 needs only 2 pages
  out, lse = jit(functools.partial(pallas_attention.paged_attention, scale=0.125,
                                   block_k=32))(q, k, v, jnp.asarray(pt), lm)
  ref_out, ref_lse = ref_attention(*ref_args, scale=0.125)
  assert_matches(out, lse, ref_out, ref_lse, lim, "float32")


@pytest.mark.parametrize("mesh_shape", [(1, 4), (2, 2)], ids=["tp4", "dp2xtp2"])
def test_sharded_over_tp(mesh_shape):
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 devices")
  dp, tp = mesh_shape
  mesh = Mesh(np.array(jax.devices()[:dp * tp]).reshape(dp, tp), ("dp", "tp"))
  args, ref_args, lim = make_inputs(11 + dp, batch=2, nq=4, hq=8, hkv=4, d=64,
                                    page_size=16, pages_per_seq=4, mode="tree",
                                    dtype="float32")
  q, k, v, pt, lm = args
  q = jax.device_put(q, NamedSharding(mesh, P(None, None, "tp", None)))
  k = jax.device_put(k, NamedSharding(mesh, P(None, None, "tp", None)))
  v = jax.device_put(v, NamedSharding(mesh, P(None, None, "tp", None)))
  f = jit(functools.partial(pallas_attention.sharded_paged_attention, scale=0.125,
                            mesh=mesh))
  out, lse = f(q, k, v, pt, lm)
  ref_out, ref_lse = ref_attention(*ref_args, scale=0.125)
  assert_matches(out, lse, ref_out, ref_lse, lim, "float32")


def test_single_device_mesh_is_plain_call():
  args, ref_args, lim = make_inputs(3, batch=2, nq=1, hq=4, hkv=2, d=64, page_size=16,
                                    pages_per_seq=2, mode="decode", dtype="float32")
  out, lse = jit(functools.partial(pallas_attention.sharded_paged_attention, scale=0.125,
                                   mesh=None))(*args)
  ref_out, ref_lse = ref_attention(*ref_args, scale=0.125)
  assert_matches(out, lse, ref_out, ref_lse, lim, "float32")


def test_model_pallas_matches_xla():
  """A tiny random Transformer gives the same logits with either attention impl over a
  ragged, chunked prefill, a few decode steps and a 4-token verify step."""
  from flax import nnx
  from ssd_jax.config import ModelConfig
  from ssd_jax.models.transformer import AttentionInputs, Transformer, init_kv_cache

  cfg = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
  models = {}
  for impl in ("xla", "pallas"):
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0), attention_impl=impl))

    @jit
    def forward(state, tokens, positions, kv, attn, graphdef=graphdef):
      logits, kv, _ = nnx.merge(graphdef, state)(tokens, positions, kv, attn)
      return logits, kv

    models[impl] = functools.partial(forward, state)
  page_size, pages_per_seq, batch = 8, 3, 2
  page_table = jnp.asarray(np.random.default_rng(0).permutation(batch * pages_per_seq + 2)
                           [:batch * pages_per_seq].reshape(batch, pages_per_seq), jnp.int32)
  caches = {impl: init_kv_cache(cfg, batch * pages_per_seq + 2, page_size, jnp.float32)
            for impl in models}
  rng = np.random.default_rng(1)
  lengths = np.array([7, 4])

  def step(tokens, positions, valid):
    slots = np.where(valid, np.take_along_axis(np.asarray(page_table), positions // page_size,
                                               axis=1) * page_size + positions % page_size, -1)
    lim = np.where(valid, positions + 1, 0)
    attn = AttentionInputs(page_table=page_table, slot_mapping=jnp.asarray(slots, jnp.int32),
                           kv_limit=jnp.asarray(lim, jnp.int32))
    logits = {}
    for impl, model in models.items():  # full f32 matmuls also on GPU (no TF32)
      with jax.default_matmul_precision("highest"):
        logits[impl], caches[impl] = model(jnp.asarray(tokens, jnp.int32),
                                              jnp.asarray(positions, jnp.int32),
                                              caches[impl], attn)
    np.testing.assert_allclose(np.asarray(logits["pallas"]), np.asarray(logits["xla"]),
                               rtol=1e-4, atol=1e-4)

  # Ragged prefill in two chunks of 4 (padding tokens write nothing and see nothing).
  for chunk in range(2):
    pos = np.broadcast_to(4 * chunk + np.arange(4), (batch, 4))
    step(rng.integers(0, cfg.vocab_size, (batch, 4)), pos, pos < lengths[:, None])
  for _ in range(3):  # decode
    step(rng.integers(0, cfg.vocab_size, (batch, 1)), lengths[:, None],
         np.ones((batch, 1), bool))
    lengths = lengths + 1
  # Verify K+1 = 4 tokens.
  pos = lengths[:, None] + np.arange(4)
  step(rng.integers(0, cfg.vocab_size, (batch, 4)), pos, np.ones((batch, 4), bool))


@pytest.mark.parametrize("kv_len,empty_paged", [(1, False), (3, False), (4, True)])
def test_extend_attention_equals_dense_plus_merge(kv_len, empty_paged):
  """The fused tree-scratch extension equals attention over the scratch merged with the
  paged result (the two-step form it replaces), including rows whose paged part saw
  nothing (lse = NEG_INF) and slots past kv_len holding garbage."""
  rng = np.random.default_rng(kv_len)
  b, m, hq, hkv, d, s = 2, 5, 4, 2, 8, 4
  q = jnp.asarray(rng.standard_normal((b, m, hq, d)), jnp.float32)
  out = jnp.asarray(rng.standard_normal((b, m, hq, d)), jnp.float32)
  lse = jnp.asarray(rng.standard_normal((b, m, hq)), jnp.float32)
  if empty_paged:
    out = out.at[0].set(0.0)
    lse = lse.at[0].set(NEG_INF)
  skv = rng.standard_normal((b, m, s, 2, hkv, d)).astype(np.float32)
  skv[:, :, kv_len:] = 1e4  # never visible: must not leak
  skv = jnp.asarray(skv)
  with jax.default_matmul_precision("highest"):
    o2, l2 = reference.dense_attention(q, skv[:, :, :, 0], skv[:, :, :, 1], kv_len,
                                       scale=0.3)
    want = reference.merge_attention(out, lse, o2, l2)
  got = reference.extend_attention(out, lse, q, skv, kv_len, scale=0.3)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_llm_sets_its_attention_impl_on_a_model_it_is_given():
  """A Transformer handed to LLM runs the attention LLM was asked for, whatever it was
  built with (random_model builds with "xla"; a GPU benchmark of such a model once timed
  XLA's attention under --attention auto)."""
  import jax
  from flax import nnx
  from ssd_jax.config import ModelConfig
  from ssd_jax.llm import LLM
  from ssd_jax.models.transformer import Transformer

  cfg = ModelConfig(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
  for asked in ("pallas", "xla"):
    built = "xla" if asked == "pallas" else "pallas"
    llm = LLM(Transformer(cfg, rngs=nnx.Rngs(0), attention_impl=built), method="ar",
              attention_impl=asked, page_size=8, max_model_len=32, max_batch_size=1)
    runner = llm.target
    model = nnx.merge(runner.graphdef, jax.tree.unflatten(runner._param_tree, runner.params))
    assert [layer.self_attn.attention_impl for layer in model.layers] == [asked, asked]
