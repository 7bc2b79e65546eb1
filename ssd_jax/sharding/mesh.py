"""Device meshes: the target's (tensor parallel x data parallel) and the draft's, disjoint."""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
from jax.sharding import Mesh

from ssd_jax.config import ModelConfig
from ssd_jax.sharding.rules import DP, TP


class MeshError(ValueError):
  """A mesh request that does not fit the devices or the model."""


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  tp: int = 1
  dp: int = 1

  @classmethod
  def parse(cls, text: str) -> "MeshSpec":
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
      raise MeshError(f"--mesh {text!r} is not of the form TxD with T, D >= 1 (e.g. 4x1)")
    return cls(tp=int(m.group(1)), dp=int(m.group(2)))

  @property
  def size(self) -> int:
    return self.tp * self.dp


def make_meshes(spec: MeshSpec, draft_devices: int = 0, devices=None):
  """Target mesh on the first T*D devices, draft mesh on the next `draft_devices`.

  Returns (target_mesh, draft_mesh); draft_mesh is None when draft_devices == 0 (the
  draft then shares the target's mesh).
  """
  devices = list(devices if devices is not None else jax.devices())
  if draft_devices < 0:
    raise MeshError(f"--draft-devices must be >= 0, got {draft_devices}")
  need = spec.size + draft_devices
  if need > len(devices):
    raise MeshError(
        f"--mesh {spec.tp}x{spec.dp} with --draft-devices {draft_devices} needs {need} "
        f"devices but only {len(devices)} are present ({devices[0].platform}); use fewer, "
        "or on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N")
  target = Mesh(np.array(devices[:spec.size]).reshape(spec.dp, spec.tp), (DP, TP))
  draft = None
  if draft_devices:
    draft = Mesh(np.array(devices[spec.size:need]).reshape(1, draft_devices), (DP, TP))
  return target, draft


def check_model_fits(cfg: ModelConfig, mesh: Mesh, name: str = "model") -> None:
  tp = mesh.shape[TP]
  for what, n in (("num_attention_heads", cfg.num_heads),
                  ("num_key_value_heads", cfg.num_kv_heads)):
    if n % tp:
      raise MeshError(f"{name}: {what}={n} is not divisible by the tensor-parallel size "
                      f"{tp}; choose a --mesh whose T divides {n}")
