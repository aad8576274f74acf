"""The device mesh, batch placement and host-to-device prefetch.

The state is replicated and batches are sharded over a one-axis ("data") mesh
of every device of every process, so the same code runs on one CPU, several
fake CPU devices, one GPU or several hosts.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Iterator

import jax
import ml_collections
import numpy as np

from genre_jax.errors import ConfigError

P = jax.sharding.PartitionSpec


def make_mesh() -> jax.sharding.Mesh:
  """A one-axis mesh over every device of every process ("data" parallel)."""
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def maybe_initialize_distributed() -> None:
  """Joins a multi-process run when launched as one (env set by the launcher).

  `jax.distributed.initialize()` reads the coordinator address, process count
  and index from the cluster environment (SLURM, TPU pods, or the
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables).
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get(
      "SLURM_NTASKS", "1") != "1":
    jax.distributed.initialize()


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
