"""The persistent XLA compilation cache: where it lives, how it is switched off, and that
JAX really writes compiled programs there."""

import os

import jax
import jax.numpy as jnp
import pytest
from jax._src import compilation_cache

from ssd_jax.checkpoint import cache


@pytest.fixture
def jax_cache_config():
  """Restores JAX's cache settings (and its once-per-process cache state) afterwards."""
  saved = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
  yield
  jax.config.update("jax_compilation_cache_dir", saved[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
  compilation_cache.reset_cache()


def test_dir_default_path_and_off(monkeypatch, tmp_path):
  monkeypatch.setenv("SSD_JAX_CACHE", str(tmp_path / "root"))
  monkeypatch.delenv("SSD_JAX_COMPILATION_CACHE", raising=False)
  assert cache.compilation_cache_dir() == str(tmp_path / "root" / "xla")
  monkeypatch.setenv("SSD_JAX_COMPILATION_CACHE", "")
  assert cache.compilation_cache_dir() == str(tmp_path / "root" / "xla")
  for off in ("0", "off", "False", "no"):
    monkeypatch.setenv("SSD_JAX_COMPILATION_CACHE", off)
    assert cache.compilation_cache_dir() is None
  monkeypatch.setenv("SSD_JAX_COMPILATION_CACHE", str(tmp_path / "elsewhere"))
  assert cache.compilation_cache_dir() == str(tmp_path / "elsewhere")


def test_off_leaves_jax_alone(monkeypatch, jax_cache_config):
  monkeypatch.setenv("SSD_JAX_COMPILATION_CACHE", "0")
  jax.config.update("jax_compilation_cache_dir", None)
  assert cache.enable_compilation_cache() is None
  assert jax.config.jax_compilation_cache_dir is None


def test_user_configured_dir_wins(monkeypatch, tmp_path, jax_cache_config):
  monkeypatch.setenv("SSD_JAX_COMPILATION_CACHE", str(tmp_path / "ours"))
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "theirs"))
  assert cache.enable_compilation_cache() == str(tmp_path / "theirs")
  assert not (tmp_path / "ours").exists()


def test_programs_are_written_to_the_cache(monkeypatch, tmp_path, jax_cache_config):
  monkeypatch.setenv("SSD_JAX_COMPILATION_CACHE", str(tmp_path / "xla"))
  monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
  jax.config.update("jax_compilation_cache_dir", None)
  compilation_cache.reset_cache()
  assert cache.enable_compilation_cache() == str(tmp_path / "xla")
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
  # A program no other test compiles (a fresh cache key), however quick to compile.
  jax.jit(lambda x: jnp.sin(x) * 3.25 + 0.5)(jnp.arange(7.0)).block_until_ready()
  assert os.listdir(tmp_path / "xla")
