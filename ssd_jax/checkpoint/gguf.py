"""GGUF files: converted once, without PyTorch, into a cached HF safetensors directory.

The `gguf` package reads the file (metadata and tensors, memory-mapped) and dequantizes
each tensor in numpy; GGUF's tensor names are mapped back to HF's through gguf's own name
map, and llama.cpp's q/k row permutation of llama models (done for its RoPE layout) is
undone. The config is rebuilt from the metadata and completed by transformers' config
class, and the tokenizer by transformers' GGUF tokenizer builder; neither touches torch.
The result equals what transformers' (torch) GGUF loader produces for the same file
(tests/test_checkpoint.py checks it tensor by tensor when torch is installed).

The conversion goes to a temporary directory that is renamed into place only when
complete, so concurrent or aborted runs never leave a half-written cache; later loads read
the cached directory and never touch the GGUF again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile

import ml_dtypes
import numpy as np

from ssd_jax.config import ModelConfig
from ssd_jax.checkpoint.cache import cache_root
from ssd_jax.checkpoint.errors import CheckpointError
from ssd_jax.checkpoint.safetensors_writer import TensorSpec, write_safetensors

MARKER = "ssd_jax_gguf.json"  # written last: its presence means the cache is complete
_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def gguf_cache_dir(gguf_path: str) -> str:
  """Default cache directory for a GGUF file (keyed by its path, size and mtime)."""
  path = os.path.abspath(gguf_path)
  st = os.stat(path)
  key = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
  stem = os.path.splitext(os.path.basename(path))[0]
  return os.path.join(cache_root(), "gguf", f"{stem}-{key}")


def is_converted(out_dir: str, gguf_path: str) -> bool:
  """True when `out_dir` holds a complete conversion of this GGUF file."""
  try:
    with open(os.path.join(out_dir, MARKER)) as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return False
  return (marker.get("source_name") == os.path.basename(gguf_path)
          and marker.get("source_size") == os.path.getsize(gguf_path))


def ensure_converted(gguf_path: str, out_dir: str | None = None, *,
                     dtype: str = "float32") -> str:
  """The cached safetensors directory for `gguf_path`, converting it first if needed."""
  if not os.path.isfile(gguf_path):
    raise CheckpointError(f"{gguf_path}: no such GGUF file")
  out_dir = out_dir or gguf_cache_dir(gguf_path)
  if not is_converted(out_dir, gguf_path):
    convert_gguf(gguf_path, out_dir, dtype=dtype)
  return out_dir


def convert_gguf(gguf_path: str, out_dir: str, *, dtype: str = "float32") -> str:
  """Dequantizes `gguf_path` (gguf package, numpy) into a HF safetensors directory `out_dir`.

  Atomic: written to a sibling temporary directory and renamed into place when complete.
  """
  if dtype not in _NP_DTYPES:
    raise ValueError(f"GGUF conversion dtype {dtype!r}: use one of {', '.join(_NP_DTYPES)}")
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  print(f"ssd_jax: converting {os.path.basename(gguf_path)} to {out_dir} "
        "(one time, a few seconds)...", file=sys.stderr, flush=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
  try:
    _convert_into(gguf_path, tmp, dtype)
    _publish(tmp, out_dir, gguf_path)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def _publish(tmp: str, out_dir: str, gguf_path: str) -> None:
  try:
    os.rename(tmp, out_dir)
    return
  except OSError:
    pass  # out_dir exists: another process finished first, or a stale/broken cache
  if is_converted(out_dir, gguf_path):
    return
  stale = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".stale-",
                           dir=os.path.dirname(out_dir))
  os.rename(out_dir, os.path.join(stale, "old"))
  os.rename(tmp, out_dir)
  shutil.rmtree(stale, ignore_errors=True)


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())[:500]


# GGUF `general.architecture` -> HF (model_type, architecture class). These are the
# architectures the engine runs; llama.cpp permutes q/k rows only for llama.
_ARCHS = {"llama": ("llama", "LlamaForCausalLM"), "qwen3": ("qwen3", "Qwen3ForCausalLM")}
_PERMUTED_QK = {"llama"}

# `{arch}.<key>` -> HF config key, as transformers' GGUF loader maps them for llama/qwen3.
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
_TOKEN_ID_KEYS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}
# Tensors llama.cpp adds that have no HF parameter; transformers' loader drops them too.
# rope_freqs holds Llama-3.1-style RoPE frequency factors, which that loader ignores.
_IGNORED_TENSORS = {"rope_freqs.weight"}


def _field_value(field):
  """A GGUFReader field as a Python value (str, int, float, bool, or a list of them)."""
  from gguf import GGUFValueType

  def scalar(part, vtype):
    if vtype == GGUFValueType.STRING:
      return bytes(part).decode("utf-8")
    v = part[0].item()
    return bool(v) if vtype == GGUFValueType.BOOL else v

  types = list(field.types)
  if types and types[0] == GGUFValueType.ARRAY:
    if len(types) != 2:  # nested arrays: nothing the conversion reads
      return None
    return [scalar(field.parts[i], types[1]) for i in field.data]
  return scalar(field.parts[field.data[0]], types[0])


def _metadata(reader) -> dict:
  return {name: _field_value(field) for name, field in reader.fields.items()}


def _hf_config_dict(meta: dict, tensor_names: set[str], gguf_path: str) -> dict:
  """The HF config keys a GGUF's metadata gives (the rest are the config class's defaults)."""
  arch = meta.get("general.architecture")
  if arch not in _ARCHS:
    raise CheckpointError(f"{gguf_path}: GGUF architecture {arch!r} is not supported; "
                          f"supported: {', '.join(_ARCHS)}")
  scaling = meta.get(f"{arch}.rope.scaling.type")
  if scaling not in (None, "none"):
    raise CheckpointError(f"{gguf_path}: GGUF rope scaling {scaling!r} is not supported")
  d = {"model_type": _ARCHS[arch][0],
       "tie_word_embeddings": "output.weight" not in tensor_names}
  for key, hf_key in _CONFIG_KEYS.items():
    if f"{arch}.{key}" in meta:
      d[hf_key] = meta[f"{arch}.{key}"]
  head_dim = meta.get(f"{arch}.attention.key_length")
  if head_dim is None and arch == "llama":
    head_dim = meta.get(f"{arch}.rope.dimension_count")
  if head_dim is not None:
    d["head_dim"] = head_dim
  for key, hf_key in _TOKEN_ID_KEYS.items():
    if key in meta:
      d[hf_key] = meta[key]
  if "vocab_size" not in d and isinstance(meta.get("tokenizer.ggml.tokens"), list):
    d["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
  missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                         "num_attention_heads", "vocab_size") if k not in d]
  if missing:
    raise CheckpointError(f"{gguf_path}: GGUF metadata lacks {', '.join(missing)}")
  return d


def _clean_config(hf_config) -> dict:
  d = hf_config.to_dict()
  d.pop("quantization_config", None)  # would make transformers look for the GGUF again
  for k in [k for k in d if k.startswith("_")]:
    d.pop(k)
  if not d.get("architectures"):
    d["architectures"] = [type_name for type_name in (_arch(d.get("model_type")),) if type_name]
  return d


def _arch(model_type):
  return {mt: cls for mt, cls in _ARCHS.values()}.get(model_type)


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple]:
  """HF parameter name -> shape, in a HF model's state-dict order."""
  h, hd = cfg.hidden_size, cfg.head_dim
  q, kv, inter = cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.intermediate_size
  shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q)})
    if cfg.qk_norm:
      shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
    shapes.update({p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                   p + "mlp.down_proj.weight": (h, inter),
                   p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)})
  shapes["model.norm.weight"] = (h,)
  if not cfg.tie_word_embeddings:
    shapes["lm_head.weight"] = (cfg.vocab_size, h)
  return shapes


