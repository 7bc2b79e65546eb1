"""One entry point from a path (HF directory, .gguf file, or None) to a model on devices."""

from __future__ import annotations

import os

import jax.numpy as jnp

from ssd_jax.config import ModelConfig
from ssd_jax.checkpoint.errors import CheckpointError
from ssd_jax.checkpoint.safetensors_loader import read_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def resolve_model_dir(path) -> str:
  """The HF directory to read for `path`: itself, a GGUF's cache, or the embedded default."""
  if path is None:
    from ssd_jax.checkpoint.embedded import embedded_model_dir
    return embedded_model_dir()
  path = check_source(path)
  if os.path.isfile(path):
    from ssd_jax.checkpoint import embedded
    from ssd_jax.checkpoint.gguf import ensure_converted
    if _same_file(path, embedded.embedded_gguf_path):
      return embedded.embedded_model_dir()  # one cache for the embedded model
    return ensure_converted(path)
  return path


def check_source(path) -> str:
  """The cheap checks of a model path (exists; a .gguf file or a directory with a
  config.json), reading nothing else: run before any model is loaded, so that a bad
  --draft fails at once, not after the target has loaded. Returns the expanded path."""
  path = os.path.expanduser(os.fspath(path))
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file or directory; expected a HuggingFace model "
                          "directory (config.json + *.safetensors) or a .gguf file")
  if os.path.isfile(path):
    if path.lower().endswith(".gguf"):
      return path
    raise CheckpointError(f"{path}: is a file but not a .gguf; expected a HuggingFace model "
                          "directory (config.json + *.safetensors) or a .gguf file")
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise CheckpointError(f"{path}: no config.json; expected a HuggingFace model directory "
                          "(config.json + *.safetensors)")
  return path


def _same_file(path, other_fn) -> bool:
  try:
    return os.path.samefile(path, other_fn())
  except (CheckpointError, OSError):
    return False


def load_model(path, *, dtype=jnp.float32, mesh=None, attention_impl: str = "xla"):
  """Loads a Llama-3 / Qwen3 checkpoint into a Transformer on `mesh` (or device 0).

  Args:
    path: HF directory (model.safetensors, or an index + shards), a .gguf file (converted
      once to a cached directory), or None for the embedded SmolLM2-135M-Instruct.
    dtype: parameter dtype; the file's values are cast to it.
    mesh: a (dp, tp) mesh; each parameter is sharded by its logical axes. None puts every
      parameter on jax.devices()[0].
    attention_impl: passed to the model ("xla", "pallas", "auto").

  Returns (model, config). Raises CheckpointError (one line naming the file and what was
  expected) for missing/broken checkpoints, ConfigError for unsupported configurations.
  """
  model_dir = resolve_model_dir(path)
  cfg = ModelConfig.from_dir(model_dir)
  model = read_model(model_dir, cfg, dtype=jnp.dtype(dtype), mesh=mesh,
                     attention_impl=attention_impl)
  return model, cfg


def load_tokenizer(path):
  """The HF tokenizer stored with a model (`path` as for `load_model`); local files only."""
  model_dir = resolve_model_dir(path)
  if not any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
    raise CheckpointError(f"{model_dir}: no tokenizer files; expected "
                          f"{' or '.join(TOKENIZER_FILES[:2])} next to the model")
  from transformers import AutoTokenizer
  try:
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
  except Exception as e:
    msg = " ".join(str(e).split())[:500]
    raise CheckpointError(f"{model_dir}: tokenizer could not be loaded "
                          f"({type(e).__name__}: {msg})") from None
