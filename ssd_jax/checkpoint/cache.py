"""The one root of ssd_jax's on-disk caches (converted GGUF files, the joined default draft)."""

import os


def cache_root() -> str:
  """$SSD_JAX_CACHE, else ~/.cache/ssd_jax (a leading ~ is expanded in either)."""
  return os.path.expanduser(os.environ.get("SSD_JAX_CACHE") or "~/.cache/ssd_jax")
