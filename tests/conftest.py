"""Strict, hermetic, multi-device test environment: CPU only, 4 host devices, a temporary cache.

This runs before any test module imports JAX, so sharding code runs everywhere. The decoded-image,
step and compilation caches go to a temporary folder (CONTRASTIVE_CACHE_DIR when it is set, as
.ci/run sets it for both of its passes), never to the user's ~/.cache. XLA gets the flags the CLI
gives a training command (perf/xla.py), so the tests run the kernels users run.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if not os.environ.get("CONTRASTIVE_CACHE_DIR"):
    _cache = tempfile.mkdtemp(prefix="contrastive-test-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["CONTRASTIVE_CACHE_DIR"] = _cache

from contrastive_cli.perf import xla  # noqa: E402  (before JAX starts: XLA reads XLA_FLAGS once)

xla.prefer_eigen_convolutions()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_compilation_cache_dir", os.path.join(os.environ["CONTRASTIVE_CACHE_DIR"], "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
