"""Device mesh, sharding helpers and multi-process start-up.

One 1-D `data` mesh over every device of every process: the batch is split over it, the train
state is replicated, so negatives and BatchNorm statistics span the global batch. With several
processes (hosts), each feeds only the rows its own devices hold (`local_rows`).
"""
from __future__ import annotations

import os
import re
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .errors import ConfigError


JOIN_TIMEOUT = 300.0  # seconds a process waits for the others to join (jax.distributed's own default)


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, join_timeout: float = JOIN_TIMEOUT) -> bool:
    """Join a multi-process run (`jax.distributed.initialize`); True when this process joined one.

    Give all three of `coordinator` ("HOST:PORT" of process 0), `num_processes` and `process_id`,
    or none: then an `srun` step or `mpirun` launch of several processes is joined (JAX reads their
    environment), else the run is single-process. Must run before anything touches a JAX device.
    While it waits for the others, `_watched_join` says so on stderr and ends the process with one
    line after `join_timeout` seconds or at SIGINT/SIGTERM (XLA would abort with a C++ stack trace).
    On CPU the cross-process collectives are gloo (jax 0.10's default
    `jax_cpu_collectives_implementation`; nothing to set).
    """
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ConfigError(f"--coordinator ({coordinator}), --num-processes ({num_processes}) and "
                          f"--process-id ({process_id}) go together: give all three or none")
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if all(given):
        if not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", coordinator):
            raise ConfigError(f"coordinator {coordinator!r} is not HOST:PORT (for example 10.0.0.1:1234)")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ConfigError(f"process id {process_id} is not in [0, {num_processes}) for {num_processes} processes")
        if num_processes == 1:
            return False
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
        if process_id == 0:
            _port_free(coordinator)
    elif launcher_present():
        kwargs = {}  # JAX reads the launcher's environment
    else:
        return False
    try:
        _watched_join(kwargs, coordinator or "the launcher's address", join_timeout)
    except (RuntimeError, ValueError) as e:  # XlaRuntimeError is a RuntimeError
        if "must be called before" in str(e):
            raise ConfigError("cannot join a multi-process run: this process already used a JAX device") from None
        raise ConfigError(f"cannot join the multi-process run at {coordinator or 'the launcher address'}: {e}") from None
    if jax.process_count() > 1:
        _native_stdout_to_stderr()
    return jax.process_count() > 1


def _port_free(coordinator: str) -> None:
    """Process 0 listens on the coordinator's port: one already in use is a ConfigError (XLA's
    coordination service would crash the process with a segmentation fault)."""
    import errno
    import socket

    host, port = coordinator.rsplit(":", 1)
    try:
        with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as s:
            s.bind((host.strip("[]"), int(port)))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} of the coordinator {coordinator} is already in use; "
                              "choose another --coordinator port") from None
        # another reason (the host is not this machine's name, ...): let the join report it


def _watched_join(kwargs: dict, address: str, timeout: float) -> None:
    """jax.distributed.initialize(**kwargs), watched by a thread: after 3 s it says on stderr what
    the process waits for; after `timeout` s, or at SIGINT/SIGTERM, it writes one line and ends the
    process (os._exit: 1, or 128 + the signal). Nothing else can: XLA's connect blocks the main
    thread in C++ (Python's signal handlers never run) and, at its own timeout, aborts the process
    with a stack trace (exit 134). The signals are blocked in the main thread meanwhile, so they
    stay pending for the watcher's sigtimedwait; XLA's threads, started from the main thread
    during the join, keep them blocked."""
    import signal
    import threading
    import time

    stop = (signal.SIGINT, signal.SIGTERM)
    masked = threading.current_thread() is threading.main_thread() and hasattr(signal, "sigtimedwait")
    joined = threading.Event()
    who = f"process {kwargs['process_id']} of {kwargs['num_processes']}" if "process_id" in kwargs else "this process"

    def leave(line: str, code: int) -> None:
        os.write(2, f"{line}\n".encode())
        os._exit(code)

    def watch() -> None:
        start, told = time.monotonic(), False
        while not joined.is_set():
            got = signal.sigtimedwait(stop, 0.2) if masked else None
            if not masked:
                joined.wait(0.2)
            if got is not None and not joined.is_set():
                leave("error: interrupted" if got.si_signo == signal.SIGINT else
                      f"error: interrupted by {signal.Signals(got.si_signo).name}", 128 + got.si_signo)
            waited = time.monotonic() - start
            if not told and waited > 3 and not joined.is_set():
                os.write(2, f"waiting for the other processes at {address} ({who}; giving up after "
                            f"{timeout:g} s)\n".encode())
                told = True
            if waited > timeout and not joined.is_set():
                leave(f"error: gave up after {timeout:g} s waiting for the other processes at {address} ({who}): "
                      "is every process started, with the same --coordinator and --num-processes?", 1)

    old = signal.pthread_sigmask(signal.SIG_BLOCK, stop) if masked else None
    watcher = threading.Thread(target=watch, name="contrastive-join", daemon=True)
    watcher.start()
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=int(timeout) + 60)
    finally:
        joined.set()
        watcher.join()
        if masked:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _native_stdout_to_stderr() -> None:
    """Send what native code prints to stderr; Python's sys.stdout keeps the real stdout.

    Gloo prints "[Gloo] Rank 0 is connected to 3 peer ranks" on file descriptor 1 whenever it sets
    up a communicator; stdout carries results only (the run directory), so move fd 1 to stderr.
    """
    sys.stdout.flush()
    try:
        results = os.dup(1)
        os.dup2(2, 1)
    except OSError:
        return
    sys.stdout = os.fdopen(results, "w", buffering=1, encoding=sys.stdout.encoding, errors=sys.stdout.errors)


