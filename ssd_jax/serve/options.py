"""Flags shared by the server and the chat (the engine's, as in the launch CLI), and the
LLM they build."""

from __future__ import annotations

import os
import sys

from absl import flags

# Flags only some methods read (as cli._METHOD_FLAGS): refused with another method.
_METHOD_FLAGS = {"draft": ("sd", "ssd"), "k": ("sd", "ssd"), "draft_devices": ("sd", "ssd"),
                 "draft_temperature": ("sd", "ssd"), "f": ("ssd",), "fanout_hit": ("ssd",),
                 "fanout_miss": ("ssd",), "fallback": ("ssd",), "sampler_x": ("ssd",)}


def define_engine_flags(fv: flags.FlagValues) -> flags.FlagValues:
  d = dict(flag_values=fv)
  flags.DEFINE_string("model", None, "Target: HuggingFace dir or .gguf file (default: the "
                      "embedded SmolLM2-135M-Instruct).", **d)
  flags.DEFINE_string("draft", None, "Draft model for sd/ssd (default with the embedded "
                      "target: the bundled distilled draft).", **d)
  flags.DEFINE_enum("method", "ar", ["ar", "sd", "ssd"], "Decoding method.", **d)
  flags.DEFINE_string("mesh", "1x1", "Target mesh TxD.", **d)
  flags.DEFINE_integer("draft_devices", 0, "Devices after the target's for the draft.", **d)
  flags.DEFINE_integer("k", 7, "Draft tokens per round (sd/ssd).", **d)
  flags.DEFINE_integer("f", 3, "SSD fan-out per acceptance length.", **d)
  flags.DEFINE_string("fanout_hit", None, "SSD fan-out list after a hit.", **d)
  flags.DEFINE_string("fanout_miss", None, "SSD fan-out list after a miss.", **d)
  flags.DEFINE_enum("fallback", None, ["jit", "fast"], "SSD miss fallback.", **d)
  flags.DEFINE_float("sampler_x", None, "SSD cache-aware sampling factor.", **d)
  flags.DEFINE_float("draft_temperature", None, "Draft sampling temperature.", **d)
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Compute dtype.", **d)
  flags.DEFINE_integer("batch_size", 8, "Max sequences in the running batch.", **d)
  flags.DEFINE_integer("max_model_len", 2048, "Max prompt + generated tokens.", **d)
  flags.DEFINE_integer("page_size", 64, "KV cache page size (tokens).", **d)
  flags.DEFINE_enum("attention", "auto", ["auto", "xla", "pallas"], "Attention impl.", **d)
  flags.DEFINE_bool("warmup", True, "Compile batch-1 programs before serving.", **d)
  return fv


def check_flags(fv: flags.FlagValues) -> None:
  for name, methods in _METHOD_FLAGS.items():
    flag = fv[name]
    if flag.present and flag.value != flag.default and fv.method not in methods:
      raise ValueError(f"--{name} is only used by --method {' or '.join(methods)}; drop it "
                       f"or choose that method (got --method {fv.method})")
  if fv.batch_size < 1:
    raise ValueError(f"--batch_size must be >= 1, got {fv.batch_size}")


def build_llm(fv: flags.FlagValues):
  from ssd_jax import LLM
  check_flags(fv)
  return LLM(fv.model, fv.draft, method=fv.method, mesh=fv.mesh,
             draft_devices=fv.draft_devices, dtype=fv.dtype, k=fv.k, f=fv.f,
             fanout_hit=fv.fanout_hit, fanout_miss=fv.fanout_miss, fallback=fv.fallback,
             sampler_x=fv.sampler_x, draft_temperature=fv.draft_temperature,
             max_batch_size=fv.batch_size, max_model_len=fv.max_model_len,
             page_size=fv.page_size, attention_impl=fv.attention)


def model_name(fv: flags.FlagValues) -> str:
  if fv.model is None:
    return "SmolLM2-135M-Instruct"
  return os.path.basename(os.path.normpath(fv.model))


def dashed_argv() -> list[str]:
  """absl spells multi-word flags with underscores; accept the dashed forms as well."""
  out = []
  for a in sys.argv:
    if a.startswith("--") and "=" in a:
      name, val = a.split("=", 1)
      a = name.replace("-", "_").replace("__", "--", 1) + "=" + val
    elif a.startswith("--"):
      a = "--" + a[2:].replace("-", "_")
    out.append(a)
  return out
