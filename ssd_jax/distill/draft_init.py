"""The draft's architecture, derived from its target, and its initial weights.

A draft shares the target's tokenizer and vocabulary (speculative decoding compares token
ids), so only depth, width and heads are free. With `init_from_target` the draft starts as
a truncated copy of the target: its embeddings, its first `num_layers` decoder layers and
its final norm (and lm_head when the embeddings are untied), which is a much better start
than random weights: the first layers already build the residual stream the final norm and
the (shared) unembedding expect.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
from flax import nnx

from ssd_jax.config import ModelConfig
from ssd_jax.checkpoint.default_draft import (INT8_BLOCK, LAYERS_PREFIX, SCALE_SUFFIX,
                                              assign_params, flat_params, int8_dequantize)
from ssd_jax.checkpoint.layout import fuse_flat, unfuse_flat
from ssd_jax.models.transformer import Transformer


def draft_config(target_cfg: ModelConfig, *, num_layers: int = 4, hidden_size: int | None = None,
                 intermediate_size: int | None = None, num_heads: int | None = None,
                 num_kv_heads: int | None = None, head_dim: int | None = None,
                 model_type: str | None = None) -> ModelConfig:
  """The target's config with the draft's shape; everything token-related is kept."""
  hidden = hidden_size or target_cfg.hidden_size
  heads = num_heads or target_cfg.num_heads
  kv_heads = num_kv_heads or min(target_cfg.num_kv_heads, heads)
  if head_dim is None:
    head_dim = (target_cfg.head_dim if hidden == target_cfg.hidden_size
                and heads == target_cfg.num_heads else hidden // heads)
  if heads % kv_heads:
    raise ValueError(f"draft num_heads={heads} is not a multiple of num_kv_heads={kv_heads}")
  if num_layers < 1:
    raise ValueError("draft needs at least one layer")
  mt = model_type or target_cfg.model_type
  return dataclasses.replace(
      target_cfg,
      model_type=mt,
      num_layers=num_layers,
      hidden_size=hidden,
      intermediate_size=intermediate_size or target_cfg.intermediate_size,
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim,
      qk_norm=(mt == "qwen3"),
  )


def check_init_compatible(target_cfg: ModelConfig, cfg: ModelConfig) -> None:
  """Raises ValueError unless `cfg` can start as a truncated copy of the target."""
  problems = []
  for field in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                "vocab_size", "model_type", "attention_bias", "tie_word_embeddings"):
    if getattr(cfg, field) != getattr(target_cfg, field):
      problems.append(f"{field} {getattr(cfg, field)} != target's {getattr(target_cfg, field)}")
  if cfg.num_layers > target_cfg.num_layers:
    problems.append(f"num_layers {cfg.num_layers} > target's {target_cfg.num_layers}")
  if problems:
    raise ValueError("--init_from_target needs the target's width and heads and at most its "
                     "depth: " + "; ".join(problems))


def build_draft(cfg: ModelConfig, *, target: Transformer | None = None,
                init_from_target: bool = False, dtype=jnp.float32, seed: int = 0,
                attention_impl: str = "xla") -> Transformer:
  """A fresh draft; with `init_from_target`, a truncated copy of `target`.

  Without init the embeddings are still taken from the target when shapes allow (the
  draft shares its vocabulary, and frozen embeddings must equal the target's).
  """
  draft = Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(seed), attention_impl=attention_impl)
  if target is None:
    if init_from_target:
      raise ValueError("init_from_target needs the target model")
    return draft
  src = flat_params(target)
  if init_from_target:
    check_init_compatible(target.cfg, cfg)
    keep = {k: v for k, v in src.items()
            if not k.startswith("layers.") or int(k.split(".")[1]) < cfg.num_layers}
    assign_params(draft, keep, strict=True)
  else:
    emb = src["embed_tokens"]
    if emb.shape == draft.embed_tokens[...].shape:
      assign_params(draft, {"embed_tokens": emb}, strict=False)
  return draft


def int8_quantize(w) -> tuple:
  """(int8 [n_blocks, INT8_BLOCK], float32 scales [n_blocks]) of any array, flattened."""
  import numpy as np
  flat = np.asarray(w, np.float32).reshape(-1)
  flat = np.pad(flat, (0, -flat.size % INT8_BLOCK)).reshape(-1, INT8_BLOCK)
  scale = np.abs(flat).max(axis=1) / 127.0
  q = np.rint(flat / np.where(scale > 0, scale, 1.0)[:, None])
  return np.clip(q, -127, 127).astype(np.int8), scale.astype(np.float32)


def int8_round_trip(flat: dict) -> dict:
  """The float32 weights that int8 storage gives back (vectors and embeddings unchanged).

  A fused parameter is stored as its parts, each quantized on its own (block boundaries
  follow the parts), so it is split, round-tripped part by part and joined again."""
  import numpy as np
  out = {}
  for k, v in flat.items():
    parts = unfuse_flat({k: np.asarray(v, np.float32)})
    parts = {pk: pv if pv.ndim < 2 or pk == "embed_tokens" else int8_dequantize(
        *int8_quantize(pv), pv.shape) for pk, pv in parts.items()}
    out[k] = fuse_flat(parts)[k]
  return out


def save_draft_layers(model: Transformer, cfg: ModelConfig, out_dir: str, *,
                      shard_mb: float = 15, storage: str = "bfloat16",
                      extra: dict | None = None) -> list[str]:
  """Writes every parameter but the embedding as safetensors shards + draft.json."""
  flat = {k: v for k, v in flat_params(model).items() if k != "embed_tokens"}
  return write_draft_layers(flat, cfg, out_dir, shard_mb=shard_mb, storage=storage,
                            extra=extra)


def write_draft_layers(flat: dict, cfg: ModelConfig, out_dir: str, *, shard_mb: float = 15,
                       storage: str = "bfloat16", extra: dict | None = None) -> list[str]:
  """`save_draft_layers` from named arrays (no embedding); shards above shard_mb MB.

  storage "bfloat16": every tensor as bf16. "int8": matrices as int8 blocks plus a
  `<name>.int8_scale` tensor each (their shapes go to draft.json), vectors as float32.
  """
  import numpy as np
  from safetensors.numpy import save_file
  if storage not in ("bfloat16", "int8"):
    raise ValueError(f"draft layer storage {storage!r}: use bfloat16 or int8")
  os.makedirs(out_dir, exist_ok=True)
  # Fused parameters are stored as their HF-named parts (q/k/v_proj, gate_proj, up_proj).
  flat = unfuse_flat({k: np.asarray(v) for k, v in flat.items() if k != "embed_tokens"})
  shapes = {k: list(np.shape(v)) for k, v in flat.items()}
  if storage == "int8":
    packed = {}
    for k, v in flat.items():
      if np.ndim(v) < 2:
        packed[k] = np.asarray(v, np.float32)
      else:
        packed[k], packed[k + SCALE_SUFFIX] = int8_quantize(v)
    flat = packed
  else:
    flat = {k: np.asarray(jnp.asarray(v, jnp.bfloat16)).view(np.uint16)
            for k, v in flat.items()}
  shards, cur, size = [], {}, 0
  for k in sorted(flat):
    nbytes = flat[k].nbytes
    if cur and size + nbytes > shard_mb * 2**20:
      shards.append(cur)
      cur, size = {}, 0
    cur[k] = flat[k]
    size += nbytes
  shards.append(cur)
  for fn in os.listdir(out_dir):
    if fn.startswith(LAYERS_PREFIX) and fn.endswith(".safetensors"):
      os.remove(os.path.join(out_dir, fn))
  files = []
  for i, shard in enumerate(shards):
    fn = (f"{LAYERS_PREFIX}.safetensors" if len(shards) == 1
          else f"{LAYERS_PREFIX}-{i + 1:05d}-of-{len(shards):05d}.safetensors")
    # bf16 is stored through a uint16 view (safetensors.numpy has no bfloat16); the dtype
    # in draft.json says how to read it back.
    save_file(shard, os.path.join(out_dir, fn), metadata={"dtype": storage})
    files.append(fn)
  meta = {"config": cfg.to_hf_dict(), "dtype": storage, "files": files,
          "embedding": "the target's (frozen); joined by ensure_default_draft()",
          **({"shapes": shapes} if storage == "int8" else {}), **(extra or {})}
  with open(os.path.join(out_dir, "draft.json"), "w") as f:
    json.dump(meta, f, indent=2, sort_keys=True)
  return files


