"""Rotary position embedding frequencies, with Llama-3.1's scaling (the rotation itself is
a kernel: `kernels.apply_rope`, or fused with the KV write in `kernels.rope_write_kv`)."""

from __future__ import annotations

import math

import numpy as np


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
  """Inverse frequencies [head_dim // 2] (float64 on the host, computed once)."""
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if not scaling:
    return inv
  # Llama-3.1: long wavelengths are slowed down by `factor`, short ones kept, and the
  # band between them interpolated smoothly.
  factor = scaling["factor"]
  low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_len = scaling["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv
  smooth = (old_len / wavelen - low) / (high - low)
  scaled = np.where(wavelen > old_len / low, inv / factor, inv)
  mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
  return np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
