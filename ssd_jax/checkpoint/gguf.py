"""GGUF files: converted once, through transformers, into a cached safetensors directory.

transformers reads GGUF (dequantizing every tensor and undoing llama.cpp's q/k row
permutation) into a PyTorch model; it refuses to `save_pretrained` such a model, so the
dequantized state dict, config.json, generation config and tokenizer files are written
here instead. The conversion goes to a temporary directory that is renamed into place
only when complete, so concurrent or aborted runs never leave a half-written cache; later
loads read the cached directory and never touch the GGUF again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
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
  """Dequantizes `gguf_path` (via transformers) into a HF safetensors directory `out_dir`.

  Atomic: written to a sibling temporary directory and renamed into place when complete.
  """
  if dtype not in _NP_DTYPES:
    raise ValueError(f"GGUF conversion dtype {dtype!r}: use one of {', '.join(_NP_DTYPES)}")
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  print(f"ssd_jax: converting {os.path.basename(gguf_path)} to {out_dir} "
        "(one time, about half a minute)...", file=sys.stderr, flush=True)
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


def _clean_config(hf_config) -> dict:
  d = hf_config.to_dict()
  d.pop("quantization_config", None)  # would make transformers look for the GGUF again
  for k in [k for k in d if k.startswith("_")]:
    d.pop(k)
  if not d.get("architectures"):
    d["architectures"] = [type_name for type_name in (_arch(d.get("model_type")),) if type_name]
  return d


def _arch(model_type):
  return {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(model_type)


@contextlib.contextmanager
def fast_gguf_name_maps():
  """Memoizes `gguf.get_tensor_name_map` while transformers reads a GGUF.

  transformers rebuilds the same (pure, read-only) name map once per module of the model,
  which is most of its GGUF load time for a small model; the cache is removed afterwards.
  """
  import gguf as gguf_pkg
  orig = getattr(gguf_pkg, "get_tensor_name_map", None)
  if orig is None:
    yield
    return
  gguf_pkg.get_tensor_name_map = functools.lru_cache(maxsize=None)(orig)
  try:
    yield
  finally:
    gguf_pkg.get_tensor_name_map = orig


def _convert_into(gguf_path: str, out_dir: str, dtype: str) -> None:
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  if importlib.util.find_spec("gguf") is None:
    raise CheckpointError(f"{gguf_path}: reading .gguf needs the gguf package "
                          "(pip install gguf)")
  try:
    import torch
  except ImportError:
    raise CheckpointError(f"{gguf_path}: converting .gguf needs PyTorch (transformers "
                          "dequantizes GGUF into a torch model); pip install torch") from None
  import transformers
  from transformers import AutoModelForCausalLM, AutoTokenizer
  from transformers.utils import logging as hf_logging

  src_dir, name = os.path.split(os.path.abspath(gguf_path))
  bars = hf_logging.is_progress_bar_enabled()
  hf_logging.disable_progress_bar()
  tqdm_env = os.environ.get("TQDM_DISABLE")
  os.environ["TQDM_DISABLE"] = "1"  # transformers' GGUF dequantization uses plain tqdm
  try:
    try:
      with fast_gguf_name_maps():
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name,
                                                     dtype=torch.float32, local_files_only=True)
    except Exception as e:
      raise CheckpointError(f"{gguf_path}: transformers could not load this GGUF "
                            f"({type(e).__name__}: {_one_line(e)})") from None
    config = _clean_config(model.config)
    config["dtype"] = dtype
    ModelConfig.from_hf_dict(config, source=gguf_path)  # unsupported architectures fail here
    np_dtype = _NP_DTYPES[dtype]
    tied = bool(config.get("tie_word_embeddings"))
    specs = []
    for tname, tensor in model.state_dict().items():
      if tied and tname == "lm_head.weight":
        continue
      def produce(t=tensor):
        yield t.detach().to(torch.float32).cpu().numpy().astype(np_dtype, copy=False)
      specs.append(TensorSpec(tname, tuple(tensor.shape), np_dtype, produce))
    write_safetensors(out_dir, specs)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    try:
      model.generation_config.save_pretrained(out_dir)
    except Exception as e:  # optional: eos ids are in config.json too
      print(f"ssd_jax: no generation_config.json written ({_one_line(e)})", file=sys.stderr)
    del model
    try:
      tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, local_files_only=True)
      tok.save_pretrained(out_dir)
    except Exception as e:  # a GGUF without tokenizer metadata still gives a model
      print(f"ssd_jax: {name}: no tokenizer converted ({type(e).__name__}: {_one_line(e)})",
            file=sys.stderr)
    with open(os.path.join(out_dir, MARKER), "w") as f:
      json.dump({"source": os.path.abspath(gguf_path), "source_name": name,
                 "source_size": os.path.getsize(gguf_path), "dtype": dtype,
                 "transformers": transformers.__version__}, f, indent=2)
  finally:
    if tqdm_env is None:
      os.environ.pop("TQDM_DISABLE", None)
    else:
      os.environ["TQDM_DISABLE"] = tqdm_env
    if bars:
      hf_logging.enable_progress_bar()
