"""Test setup: 8 virtual CPU devices so meshes (TP, a separate draft mesh) can be tested.

XLA reads this flag once, when the backend starts, so it must be set before jax is used.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A fresh XLA cache for each run, deleted at exit: the many engines the tests build over
# the same tiny models compile many identical programs, and each is compiled once per run
# (on CI's 2 cores compiling is most of the suite's time). Nothing is kept between runs
# and the user's ~/.cache is untouched; export SSD_JAX_COMPILATION_CACHE=DIR to keep one,
# or =0 to compile every program.
if "SSD_JAX_COMPILATION_CACHE" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="ssd_jax_tests_xla_")
  os.environ["SSD_JAX_COMPILATION_CACHE"] = _XLA_CACHE
  atexit.register(shutil.rmtree, _XLA_CACHE, True)
