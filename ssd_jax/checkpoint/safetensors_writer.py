"""Writes safetensors files one tensor (or one chunk of a tensor) at a time.

`safetensors.numpy.save_file` needs every tensor of a file in memory at once; a random
8B checkpoint or an export of a large model should not. The format is small: an 8-byte
little-endian header length, a JSON header of name -> dtype/shape/byte offsets, then the
raw bytes in offset order. Files above `max_shard_bytes` are split into HF-style shards
with a `model.safetensors.index.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

DTYPE_CODES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float64): "F64",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
}

MAX_SHARD_BYTES = 4 * 2**30


@dataclasses.dataclass
class TensorSpec:
  """One tensor to write: `produce()` yields C-ordered chunks that concatenate to it."""
  name: str
  shape: tuple
  dtype: np.dtype
  produce: Callable[[], Iterable[np.ndarray]]

  @property
  def nbytes(self) -> int:
    n = np.dtype(self.dtype).itemsize
    for s in self.shape:
      n *= int(s)
    return n


def _plan(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for spec in specs:
    if shards[-1] and size + spec.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += spec.nbytes
  return shards


def _write_file(path: str, specs: list[TensorSpec]) -> None:
  header: dict = {"__metadata__": {"format": "pt"}}
  offset = 0
  for spec in specs:
    header[spec.name] = {"dtype": DTYPE_CODES[np.dtype(spec.dtype)],
                         "shape": [int(s) for s in spec.shape],
                         "data_offsets": [offset, offset + spec.nbytes]}
    offset += spec.nbytes
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  tmp = path + ".partial"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for spec in specs:
      written = 0
      for chunk in spec.produce():
        chunk = np.ascontiguousarray(chunk, dtype=spec.dtype)
        f.write(chunk.reshape(-1).view(np.uint8).data)
        written += chunk.nbytes
      if written != spec.nbytes:
        raise RuntimeError(f"{path}: tensor {spec.name} produced {written} bytes, "
                           f"expected {spec.nbytes}")
  os.replace(tmp, path)


def write_safetensors(out_dir: str, specs: list[TensorSpec],
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
  """Writes `specs` as model.safetensors, or as shards + index when they exceed the limit.

  Returns the file names written (relative to out_dir).
  """
  os.makedirs(out_dir, exist_ok=True)
  names = set()
  for spec in specs:
    if spec.name in names:
      raise ValueError(f"tensor {spec.name} given twice")
    names.add(spec.name)
    if np.dtype(spec.dtype) not in DTYPE_CODES:
      raise ValueError(f"tensor {spec.name}: dtype {spec.dtype} cannot be written")
  shards = _plan(specs, max_shard_bytes)
  if len(shards) == 1:
    _write_file(os.path.join(out_dir, "model.safetensors"), shards[0])
    return ["model.safetensors"]
  files, weight_map = [], {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    _write_file(os.path.join(out_dir, fname), shard)
    files.append(fname)
    weight_map.update({spec.name: fname for spec in shard})
  index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f, indent=2)
  return files + ["model.safetensors.index.json"]


def chunks_of(array: np.ndarray, max_bytes: int = 256 * 2**20):
  """Yields `array` in row blocks of at most about `max_bytes` (for write-through)."""
  if array.ndim == 0 or array.nbytes <= max_bytes:
    yield array
    return
  rows = max(1, max_bytes // max(1, array[0].nbytes))
  for start in range(0, array.shape[0], rows):
    yield array[start:start + rows]
