"""The device mesh, how arrays are laid out on it, and host-to-device prefetch.

The mesh has two axes over every device of every process: "data" and "fsdp"
(config.mesh; product = device count). Batches are split over both. The
train state follows one rule (state_sharding): with mesh.fsdp > 1, every
parameter and optimizer-state array of at least MIN_SHARDED_SIZE elements is
split over "fsdp" along its largest dimension that the axis divides (FSDP:
each device holds 1/fsdp of the large weights, gathered by XLA where used);
the rest is replicated. The same code runs on one CPU, fake CPU devices, one
GPU or several hosts.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np

from genre_jax.errors import ConfigError

P = jax.sharding.PartitionSpec


AXES = ("data", "fsdp")
BATCH = P(AXES)  # the batch axis, split over every device
# Arrays smaller than this (biases, norms, small layers) stay replicated.
MIN_SHARDED_SIZE = 2**16


def mesh_shape(config: ml_collections.ConfigDict | None = None
               ) -> tuple[int, int]:
  """(data, fsdp) sizes of config.mesh (data=-1: the devices fsdp leaves)."""
  devices = jax.device_count()
  mesh = config.get("mesh") if config is not None else None
  fsdp = int(mesh.fsdp) if mesh is not None else 1
  data = int(mesh.data) if mesh is not None else -1
  if data == -1 and devices % fsdp == 0:
    data = devices // fsdp
  if data * fsdp != devices:
    raise ConfigError(f"config.mesh.data={data if data != -1 else -1} x "
                      f"config.mesh.fsdp={fsdp} must equal the number of "
                      f"devices ({devices}); mesh.data=-1 takes the rest")
  return data, fsdp


def make_mesh(config: ml_collections.ConfigDict | None = None
              ) -> jax.sharding.Mesh:
  """The ("data", "fsdp") mesh over every device of every process; without
  a config, all devices on "data" (pure data parallelism)."""
  return jax.make_mesh(mesh_shape(config), AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def param_spec(shape: tuple[int, ...], fsdp: int) -> jax.sharding.PartitionSpec:
  """The one sharding rule of parameters and optimizer state (see above)."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_SIZE:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp == 0:
      return P(*([None] * axis), "fsdp")
  return P()


def state_sharding(tree, mesh: jax.sharding.Mesh):
  """NamedShardings of a train state (or any array tree) by param_spec."""
  fsdp = int(mesh.shape["fsdp"])
  return jax.tree.map(
      lambda x: jax.sharding.NamedSharding(mesh,
                                           param_spec(tuple(x.shape), fsdp)),
      tree)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, BATCH)


def maybe_initialize_distributed() -> None:
  """Joins a multi-process run when launched as one (env set by the launcher).

  Under SLURM (SLURM_NTASKS > 1) `jax.distributed.initialize()` reads the
  coordinator address, process count and index from SLURM's variables;
  elsewhere from JAX_COORDINATOR_ADDRESS (host:port of process 0),
  JAX_NUM_PROCESSES and JAX_PROCESS_ID. JAX reads only the first of these
  itself, so the other two are passed here.
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get(
      "SLURM_NTASKS", "1") != "1":
    count, index = (os.environ.get("JAX_NUM_PROCESSES"),
                    os.environ.get("JAX_PROCESS_ID"))
    jax.distributed.initialize(
        num_processes=int(count) if count else None,
        process_id=int(index) if index else None)


_barriers = 0  # barriers passed: each one's name is new, in every process


def process_0_first(fn: Callable[[], Any], what: str = "process_0_first",
                    timeout_s: int = 3 * 3600) -> Any:
  """fn() in process 0, then, once it has returned, in the other processes.

  For work that fills a cache on a shared disk (preparing a dataset): done
  by one process while the others wait, then only read by them. The wait
  is on the distributed runtime's barrier, not a device collective (whose
  set-up times out in 30 s on CPU). One process: just fn().
  """
  global _barriers
  if jax.process_count() == 1:
    return fn()
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  result = fn() if jax.process_index() == 0 else None
  _barriers += 1
  distributed.global_state.client.wait_at_barrier(
      f"genre_jax:{what}:{_barriers}", timeout_in_ms=timeout_s * 1000)
  return fn() if jax.process_index() != 0 else result


def to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded on the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()}


def prefetch_to_device(batches: Iterator[dict[str, np.ndarray]], sharding,
                       size: int = 2) -> Iterator[tuple[int, dict]]:
  """Builds host batches and copies them to the devices `size` ahead.

  A background thread runs the numpy batcher and starts each transfer, so
  the accelerator never waits for the host. Yields (number of real samples,
  device batch). Closing the generator (a `break`) stops the thread.
  """
  out: queue.Queue = queue.Queue(maxsize=max(size, 1))
  stop = threading.Event()
  done = object()

  def produce():
    try:
      for batch in batches:
        item = (int(batch["weights"].sum()), to_global(batch, sharding))
        while not stop.is_set():
          try:
            out.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      out.put(done)
    except BaseException as e:  # pylint: disable=broad-except
      out.put(e)  # re-raised in the consumer

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = out.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    while thread.is_alive():  # unblock a producer waiting on a full queue
      try:
        out.get_nowait()
      except queue.Empty:
        thread.join(timeout=0.05)


def abstract(tree):
  """ShapeDtypeStructs (with the arrays' shardings) of a tree of arrays: what
  Orbax restores into, and what compiling ahead of time reads."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, "sharding", None)),
      tree)


def check_batch_size(config: ml_collections.ConfigDict, section: str) -> None:
  """Fails with the config field's name unless config.<section>.batch_size
  is a positive multiple of the device count (each device takes a slice)."""
  size, devices = config[section].batch_size, jax.device_count()
  if not isinstance(size, int) or size < 1 or size % devices:
    raise ConfigError(f"config.{section}.batch_size={size!r} must be a "
                      f"positive multiple of the number of devices ({devices})")
