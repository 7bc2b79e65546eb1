"""Draft distillation on a tiny random target (CPU, seconds)."""

import dataclasses
import functools
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssd_jax.config import ModelConfig
from ssd_jax.checkpoint import default_draft
from ssd_jax.distill import corpus, draft_init, train
from ssd_jax.models.transformer import Transformer

CFG = ModelConfig(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  tie_word_embeddings=True, eos_token_ids=(1,), rope_theta=10000.0)
B, T = 4, 16


@functools.lru_cache(maxsize=None)
def tiny_target():
  """A random target whose layers matter (weights scaled up from the init's 0.02).

  Built once: eager model construction is most of a tiny test's time on a busy CPU.
  """
  m = Transformer(CFG, rngs=nnx.Rngs(0))
  flat = default_draft.flat_params(m)
  flat = {k: (v * 8.0 if k.startswith("layers.") and v.ndim > 1 else v)
          for k, v in flat.items()}
  default_draft.assign_params(m, flat)
  return m


def token_batches(seed=0):
  toks = np.random.default_rng(seed).integers(2, CFG.vocab_size, size=B * T * 64)
  return corpus.ArrayBatches(toks, B, T, seed=seed)


def make_dist(target, steps=12, init_from_target=False, ckpt_every=0):
  dcfg = draft_init.draft_config(CFG, num_layers=1)
  draft = draft_init.build_draft(dcfg, target=target, init_from_target=init_from_target,
                                 seed=1)
  tc = train.TrainConfig(steps=steps, lr=1e-2, warmup_steps=2, log_every=0,
                         ckpt_every=ckpt_every)
  return train.Distiller(target, draft, tc)


def test_init_from_target_copies_first_layers():
  target = tiny_target()
  draft = draft_init.build_draft(draft_init.draft_config(CFG, num_layers=1), target=target,
                                 init_from_target=True)
  t, d = default_draft.flat_params(target), default_draft.flat_params(draft)
  assert set(d) == {k for k in t if not k.startswith("layers.1.")}
  for k in d:
    np.testing.assert_array_equal(d[k], t[k])
  with pytest.raises(ValueError):
    draft_init.check_init_compatible(CFG, draft_init.draft_config(CFG, num_layers=3))


def test_training_reduces_kl_and_keeps_embeddings_frozen():
  target = tiny_target()
  dist = make_dist(target, steps=40)
  held = [token_batches(seed=9).get(0)]
  before = dist.evaluate(held)["kl"]
  hist = train.train_loop(dist, token_batches())
  after = dist.evaluate(held)["kl"]
  assert len(hist) == 40
  assert after < 0.7 * before, (before, after)
  assert "embed_tokens" not in dist.params
  np.testing.assert_array_equal(dist.draft_model().embed_tokens[...], target.embed_tokens[...])


def test_resume_continues_the_same_run(tmp_path):
  target = tiny_target()
  full = train.train_loop(make_dist(target, steps=6), token_batches())
  ckpt = str(tmp_path / "ckpt")
  first = train.train_loop(make_dist(target, steps=6, ckpt_every=3), token_batches(),
                           ckpt_dir=ckpt, stop_after=3)
  resumed_dist = make_dist(target, steps=6, ckpt_every=3)
  rest = train.train_loop(resumed_dist, token_batches(), ckpt_dir=ckpt, resume=True)
  assert [h["step"] for h in first + rest] == list(range(1, 7))
  np.testing.assert_allclose([h["loss"] for h in first + rest], [h["loss"] for h in full],
                             rtol=1e-6, atol=1e-7)


