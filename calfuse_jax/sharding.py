"""Data-parallel placement: one `Mesh` with a `data` axis over every device of every process;
batches split along their first axis, everything else replicated."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis `data` over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def padded_size(n: int, mesh: Mesh) -> int:
    """Smallest multiple of the mesh size that is >= n (a batch must split evenly)."""
    size = mesh.devices.size
    return max(size, -(-n // size) * size)


def _place(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    # Each process builds only its own devices' shards from its copy of the global array.
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def shard_batch(batch, mesh: Mesh):
    """A pytree of host arrays [B, ...] (the same on every process) sharded `P("data")`."""
    sharding = data_sharding(mesh)

    def place(x):
        x = np.asarray(x)
        if x.shape[0] % mesh.devices.size:
            raise ValueError(
                f"batch of {x.shape[0]} rows does not split over {mesh.devices.size} devices; "
                "pad it with `padded_size` and mask the padding"
            )
        return _place(x, sharding)

    return jax.tree.map(place, batch)


def replicate(tree, mesh: Mesh):
    """Places a pytree (host or device arrays, identical on every process) on every device."""
    sharding = replicated(mesh)

    def place(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, sharding)  # a global array: let XLA move it
        return _place(np.asarray(x), sharding)

    return jax.tree.map(place, tree)


def to_host(tree):
    """Fetches a pytree of replicated (or fully addressable) arrays as NumPy arrays."""

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(fetch, tree)


def is_primary() -> bool:
    """Whether this process writes files: always in one process, process 0 of several."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process of a multi-process run waits here until all reach `name`; no-op in one."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def same_on_every_process(key: str, value: str, timeout_s: float) -> None:
    """Checks that every process passes the same `value` (key-value store: no collective hang)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # noqa: PLC0415  (the client orbax uses too)

    client = distributed.global_state.client
    client.key_value_set(f"{key}/{jax.process_index()}", value)
    for other in range(jax.process_count()):
        try:
            theirs = client.blocking_key_value_get(f"{key}/{other}", int(timeout_s * 1000))
        except jax.errors.JaxRuntimeError as err:
            raise TimeoutError(
                f"process {other} did not report within {timeout_s:g} s (it died or is stuck)"
            ) from err
        if theirs != value:
            here = jax.process_index()
            raise ValueError(f"process {other} runs another config or command than process {here}")
