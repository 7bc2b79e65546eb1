"""Test setup: 8 virtual CPU devices so meshes (TP, a separate draft mesh) can be tested.

XLA reads this flag once, when the backend starts, so it must be set before jax is used.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests compile into a fresh process each run, as CI does: no persistent XLA cache in the
# user's ~/.cache (export SSD_JAX_COMPILATION_CACHE=DIR to use one).
os.environ.setdefault("SSD_JAX_COMPILATION_CACHE", "0")
