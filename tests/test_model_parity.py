"""Logits parity with transformers (PyTorch, float32) through the paged KV cache.

Tiny random checkpoints cover GQA with Llama-3.1 RoPE scaling, tied embeddings and Qwen3
(q/k norms, head_dim != hidden / heads); ragged prefill of two prompts, then decode steps
compared with transformers' forward on the growing sequence. Tensor parallelism (4-way
on virtual CPU devices) must reproduce the single-device logits, and the embedded default
model must decode greedily exactly like transformers' `generate` on the GGUF.
"""

import glob
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import helpers
from ssd_jax.checkpoint import (embedded_gguf_path, load_model, load_tokenizer)
from ssd_jax.sharding.mesh import MeshSpec, make_meshes

PROMPTS = [[1, 5, 9, 22, 7, 3, 40, 11, 13, 17, 60], [1, 30, 4, 8, 2]]  # ragged: 11 and 5
NUM_DECODE = 4
TOL = 1e-5  # max relative error; float32 agreement is about 1e-6


def _hf_from_dir(path):
  import torch
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager", local_files_only=True).eval()


def _compare_with_hf(hf, out):
  errs = []
  for b, prompt in enumerate(PROMPTS):
    ref = helpers.hf_logits(hf, prompt)
    errs.append(helpers.max_rel_err(out["prefill"][b, :len(prompt)], ref))
    seq = list(prompt)
    for s in range(NUM_DECODE):
      seq.append(int(out["tokens"][b, s]))
      ref = helpers.hf_logits(hf, seq)[-1]
      errs.append(helpers.max_rel_err(out["decode"][s, b], ref))
  return max(errs)


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen3"])
def test_prefill_and_decode_logits_match_transformers(tmp_path, kind):
  path = helpers.make_tiny_hf_checkpoint(tmp_path, kind)
  model, cfg = load_model(path)
  spec = helpers.TINY_KINDS[kind]
  assert cfg.model_type == spec["family"] and cfg.head_dim == spec["head_dim"]
  assert cfg.tie_word_embeddings == spec["tie_word_embeddings"]
  assert hasattr(model, "lm_head") == (not cfg.tie_word_embeddings)
  if kind == "llama":
    assert cfg.rope_scaling_dict["factor"] == 8.0 and cfg.num_kv_heads < cfg.num_heads
  if kind == "qwen3":
    assert cfg.qk_norm and cfg.head_dim != cfg.hidden_size // cfg.num_heads
  out = helpers.run_paged(model, cfg, PROMPTS, NUM_DECODE)
  assert _compare_with_hf(_hf_from_dir(path), out) < TOL


def test_attention_bias_checkpoint(tmp_path):
  """HF Llama/Qwen3 attention_bias means q/k/v AND o_proj biases."""
  path = helpers.make_tiny_hf_checkpoint(tmp_path, "llama_bias", tokenizer=False)
  from ssd_jax.checkpoint import CheckpointError
  try:
    model, cfg = load_model(path)
  except CheckpointError as e:
    assert "o_proj.bias" in str(e)
    pytest.skip(f"model has no o_proj bias yet: {e}")
  out = helpers.run_paged(model, cfg, PROMPTS, NUM_DECODE)
  assert _compare_with_hf(_hf_from_dir(path), out) < TOL


def test_tensor_parallel_matches_single_device(tmp_path):
  # The 4-way load reads a sharded index checkpoint: blocks come from several files.
  path = helpers.make_tiny_hf_checkpoint(tmp_path, "tp", max_shard_size="40KB")
  mesh, _ = make_meshes(MeshSpec(tp=4, dp=1))
  m1, cfg = load_model(path)
  m4, _ = load_model(path, mesh=mesh)
  qkv = m4.layers[0].self_attn.qkv_proj[...]
  assert qkv.sharding.spec == P(None, "tp", None, None) and len(qkv.sharding.device_set) == 4
  group = cfg.num_heads // cfg.num_kv_heads
  assert {s.data.shape for s in qkv.addressable_shards} == {
      (cfg.hidden_size, cfg.num_kv_heads // 4, group + 2, cfg.head_dim)}
  assert m4.embed_tokens[...].sharding.spec == P("tp", None)
  assert m4.layers[1].mlp.down_proj[...].sharding.spec == P("tp", None)
  assert m4.norm.weight[...].sharding.is_fully_replicated
  for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m4)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  out1 = helpers.run_paged(m1, cfg, PROMPTS, NUM_DECODE)
  out4 = helpers.run_paged(m4, cfg, PROMPTS, NUM_DECODE, mesh=mesh, forced=out1["tokens"])
  for b, prompt in enumerate(PROMPTS):
    assert helpers.max_rel_err(out4["prefill"][b, :len(prompt)],
                               out1["prefill"][b, :len(prompt)]) < 1e-6
  assert helpers.max_rel_err(out4["decode"], out1["decode"]) < 1e-6
  np.testing.assert_array_equal(out4["tokens"], out1["tokens"])


def test_sharded_index_checkpoint_loads_identically(tmp_path):
  single = helpers.make_tiny_hf_checkpoint(tmp_path, "qwen3")
  sharded = helpers.make_tiny_hf_checkpoint(tmp_path, "qwen3", max_shard_size="20KB")
  assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
  assert len(glob.glob(os.path.join(sharded, "*.safetensors"))) > 2
  m1, c1 = load_model(single)
  m2, c2 = load_model(sharded)
  assert c1 == c2
  for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _chat_prompts(tok):
  chats = [[{"role": "user", "content": "What is the capital of France?"}],
           [{"role": "user", "content": "Write a haiku about the sea."}]]
  prompts = []
  for chat in chats:
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
      ids = ids["input_ids"]
    prompts.append([int(i) for i in ids])
  return prompts


def test_embedded_default_greedy_matches_transformers_gguf():
  import torch
  model, cfg = load_model(None)
  tok = load_tokenizer(None)
  assert cfg.model_type == "llama" and cfg.tie_word_embeddings and cfg.num_layers == 30
  prompts = _chat_prompts(tok)
  assert len(prompts[0]) != len(prompts[1])  # ragged batch
  new = 16
  ours = helpers.greedy_generate(model, cfg, prompts, new)
  hf = helpers.load_gguf_with_transformers(embedded_gguf_path())
  for prompt, mine in zip(prompts, ours):
    ids = torch.tensor([prompt])
    with torch.no_grad():
      ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                        do_sample=False, pad_token_id=tok.pad_token_id)[0, len(prompt):]
    ref = ref.tolist()
    assert len(ref) == new or ref[-1] in cfg.eos_token_ids  # HF stops at EOS; we do not
    assert mine[:len(ref)] == ref, (tok.decode(mine), tok.decode(ref))
