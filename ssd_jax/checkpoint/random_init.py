"""Random weights at real sizes: straight onto the devices, or streamed into a HF checkpoint.

`random_model` draws every parameter on its devices, already sharded (one jitted draw per
parameter with `out_shardings`), so an 8B or 70B model never exists on the host.
`write_random_hf_checkpoint` streams a random HF checkpoint to disk one tensor chunk at a
time with numpy, so that a PyTorch peer and this engine can load the same weights on a
machine without much RAM. `REAL_SHAPES` holds the true hyperparameters of the models the
benchmarks use.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ssd_jax.config import ModelConfig
from ssd_jax.checkpoint.abstract import (abstract_model, check_mesh, materialize,
                                         param_sharding)
from ssd_jax.checkpoint.layout import param_layouts
from ssd_jax.checkpoint.safetensors_writer import MAX_SHARD_BYTES, TensorSpec, write_safetensors

INIT_STD = 0.02


def _llama3(factor: float):
  return (("factor", factor), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
          ("original_max_position_embeddings", 8192))


_LLAMA3 = dict(model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
               max_position_embeddings=131072, bos_token_id=128000,
               eos_token_ids=(128001, 128008, 128009))
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, head_dim=128, rms_norm_eps=1e-6,
              rope_theta=1000000.0, qk_norm=True, max_position_embeddings=40960,
              bos_token_id=151643, eos_token_ids=(151645, 151643))

# True HF hyperparameters (config.json of the Instruct releases; eos ids as in their
# generation_config.json).
REAL_SHAPES: dict[str, ModelConfig] = {
    "llama-3.2-1b": ModelConfig(**_LLAMA3, hidden_size=2048, intermediate_size=8192,
                                num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                                rope_scaling=_llama3(32.0), tie_word_embeddings=True),
    "llama-3.2-3b": ModelConfig(**_LLAMA3, hidden_size=3072, intermediate_size=8192,
                                num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128,
                                rope_scaling=_llama3(32.0), tie_word_embeddings=True),
    "llama-3.1-8b": ModelConfig(**_LLAMA3, hidden_size=4096, intermediate_size=14336,
                                num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                                rope_scaling=_llama3(8.0)),
    "llama-3.1-70b": ModelConfig(**_LLAMA3, hidden_size=8192, intermediate_size=28672,
                                 num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                                 rope_scaling=_llama3(8.0)),
    # The embedded real target (its GGUF's config): random weights of its shape time the
    # real pair's programs (e.g. forced cache hits) without carrying the 98 MB file.
    "smollm2-135m": ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576,
                                intermediate_size=1536, num_layers=30, num_heads=9,
                                num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
                                rope_theta=100000.0, max_position_embeddings=8192,
                                tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
    "qwen3-0.6b": ModelConfig(**_QWEN3, hidden_size=1024, intermediate_size=3072,
                              num_layers=28, num_heads=16, num_kv_heads=8,
                              tie_word_embeddings=True),
    "qwen3-1.7b": ModelConfig(**_QWEN3, hidden_size=2048, intermediate_size=6144,
                              num_layers=28, num_heads=16, num_kv_heads=8,
                              tie_word_embeddings=True),
    "qwen3-4b": ModelConfig(**_QWEN3, hidden_size=2560, intermediate_size=9728,
                            num_layers=36, num_heads=32, num_kv_heads=8,
                            tie_word_embeddings=True),
    "qwen3-8b": ModelConfig(**_QWEN3, hidden_size=4096, intermediate_size=12288,
                            num_layers=36, num_heads=32, num_kv_heads=8),
    "qwen3-32b": ModelConfig(**_QWEN3, hidden_size=5120, intermediate_size=25600,
                             num_layers=64, num_heads=64, num_kv_heads=8),
}


@functools.lru_cache(maxsize=None)
def _group_drawer(specs: tuple, dtype):
  """One jitted draw of a group of parameters (a decoder layer), each in its sharding.

  specs: ((shape, kind, sharding), ...). All layers share one compiled program.
  """
  def draw(keys):
    out = []
    for j, (shape, kind, _) in enumerate(specs):
      if kind == "norm":
        out.append(jnp.ones(shape, dtype))
      elif kind == "bias":
        out.append(jnp.zeros(shape, dtype))
      else:
        out.append((INIT_STD * jax.random.normal(keys[j], shape, jnp.float32)).astype(dtype))
    return out
  return jax.jit(draw, out_shardings=[sh for _, _, sh in specs])


def random_model(cfg: ModelConfig, *, dtype=jnp.bfloat16, mesh=None, seed: int = 0,
                 attention_impl: str = "xla"):
  """A Transformer with random weights (normal(0, 0.02); norms 1; biases 0) on devices.

  Parameters are drawn by jitted functions whose output shardings are the parameters'
  (one program per decoder layer, shared by all layers, plus one for the rest), so
  nothing is built on the host and peak memory is about the model itself. Parameter i
  uses key fold_in(key(seed, impl="rbg"), i); values are reproducible for one seed and
  mesh, not across meshes.
  """
  dtype = jnp.dtype(dtype)
  graphdef, abstract_state = abstract_model(cfg, dtype, mesh, attention_impl)
  layouts = param_layouts(abstract_state)
  check_mesh(cfg, mesh, layouts)
  # RBG keys: XLA's RngBitGenerator compiles far faster than threefry (seconds per
  # program on CPU) and draws each shard on its own device. Values depend on the mesh.
  root = jax.random.key(seed, impl="rbg")
  groups: dict = {}
  for i, (layout, var) in enumerate(layouts):
    group = layout.path[1] if layout.path[0] == "layers" else "rest"
    groups.setdefault(group, []).append((i, layout, var))
  arrays = {}
  for members in groups.values():
    specs = tuple((layout.shape, layout.kind, param_sharding(mesh, var, layout.shape))
                  for _, layout, var in members)
    keys = jnp.stack([jax.random.fold_in(root, i) for i, _, _ in members])
    for (i, _, _), x in zip(members, _group_drawer(specs, dtype)(keys)):
      arrays[i] = x

  return materialize(graphdef, abstract_state, cfg, lambda i, layout, var: arrays[i])


_NP_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32),
              "float16": np.dtype(np.float16)}


def write_random_hf_checkpoint(cfg: ModelConfig, out_dir: str, dtype: str = "bfloat16",
                               seed: int = 0, *,
                               max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
  """Writes a random-weight HF checkpoint (config.json + safetensors, sharded with an
  index above `max_shard_bytes`), generating and writing one chunk at a time.

  Weights are normal(0, 0.02), norms 1, biases 0; chunk c of tensor i comes from the
  numpy generator seeded with (seed, i, c), drawn by a thread pool, so the bytes depend
  only on (cfg, dtype, seed). Returns out_dir.
  """
  if dtype not in _NP_DTYPES:
    raise ValueError(f"dtype {dtype!r}: use one of {', '.join(_NP_DTYPES)}")
  np_dtype = _NP_DTYPES[dtype]
  _, abstract_state = abstract_model(cfg, jnp.float32, None, "xla")
  os.makedirs(out_dir, exist_ok=True)
  # numpy's generators release the GIL, so threads draw chunks in parallel.
  workers = max(1, min(16, os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    specs = []
    parts = [part for layout, _ in param_layouts(abstract_state) for part in layout.parts]
    for i, part in enumerate(parts):  # i: the HF tensor's index, part of its seed
      specs.append(TensorSpec(part.hf_name, part.hf_shape, np_dtype,
                              functools.partial(_random_chunks, part.hf_shape, part.kind,
                                                np_dtype, seed, i, pool, 2 * workers)))
    write_safetensors(out_dir, specs, max_shard_bytes=max_shard_bytes)
  hf = cfg.to_hf_dict()
  hf["torch_dtype"] = dtype
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  return out_dir


_CHUNK = 1 << 22  # elements per independently seeded chunk (fixed: part of the output)


def _draw_chunk(seed, index, chunk, m, np_dtype):
  x = np.random.default_rng([seed, index, chunk]).standard_normal(m, dtype=np.float32)
  x *= INIT_STD
  return x.astype(np_dtype)


def _random_chunks(shape, kind, np_dtype, seed, index, pool=None, window_size=1):
  """Yields tensor `index` in chunks; chunk c comes from generator (seed, index, c), so
  the bytes do not depend on how many threads drew them."""
  n = int(np.prod(shape))
  if kind != "weight":
    yield np.full(n, 1.0 if kind == "norm" else 0.0, np_dtype)
    return
  starts = range(0, n, _CHUNK)
  jobs = ((c, min(_CHUNK, n - s)) for c, s in enumerate(starts))
  if pool is None:
    for c, m in jobs:
      yield _draw_chunk(seed, index, c, m, np_dtype)
    return
  window = collections.deque()
  for c, m in jobs:  # keep a bounded number of chunks in flight, yield them in order
    window.append(pool.submit(_draw_chunk, seed, index, c, m, np_dtype))
    if len(window) >= window_size:
      yield window.popleft().result()
  while window:
    yield window.popleft().result()
