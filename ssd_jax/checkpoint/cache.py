"""The one root of ssd_jax's on-disk caches (converted GGUF files, the joined default draft,
compiled XLA programs)."""

import os

_OFF = ("0", "off", "false", "no", "none")


def cache_root() -> str:
  """$SSD_JAX_CACHE, else ~/.cache/ssd_jax (a leading ~ is expanded in either)."""
  return os.path.expanduser(os.environ.get("SSD_JAX_CACHE") or "~/.cache/ssd_jax")


def compilation_cache_dir() -> str | None:
  """Where compiled XLA programs are kept between runs, or None when that is off.

  $SSD_JAX_COMPILATION_CACHE: unset or empty -> cache_root()/xla (~/.cache/ssd_jax/xla);
  0/off/false/no/none -> off; anything else is the directory. Deleting the directory
  clears the cache (it is rebuilt as programs are compiled again).
  """
  value = os.environ.get("SSD_JAX_COMPILATION_CACHE", "").strip()
  if value.lower() in _OFF:
    return None
  return os.path.expanduser(value) if value else os.path.join(cache_root(), "xla")


def enable_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache at `compilation_cache_dir()`, so that a
  second run loads the engine's programs instead of compiling them (on a 2-core CPU the
  embedded model's prefill and decode step take ~10 s to compile). Returns the directory
  in use, or None.

  Leaves JAX alone when the cache is switched off here, or when the user configured JAX's
  cache themselves (jax_compilation_cache_dir / JAX_COMPILATION_CACHE_DIR): theirs wins.
  Every program is cached, however quickly it compiled (JAX's default skips those under
  a second, which on a slow CPU is most of the small ones), unless
  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise.
  """
  import jax
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  path = compilation_cache_dir()
  if path is None:
    return None
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path
