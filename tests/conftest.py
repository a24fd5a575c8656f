"""Strict, multi-device test environment: CPU only, 4 host devices, persistent compile cache.

This runs before any test module imports JAX, so sharding code runs everywhere.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CONTRASTIVE_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "contrastive"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_compilation_cache_dir", os.path.join(os.environ["CONTRASTIVE_CACHE_DIR"], "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
