"""Tiny random models for engine tests: a target and drafts that agree with it to
different degrees (so both SSD cache hits and misses really happen)."""

import jax
import jax.numpy as jnp
from flax import nnx

from ssd_jax.config import ModelConfig
from ssd_jax.models.transformer import Transformer

VOCAB = 96
EOS = VOCAB - 1


def tiny_config(layers=2, model_type="llama", vocab=VOCAB, heads=4, kv_heads=2):
  return ModelConfig(model_type=model_type, vocab_size=vocab, hidden_size=32,
                     intermediate_size=64, num_layers=layers, num_heads=heads,
                     num_kv_heads=kv_heads, head_dim=8, eos_token_ids=(vocab - 1,),
                     qk_norm=model_type == "qwen3")


def tiny_target(seed=0, **kw):
  return Transformer(tiny_config(**kw), rngs=nnx.Rngs(seed))


def scaled_target(seed=0, scale=8.0, **kw):
  """A target with sharper logits (a larger final norm), so it is not near-uniform."""
  model = tiny_target(seed, **kw)
  model.norm.weight[...] = model.norm.weight[...] * scale
  return model


def noisy_copy(model, noise, seed=1):
  """The same architecture and weights plus Gaussian noise: a draft that agrees with
  the target often but not always."""
  graphdef, state = nnx.split(model)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + noise * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype)
            if x.ndim >= 2 else x for x, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))
