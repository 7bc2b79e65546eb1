"""Checkpoints: HF safetensors / GGUF / the embedded default in, HF safetensors out.

  load_model(path, dtype=, mesh=, attention_impl=) -> (Transformer, ModelConfig)
  load_tokenizer(path)                     -> transformers tokenizer (local files only)
  save_hf_checkpoint(model, cfg, out_dir, tokenizer=None, dtype=None)
  random_model(cfg, dtype=, mesh=, seed=)  -> Transformer with random sharded weights
  write_random_hf_checkpoint(cfg, out_dir, dtype="bfloat16", seed=0)
  REAL_SHAPES[name]                        -> ModelConfig of a real model size
  ensure_default_draft()                   -> the bundled draft of the embedded model (HF dir)
"""

from ssd_jax.checkpoint.errors import CheckpointError
from ssd_jax.checkpoint.loader import load_model, load_tokenizer, resolve_model_dir
from ssd_jax.checkpoint.export import save_hf_checkpoint
from ssd_jax.checkpoint.random_init import REAL_SHAPES, random_model, write_random_hf_checkpoint
from ssd_jax.checkpoint.embedded import embedded_gguf_path, embedded_model_dir
from ssd_jax.checkpoint.cache import cache_root
from ssd_jax.checkpoint.default_draft import ensure_default_draft
from ssd_jax.checkpoint.gguf import ensure_converted

__all__ = ["CheckpointError", "load_model", "load_tokenizer", "resolve_model_dir",
           "save_hf_checkpoint", "REAL_SHAPES", "random_model", "write_random_hf_checkpoint",
           "embedded_gguf_path", "embedded_model_dir", "cache_root", "ensure_converted",
           "ensure_default_draft"]
