"""Memory-bandwidth roofline for decoding: the fewest bytes a step must read over the
device's measured read ceiling.

A decode step of a dense decoder must read every weight it uses once (the output
projection reads the whole vocabulary matrix; the input embedding only gathers one row per
sequence, so an untied input table is not counted) plus the K/V of the whole context of
every sequence. Those bytes are only read, so the ceiling is the device's read bandwidth:
bytes over the time per call of a jitted `jnp.sum` over a large array (8 GiB on an
accelerator, so that fixed per-call costs are small against it), calls queued back to back
so that the host's dispatch and wait are not counted (`measure_read_bandwidth`). Bytes over
that ceiling give the floor time of a step; measured time over that floor is the gap, and
floor / measured is the achieved fraction. A copy moves every byte twice (read + write) and
reaches less than a reduction does, so the copy figure (`measure_copy_bandwidth`) is
reported beside the read ceiling, labelled, and never used for the floor.

Per round of each method (B sequences, mean context length C):

* AR: one target step.                               floor = T(target)
* SD: K draft steps, then one target verify, serial:  floor = T(target) + K * T(draft)
* SSD, draft on its own devices: the target verifies while the draft prepares the next
  speculation (K+1 forward steps: glue + K tree steps), so on a hit
                                                      floor = max(T(target), (K+1) * T(draft))
  and with the draft sharing the target's devices     floor = T(target) + (K+1) * T(draft).

T(model) = (weight bytes read + B * C * KV bytes per token) / (bandwidth * devices).
Tree-branch scratch K/V and the K+1 query tokens of a verify are ignored (small at the
batch sizes this is used for), so the floor is a lower bound on time.

Pure Python except the two measurements, which import JAX only when called.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2, "fp16": 2}


def dtype_bytes(dtype: str) -> int:
  try:
    return DTYPE_BYTES[str(dtype)]
  except KeyError:
    raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}") from None


def mesh_devices(mesh: str | None) -> int:
  """Devices in a mesh string like '1x1', '1x4', '2x2' (or '4')."""
  if not mesh:
    return 1
  n = 1
  for part in str(mesh).lower().split("x"):
    part = part.strip()
    if not part.isdigit() or int(part) < 1:
      raise ValueError(f"mesh {mesh!r}: expected sizes like '1x4'")
    n *= int(part)
  return n


@dataclasses.dataclass(frozen=True)
class ModelBytes:
  """The byte counts of one model that a decode step touches."""
  num_params: int
  weight_bytes_total: int       # every parameter once
  weight_bytes_per_step: int    # what a decode step must read (see module docstring)
  kv_bytes_per_token: int       # K and V, all layers, one position of one sequence

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def model_bytes(cfg, dtype: str) -> ModelBytes:
  """Byte counts for a ModelConfig-like object (num_params, hidden_size, vocab_size,
  tie_word_embeddings, num_layers, num_kv_heads, head_dim) in `dtype`."""
  b = dtype_bytes(dtype)
  n = int(cfg.num_params)
  untied_embedding = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
  kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * b
  return ModelBytes(num_params=n, weight_bytes_total=n * b,
                    weight_bytes_per_step=(n - untied_embedding) * b, kv_bytes_per_token=kv)


def step_floor_s(mb: ModelBytes, batch: int, context: float, bandwidth_Bps: float,
                 devices: int = 1) -> float:
  """Floor time of one decode step of `batch` sequences of mean length `context`."""
  if bandwidth_Bps <= 0:
    raise ValueError("bandwidth must be positive")
  total = mb.weight_bytes_per_step + batch * context * mb.kv_bytes_per_token
  return total / (bandwidth_Bps * max(1, devices))


def round_floor_s(method: str, *, target: ModelBytes, draft: ModelBytes | None, batch: int,
                  context: float, bandwidth_Bps: float, k: int, target_devices: int = 1,
                  draft_devices: int = 0) -> float:
  """Floor time of one round of `method` ('ar', 'sd', 'ssd'); see the module docstring.
  draft_devices=0 means the draft shares the target's devices."""
  t = step_floor_s(target, batch, context, bandwidth_Bps, target_devices)
  if method == "ar":
    return t
  if draft is None:
    raise ValueError(f"{method}: the draft model's sizes are needed for its roofline")
  if method == "sd":
    return t + k * step_floor_s(draft, batch, context, bandwidth_Bps,
                                draft_devices or target_devices)
  if method == "ssd":
    if draft_devices > 0:
      return max(t, (k + 1) * step_floor_s(draft, batch, context, bandwidth_Bps, draft_devices))
    return t + (k + 1) * step_floor_s(draft, batch, context, bandwidth_Bps, target_devices)
  raise ValueError(f"unknown method {method!r}")


def report(method: str, *, target: ModelBytes | None, draft: ModelBytes | None, batch: int,
           context: float, bandwidth_Bps: float | None, k: int, target_devices: int,
           draft_devices: int, measured_round_s: float | None,
           measured_tokens_per_s: float | None) -> dict:
  """The roofline numbers of one result row (a dict with a 'reason' when unavailable)."""
  if target is None or not bandwidth_Bps:
    return {"available": False,
            "reason": "no model sizes" if target is None else "no bandwidth measurement"}
  try:
    floor = round_floor_s(method, target=target, draft=draft, batch=batch, context=context,
                          bandwidth_Bps=bandwidth_Bps, k=k, target_devices=target_devices,
                          draft_devices=draft_devices)
  except ValueError as e:
    return {"available": False, "reason": str(e)}
  ar_floor = step_floor_s(target, batch, context, bandwidth_Bps, target_devices)
  out = {
      "available": True,
      "mean_context": round(context, 1),
      "round_floor_ms": floor * 1e3,
      "ar_step_floor_ms": ar_floor * 1e3,
      "ar_ceiling_tokens_per_s": batch / ar_floor,
      "achieved_fraction": None,
      "tokens_per_s_over_ar_ceiling": None,
  }
  if measured_round_s and measured_round_s > 0:
    out["achieved_fraction"] = floor / measured_round_s
  if measured_tokens_per_s:
    # Above 1 only for speculative methods: more than one token per target weight read.
    out["tokens_per_s_over_ar_ceiling"] = measured_tokens_per_s / out["ar_ceiling_tokens_per_s"]
  return out


