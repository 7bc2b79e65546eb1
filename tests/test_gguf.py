"""GGUF files: conversion to HF safetensors without torch, equal to transformers' own
loader, round trips of tiny files written as llama.cpp writes them, errors, the cache."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

import helpers
from ssd_jax.checkpoint import CheckpointError, load_model, load_tokenizer
from ssd_jax.checkpoint import embedded, gguf


def test_gguf_cache_is_reused(monkeypatch):
  cache = embedded.embedded_model_dir()  # converts once if this cache is cold
  marker = os.path.join(cache, gguf.MARKER)
  stamp = os.stat(marker).st_mtime_ns

  def no_conversion(*a, **k):
    raise AssertionError("GGUF reconverted although the cache is complete")

  monkeypatch.setattr(gguf, "_convert_into", no_conversion)
  assert embedded.embedded_model_dir() == cache
  # The GGUF path itself maps to the same cache (no second conversion elsewhere).
  _, cfg = load_model(embedded.embedded_gguf_path())
  assert cfg.vocab_size == 49152 and cfg.num_layers == 30
  assert os.stat(marker).st_mtime_ns == stamp
  assert load_tokenizer(None).encode("Hello") == load_tokenizer(cache).encode("Hello")


def test_gguf_conversion_is_atomic(tmp_path, monkeypatch):
  """A failed conversion leaves nothing; a broken cache dir is replaced; a good one kept."""
  monkeypatch.setenv("SSD_JAX_CACHE", str(tmp_path / "cache"))
  src = tmp_path / "m.gguf"
  src.write_bytes(b"GGUF" + b"\0" * 60)
  calls = []

  def fake(path, out, dtype):
    calls.append(out)
    with open(os.path.join(out, "config.json"), "w") as f:
      f.write("{}")
    if len(calls) == 1:
      raise RuntimeError("interrupted")
    with open(os.path.join(out, gguf.MARKER), "w") as f:
      json.dump({"source_name": "m.gguf", "source_size": 64}, f)

  monkeypatch.setattr(gguf, "_convert_into", fake)
  out = gguf.gguf_cache_dir(str(src))
  with pytest.raises(RuntimeError):
    gguf.ensure_converted(str(src))
  assert not os.path.exists(out) and os.listdir(os.path.dirname(out)) == []
  os.makedirs(out)  # a broken leftover without the completion marker
  assert gguf.ensure_converted(str(src)) == out and len(calls) == 2
  assert gguf.is_converted(out, str(src))
  assert gguf.ensure_converted(str(src)) == out and len(calls) == 2  # reused
  assert sorted(os.listdir(os.path.dirname(out))) == [os.path.basename(out)]


# -------------------------------------------------------------------- GGUF conversion

# ssd_jax/checkpoint/gguf.py -> the root of the checkout under test
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(gguf.__file__))))


@pytest.fixture(scope="module")
def torch_free_conversion(tmp_path_factory):
  """The embedded GGUF converted in a subprocess in which `import torch` fails."""
  out = str(tmp_path_factory.mktemp("gguf") / "smollm2")
  code = ("import sys\n"
          "sys.modules['torch'] = None  # from here on, importing torch raises\n"
          "from ssd_jax.checkpoint import embedded, gguf\n"
          f"gguf.convert_gguf(embedded.embedded_gguf_path(), {out!r})\n"
          "assert sys.modules['torch'] is None\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [_REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                     timeout=900)
  assert r.returncode == 0, r.stderr[-4000:]
  return out, r.stderr


def test_gguf_conversion_needs_no_torch(torch_free_conversion):
  out, stderr = torch_free_conversion
  assert "converting SmolLM2-135M-Instruct.Q4_1.gguf" in stderr  # the progress message
  assert "no tokenizer converted" not in stderr and "no generation_config" not in stderr
  for f in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            gguf.MARKER):
    assert os.path.isfile(os.path.join(out, f)), f
  assert gguf.is_converted(out, embedded.embedded_gguf_path())
  _, cfg = load_model(out)
  assert cfg.model_type == "llama" and cfg.num_layers == 30 and cfg.tie_word_embeddings
  assert load_tokenizer(out).decode(load_tokenizer(out).encode("Hello there")) == "Hello there"


def test_gguf_conversion_matches_transformers(torch_free_conversion, tmp_path):
  """Every tensor bit-exact, the config, generation config and tokenizer as transformers'
  (torch) GGUF loader gives them for the embedded model."""
  pytest.importorskip("torch")
  import transformers
  out, _ = torch_free_conversion
  path = embedded.embedded_gguf_path()
  ref = helpers.load_gguf_with_transformers(path)
  expected = {k: v.numpy() for k, v in ref.state_dict().items()}
  assert ref.config.tie_word_embeddings
  expected.pop("lm_head.weight")  # tied: the embedding, not stored twice
  ours = load_file(os.path.join(out, "model.safetensors"))
  assert sorted(ours) == sorted(expected)
  for k, v in expected.items():
    assert ours[k].dtype == np.float32 and ours[k].shape == v.shape, k
    np.testing.assert_array_equal(ours[k], v, err_msg=k)

  ref_config = gguf._clean_config(ref.config)
  ref_config["dtype"] = "float32"
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f) == json.loads(json.dumps(ref_config))  # (json keys are strings)
  ref.generation_config.save_pretrained(tmp_path)
  with open(os.path.join(out, "generation_config.json")) as f, \
       open(os.path.join(tmp_path, "generation_config.json")) as g:
    assert json.load(f) == json.load(g)

  ref_tok = transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), local_files_only=True)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.backend_tokenizer.to_str() == ref_tok.backend_tokenizer.to_str()
  assert tok.special_tokens_map == ref_tok.special_tokens_map
  assert tok.chat_template == ref_tok.chat_template
  chat = [{"role": "user", "content": "Hi! Café, 12345 naïve\n\ttabs <|im_end|>"}]
  for text in ("Hello world", "  leading spaces, ünïcödé and 12345", chat[0]["content"]):
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
  assert (tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
          == ref_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))


def _llama_cpp_permute(w, n_head):
  """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (HF rows -> GGUF rows)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def _write_tiny_gguf(path, kind, qtype_name, *, arch=None, extra=None, drop=None):
  """A tiny random GGUF as llama.cpp would write it; returns {HF name: expected float32}.

  2-D weights are stored as `qtype_name`, vectors as F32. llama's q/k rows are permuted
  as llama.cpp does; the expected values are the HF-layout weights after the same
  quantization round trip (row-wise, so it commutes with the row permutation).
  """
  import gguf as gguf_pkg
  from gguf import GGMLQuantizationType as Q
  k = helpers.TINY_KINDS[kind]
  family, arch = k["family"], arch or k["family"]
  V, H, I, L = k["vocab_size"], k["hidden_size"], k["intermediate_size"], k["num_hidden_layers"]
  nh, nkv, hd = k["num_attention_heads"], k["num_key_value_heads"], k["head_dim"]
  entries = [("model.embed_tokens.weight", "token_embd.weight", (V, H))]
  for i in range(L):
    p, b = f"model.layers.{i}.", f"blk.{i}."
    entries += [(p + "self_attn.q_proj.weight", b + "attn_q.weight", (nh * hd, H)),
                (p + "self_attn.k_proj.weight", b + "attn_k.weight", (nkv * hd, H)),
                (p + "self_attn.v_proj.weight", b + "attn_v.weight", (nkv * hd, H)),
                (p + "self_attn.o_proj.weight", b + "attn_output.weight", (H, nh * hd))]
    if family == "qwen3":
      entries += [(p + "self_attn.q_norm.weight", b + "attn_q_norm.weight", (hd,)),
                  (p + "self_attn.k_norm.weight", b + "attn_k_norm.weight", (hd,))]
    entries += [(p + "mlp.gate_proj.weight", b + "ffn_gate.weight", (I, H)),
                (p + "mlp.up_proj.weight", b + "ffn_up.weight", (I, H)),
                (p + "mlp.down_proj.weight", b + "ffn_down.weight", (H, I)),
                (p + "input_layernorm.weight", b + "attn_norm.weight", (H,)),
                (p + "post_attention_layernorm.weight", b + "ffn_norm.weight", (H,))]
  entries.append(("model.norm.weight", "output_norm.weight", (H,)))
  if not k["tie_word_embeddings"]:
    entries.append(("lm_head.weight", "output.weight", (V, H)))
  w = gguf_pkg.GGUFWriter(str(path), arch)
  w.add_block_count(L)
  w.add_context_length(k["max_position_embeddings"])
  w.add_embedding_length(H)
  w.add_feed_forward_length(I)
  w.add_head_count(nh)
  w.add_head_count_kv(nkv)
  if family == "llama":
    w.add_rope_dimension_count(hd)
  else:
    w.add_key_length(hd)
    w.add_value_length(hd)
  w.add_rope_freq_base(k["rope_theta"])
  w.add_layer_norm_rms_eps(k["rms_norm_eps"])
  w.add_vocab_size(V)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  rng = np.random.default_rng(0)
  expected = {}
  for hf_name, g_name, shape in entries:
    if g_name == drop:
      continue
    if len(shape) == 1:
      x = (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
      expected[hf_name] = x
      w.add_tensor(g_name, x)
      continue
    x = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    qtype = Q[qtype_name]
    stored = x
    if family == "llama" and g_name.endswith(("attn_q.weight", "attn_k.weight")):
      stored = _llama_cpp_permute(x, nh if "attn_q" in g_name else nkv)
    if qtype_name == "F64":
      w.add_tensor(g_name, stored.astype(np.float64))
      expected[hf_name] = x
    elif qtype in (Q.F32, Q.F16):
      w.add_tensor(g_name, gguf_pkg.quants.quantize(stored, qtype))
      expected[hf_name] = gguf_pkg.quants.quantize(x, qtype).astype(np.float32)
    else:
      w.add_tensor(g_name, gguf_pkg.quants.quantize(stored, qtype), raw_dtype=qtype)
      expected[hf_name] = gguf_pkg.quants.dequantize(gguf_pkg.quants.quantize(x, qtype), qtype)
  if extra:
    w.add_tensor(extra, np.zeros(H, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return expected


@pytest.mark.parametrize("kind,qtype", [("llama", "Q8_0"), ("llama_tied", "Q4_1"),
                                        ("qwen3", "F16"), ("qwen3", "F32")])
def test_gguf_conversion_round_trip(tmp_path, kind, qtype):
  """llama (GQA q/k un-permuted, untied and tied) and qwen3 (q/k norms, head_dim != hidden /
  heads): the converted tensors are the original HF weights (after the quantization)."""
  src = tmp_path / "m.gguf"
  expected = _write_tiny_gguf(src, kind, qtype)
  out = gguf.convert_gguf(str(src), str(tmp_path / "out"))
  ours = load_file(os.path.join(out, "model.safetensors"))
  assert sorted(ours) == sorted(expected)
  for k, v in expected.items():
    np.testing.assert_array_equal(ours[k], v, err_msg=k)
  _, cfg = load_model(out)
  t = helpers.TINY_KINDS[kind]
  assert (cfg.model_type, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.tie_word_embeddings,
          cfg.intermediate_size, cfg.rope_theta) == (
              t["family"], t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"],
              t["tie_word_embeddings"], t["intermediate_size"], t["rope_theta"])


@pytest.mark.parametrize("change,message", [
    (dict(arch="gpt2"), "GGUF architecture 'gpt2' is not supported"),
    (dict(extra="blk.0.attn_q.bias"), "has no parameter for: blk.0.attn_q.bias"),
    (dict(drop="blk.1.ffn_up.weight"), "GGUF lacks tensor(s) blk.1.ffn_up.weight"),
    (dict(qtype_name="F64"), "GGUF type F64 cannot be dequantized"),
])
def test_gguf_conversion_errors(tmp_path, change, message):
  src = tmp_path / "m.gguf"
  _write_tiny_gguf(src, "llama_tied", **{"qtype_name": "F32", **change})
  with pytest.raises(CheckpointError) as e:
    gguf.ensure_converted(str(src), str(tmp_path / "out"))
  assert message in str(e.value)
  assert not os.path.exists(tmp_path / "out")


# ---------------------------------------------------------------------------- export
