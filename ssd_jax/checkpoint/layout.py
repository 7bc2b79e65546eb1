"""Where each model parameter lives in a HuggingFace checkpoint, and how its layout differs.

Our parameters are split per head for sharding (q_proj [embed, heads, head_dim], o_proj
[heads, head_dim, embed], ...) while HF stores `nn.Linear` weights as [out, in]. Every
parameter is described by one `TensorLayout`: our array is the HF tensor reshaped to
`split` and transposed by `perm`. A fused parameter (Q, K and V, gate and up: one GEMM
each, `FUSED_PARAMS` in models/transformer.py) is a `FusedLayout`: several such HF
tensors side by side along one (never sharded) axis. The loader, the exporter and the
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
# q/k/v and gate/up are the parts of fused parameters (FusedLayout), laid out as if alone.
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

  stack_axis = squeezed = None  # not fused (see FusedLayout)

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
class FusedLayout:
  """A parameter made of HF tensors side by side along `stack_axis` of ours.

  parts[j] is the layout of the j-th HF tensor (e.g. q_proj, k_proj, v_proj), as if it
  were a parameter of its own: with the stacking axis, `widths[j]` wide, if it is the
  fused parameter's `wide` part, and without it (one slot) otherwise (`squeezed[j]`). The
  stacking axis is never sharded (logical name "stack"), so a device's block of ours is
  the same block of every part, side by side.
  """
  path: tuple
  shape: tuple
  stack_axis: int
  parts: tuple
  squeezed: tuple

  @property
  def kind(self) -> str:
    return self.parts[0].kind

  @property
  def widths(self) -> tuple:
    return tuple(1 if sq else p.shape[self.stack_axis]
                 for p, sq in zip(self.parts, self.squeezed))

  def part_spec(self, ours_spec: tuple, j: int) -> tuple:
    """The partition spec of part j, given ours."""
    ours_spec = tuple(ours_spec) + (None,) * (len(self.shape) - len(ours_spec))
    if ours_spec[self.stack_axis] is not None:
      raise ValueError(f"{'.'.join(map(str, self.path))}: the stacking axis must not be "
                       f"sharded (spec {ours_spec})")
    if not self.squeezed[j]:
      return ours_spec
    return ours_spec[:self.stack_axis] + ours_spec[self.stack_axis + 1:]

  def part_index(self, index: tuple) -> list[tuple[int, tuple]]:
    """For a block `index` of ours: [(j, the index into part j)] for the parts it covers,
    in order along the stacking axis."""
    a = self.stack_axis
    index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
    lo, hi = index[a].indices(self.shape[a])[:2]
    out, start = [], 0
    for j, width in enumerate(self.widths):
      first, last = max(lo, start), min(hi, start + width)
      if first < last:
        inner = () if self.squeezed[j] else (slice(first - start, last - start),)
        out.append((j, index[:a] + inner + index[a + 1:]))
      start += width
    return out

  def join(self, blocks: list, js: list, xp=np):
    """Blocks of parts `js` (as `part_index` lists them) -> the block of ours."""
    return xp.concatenate([xp.expand_dims(b, self.stack_axis) if self.squeezed[j] else b
                           for b, j in zip(blocks, js)], axis=self.stack_axis)

  def split(self, ours: np.ndarray) -> list:
    """Our array -> each part's array, in its own layout."""
    return _split_fused(ours, self.stack_axis, self.widths, self.squeezed)


def _key(k):
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return getattr(k, attr)
  raise TypeError(f"unexpected pytree key {k!r}")


def state_path(keypath) -> tuple:
  """A jax key path of an NNX state leaf -> tuple of str/int."""
  return tuple(_key(k) for k in keypath)


def layout_for(path: tuple, shape: tuple) -> TensorLayout | FusedLayout:
  """The HF name(s) and layout of one of our parameters, given its path and shape."""
  shape = tuple(int(s) for s in shape)
  if path and path[-1] in FUSED_PARAMS:
    fused = FUSED_PARAMS[path[-1]]
    widths = _fused_widths(path, shape)
    parts = [layout_for(path[:-1] + (name,),
                        shape[:fused.axis] + ((w,) if name == fused.wide else ())
                        + shape[fused.axis + 1:])
             for name, w in zip(fused.parts, widths)]
    return FusedLayout(path, shape, fused.axis, tuple(parts),
                       tuple(name != fused.wide for name in fused.parts))
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


