"""Where each model parameter lives in a HuggingFace checkpoint, and how its layout differs.

Our parameters are split per head for sharding (q_proj [embed, heads, head_dim], o_proj
[heads, head_dim, embed], ...) while HF stores `nn.Linear` weights as [out, in]. Every
parameter is described by one `TensorLayout`: our array is the HF tensor reshaped to
`split` and transposed by `perm`. A fused parameter (K and V, gate and up: one GEMM
each, `FUSED_PARAMS` in models/transformer.py) is a `StackedLayout`: several such HF
tensors stacked along one (never sharded) axis. The loader, the exporter and the
random-checkpoint writer all use this one table, so they cannot drift apart; each of them
reads or writes `layout.parts`, the HF tensors of a parameter, one at a time; `fuse_flat`
and `unfuse_flat` apply the same map to {dotted name: array} dicts.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import nnx

from ssd_jax.models.transformer import FUSED_PARAMS

# Linear weights whose first `n` of our axes are the input side (HF's second dim);
# the remaining axes are the output side (HF's first dim), split per head where needed.
# k/v and gate/up are the parts of fused parameters (StackedLayout), laid out as if alone.
_LINEAR_IN_AXES = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1,
                   "up_proj": 1, "down_proj": 1, "lm_head": 1}
_BIASES = {"q_bias": "q_proj", "k_bias": "k_proj", "v_bias": "v_proj", "o_bias": "o_proj"}


@dataclasses.dataclass(frozen=True)
class TensorLayout:
  """ours = hf.reshape(split).transpose(perm); `groups[i]` split axes make HF dim i."""
  path: tuple            # our parameter path, e.g. ("layers", 3, "self_attn", "q_proj")
  hf_name: str           # e.g. "model.layers.3.self_attn.q_proj.weight"
  hf_shape: tuple
  split: tuple
  perm: tuple
  groups: tuple

  @property
  def shape(self) -> tuple:
    return tuple(self.split[p] for p in self.perm)

  @property
  def kind(self) -> str:
    """'norm' (init to ones), 'bias' (zeros) or 'weight' (random) for random init."""
    leaf = self.path[-1]
    if leaf in _BIASES:
      return "bias"
    if leaf == "weight":  # RMSNorm scales are the only `weight` leaves
      return "norm"
    return "weight"

  def hf_spec(self, ours_spec: tuple):
    """The partition spec of the HF tensor whose blocks become our blocks under `ours_spec`
    without moving data between devices; None if an inner (minor) axis of a split HF dim
    is sharded, which no HF-layout sharding can express."""
    split_spec = [None] * len(self.split)
    for i, s in enumerate(ours_spec):
      split_spec[self.perm[i]] = s
    out, axis = [], 0
    for n in self.groups:
      if any(split_spec[a] is not None for a in range(axis + 1, axis + n)):
        return None
      out.append(split_spec[axis])
      axis += n
    return tuple(out)

  @property
  def parts(self) -> tuple["TensorLayout", ...]:
    """The HF tensors this parameter is made of: itself."""
    return (self,)

  stack_axis = None  # not stacked (see StackedLayout)

  @property
  def is_identity(self) -> bool:
    return self.split == self.hf_shape and self.perm == tuple(range(len(self.perm)))

  def to_hf(self, ours: np.ndarray) -> np.ndarray:
    """Inverse of the load transform: our array -> HF tensor."""
    return np.ascontiguousarray(np.transpose(ours, np.argsort(self.perm)).reshape(self.hf_shape))

  def from_hf(self, hf: np.ndarray) -> np.ndarray:
    return np.transpose(hf.reshape(self.split), self.perm)

  def hf_slices(self, index: tuple) -> tuple[tuple, tuple]:
    """For a block `index` (slices over our axes): HF slices to read, and the slices to
    apply after `reshape` to the split layout (the part a contiguous HF read cannot do)."""
    ours_shape = self.shape
    split_sl = [None] * len(self.split)
    for i, sl in enumerate(index):
      split_sl[self.perm[i]] = slice(*sl.indices(ours_shape[i])[:2])
    hf_sl, post = [], []
    axis = 0
    for n in self.groups:
      axes = range(axis, axis + n)
      inner = math.prod(self.split[a] for a in axes[1:])
      first = split_sl[axis]
      hf_sl.append(slice(first.start * inner, first.stop * inner))
      post.append(slice(None))
      post.extend(split_sl[a] for a in axes[1:])
      axis += n
    return tuple(hf_sl), tuple(post)

  def read_block(self, hf_block: np.ndarray, post: tuple) -> np.ndarray:
    """HF block (read with `hf_slices`) -> our block for `index`."""
    # Reshape the HF block to the split layout; the first axis of each group is partial.
    shape, axis = [], 0
    for g, n in enumerate(self.groups):
      inner = math.prod(self.split[axis + 1: axis + n])
      shape.append(hf_block.shape[g] // inner)
      shape.extend(self.split[axis + 1: axis + n])
      axis += n
    block = hf_block.reshape(shape)[post]
    return np.transpose(block, self.perm)


@dataclasses.dataclass(frozen=True)
class StackedLayout:
  """A parameter made of HF tensors stacked along `stack_axis` of ours.

  parts[j] is the layout of the j-th HF tensor (e.g. k_proj, then v_proj), as if it were a
  parameter of our shape without the stacking axis; ours[..., j, ...] (j on stack_axis)
  is that part. The stacking axis is never sharded (logical name "stack"), so a device's
  block of ours is the stack of the same block of every part.
  """
  path: tuple
  shape: tuple
  stack_axis: int
  parts: tuple

  @property
  def kind(self) -> str:
    return self.parts[0].kind

  def part_spec(self, ours_spec: tuple) -> tuple:
    """Our partition spec without the stacking axis: the spec of each part."""
    ours_spec = tuple(ours_spec) + (None,) * (len(self.shape) - len(ours_spec))
    if ours_spec[self.stack_axis] is not None:
      raise ValueError(f"{'.'.join(map(str, self.path))}: the stacking axis must not be "
                       f"sharded (spec {ours_spec})")
    return ours_spec[:self.stack_axis] + ours_spec[self.stack_axis + 1:]

  def part_index(self, index: tuple) -> tuple[tuple, tuple]:
    """For a block `index` of ours: (the parts it covers, the index into each part)."""
    index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
    return (self.parts[index[self.stack_axis]],
            index[:self.stack_axis] + index[self.stack_axis + 1:])


def _key(k):
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return getattr(k, attr)
  raise TypeError(f"unexpected pytree key {k!r}")


def state_path(keypath) -> tuple:
  """A jax key path of an NNX state leaf -> tuple of str/int."""
  return tuple(_key(k) for k in keypath)


def layout_for(path: tuple, shape: tuple) -> TensorLayout | StackedLayout:
  """The HF name(s) and layout of one of our parameters, given its path and shape."""
  shape = tuple(int(s) for s in shape)
  if path and path[-1] in FUSED_PARAMS:
    names, axis = FUSED_PARAMS[path[-1]]
    if len(shape) <= axis or shape[axis] != len(names):
      raise KeyError(f"{'.'.join(map(str, path))}: shape {shape} does not stack "
                     f"{len(names)} tensors on axis {axis}")
    part_shape = shape[:axis] + shape[axis + 1:]
    parts = tuple(layout_for(path[:-1] + (name,), part_shape) for name in names)
    return StackedLayout(path, shape, axis, parts)
  ident = lambda name: TensorLayout(path, name, shape, shape, tuple(range(len(shape))),
                                    (1,) * len(shape))
  if path == ("embed_tokens",):
    return ident("model.embed_tokens.weight")
  if path == ("norm", "weight"):
    return ident("model.norm.weight")
  if len(path) >= 3 and path[0] == "layers":
    prefix = f"model.layers.{int(path[1])}."
    rest = path[2:]
    leaf = rest[-1]
    if leaf == "weight":  # RMSNorm scale (input/post-attention, q_norm, k_norm)
      return ident(prefix + ".".join(rest))
    if leaf in _BIASES:
      name = prefix + ".".join(rest[:-1] + (_BIASES[leaf], "bias"))
      return TensorLayout(path, name, (math.prod(shape),), shape, tuple(range(len(shape))),
                          (len(shape),))
    if leaf in _LINEAR_IN_AXES:
      return _linear(path, prefix + ".".join(rest) + ".weight", shape, _LINEAR_IN_AXES[leaf])
  if path == ("lm_head",):
    return _linear(path, "lm_head.weight", shape, 1)
  raise KeyError(f"no HuggingFace name known for model parameter {'.'.join(map(str, path))}")


def _linear(path, name, shape, n_in) -> TensorLayout:
  ins, outs = shape[:n_in], shape[n_in:]
  split = outs + ins
  perm = tuple(range(len(outs), len(split))) + tuple(range(len(outs)))
  hf_shape = (math.prod(outs), math.prod(ins))
  return TensorLayout(path, name, hf_shape, split, perm, (len(outs), len(ins)))


def is_param(x) -> bool:
  return isinstance(x, nnx.Param)


def param_layouts(abstract_state) -> list[tuple[TensorLayout | StackedLayout, object]]:
  """(layout, Param) for every nnx.Param of a (possibly abstract) model state, in order."""
  leaves = jax.tree_util.tree_flatten_with_path(
      abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  out = []
  for kp, var in leaves:
    if is_param(var):
      out.append((layout_for(state_path(kp), var_value(var).shape), var))
  return out


def var_value(var):
  """The value of an nnx.Variable (array or ShapeDtypeStruct), across flax versions."""
  if hasattr(var, "get_value"):
    return var.get_value()
  return var.value


# -- the same map for named host arrays (the bundled draft's files, distillation) --------
def unfuse_flat(flat: dict) -> dict:
  """{dotted name: array} with each fused parameter split into its HF-named parts
  ('layers.0.self_attn.kv_proj' -> '...k_proj' and '...v_proj'); other names unchanged."""
  out = {}
  for name, value in flat.items():
    prefix, _, leaf = name.rpartition(".")
    if leaf not in FUSED_PARAMS:
      out[name] = value
      continue
    parts, axis = FUSED_PARAMS[leaf]
    for j, part in enumerate(parts):
      out[f"{prefix}.{part}" if prefix else part] = np.take(np.asarray(value), j, axis=axis)
  return out


def fuse_flat(flat: dict) -> dict:
  """The inverse of `unfuse_flat`: stacks HF-named parts into the model's fused names.
  Raises KeyError when only some parts of a fused parameter are present."""
  part_of = {part: (fused, j) for fused, (parts, _) in FUSED_PARAMS.items()
             for j, part in enumerate(parts)}
  out, groups = {}, {}
  for name, value in flat.items():
    prefix, _, leaf = name.rpartition(".")
    if leaf not in part_of:
      out[name] = value
      continue
    fused, j = part_of[leaf]
    groups.setdefault((prefix, fused), {})[j] = value
  for (prefix, fused), got in groups.items():
    parts, axis = FUSED_PARAMS[fused]
    name = f"{prefix}.{fused}" if prefix else fused
    if len(got) != len(parts):
      missing = [p for j, p in enumerate(parts) if j not in got]
      raise KeyError(f"{name}: parts {missing} missing")
    out[name] = np.stack([np.asarray(got[j]) for j in range(len(parts))], axis=axis)
  return out
