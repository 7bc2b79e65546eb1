"""A model's shapes without its memory: build abstractly, then fill each parameter.

`nnx.eval_shape` traces the constructor so nothing is allocated; every parameter is then
created directly as a (possibly sharded) device array by a caller-given function: read
from a checkpoint (`safetensors_loader`) or drawn at random on the devices (`random_init`).
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx
from jax.sharding import SingleDeviceSharding

from ssd_jax.config import ModelConfig
from ssd_jax.models.rope import rope_frequencies
from ssd_jax.models.transformer import Transformer
from ssd_jax.sharding.mesh import MeshError, check_model_fits
from ssd_jax.sharding.rules import sharding_for
from ssd_jax.checkpoint.layout import TensorLayout, layout_for, state_path, var_value


def abstract_model(cfg: ModelConfig, dtype, mesh, attention_impl: str):
  """(graphdef, abstract state) of the Transformer; no parameter memory is allocated."""
  del mesh  # the model knows no mesh; parameters are placed by `param_sharding`
  try:
    model = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, rngs=_ConstantKeys(),
                                               attention_impl=attention_impl))
  except (TypeError, AttributeError):  # the model wants a real nnx.Rngs
    model = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0),
                                               attention_impl=attention_impl))
  return nnx.split(model)


class _ConstantKeys:
  """Stands in for nnx.Rngs while only shapes are traced: every stream gives one key.

  (A real nnx.Rngs increments a counter Variable per draw, and under tracing each
  increment costs milliseconds in flax; a 70B model draws thousands of times.)
  """

  def __getattr__(self, name):
    if name.startswith("_"):
      raise AttributeError(name)
    return self

  def __call__(self):
    return jax.random.key(0)


def param_sharding(mesh, var, shape) -> jax.sharding.Sharding:
  """Where a parameter lives: the rules' NamedSharding, or device 0 without a mesh."""
  if mesh is None:
    return SingleDeviceSharding(jax.devices()[0])
  axes = getattr(var, "axes", None) or (None,) * len(shape)
  return sharding_for(mesh, axes)


def check_mesh(cfg: ModelConfig, mesh, layouts) -> None:
  """Every sharded dimension must divide evenly over its mesh axis (one clear line if not)."""
  if mesh is None:
    return
  check_model_fits(cfg, mesh)
  for layout, var in layouts:
    sharding = param_sharding(mesh, var, layout.shape)
    for dim, (n, axis) in enumerate(zip(layout.shape, sharding.spec)):
      names = axis if isinstance(axis, tuple) else (axis,)
      size = 1
      for a in names:
        if a is not None:
          size *= mesh.shape[a]
      if n % size:
        logical = (getattr(var, "axes", None) or (None,) * len(layout.shape))[dim]
        raise MeshError(f"{'.'.join(map(str, layout.path))}: dimension {dim} ({logical}) of "
                        f"size {n} is not divisible by mesh axis {axis}={size}")


def materialize(graphdef, abstract_state, cfg: ModelConfig,
                make_param: Callable[[int, TensorLayout, object], jax.Array]) -> Transformer:
  """Merges the graph with real values: `make_param(i, layout, var)` for each parameter.

  Array attributes of the model that are not nnx.Variables (RoPE's `inv_freq`) come out
  of `nnx.eval_shape` abstract; they are recomputed here from the config.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
      abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  values, i = [], 0
  for kp, leaf in leaves:
    path = state_path(kp)
    if isinstance(leaf, nnx.Param):
      layout = layout_for(path, var_value(leaf).shape)
      values.append(leaf.replace(make_param(i, layout, leaf)))
      i += 1
    elif isinstance(leaf, nnx.Variable):
      raise TypeError(f"model variable {'.'.join(map(str, path))} of type "
                      f"{type(leaf).__name__} has no checkpoint mapping")
    elif path and path[-1] == "inv_freq":
      values.append(rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict))
    elif isinstance(leaf, jax.ShapeDtypeStruct):
      raise TypeError(f"model attribute {'.'.join(map(str, path))} is an array outside "
                      "nnx.Param; the loader cannot recreate it")
    else:
      values.append(leaf)
  return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, values))