def _fused_widths(path: tuple, shape: tuple) -> tuple:
  """How many slots of the fused axis each part of fused parameter `path[-1]` takes."""
  fused = FUSED_PARAMS[path[-1]]
  narrow = len(fused.parts) - (fused.wide is not None)
  wide = shape[fused.axis] - narrow if len(shape) > fused.axis else -1
  if wide < (1 if fused.wide else 0) or (fused.wide is None and wide):
    raise KeyError(f"{'.'.join(map(str, path))}: shape {shape} does not fuse "
                   f"{', '.join(fused.parts)} on axis {fused.axis}")
  return tuple(wide if name == fused.wide else 1 for name in fused.parts)


def _split_fused(ours: np.ndarray, axis: int, widths: tuple, squeezed: tuple) -> list:
  out, start = [], 0
  for width, sq in zip(widths, squeezed):
    piece = np.take(ours, np.arange(start, start + width), axis=axis)
    out.append(np.squeeze(piece, axis) if sq else piece)
    start += width
  return out


def _linear(path, name, shape, n_in) -> TensorLayout:
  ins, outs = shape[:n_in], shape[n_in:]
  split = outs + ins
  perm = tuple(range(len(outs), len(split))) + tuple(range(len(outs)))
  hf_shape = (math.prod(outs), math.prod(ins))
  return TensorLayout(path, name, hf_shape, split, perm, (len(outs), len(ins)))


def is_param(x) -> bool:
  return isinstance(x, nnx.Param)


def param_layouts(abstract_state) -> list[tuple[TensorLayout | FusedLayout, object]]:
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
# There each part has the shape it has as a parameter of its own: the wide part's
# stacking axis merged into the axis before it (q_proj [embed, heads, head_dim]).
def unfuse_flat(flat: dict) -> dict:
  """{dotted name: array} with each fused parameter split into its HF-named parts
  ('layers.0.self_attn.qkv_proj' -> '...q_proj', '...k_proj', '...v_proj'); other names
  unchanged."""
  out = {}
  for name, value in flat.items():
    prefix, _, leaf = name.rpartition(".")
    if leaf not in FUSED_PARAMS:
      out[name] = value
      continue
    fused, value = FUSED_PARAMS[leaf], np.asarray(value)
    squeezed = tuple(part != fused.wide for part in fused.parts)
    widths = _fused_widths(tuple(name.split(".")), value.shape)
    pieces = _split_fused(value, fused.axis, widths, squeezed)
    for part, piece, sq in zip(fused.parts, pieces, squeezed):
      if not sq:
        a = fused.axis
        piece = piece.reshape(piece.shape[:a - 1] + (-1,) + piece.shape[a + 1:])
      out[f"{prefix}.{part}" if prefix else part] = piece
  return out


def fuse_flat(flat: dict) -> dict:
  """The inverse of `unfuse_flat`: joins HF-named parts into the model's fused names.
  Raises KeyError when only some parts of a fused parameter are present."""
  part_of = {part: (fused, j) for fused, f in FUSED_PARAMS.items()
             for j, part in enumerate(f.parts)}
  out, groups = {}, {}
  for name, value in flat.items():
    prefix, _, leaf = name.rpartition(".")
    if leaf not in part_of:
      out[name] = value
      continue
    fused, j = part_of[leaf]
    groups.setdefault((prefix, fused), {})[j] = value
  for (prefix, fused), got in groups.items():
    f = FUSED_PARAMS[fused]
    name = f"{prefix}.{fused}" if prefix else fused
    if len(got) != len(f.parts):
      missing = [p for j, p in enumerate(f.parts) if j not in got]
      raise KeyError(f"{name}: parts {missing} missing")
    pieces = []
    for j, part in enumerate(f.parts):
      piece = np.asarray(got[j])
      if part == f.wide:  # [.., heads, ..] -> [.., kv_heads, group, ..], kv_heads from K
        narrow = np.shape(got[(j + 1) % len(f.parts)])
        piece = piece.reshape(narrow[:f.axis] + (-1,) + narrow[f.axis:])
      else:
        piece = np.expand_dims(piece, f.axis)
      pieces.append(piece)
    out[name] = np.concatenate(pieces, axis=f.axis)
  return out
