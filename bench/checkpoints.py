"""The models a benchmark runs: a checkpoint path as given, a random-weight checkpoint of a
real model's shape (written once, reused), or tiny in-memory models (`--engine tiny`)."""

from __future__ import annotations

import json
import os
import time

from bench.errors import BenchError


def random_shapes() -> dict:
  """REAL_SHAPES and, for CPU dry runs of the GPU scripts, TINY_SHAPES."""
  from ssd_jax.checkpoint.random_init import REAL_SHAPES
  return {**REAL_SHAPES, **tiny_shapes()}


def tiny_shapes() -> dict:
  """Shapes small enough to serve on a 2-core CPU, written like the real ones (a dry run of
  a GPU script goes through the same checkpoint, loading and serving code)."""
  from ssd_jax.config import ModelConfig
  return {"tiny-llama": ModelConfig(model_type="llama", vocab_size=512, hidden_size=64,
                                    intermediate_size=128, num_layers=2, num_heads=4,
                                    num_kv_heads=2, head_dim=16, max_position_embeddings=2048,
                                    bos_token_id=1, eos_token_ids=(2,))}


def ensure_random_checkpoint(name: str, root: str, dtype: str = "bfloat16", seed: int = 0,
                             log=print) -> str:
  """Directory of a random-weight HF checkpoint with the shape of `name` (a key of
  REAL_SHAPES), written under `root` unless a complete one is already there."""
  shapes = random_shapes()
  if name not in shapes:
    raise BenchError(f"unknown shape {name!r}; known: {', '.join(sorted(shapes))}")
  out = os.path.join(root, f"{name}-{dtype}-seed{seed}")
  marker = os.path.join(out, ".ssd_jax_random_complete")
  want = {"shape": name, "dtype": dtype, "seed": seed}
  if os.path.isfile(marker):
    try:
      with open(marker) as f:
        if json.load(f) == want:
          log(f"[bench] reusing random checkpoint {out}")
          return out
    except (OSError, json.JSONDecodeError):
      pass
  from ssd_jax.checkpoint.random_init import write_random_hf_checkpoint
  os.makedirs(out, exist_ok=True)
  t0 = time.perf_counter()
  write_random_hf_checkpoint(shapes[name], out, dtype=dtype, seed=seed)
  with open(marker, "w") as f:
    json.dump(want, f)
  log(f"[bench] wrote random checkpoint {name} ({dtype}, seed {seed}) to {out} in "
      f"{time.perf_counter() - t0:.1f}s")
  return out


def resolve_model(path: str | None, *, random_weights: bool, ckpt_root: str, seed: int,
                  log=print) -> tuple[str | None, str | None]:
  """(path to load, shape name or None). With random_weights a REAL_SHAPES name becomes a
  written checkpoint (bf16); an existing path is used as is; None is the engine's
  embedded default."""
  if path is None:
    return None, None
  if random_weights and not os.path.exists(path):
    return ensure_random_checkpoint(path, ckpt_root, "bfloat16", seed, log), path
  if not os.path.exists(path):
    raise BenchError(f"model {path!r} does not exist")
  return path, None


def tiny_model(seed: int = 0):
  """A 2-layer random Transformer (vocab 96, hidden 32, GQA 4/2 heads) in float32, with a
  sharpened final norm so that its greedy picks are not near-ties: the CPU stand-in for
  a target. Used as its own draft, every draft token is accepted and every SSD lookup
  hits, so a dry run goes through SD's and SSD's accepting paths."""
  from flax import nnx
  from ssd_jax.config import ModelConfig
  from ssd_jax.models.transformer import Transformer
  cfg = ModelConfig(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    eos_token_ids=(95,))
  model = Transformer(cfg, rngs=nnx.Rngs(seed))
  model.norm.weight[...] = model.norm.weight[...] * 8.0
  return model