def _gguf_names(arch: str, hf_names, num_layers: int, gguf_path: str) -> dict[str, str]:
  """HF parameter name -> GGUF tensor name, through the gguf package's name map."""
  import gguf as gguf_pkg
  arch_enum = next((k for k, v in gguf_pkg.MODEL_ARCH_NAMES.items() if v == arch), None)
  if arch_enum is None:
    raise CheckpointError(f"{gguf_path}: the installed gguf package does not know "
                          f"architecture {arch!r} (pip install -U gguf)")
  name_map = gguf_pkg.get_tensor_name_map(arch_enum, num_layers)
  out = {}
  for hf_name in hf_names:
    base, suffix = hf_name.rsplit(".", 1)
    g = name_map.get_name(base)
    if g is None:
      raise CheckpointError(f"{gguf_path}: no GGUF tensor name for {hf_name} "
                            f"(architecture {arch})")
    out[hf_name] = f"{g}.{suffix}"
  return out


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's q/k permutation (convert_hf_to_gguf.py `LlamaModel.permute`): it
  reorders each head's rows from HF's rotate-half RoPE layout to interleaved pairs."""
  return np.ascontiguousarray(
      w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2)
  ).reshape(w.shape)


def _tensor_specs(reader, cfg: ModelConfig, arch: str, np_dtype, gguf_path: str):
  from gguf import GGMLQuantizationType, quants
  shapes = _hf_shapes(cfg)
  to_gguf = _gguf_names(arch, shapes, cfg.num_layers, gguf_path)
  tensors = {t.name: t for t in reader.tensors}
  unknown = sorted(set(tensors) - set(to_gguf.values()) - _IGNORED_TENSORS)
  if unknown:
    raise CheckpointError(f"{gguf_path}: GGUF tensor(s) this {arch} model has no parameter "
                          f"for: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
  missing = [g for g in to_gguf.values() if g not in tensors]
  if missing:
    raise CheckpointError(f"{gguf_path}: GGUF lacks tensor(s) {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''}")
  for name in sorted(_IGNORED_TENSORS & set(tensors)):
    print(f"ssd_jax: {os.path.basename(gguf_path)}: ignoring GGUF tensor {name} "
          "(no HF parameter; transformers ignores it too)", file=sys.stderr)
  traits = getattr(quants, "_type_traits", None)
  plain = {GGMLQuantizationType.F32, GGMLQuantizationType.F16}
  specs = []
  for hf_name, shape in shapes.items():
    t = tensors[to_gguf[hf_name]]
    qtype = GGMLQuantizationType(int(t.tensor_type))
    if traits is not None and qtype not in plain and qtype not in traits:
      raise CheckpointError(f"{gguf_path}: {t.name}: GGUF type {qtype.name} cannot be "
                            "dequantized by the installed gguf package")
    gguf_shape = tuple(int(d) for d in reversed(list(t.shape)))  # ggml lists dims innermost first
    if gguf_shape != shape:
      raise CheckpointError(f"{gguf_path}: {t.name} has shape {gguf_shape}, the config "
                            f"implies {shape} for {hf_name}")
    n_head = None
    if arch in _PERMUTED_QK and hf_name.endswith("self_attn.q_proj.weight"):
      n_head = cfg.num_heads
    elif arch in _PERMUTED_QK and hf_name.endswith("self_attn.k_proj.weight"):
      n_head = cfg.num_kv_heads

    def produce(t=t, qtype=qtype, shape=shape, n_head=n_head):
      try:
        w = quants.dequantize(t.data, qtype)
      except NotImplementedError as e:
        raise CheckpointError(f"{gguf_path}: {t.name}: {_one_line(e)}") from None
      w = np.asarray(w, dtype=np.float32).reshape(shape)
      if n_head is not None:
        w = _unpermute_rows(w, n_head)
      yield np.ascontiguousarray(w.astype(np_dtype, copy=False))
    specs.append(TensorSpec(hf_name, shape, np_dtype, produce))
  return specs


def _tokenizer(gguf_path: str, meta: dict):
  """transformers' tokenizer for the GGUF's tokenizer metadata, built without torch.

  transformers' own GGUF tokenizer entry points read the file through a torch-importing
  module; its builders (vocabulary, merges, pre-tokenizer, special tokens) do not, so the
  metadata they take is read here, as `get_gguf_tokenizer` (transformers 5) or the GGUF
  branch of `PreTrainedTokenizerFast.__init__` (transformers 4) would.
  """
  from transformers import PreTrainedTokenizerFast
  try:  # transformers 5
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    v5 = True
  except ImportError:  # transformers 4
    from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    v5 = False
  grouped = {
      group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items()
              if isinstance(name, str) and meta.get(f"tokenizer.{key}") is not None}
      for group, renames in GGUF_TOKENIZER_MAPPING.items()}
  tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
  architecture = meta["general.architecture"]
  if v5:
    kind = tokenizer_dict.get("tokenizer_type")
    if kind == "llama":
      tokenizer_config.setdefault("add_bos_token", True)
    elif kind == "gemma4":
      tokenizer_config["add_bos_token"] = False
    tokens = tokenizer_dict.get("tokens") or []
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
      token_id = meta.get(f"tokenizer.ggml.{key}")
      tokenizer_config[name] = tokens[token_id] if token_id is not None else None
  else:
    architecture = _ARCHS[architecture][0]  # transformers 4 keys its converters by model_type
  backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
  kwargs = {**tokenizer_config, **(extra or {})}
  return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def _convert_into(gguf_path: str, out_dir: str, dtype: str) -> None:
  if importlib.util.find_spec("gguf") is None:
    raise CheckpointError(f"{gguf_path}: reading .gguf needs the gguf package "
                          "(pip install gguf)")
  import transformers
  from gguf import GGUFReader

  name = os.path.basename(gguf_path)
  try:
    reader = GGUFReader(gguf_path)
    meta = _metadata(reader)
  except Exception as e:
    raise CheckpointError(f"{gguf_path}: not a readable GGUF file "
                          f"({type(e).__name__}: {_one_line(e)})") from None
  arch = meta.get("general.architecture")
  hf = _hf_config_dict(meta, {t.name for t in reader.tensors}, gguf_path)
  try:
    hf_config = transformers.AutoConfig.for_model(**hf)
  except Exception as e:
    raise CheckpointError(f"{gguf_path}: transformers could not build a config from this "
                          f"GGUF ({type(e).__name__}: {_one_line(e)})") from None
  config = _clean_config(hf_config)
  config["dtype"] = dtype
  cfg = ModelConfig.from_hf_dict(config, source=gguf_path)
  np_dtype = _NP_DTYPES[dtype]
  write_safetensors(out_dir, _tensor_specs(reader, cfg, arch, np_dtype, gguf_path))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  try:
    transformers.GenerationConfig.from_model_config(hf_config).save_pretrained(out_dir)
  except Exception as e:  # optional: eos ids are in config.json too
    print(f"ssd_jax: no generation_config.json written ({_one_line(e)})", file=sys.stderr)
  try:
    _tokenizer(gguf_path, meta).save_pretrained(out_dir)
  except Exception as e:  # a GGUF without tokenizer metadata still gives a model
    print(f"ssd_jax: {name}: no tokenizer converted ({type(e).__name__}: {_one_line(e)})",
          file=sys.stderr)
  with open(os.path.join(out_dir, MARKER), "w") as f:
    json.dump({"source": os.path.abspath(gguf_path), "source_name": name,
               "source_size": os.path.getsize(gguf_path), "dtype": dtype,
               "transformers": transformers.__version__,
               "gguf": importlib.metadata.version("gguf")}, f, indent=2)
