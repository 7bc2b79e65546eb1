"""Model configuration: the few numbers a decoder needs, read from a HuggingFace config.

Llama-3 and Qwen3 are one architecture with three switches (q/k norm, attention bias,
tied embeddings) and a RoPE variant, so they share one config class and one decoder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen3")


class ConfigError(ValueError):
  """A model configuration the engine cannot run; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # Llama-3.1 style frequency scaling: dict with factor, low_freq_factor,
  # high_freq_factor, original_max_position_embeddings; None for plain RoPE.
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  tie_word_embeddings: bool = False
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE.
  attention_bias: bool = False
  max_position_embeddings: int = 8192
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return dict(self.rope_scaling) if self.rope_scaling else None

  @property
  def num_params(self) -> int:
    """Parameter count (for roofline numbers)."""
    e, h, kv, d, m = (self.hidden_size, self.num_heads, self.num_kv_heads,
                      self.head_dim, self.intermediate_size)
    per_layer = e * (h + 2 * kv) * d + h * d * e + 3 * e * m + 2 * e
    if self.qk_norm:
      per_layer += 2 * d
    head = 0 if self.tie_word_embeddings else e * self.vocab_size
    return self.num_layers * per_layer + self.vocab_size * e + e + head

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], source: str = "config") -> "ModelConfig":
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ConfigError(
          f"{source}: model_type {model_type!r} is not supported; "
          f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads")
    missing = [k for k in required if k not in hf]
    if missing:
      raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
    heads = int(hf["num_attention_heads"])
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or hf["hidden_size"] // heads)
    if heads % kv_heads:
      raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of "
                        f"num_key_value_heads={kv_heads}")
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    rope_theta = hf.get("rope_theta")
    if isinstance(scaling, dict):
      rope_theta = rope_theta or scaling.get("rope_theta")
      kind = scaling.get("rope_type", scaling.get("type", "default"))
      if kind in (None, "default"):
        scaling = None
      elif kind != "llama3":
        raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported; "
                          "supported: llama3 (or none)")
      else:
        scaling = tuple(sorted((k, v) for k, v in scaling.items()
                               if k in ("factor", "low_freq_factor", "high_freq_factor",
                                        "original_max_position_embeddings")))
    else:
      scaling = None
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    return cls(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6 if model_type == "qwen3" else 1e-5)),
        rope_theta=float(rope_theta or 10000.0),
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_norm=model_type == "qwen3",
        attention_bias=bool(hf.get("attention_bias", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(int(e) for e in eos_ids),
    )

  @classmethod
  def from_dir(cls, path: str) -> "ModelConfig":
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
      raise ConfigError(f"{path}: no config.json; expected a HuggingFace model directory")
    try:
      with open(cfg_path) as f:
        hf = json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from None
    return cls.from_hf_dict(hf, source=cfg_path)

  def to_hf_dict(self) -> dict[str, Any]:
    """The HuggingFace config.json this config came from (enough for transformers to load)."""
    arch = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[self.model_type]
    d: dict[str, Any] = {
        "architectures": [arch],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "tie_word_embeddings": self.tie_word_embeddings,
        "attention_bias": self.attention_bias,
        "max_position_embeddings": self.max_position_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if self.rope_scaling:
      d["rope_scaling"] = {"rope_type": "llama3", **dict(self.rope_scaling)}
    if self.bos_token_id is not None:
      d["bos_token_id"] = self.bos_token_id
    if self.eos_token_ids:
      d["eos_token_id"] = (self.eos_token_ids[0] if len(self.eos_token_ids) == 1
                           else list(self.eos_token_ids))
    return d
