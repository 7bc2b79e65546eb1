"""Writes a model back as a HuggingFace checkpoint (the inverse of the loader).

The directory holds config.json, safetensors in HF layout (sharded with an index above
4 GB) and, when given, the tokenizer, so that both `load_model` and
`transformers.AutoModelForCausalLM.from_pretrained` read it. Parameters are gathered to
the host one at a time.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssd_jax.config import ModelConfig
from ssd_jax.checkpoint.layout import param_layouts, var_value
from ssd_jax.checkpoint.safetensors_writer import (MAX_SHARD_BYTES, TensorSpec, chunks_of,
                                                   write_safetensors)


def save_hf_checkpoint(model, cfg: ModelConfig, out_dir: str, tokenizer=None, dtype=None,
                       *, max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
  """Saves `model` (a Transformer) as a HF checkpoint in `out_dir`; returns out_dir.

  dtype: dtype of the written tensors (e.g. "bfloat16"); None keeps each parameter's.
  """
  os.makedirs(out_dir, exist_ok=True)
  state = nnx.state(model, nnx.Param)
  specs = []
  names = []
  for layout, var in param_layouts(state):
    value = var_value(var)
    np_dtype = np.dtype(jnp.dtype(dtype if dtype is not None else value.dtype))
    names.append(np_dtype.name)
    # A fused parameter (q/k/v, gate/up) becomes one HF tensor per part; the parameter is
    # gathered to the host once, when its first part is written, and dropped after the
    # last (tensors are written in order).
    held: dict = {}

    def produce(value=value, part=None, j=0, layout=layout, np_dtype=np_dtype, held=held):
      if "host" not in held:
        host = np.asarray(jax.device_get(value))
        held["host"] = [host] if layout.stack_axis is None else layout.split(host)
      host = held["host"][j]
      if j == len(layout.parts) - 1:
        held.clear()
      yield from chunks_of(part.to_hf(host).astype(np_dtype, copy=False))

    for j, part in enumerate(layout.parts):
      specs.append(TensorSpec(part.hf_name, part.hf_shape, np_dtype,
                              functools.partial(produce, part=part, j=j)))
  write_safetensors(out_dir, specs, max_shard_bytes=max_shard_bytes)
  hf = cfg.to_hf_dict()
  if names:
    hf["torch_dtype"] = max(set(names), key=names.count)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  return out_dir
