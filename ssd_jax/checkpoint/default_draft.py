"""The bundled default draft: package data joined with its target's embedding on first use.

A draft with frozen embeddings shares them with its target, so the package keeps only the
other weights (safetensors under ssd_jax/drafts/, in the engine's own names and shapes,
except that fused parameters are stored as their separate HF-named parts: q_proj, k_proj
and v_proj, not qkv_proj) plus a json with the config. `ensure_default_draft` joins them
with the target's embedding into a full HuggingFace dir in the cache on first use. The
writing side (training, int8 packing) is ssd_jax.distill's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssd_jax.checkpoint.cache import cache_root
from ssd_jax.config import ModelConfig
from ssd_jax.checkpoint.layout import fuse_flat
from ssd_jax.models.transformer import Transformer

DEFAULT_DRAFT_NAME = "smollm2-135m-draft"
LAYERS_PREFIX = "draft_layers"

# int8 storage: each matrix, flattened, in blocks of INT8_BLOCK values with one float32
# scale per block (max |w| / 127), the scheme GGUF calls Q8_0. Half the bytes of bf16, and
# the draft's agreement with its target is measured on the round-tripped weights. Vectors
# (norm weights) are few bytes and stay float32.
INT8_BLOCK = 32
SCALE_SUFFIX = ".int8_scale"



def drafts_dir() -> str:
  """Where the bundled drafts live: package data, so an installed wheel has them too."""
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "drafts")


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
  """{'layers.0.self_attn.q_proj': array, ...}: the model's parameters by dotted name."""
  state = nnx.state(model, nnx.Param)
  return {".".join(str(k) for k in path): var[...] for path, var in nnx.to_flat_state(state)}


def assign_params(model: nnx.Module, flat: dict[str, jax.Array], *, strict: bool = True) -> None:
  """Sets the model's parameters in place from `flat` (names as in `flat_params`)."""
  state = nnx.state(model, nnx.Param)
  seen = set()
  for path, var in nnx.to_flat_state(state):
    name = ".".join(str(k) for k in path)
    if name not in flat:
      if strict:
        raise KeyError(f"missing parameter {name}")
      continue
    value = jnp.asarray(flat[name])
    if value.shape != var[...].shape:
      raise ValueError(f"{name}: shape {value.shape} != model's {var[...].shape}")
    var[...] = jnp.array(value, var[...].dtype, copy=True)
    seen.add(name)
  if strict:
    extra = set(flat) - seen
    if extra:
      raise KeyError(f"unexpected parameters: {sorted(extra)[:5]}")


def int8_dequantize(q, scale, shape) -> "np.ndarray":
  flat = (q.astype(np.float32) * scale[:, None]).reshape(-1)
  return flat[:int(np.prod(shape))].reshape(shape)


def load_draft_layers(src_dir: str) -> tuple[ModelConfig, dict]:
  """(config, {name: array}) from a `save_draft_layers` directory, in the model's names
  (int8 dequantized; the stored q/k/v and gate/up parts joined into the fused parameters)."""
  import ml_dtypes
  from safetensors.numpy import load_file
  with open(os.path.join(src_dir, "draft.json")) as f:
    meta = json.load(f)
  cfg = ModelConfig.from_hf_dict(meta["config"], source=os.path.join(src_dir, "draft.json"))
  storage = meta.get("dtype", "bfloat16")
  raw = {}
  for fn in meta["files"]:
    raw.update(load_file(os.path.join(src_dir, fn)))
  flat = {}
  for k, v in raw.items():
    if k.endswith(SCALE_SUFFIX):
      continue
    if storage == "bfloat16":
      flat[k] = v.view(ml_dtypes.bfloat16)
    elif v.dtype == "int8":
      flat[k] = int8_dequantize(v, raw[k + SCALE_SUFFIX], tuple(meta["shapes"][k]))
    else:
      flat[k] = v
  return cfg, fuse_flat(flat)


def _digest(src_dir: str) -> str:
  h = hashlib.sha256()
  for fn in sorted(os.listdir(src_dir)):
    if fn.endswith((".safetensors", ".json")):
      h.update(fn.encode())
      with open(os.path.join(src_dir, fn), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          h.update(chunk)
  return h.hexdigest()[:12]


def build_full_draft(src_dir: str, out_dir: str, *, target_path: str | None = None,
                     dtype=jnp.bfloat16, with_tokenizer: bool = True) -> str:
  """Joins draft layers with the target's embedding into a HuggingFace dir at out_dir."""
  from ssd_jax.checkpoint.export import save_hf_checkpoint
  from ssd_jax.checkpoint.loader import load_model, load_tokenizer
  cfg, flat = load_draft_layers(src_dir)
  target, tcfg = load_model(target_path, dtype=jnp.float32)
  if tcfg.vocab_size != cfg.vocab_size or tcfg.hidden_size != cfg.hidden_size:
    raise ValueError(f"{src_dir}: draft does not fit the target (vocab/hidden "
                     f"{cfg.vocab_size}/{cfg.hidden_size} vs {tcfg.vocab_size}/"
                     f"{tcfg.hidden_size})")
  flat = dict(flat)
  flat["embed_tokens"] = target.embed_tokens[...]
  draft = Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
  assign_params(draft, {k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})
  del target
  tmp = out_dir + f".tmp{os.getpid()}"
  if os.path.isdir(tmp):
    shutil.rmtree(tmp)
  tok = load_tokenizer(target_path) if with_tokenizer else None
  save_hf_checkpoint(draft, cfg, tmp, tokenizer=tok, dtype=dtype)
  if os.path.isdir(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)
  return out_dir


def ensure_default_draft(name: str = DEFAULT_DRAFT_NAME) -> str:
  """The default draft of the embedded target as a HuggingFace dir (built once, cached).

  The dir lives under $SSD_JAX_CACHE (default ~/.cache/ssd_jax)/drafts/, keyed by a hash of
  the bundled draft files, so an updated draft is rebuilt and later calls are instant.
  """
  src = os.path.join(drafts_dir(), name)
  if not os.path.isfile(os.path.join(src, "draft.json")):
    raise FileNotFoundError(f"no default draft at {src}")
  out = os.path.join(cache_root(), "drafts", f"{name}-{_digest(src)}")
  if os.path.isfile(os.path.join(out, "config.json")):
    return out
  os.makedirs(os.path.dirname(out), exist_ok=True)
  return build_full_draft(src, out)
