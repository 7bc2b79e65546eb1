"""Reads a HuggingFace safetensors checkpoint straight into (sharded) device arrays.

Every parameter is created with `jax.make_array_from_callback`: for each device's block
the callback reads only that block's rows/columns from the memory-mapped file
(`safe_open(...).get_slice`), converts the HF layout to ours and casts. No full host copy
of the model, nor of a parameter per device, is ever made. All names, shapes and dtypes
are checked against the file headers before anything is read, so a bad checkpoint fails
at once with one line naming the file and the tensor.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import safe_open

from ssd_jax.config import ModelConfig
from ssd_jax.checkpoint.abstract import (abstract_model, check_mesh, materialize,
                                         param_sharding)
from ssd_jax.checkpoint.errors import CheckpointError
from ssd_jax.checkpoint.layout import param_layouts

SUPPORTED_FILE_DTYPES = ("F32", "F16", "BF16", "F64")
INDEX_NAME = "model.safetensors.index.json"
_LAYER_PREFIX = re.compile(r"model\.layers\.(\d+)\.")

log = logging.getLogger("ssd_jax")


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())


class WeightFiles:
  """The tensors of a HF model directory: name -> file, with lazily opened handles.

  `label` is the file that error messages name: the index for a sharded checkpoint, the
  single model.safetensors otherwise.
  """

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    self._handles: dict[str, object] = {}
    index = os.path.join(model_dir, INDEX_NAME)
    if os.path.isfile(index):
      self.label = index
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index (expected a JSON "
                              f"object with a weight_map; {_one_line(e)})") from None
      self.file_of = {name: os.path.join(model_dir, fname)
                      for name, fname in weight_map.items()}
      for fname in sorted(set(self.file_of.values())):
        if not os.path.isfile(fname):
          raise CheckpointError(f"{index}: shard {os.path.basename(fname)} is listed but "
                                "missing from the directory")
    else:
      files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
      if not files:
        others = [n for n in ("pytorch_model.bin", "model.pt", "tf_model.h5")
                  if os.path.exists(os.path.join(model_dir, n))]
        hint = f" (found {others[0]}; only safetensors weights are supported)" if others else ""
        raise CheckpointError(f"{model_dir}: no *.safetensors weights; expected "
                              f"model.safetensors or {INDEX_NAME} with its shards{hint}")
      self.label = files[0] if len(files) == 1 else os.path.join(model_dir, "*.safetensors")
      self.file_of = {}
      for fname in files:
        for name in self._open(fname).keys():
          self.file_of[name] = fname

  def _open(self, fname: str):
    h = self._handles.get(fname)
    if h is None:
      try:
        h = safe_open(fname, framework="numpy")
      except Exception as e:  # SafetensorError, OSError: corrupt or unreadable file
        raise CheckpointError(f"{fname}: not a readable safetensors file "
                              f"({_one_line(e)})") from None
      self._handles[fname] = h
    return h

  def has(self, name: str) -> bool:
    return name in self.file_of

  def slice_of(self, name: str):
    return self._open(self.file_of[name]).get_slice(name)

  def check(self, name: str, shape: tuple) -> None:
    """Raises CheckpointError unless tensor `name` exists with `shape` and a float dtype."""
    if name not in self.file_of:
      raise CheckpointError(f"{self.label}: tensor {name} missing")
    fname = self.file_of[name]
    try:
      sl = self.slice_of(name)
    except CheckpointError:
      raise
    except Exception as e:
      raise CheckpointError(f"{fname}: tensor {name} listed in {self.label} but not "
                            f"readable ({_one_line(e)})") from None
    found = tuple(int(s) for s in sl.get_shape())
    if found != tuple(shape):
      raise CheckpointError(f"{fname}: tensor {name}: expected {list(shape)}, "
                            f"found {list(found)}")
    dt = sl.get_dtype()
    if dt not in SUPPORTED_FILE_DTYPES:
      raise CheckpointError(f"{fname}: tensor {name} has dtype {dt}; expected one of "
                            f"{', '.join(SUPPORTED_FILE_DTYPES)}")

  def close(self) -> None:
    self._handles.clear()


def _check_unsupported(files: WeightFiles, cfg: ModelConfig, layouts) -> None:
  """Tensors HF would use but our model cannot (an output-projection bias)."""
  ours = {part.hf_name for layout, _ in layouts for part in layout.parts}
  if cfg.attention_bias:
    for i in range(cfg.num_layers):
      name = f"model.layers.{i}.self_attn.o_proj.bias"
      if files.has(name) and name not in ours:
        raise CheckpointError(f"{files.file_of[name]}: tensor {name} (attention_bias) is not "
                              "supported: the model has q/k/v biases but no o_proj bias")


def _check_unused(files: WeightFiles, cfg: ModelConfig, layouts) -> None:
  """Tensors the model would not read. Layers beyond num_hidden_layers, or a tensor inside
  a layer that our architecture lacks, mean the checkpoint is not the model its config
  describes (generating would silently give other outputs): refused. Anything else
  (outside the layers) is named in one warning line."""
  ours = {part.hf_name for layout, _ in layouts for part in layout.parts}
  unused = sorted(n for n in files.file_of if n not in ours)
  beyond = sorted({int(m.group(1)) for n in unused if (m := _LAYER_PREFIX.match(n))
                   and int(m.group(1)) >= cfg.num_layers})
  if beyond:
    found = max(beyond) + 1
    raise CheckpointError(f"{files.label}: holds tensors for {found} layers (up to "
                          f"model.layers.{found - 1}) but config.json says num_hidden_layers="
                          f"{cfg.num_layers}; fix num_hidden_layers in config.json")
  foreign = [n for n in unused if _LAYER_PREFIX.match(n)]
  if foreign:
    more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
    raise CheckpointError(f"{files.file_of[foreign[0]]}: tensor {foreign[0]}{more} is not "
                          f"part of a {cfg.model_type} model as config.json describes it; "
                          "the checkpoint and its config.json do not match")
  harmless = lambda n: n.endswith("rotary_emb.inv_freq") or (
      n == "lm_head.weight" and cfg.tie_word_embeddings)  # HF ties it to the embedding too
  rest = [n for n in unused if not harmless(n)]
  if rest:
    log.warning("%s: ignoring %d tensor(s) the model does not use: %s%s", files.label,
                len(rest), ", ".join(rest[:4]), ", ..." if len(rest) > 4 else "")


def _hf_sharding(layout, sharding):
  """Sharding of the HF-layout tensor that lands each device's block where ours needs it."""
  if not isinstance(sharding, NamedSharding):
    return sharding
  spec = tuple(sharding.spec) + (None,) * (len(layout.shape) - len(sharding.spec))
  hf_spec = layout.hf_spec(spec)
  return None if hf_spec is None else NamedSharding(sharding.mesh, P(*hf_spec))


