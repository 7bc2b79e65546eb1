"""The one table that maps logical axis names to mesh axes.

Models annotate every parameter with logical names (`axes=("embed", "heads", ...)`); this
table decides where each lands. Tensor parallelism splits attention heads, KV heads, the MLP
hidden dimension and the vocabulary over the "tp" mesh axis; the batch splits over "dp".
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

TP, DP = "tp", "dp"

LOGICAL_RULES: dict[str, str | None] = {
    "batch": DP,
    "vocab": TP,
    "embed": None,
    "heads": TP,
    "kv_heads": TP,
    "head_dim": None,
    "mlp": TP,
    # The axis that joins fused parameters (q/k/v, gate/up; models/transformer.py
    # FUSED_PARAMS). Never sharded: each shard must hold every part of its own
    # heads / MLP columns.
    "stack": None,
    "pages": None,
    "page_slot": None,
}


def spec_for(axes: tuple[str | None, ...]) -> P:
  return P(*(LOGICAL_RULES.get(a) if a is not None else None for a in axes))


def sharding_for(mesh, axes) -> NamedSharding:
  return NamedSharding(mesh, spec_for(tuple(axes)))


def param_shardings(mesh, abstract_state):
  """NamedSharding for every parameter of an (abstract) NNX state, from its `axes`."""
  def one(var):
    axes = getattr(var, "axes", None)
    if axes is None:
      axes = (None,) * len(var.value.shape)
    return var.replace(sharding_for(mesh, axes))
  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# KV pools [num_pages, page_size, kv_heads, head_dim]: each TP shard holds its heads.
KV_PAGES_AXES = ("pages", "page_slot", "kv_heads", "head_dim")
# Tree scratch [batch, branches, steps, 2 (K, V), kv_heads, head_dim].
TREE_SCRATCH_AXES = (None, None, None, "stack", "kv_heads", "head_dim")