def launcher_present() -> bool:
    """An `srun` step or `mpirun` launch of several processes (JAX then finds its parameters).

    SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: a batch script of an --ntasks=4 job that runs one
    `contrastive` without srun is a single process.
    """
    env = os.environ

    def count(name):
        try:
            return int(env.get(name, "1"))
        except ValueError:
            return 1

    return ("SLURM_JOB_ID" in env and count("SLURM_STEP_NUM_TASKS") > 1) or count("OMPI_COMM_WORLD_SIZE") > 1


def is_primary() -> bool:
    """True on the process that writes files and talks to the user (process 0)."""
    return jax.process_index() == 0


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
        use = f"{lo} or {hi}" if lo else f"{hi}"  # below n there is only one way up
        raise ConfigError(f"batch size {batch_size} is not divisible by {n} devices; use {use}")


def local_rows(sharding: NamedSharding, batch_size: int) -> np.ndarray:
    """Rows of a global [batch_size, ...] batch that this process's devices hold, in order.

    `jax.make_array_from_process_local_data(sharding, batch[rows])` then builds the global array;
    with one process this is every row.
    """
    index_map = sharding.addressable_devices_indices_map((batch_size,))
    rows = {r for (s,) in index_map.values() for r in range(*s.indices(batch_size))}
    return np.asarray(sorted(rows), dtype=np.int64)


def global_batch(local: np.ndarray, sharding: NamedSharding, batch_size: int) -> jax.Array:
    """The global [batch_size, ...] array from this process's rows of it (`local_rows`)."""
    return jax.make_array_from_process_local_data(sharding, local, (batch_size, *local.shape[1:]))


def agree(values: list[int]) -> np.ndarray:
    """Every process's `values` (int32), stacked [processes, len(values)]; a collective: all must call."""
    local = np.asarray(values, np.int32)
    if jax.process_count() == 1:
        return local[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local)).reshape(jax.process_count(), -1)



def disagreements(values: dict[str, object]) -> dict[str, list[int]]:
    """{name: the processes whose value differs from process 0's} for each name in `values` (JSON-able
    settings, the same names on every process) that not all processes hold alike; {} when they agree.
    A collective: every process must call it with the same names. Values are compared by a CRC-32 of
    their JSON (all-gathered as int32)."""
    import json
    import zlib

    names = sorted(values)
    crcs = [zlib.crc32(json.dumps(values[k], sort_keys=True, default=str).encode()) & 0x7FFFFFFF for k in names]
    seen = agree([len(names), *crcs])
    if (seen[:, 0] != len(names)).any():  # a different version of the tool: the names themselves differ
        return {"(the settings themselves: another version of contrastive?)": np.flatnonzero(seen[:, 0] != len(names)).tolist()}
    return {k: np.flatnonzero(seen[:, i + 1] != seen[0, i + 1]).tolist()
            for i, k in enumerate(names) if (seen[:, i + 1] != seen[0, i + 1]).any()}
