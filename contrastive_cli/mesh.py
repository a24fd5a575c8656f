"""Device mesh and sharding helpers: a 1-D `data` mesh, batch sharded, state replicated."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .errors import ConfigError


def data_mesh(devices=None) -> Mesh:
    """All (global) devices on one `data` axis: negatives and BatchNorm statistics span the batch."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`."""
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if batch_size % n:
        lo, hi = batch_size - batch_size % n, batch_size + n - batch_size % n
        raise ConfigError(f"batch size {batch_size} is not divisible by {n} devices; use {lo or n} or {hi}")