def _device_and_size(device, nbytes, accelerator_default):
  import jax
  device = device or jax.devices()[0]
  if nbytes is None:
    nbytes = (64 << 20) if device.platform == "cpu" else accelerator_default
  return device, nbytes


def _warmup_s(warmup_s: float | None, platform: str) -> float:
  """Seconds of calls before timing, so that an idle GPU's clocks have ramped up (a cold
  start reads low); default 1 s on an accelerator, none on a CPU."""
  if warmup_s is not None:
    return warmup_s
  return 0.0 if platform == "cpu" else 1.0


def _per_call_s(f, x, reps: int, warmup_s: float, calls: int) -> tuple[float, list]:
  """Median device time per call of `f(x)`: `calls` calls queued back to back, then one
  wait, over their number, `reps` times, after `warmup_s` seconds of calls. Waiting after
  every call instead adds the dispatch and the wait to each (on an H200 a single 4 GiB
  reduction then reads 3.6 TB/s where queued ones read 4.4)."""
  f(x).block_until_ready()
  t_end = time.perf_counter() + warmup_s
  while time.perf_counter() < t_end:
    f(x).block_until_ready()
  samples = []
  for _ in range(max(3, reps)):
    t0 = time.perf_counter()
    for _ in range(calls):
      y = f(x)  # rebinding frees the previous output once its call is done
    y.block_until_ready()
    samples.append((time.perf_counter() - t0) / calls)
  return statistics.median(samples), samples


def measure_read_bandwidth(nbytes: int | None = None, reps: int = 10, device=None,
                           warmup_s: float | None = None, calls: int = 10) -> dict:
  """The read ceiling in bytes/s: bytes of a bfloat16 array over the median time per call
  of a jitted `jnp.sum` of it (the roofline's bandwidth; module docstring).

  Default size: 8 GiB on an accelerator (4 GiB reads ~3% lower: fixed costs per call),
  64 MiB on CPU.
  """
  import jax
  import jax.numpy as jnp

  device, nbytes = _device_and_size(device, nbytes, 8 << 30)
  n = max(1024, nbytes // 2)
  x = jax.device_put(jnp.ones((n,), jnp.bfloat16), device)
  f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  med, samples = _per_call_s(f, x, reps, _warmup_s(warmup_s, device.platform), calls)
  read = n * 2
  del x
  return {"bandwidth_Bps": read / med, "bytes_read": read, "median_s": med,
          "min_s": min(samples), "reps": len(samples), "device": str(device),
          "platform": device.platform, "calls_per_sample": calls,
          "method": "read: jitted jnp.sum over a bfloat16 array, bytes read / median time "
                    "per call of calls queued back to back"}


def measure_copy_bandwidth(nbytes: int | None = None, reps: int = 10, device=None,
                           warmup_s: float | None = None, calls: int = 10) -> dict:
  """Copy bandwidth in bytes/s, bytes read + written: the better of a jitted `jnp.copy`
  and an elementwise pass (`a * 1.0001 + 1`) over a float32 array, median time per call
  of calls queued back to back. Reported beside the read ceiling, labelled; the roofline
  does not use it.

  Default size: 1 GiB on an accelerator, 64 MiB on CPU.
  """
  import jax
  import jax.numpy as jnp

  device, nbytes = _device_and_size(device, nbytes, 1 << 30)
  n = max(1024, nbytes // 4)
  x = jax.device_put(jnp.arange(n, dtype=jnp.float32), device)
  moved = 2 * n * 4
  warm = _warmup_s(warmup_s, device.platform) / 2
  out = {}
  for name, f in (("copy", jax.jit(jnp.copy)),
                  ("elementwise", jax.jit(lambda a: a * 1.0001 + 1.0))):
    med, samples = _per_call_s(f, x, reps, warm, calls)
    out[name] = {"Bps": moved / med, "median_s": med, "min_s": min(samples)}
  del x
  best = max(out, key=lambda k: out[k]["Bps"])
  return {"bandwidth_Bps": out[best]["Bps"], "copy_Bps": out["copy"]["Bps"],
          "elementwise_Bps": out["elementwise"]["Bps"], "best": best,
          "bytes_moved": moved, "median_s": out[best]["median_s"], "reps": max(3, reps),
          "device": str(device), "platform": device.platform, "calls_per_sample": calls,
          "method": "copy: jitted jnp.copy and a * 1.0001 + 1 over a float32 array, "
                    "bytes read + written / median time per call of calls queued back to "
                    "back, the better of the two"}


def measure_ceilings(device=None) -> dict:
  """{'read': measure_read_bandwidth(), 'copy': measure_copy_bandwidth()} on `device`."""
  return {"read": measure_read_bandwidth(device=device),
          "copy": measure_copy_bandwidth(device=device)}


def fmt_bytes(n: float) -> str:
  if n is None or (isinstance(n, float) and math.isnan(n)):
    return "n/a"
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if abs(n) < 1000 or unit == "TB":
      return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1000.0
  return f"{n:.2f} TB"