def test_stop_after_seconds_leaves_a_resumable_run(tmp_path):
  target = tiny_target()
  full = train.train_loop(make_dist(target, steps=4), token_batches())
  ckpt = str(tmp_path / "ckpt")
  dist = make_dist(target, steps=4)
  dist.tc = dataclasses.replace(dist.tc, log_every=1)
  first = train.train_loop(dist, token_batches(), ckpt_dir=ckpt, stop_after_s=1e-9,
                           log=lambda m: None)
  assert len(first) == 1  # stopped at the first progress line, with a checkpoint
  rest = train.train_loop(make_dist(target, steps=4), token_batches(), ckpt_dir=ckpt,
                          resume=True)
  assert [h["step"] for h in first + rest] == [1, 2, 3, 4]
  np.testing.assert_allclose([h["loss"] for h in first + rest], [h["loss"] for h in full],
                             rtol=1e-6, atol=1e-7)


def test_simulate_acceptance():
  agree = np.array([1, 1, 0, 1, 1, 1, 1, 1, 0, 0], bool)
  acc, rounds = train.simulate_acceptance(agree, 4)
  # round 1: 2 accepted (+1 correction) -> j=3; round 2: 4 accepted (+bonus) -> j=8;
  # round 3: 0 -> j=9; round 4: 0 -> j=10.
  assert acc == [2, 4, 0, 0] and rounds == 4
  rep = train.acceptance_report([agree], ks=(4,))
  assert rep["K=4"]["mean_accepted_draft_tokens"] == 1.5
  assert rep["K=4"]["tokens_per_round"] == 2.5


def test_acceptance_of_target_as_its_own_draft_is_full():
  # Also checks that the plain causal forward agrees with cached greedy generation.
  target = tiny_target()
  rep, _ = train.estimate_acceptance(target, target, [[5, 6, 7], [9, 10, 11, 12]], max_new=16,
                                     ks=(4,), batch_size=2)
  assert rep["greedy_token_agreement"] == 1.0


def test_draft_layers_and_export_round_trip(tmp_path):
  checkpoint = pytest.importorskip("ssd_jax.checkpoint")
  export = pytest.importorskip("ssd_jax.checkpoint.export")
  if not hasattr(checkpoint, "load_model"):
    pytest.skip("ssd_jax.checkpoint.load_model not available")
  target = tiny_target()
  dist = make_dist(target, steps=3)
  train.train_loop(dist, token_batches())
  draft = dist.draft_model(jnp.float32)
  dcfg = draft.cfg
  tokens = jnp.asarray(token_batches(seed=5).get(0))
  ref = np.asarray(train.causal_forward(draft, tokens))
  # export -> reload with our loader: identical logits
  out = str(tmp_path / "draft_hf")
  export.save_hf_checkpoint(draft, dcfg, out, dtype=jnp.float32)
  loaded, lcfg = checkpoint.load_model(out, dtype=jnp.float32)
  assert lcfg.num_layers == 1
  np.testing.assert_array_equal(np.asarray(train.causal_forward(loaded, tokens)), ref)
  # repo format (layers only, bf16) + the target's embedding -> a full HF dir
  tdir = str(tmp_path / "target_hf")
  export.save_hf_checkpoint(target, CFG, tdir, dtype=jnp.float32)
  layers = str(tmp_path / "layers")
  draft_init.save_draft_layers(draft, dcfg, layers, shard_mb=0.01)
  assert len([f for f in os.listdir(layers) if f.endswith(".safetensors")]) > 1
  full = default_draft.build_full_draft(layers, str(tmp_path / "full"), target_path=tdir,
                                     dtype=jnp.float32, with_tokenizer=False)
  rebuilt, _ = checkpoint.load_model(full, dtype=jnp.float32)
  np.testing.assert_array_equal(rebuilt.embed_tokens[...], target.embed_tokens[...])
  bf16 = {k: np.asarray(jnp.asarray(v, jnp.bfloat16).astype(jnp.float32))
          for k, v in default_draft.flat_params(draft).items() if k != "embed_tokens"}
  got = default_draft.flat_params(rebuilt)
  for k, v in bf16.items():
    np.testing.assert_array_equal(np.asarray(got[k]), v)