def _part_sharding(layout, sharding, j):
  """The sharding of HF part j of a fused parameter, given ours."""
  if layout.stack_axis is None or not isinstance(sharding, NamedSharding):
    return sharding
  return NamedSharding(sharding.mesh, P(*layout.part_spec(tuple(sharding.spec), j)))


@functools.lru_cache(maxsize=None)
def _to_ours(parts: tuple, stack_axis, squeezed, dtype, sharding):
  """On-device HF -> our layout: each part (split, perm) reshaped per head, transposed,
  cast, and the parts joined on `stack_axis` when there are several. No data moves
  between devices: every input is sharded by `_hf_sharding`, and the stacking axis of
  the output is not sharded."""
  def convert(*raws):
    outs = [jnp.transpose(x.reshape(split), perm).astype(dtype)
            for x, (split, perm) in zip(raws, parts)]
    if stack_axis is None:
      return outs[0]
    return jnp.concatenate([jnp.expand_dims(o, stack_axis) if sq else o
                            for o, sq in zip(outs, squeezed)], axis=stack_axis)
  return jax.jit(convert, out_shardings=sharding)


def read_model(model_dir: str, cfg: ModelConfig, *, dtype, mesh=None,
               attention_impl: str = "xla", on_device: bool | None = None):
  """The Transformer for `cfg` with its weights read from the safetensors in `model_dir`.

  on_device: convert layouts (transpose, cast) on the accelerator rather than with numpy
  on the host; a single-threaded numpy transpose moves only ~200 MB/s, so an 8B model
  would take over a minute. None: on device unless the devices are CPUs.
  """
  graphdef, abstract_state = abstract_model(cfg, dtype, mesh, attention_impl)
  layouts = param_layouts(abstract_state)
  check_mesh(cfg, mesh, layouts)
  files = WeightFiles(model_dir)
  for layout, _ in layouts:
    for part in layout.parts:
      files.check(part.hf_name, part.hf_shape)
  _check_unsupported(files, cfg, layouts)
  _check_unused(files, cfg, layouts)
  target = np.dtype(jnp.dtype(dtype))
  if on_device is None:
    device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
    on_device = device.platform != "cpu"

  def raw_part(part, part_sharding):
    """One HF tensor, as stored, in the sharding that needs no movement to become ours
    (None when no HF-layout sharding can express it)."""
    hf_sharding = _hf_sharding(part, part_sharding)
    if hf_sharding is None:
      return None
    src = files.slice_of(part.hf_name)
    wide = src.get_dtype() == "F64"  # jax without x64 would silently narrow it anyway

    def raw_block(index):
      arr = src[index]
      return arr.astype(np.float32) if wide else np.ascontiguousarray(arr)

    return jax.make_array_from_callback(part.hf_shape, hf_sharding, raw_block)

  def host_block(layout, index):
    """Our block `index` of a parameter, read from the file(s) and converted by numpy."""
    if layout.stack_axis is not None:
      covered = layout.part_index(index)
      return layout.join([host_block(layout.parts[j], rest) for j, rest in covered],
                         [j for j, _ in covered])
    hf_sl, post = layout.hf_slices(index)
    arr = layout.read_block(files.slice_of(layout.hf_name)[hf_sl], post)
    return np.ascontiguousarray(arr, dtype=target)

  def make(_, layout, var):
    sharding = param_sharding(mesh, var, layout.shape)
    if on_device:
      raws = [raw_part(part, _part_sharding(layout, sharding, j))
              for j, part in enumerate(layout.parts)]
      if all(r is not None for r in raws):
        if (layout.stack_axis is None and layout.is_identity
            and raws[0].dtype == target):
          return raws[0]
        return _to_ours(tuple((p.split, p.perm) for p in layout.parts), layout.stack_axis,
                        layout.squeezed, target, sharding)(*raws)
    return jax.make_array_from_callback(layout.shape, sharding,
                                        lambda index: host_block(layout, index))

  try:
    return materialize(graphdef, abstract_state, cfg, make)
  finally:
    files.close()