def test_corpus_streams_and_holds_out_humaneval():
  probs = corpus.humaneval_problems()
  assert len(probs) == 164 and "prompt" in probs[0]
  docs = corpus.iter_documents(split="train")
  seen = 0
  for doc_id, text in docs:
    assert "HumanEval" not in text and "human_eval" not in doc_id
    seen += 1
    if seen == 20:
      break
  assert seen == 20
  held = [d for d, _ in zip(corpus.iter_documents(split="heldout", heldout_frac=0.05), range(5))]
  assert all(corpus.is_heldout(d, 0.05) for d, _ in held)
  packed = list(corpus.pack(iter([[1] * 10, [2] * 30, [3] * 25]), 2, 8))
  assert len(packed) == 4 and packed[0].shape == (2, 8) and packed[0].dtype == np.int32
  a, b = token_batches(), token_batches()
  np.testing.assert_array_equal(a.get(70), b.get(70))


def test_token_file_round_trip(tmp_path):
  path = str(tmp_path / "t.u16")
  n = corpus.write_token_file(path, iter([[1, 2, 3], [40000, 5]]), max_tokens=4)
  assert n == 4
  assert corpus.open_token_file(path).tolist() == [1, 2, 3, 40000]


def test_default_draft_files_fit_the_embedded_target():
  src = os.path.join(default_draft.drafts_dir(), default_draft.DEFAULT_DRAFT_NAME)
  if not os.path.isfile(os.path.join(src, "draft.json")):
    pytest.skip("no default draft in this checkout")
  cfg, flat = default_draft.load_draft_layers(src)
  assert (cfg.vocab_size, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (49152, 576, 9, 3)
  assert "embed_tokens" not in flat and cfg.tie_word_embeddings
  draft = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # shapes only
  state = nnx.state(draft, nnx.Param)
  shapes = {".".join(map(str, p)): tuple(v.get_value().shape)
            for p, v in nnx.to_flat_state(state)}
  shapes.pop("embed_tokens")
  assert shapes == {k: tuple(v.shape) for k, v in flat.items()}
  assert sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src)) < 40 * 2**20


def test_int8_draft_layers_store_what_the_round_trip_says(tmp_path):
  rng = np.random.default_rng(0)
  flat = {"layers.0.mlp.down_proj": rng.normal(0, 0.05, (48, 40)).astype(np.float32),
          "layers.0.input_layernorm.weight": rng.normal(1, 0.1, (40,)).astype(np.float32),
          "layers.0.self_attn.qkv_proj": rng.normal(0, 0.05, (40, 2, 3 + 2, 7)).astype(np.float32)}
  rt = draft_init.int8_round_trip(flat)
  # blocks of 32 with a scale each: error within half a step of the block's scale; the
  # fused qkv_proj is quantized as its stored parts, q_proj, k_proj and v_proj
  for k, v in flat.items():
    err = np.abs(rt[k] - v).max()
    assert err <= (np.abs(v).max() / 127 / 2 + 1e-7 if v.ndim > 1 else 0), k
  k_part = flat["layers.0.self_attn.qkv_proj"][:, :, 3]
  np.testing.assert_array_equal(rt["layers.0.self_attn.qkv_proj"][:, :, 3],
                                default_draft.int8_dequantize(*draft_init.int8_quantize(k_part),
                                                           k_part.shape))
  out = str(tmp_path / "layers")
  draft_init.write_draft_layers(flat, CFG, out, storage="int8")
  cfg, loaded = default_draft.load_draft_layers(out)
  assert cfg.num_layers == CFG.num_layers
  assert set(loaded) == set(flat)
  for k in flat:
    np.testing.assert_array_equal(loaded[k], rt[k])
  size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
             if f.endswith(".safetensors"))
  assert size < sum(v.size for v in flat.values()) * 2  # smaller than bf16
  with pytest.raises(ValueError, match="use bfloat16 or int8"):
    draft_init.write_draft_layers(flat, CFG, out, storage="fp4")
